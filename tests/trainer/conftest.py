import pytest

from tests.conftest import tiny_model  # noqa: F401  (defined there; re-exported for importers)
from tests.trainer.helpers import make_dataset


@pytest.fixture(scope="session")
def dataset_root(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "ds", n=6, size=(56, 56))
