import pytest

from tests.trainer.helpers import make_dataset, make_tiny_depth_anything


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_tiny_depth_anything(tmp_path_factory.mktemp("model") / "tiny-dav2")


@pytest.fixture(scope="session")
def dataset_root(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "ds", n=6, size=(56, 56))
