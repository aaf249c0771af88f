"""Fixtures shared with tests/trainer: a tiny random-init model and a synthetic dataset."""

from tests.trainer.conftest import dataset_root, tiny_model  # noqa: F401
