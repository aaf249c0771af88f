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

__all__ = [
    "NUM_STATS",
    "INFO_SIZE",
    "acc_dtype",
    "context_capacity",
    "cpp_schema",
    "register_family",
    "register_lora",
]

# Columns of the per-context stats tensor (csrc/include/westar/sa_hdn_math.h, SaHdnStat).
NUM_STATS = 8
# sa_hdn_forward's info (int64): K found, N memberships, flat position in instances of the
# first negative id and of the first id >= 2^31 (-1: none). docs/internals.md.
INFO_SIZE = 4

_ID_MAX = {torch.uint8: 255, torch.int8: 127, torch.int16: 32767}


def context_capacity(
    pred, instances, include_global: bool, min_pixels: int, max_contexts: int
) -> int:
    """Rows of the GPU kernels' stats and median_index (docs/internals.md, Capacity), from
    the shapes alone: ``max_contexts`` when > 0, else one global context per image plus,
    per instance level and image, min(H*W // max(min_pixels, 1), the dtype's largest id).
    Mirrors westar::context_capacity (csrc/include/westar/op_checks.h)."""
    if max_contexts > 0:
        return int(max_contexts)
    batch, height, width = pred.shape
    cap = batch if include_global else 0
    if instances is not None and instances.shape[1] > 0:
        id_max = _ID_MAX.get(instances.dtype, 2**31 - 1)
        per_plane = min((height * width) // max(int(min_pixels), 1), id_max)
        cap += instances.shape[1] * batch * per_plane
    return cap


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

    # The CPU kernel returns exactly K rows (it knows K on the host anyway); the GPU
    # kernels (and the Triton family everywhere) return a capacity known from the shapes,
    # so that no output shape depends on the data (CUDA graphs, no host sync).
    exact_on_cpu = namespace == "westar_ops"

    @torch.library.register_fake(qual + "sa_hdn_forward")
    def _sa_hdn_forward_fake(
        pred, target, instances, valid, include_global, eps, min_pixels, stats_grad, max_contexts=0
    ):
        batch, height, width = pred.shape
        levels = int(include_global) + (instances.shape[1] if instances is not None else 0)
        if exact_on_cpu and pred.device.type == "cpu":
            contexts = torch.library.get_ctx().new_dynamic_size()
        else:
            contexts = context_capacity(pred, instances, include_global, min_pixels, max_contexts)
        return (
            pred.new_empty(()),
            pred.new_empty((levels, batch, height, width), dtype=torch.int32),
            pred.new_empty((contexts, NUM_STATS), dtype=acc_dtype(pred.dtype)),
            pred.new_empty((contexts,), dtype=torch.int64),
            pred.new_empty((INFO_SIZE,), dtype=torch.int64),
        )

    @torch.library.register_fake(qual + "sa_hdn_backward")
    def _sa_hdn_backward_fake(grad, pred, target, seg, stats, median_index, stats_grad, info=None):
        return torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)

    def _sa_hdn_setup(ctx, inputs, output):
        pred, target, _instances, _valid, _glob, _eps, _minp, stats_grad, *_cap = inputs
        _loss, seg, stats, median_index, info = output
        ctx.mark_non_differentiable(seg, stats, median_index, info)
        # Their gradients are never used: without this, autograd fills a zero tensor as
        # large as seg (levels x B x H x W) for every backward.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(pred, target, seg, stats, median_index, info)
        ctx.stats_grad = stats_grad
        ctx.num_inputs = len(inputs)

    def _sa_hdn_backward(ctx, grad_loss, *_unused):
        nones = (None,) * (ctx.num_inputs - 1)
        if grad_loss is None:  # no gradient reached the loss (grads are not materialized)
            return (None, *nones)
        pred, target, seg, stats, median_index, info = ctx.saved_tensors
        grad_pred = family.sa_hdn_backward(
            grad_loss, pred, target, seg, stats, median_index, ctx.stats_grad, info
        )
        return (grad_pred, *nones)

    torch.library.register_autograd(
        qual + "sa_hdn_forward", _sa_hdn_backward, setup_context=_sa_hdn_setup
    )

    @torch.library.register_fake(qual + "ordinal_ranking_forward")
    def _ordinal_forward_fake(pred, pairs, labels, margin, kind, equal_weight):
        return pred.new_empty(()), pred.new_empty((), dtype=torch.int64)

    @torch.library.register_fake(qual + "ordinal_ranking_backward")
    def _ordinal_backward_fake(grad, pred, pairs, labels, margin, kind, equal_weight, count=None):
        return torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)

    def _ordinal_setup(ctx, inputs, output):
        pred, pairs, labels, margin, kind, equal_weight = inputs
        _loss, count = output
        ctx.mark_non_differentiable(count)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(pred, pairs, labels, count)
        ctx.args = (margin, kind, equal_weight)

    def _ordinal_backward(ctx, grad_loss, _g_count):
        if grad_loss is None:
            return None, None, None, None, None, None
        pred, pairs, labels, count = ctx.saved_tensors
        grad_pred = family.ordinal_ranking_backward(
            grad_loss, pred, pairs, labels, *ctx.args, count
        )
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
