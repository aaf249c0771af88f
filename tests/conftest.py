"""Test-wide setup.

Triton's interpreter must be switched on before any module that defines a Triton kernel
is imported, so it is set here, first. On a machine with a GPU the real compiler is used.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random-init Depth Anything V2 saved with save_pretrained (one per session,
    shared by the trainer, annotate and sweep tests)."""
    from tests.trainer.helpers import make_tiny_depth_anything

    return make_tiny_depth_anything(tmp_path_factory.mktemp("model") / "tiny-dav2")


@pytest.fixture
def rng() -> torch.Generator:
    """A fresh, seeded generator per test (the seed is printed on failure by the test id)."""
    return torch.Generator().manual_seed(0)
