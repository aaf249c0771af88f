"""Test-wide setup.

Triton's interpreter must be switched on before any module that defines a Triton kernel
is imported, so it is set here, first. On a machine with a GPU the real compiler is used.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def rng() -> torch.Generator:
    """A fresh, seeded generator per test (the seed is printed on failure by the test id)."""
    return torch.Generator().manual_seed(0)
