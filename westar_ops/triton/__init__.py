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


@torch.library.custom_op(
    "westar_triton::sa_hdn_forward",
    mutates_args=(),
    device_types=_DEVICES,
    schema=cpp_schema("sa_hdn_forward"),
)
def sa_hdn_forward(
    pred: torch.Tensor,
    target: torch.Tensor,
    instances: torch.Tensor | None,
    valid: torch.Tensor | None,
    include_global: bool,
    eps: float,
    min_pixels: int,
    stats_grad: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _sa_hdn.sa_hdn_forward(
        pred, target, instances, valid, include_global, eps, min_pixels, stats_grad
    )


@torch.library.custom_op(
    "westar_triton::sa_hdn_backward",
    mutates_args=(),
    device_types=_DEVICES,
    schema=cpp_schema("sa_hdn_backward"),
)
def sa_hdn_backward(
    grad: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor,
    seg: torch.Tensor,
    stats: torch.Tensor,
    median_index: torch.Tensor,
    stats_grad: int,
) -> torch.Tensor:
    return _sa_hdn.sa_hdn_backward(grad, pred, target, seg, stats, median_index, stats_grad)


@torch.library.custom_op(
    "westar_triton::ordinal_ranking_forward",
    mutates_args=(),
    device_types=_DEVICES,
    schema=cpp_schema("ordinal_ranking_forward"),
)
def ordinal_ranking_forward(
    pred: torch.Tensor,
    pairs: torch.Tensor,
    labels: torch.Tensor,
    margin: float,
    kind: int,
    equal_weight: float,
) -> torch.Tensor:
    return _ordinal.ordinal_ranking_forward(pred, pairs, labels, margin, kind, equal_weight)


@torch.library.custom_op(
    "westar_triton::ordinal_ranking_backward",
    mutates_args=(),
    device_types=_DEVICES,
    schema=cpp_schema("ordinal_ranking_backward"),
)
def ordinal_ranking_backward(
    grad: torch.Tensor,
    pred: torch.Tensor,
    pairs: torch.Tensor,
    labels: torch.Tensor,
    margin: float,
    kind: int,
    equal_weight: float,
) -> torch.Tensor:
    return _ordinal.ordinal_ranking_backward(grad, pred, pairs, labels, margin, kind, equal_weight)


register_family("westar_triton")
