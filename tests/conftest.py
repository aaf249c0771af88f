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


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps one process-wide state (device, mixed precision): a test that
    trains in bf16 in this process (tests/trainer/test_gpu_check_tiny.py) must not leave
    it to the next test, whose Trainer asks for another precision."""
    yield
    import sys

    if "accelerate.state" in sys.modules:
        sys.modules["accelerate.state"].AcceleratorState._reset_state(reset_partial_state=True)
