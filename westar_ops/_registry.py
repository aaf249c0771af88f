"""What both op families share, with no import of ``ops`` or ``triton``: the constants of
the kernel interface, the schemas (read from the C++ library, the one place they are
declared), and the fake kernels and autograd formulas registered for each family.

``westar_ops.ops`` registers the C++ family (``torch.ops.westar_ops``) with this module;
``westar_ops.triton`` defines the Triton family (``torch.ops.westar_triton``) with the
C++ schemas and registers it here too. docs/internals.md describes the interface.
"""

from __future__ import annotations

import torch

from westar_ops import _loader  # noqa: F401  (loads the C++ library that defines the ops)

__all__ = ["NUM_STATS", "acc_dtype", "cpp_schema", "register_family", "register_lora"]

# Columns of the per-context stats tensor (csrc/include/westar/sa_hdn_math.h, SaHdnStat).
NUM_STATS = 8


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute and keep stats in: float64 for float64 inputs, else
    float32 (docs/ops.md, Precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cpp_schema(name: str) -> str:
    """The schema of ``westar_ops::<name>`` as declared in csrc/westar_ops.cpp, without the
    qualified name: ``"(Tensor pred, ...) -> Tensor"``, the form ``torch.library.custom_op``
    takes."""
    schema = str(getattr(torch.ops.westar_ops, name).default._schema)
    prefix = f"westar_ops::{name}"
    if not schema.startswith(prefix + "("):
        raise RuntimeError(f"unexpected schema of westar_ops::{name}: {schema}")
    return schema[len(prefix) :]


def register_family(namespace: str) -> None:
    """Register fake kernels and autograd formulas for one op family (idempotent per family)."""
    qual = f"{namespace}::"
    family = getattr(torch.ops, namespace)

    @torch.library.register_fake(qual + "sa_hdn_forward")
    def _sa_hdn_forward_fake(
        pred, target, instances, valid, include_global, eps, min_pixels, stats_grad
    ):
        batch, height, width = pred.shape
        levels = int(include_global) + (instances.shape[1] if instances is not None else 0)
        contexts = torch.library.get_ctx().new_dynamic_size()
        return (
            pred.new_empty(()),
            pred.new_empty((levels, batch, height, width), dtype=torch.int32),
            pred.new_empty((contexts, NUM_STATS), dtype=acc_dtype(pred.dtype)),
            pred.new_empty((contexts,), dtype=torch.int64),
        )

    @torch.library.register_fake(qual + "sa_hdn_backward")
    def _sa_hdn_backward_fake(grad, pred, target, seg, stats, median_index, stats_grad):
        return torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)

    def _sa_hdn_setup(ctx, inputs, output):
        pred, target, _instances, _valid, _glob, _eps, _minp, stats_grad = inputs
        _loss, seg, stats, median_index = output
        ctx.mark_non_differentiable(seg, stats, median_index)
        # Their gradients are never used: without this, autograd fills a zero tensor as
        # large as seg (levels x B x H x W) for every backward.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(pred, target, seg, stats, median_index)
        ctx.stats_grad = stats_grad

    def _sa_hdn_backward(ctx, grad_loss, _g_seg, _g_stats, _g_median):
        if grad_loss is None:  # no gradient reached the loss (grads are not materialized)
            return None, None, None, None, None, None, None, None
        pred, target, seg, stats, median_index = ctx.saved_tensors
        grad_pred = family.sa_hdn_backward(
            grad_loss, pred, target, seg, stats, median_index, ctx.stats_grad
        )
        return grad_pred, None, None, None, None, None, None, None

    torch.library.register_autograd(
        qual + "sa_hdn_forward", _sa_hdn_backward, setup_context=_sa_hdn_setup
    )

    @torch.library.register_fake(qual + "ordinal_ranking_forward")
    def _ordinal_forward_fake(pred, pairs, labels, margin, kind, equal_weight):
        return pred.new_empty(())

    @torch.library.register_fake(qual + "ordinal_ranking_backward")
    def _ordinal_backward_fake(grad, pred, pairs, labels, margin, kind, equal_weight):
        return torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)

    def _ordinal_setup(ctx, inputs, output):
        pred, pairs, labels, margin, kind, equal_weight = inputs
        ctx.save_for_backward(pred, pairs, labels)
        ctx.args = (margin, kind, equal_weight)

    def _ordinal_backward(ctx, grad_loss):
        pred, pairs, labels = ctx.saved_tensors
        grad_pred = family.ordinal_ranking_backward(grad_loss, pred, pairs, labels, *ctx.args)
        return grad_pred, None, None, None, None, None

    torch.library.register_autograd(
        qual + "ordinal_ranking_forward", _ordinal_backward, setup_context=_ordinal_setup
    )


def register_lora() -> None:
    """Fake kernel and autograd formula of the C++ lora_delta_sq_norm (every device)."""

    @torch.library.register_fake("westar_ops::lora_delta_sq_norm")
    def _lora_fake(A, B, scaling):
        return A.new_empty(())

    @torch.library.register_fake("westar_ops::lora_delta_sq_norm_backward")
    def _lora_backward_fake(grad, A, B, scaling):
        return torch.empty_like(A), torch.empty_like(B)

    def _setup(ctx, inputs, output):
        A, B, scaling = inputs
        ctx.save_for_backward(A, B)
        ctx.scaling = scaling

    def _backward(ctx, grad):
        A, B = ctx.saved_tensors
        grad_a, grad_b = torch.ops.westar_ops.lora_delta_sq_norm_backward(grad, A, B, ctx.scaling)
        return grad_a, grad_b, None

    torch.library.register_autograd(
        "westar_ops::lora_delta_sq_norm", _backward, setup_context=_setup
    )
