"""Shared setup of the Triton backend tests (run under Triton's interpreter without a GPU).

tests/conftest.py sets TRITON_INTERPRET=1 before anything imports Triton when no GPU is
present. Images stay tiny (the interpreter runs every kernel program in Python).
"""

import os

import pytest
import torch

triton = pytest.importorskip("triton")

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

import westar_ops.triton  # noqa: E402,F401  (registers torch.ops.westar_triton)
from westar_ops.triton import sa_hdn as triton_sa_hdn  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def big_path(monkeypatch):
    """Route every context with more than 4 members through the tiled radix-select path
    (tiles of 16), so that tiny test images exercise it."""
    monkeypatch.setattr(triton_sa_hdn, "SMALL_SIZES", (2, 4))
    monkeypatch.setattr(triton_sa_hdn, "TILE", 16)
