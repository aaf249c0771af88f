import pytest

from tests.trainer.helpers import make_dataset

# tiny_model: tests/conftest.py


@pytest.fixture(scope="session")
def dataset_root(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "ds", n=6, size=(56, 56))
