"""Triton backend of westar_ops: the ``torch.ops.westar_triton`` op family.

The four ops take their schemas from the registered C++ ops (declared once, in
csrc/westar_ops.cpp) and give the same results (docs/internals.md). They are ``torch.library.custom_op`` with
``mutates_args=()`` for the "cuda" and "cpu" device types (CPU tensors run under Triton's
interpreter, ``TRITON_INTERPRET=1`` set before this package is imported); the fake
kernels and autograd formulas come from :func:`westar_ops._registry.register_family`.
Kernels and their cost account: docs/triton_kernels.md.
"""

from __future__ import annotations

import torch

from westar_ops._registry import cpp_schema, register_family
from westar_ops.triton import ordinal as _ordinal
from westar_ops.triton import sa_hdn as _sa_hdn

__all__ = [
    "sa_hdn_forward",
    "sa_hdn_backward",
    "ordinal_ranking_forward",
    "ordinal_ranking_backward",
]

_DEVICES = ("cuda", "cpu")


def _define(name: str, fn):
    """``westar_triton::<name>`` implemented by ``fn``, with the C++ op's schema."""
    return torch.library.custom_op(
        f"westar_triton::{name}", mutates_args=(), device_types=_DEVICES, schema=cpp_schema(name)
    )(fn)


sa_hdn_forward = _define("sa_hdn_forward", _sa_hdn.sa_hdn_forward)
sa_hdn_backward = _define("sa_hdn_backward", _sa_hdn.sa_hdn_backward)
ordinal_ranking_forward = _define("ordinal_ranking_forward", _ordinal.ordinal_ranking_forward)
ordinal_ranking_backward = _define("ordinal_ranking_backward", _ordinal.ordinal_ranking_backward)

register_family("westar_triton")
