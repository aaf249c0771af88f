"""Public ops: argument checks and backend choice (contract: docs/ops.md).

The kernels are torch custom ops in two families with identical schemas and identical
semantics (docs/internals.md):
- ``torch.ops.westar_ops.*``: C++, registered for the CPU and (when built) CUDA keys;
- ``torch.ops.westar_triton.*``: Triton, defined in :mod:`westar_ops.triton`.
Their fake kernels and autograd formulas come from :mod:`westar_ops._registry`, which
imports neither this module nor the Triton package. The public functions below pick the
family from ``backend`` and the tensors' device.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import SimpleNamespace
from typing import NamedTuple

import torch

from westar_ops._registry import acc_dtype, register_family, register_lora

__all__ = [
    "sa_hdn_loss",
    "NormalizationStats",
    "ordinal_ranking_loss",
    "normalized_ordinal_ranking_loss",
    "lora_delta_sq_norm",
    "available_backends",
    "resolve_backend",
    "debug_checks",
    "set_debug_checks",
]

BACKENDS = ("auto", "cpu", "triton", "cuda")
STATS_GRAD_MODES = {"none": 0, "scale": 1, "full": 2}
ORDINAL_KINDS = {"margin": 0, "logistic": 1}

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ID_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)
_INDEX_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
IGNORED_LABEL = -100  # a label outside {-1, 0, +1}: the pair is not used


class NormalizationStats(NamedTuple):
    """The per-image global contexts of one ``sa_hdn_loss`` call (``return_stats=True``),
    as its forward computed them (docs/internals.md); constants, no gradient.

    ``seg``: (B, H, W) int32, level 0 of the forward's ``seg``: the index k of the
    image's global context for every usable pixel, -1 for the others.
    ``stats``: (K, 8) per-context statistics of *all* contexts (columns in
    docs/internals.md: 0 median of pred, 1 its mean absolute deviation + eps, 6 S3,
    7 n). ``median_index``: (K,) int64 flat index b*H*W + y*W + x of each median.
    """

    seg: torch.Tensor
    stats: torch.Tensor
    median_index: torch.Tensor


# --------------------------------------------------------------------------- backends


def _cuda_built() -> bool:
    from westar_ops import _build_info

    return bool(_build_info.WITH_CUDA)


def _triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON_LOADED = False


def _triton_ops() -> SimpleNamespace:
    """The Triton family, imported on first use (importing triton is slow).

    After the first call this is a plain attribute lookup: torch.compile traces through
    it (dynamo refuses to trace importlib.import_module)."""
    global _TRITON_LOADED
    if not _TRITON_LOADED:
        try:
            importlib.import_module("westar_ops.triton")
        except ImportError as err:  # triton missing, or a kernel module failed to import
            raise RuntimeError(
                f"backend='triton' needs the triton package ({err}); "
                "install it with `pip install triton`"
            ) from err
        _TRITON_LOADED = True
    return torch.ops.westar_triton


def preload_triton() -> None:
    """Import the Triton family now when it can run here (a visible CUDA device, or
    Triton's interpreter), so that the first call of a compiled function needs no import
    (torch.compile cannot trace one). Elsewhere it stays lazy: importing triton is slow
    and useless on a CPU-only machine."""
    if importlib.util.find_spec("triton") is None:
        return
    if _triton_interpreter() or torch.cuda.is_available():
        try:
            _triton_ops()
        except RuntimeError:  # a broken triton install: backend="triton" reports it
            pass


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on ``device`` in this installation."""
    device = torch.device(device)
    found = []
    if device.type == "cpu":
        found.append("cpu")
        if _triton_interpreter() and importlib.util.find_spec("triton") is not None:
            found.append("triton")
    elif device.type == "cuda":
        if _cuda_built():
            found.append("cuda")
        if importlib.util.find_spec("triton") is not None:
            found.append("triton")
    return found


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn ``backend`` ("auto" | "cpu" | "triton" | "cuda") into a concrete backend.

    "auto" picks "cpu" for CPU tensors and, for CUDA tensors, the CUDA C++ kernels when
    the extension was built with them, else Triton.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"westar_ops runs on CPU and CUDA tensors, got device {device}")
    if backend == "auto":
        if device.type == "cpu":
            return "cpu"
        return "cuda" if _cuda_built() else "triton"
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
        if not _cuda_built():
            raise RuntimeError(
                "backend='cuda': westar_ops was built without CUDA kernels "
                "(rebuild with WESTAR_CUDA=1 and nvcc available, or use backend='triton')"
            )
    if backend == "triton" and device.type == "cpu" and not _triton_interpreter():
        raise RuntimeError(
            "backend='triton' on CPU tensors runs only under Triton's interpreter: set "
            "TRITON_INTERPRET=1 before westar_ops.triton is imported, or use backend='cpu'"
        )
    return backend


def _family(backend: str):
    return _triton_ops() if backend == "triton" else torch.ops.westar_ops


# ------------------------------------------------------------------- argument checks


def _check_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), "
            f"got {t.dtype}"
        )


def _image_view(name: str, t: torch.Tensor) -> torch.Tensor:
    """(B, H, W) or (B, 1, H, W) -> (B, H, W) view."""
    if t.dim() == 3:
        return t
    if t.dim() == 4 and t.shape[1] == 1:
        return t.squeeze(1)
    raise ValueError(f"{name} must have shape (B, H, W) or (B, 1, H, W), got {tuple(t.shape)}")


def _check_device(name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but pred is on {ref.device}")


def _check_valid(valid, pred: torch.Tensor, pred3: torch.Tensor) -> torch.Tensor:
    """`valid` as a (B, H, W) bool view matching pred3 (pred's (B, H, W) view), checked."""
    valid = _check_tensor("valid", valid)
    _check_device("valid", valid, pred)
    if valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool tensor, got {valid.dtype}")
    valid = _image_view("valid", valid)
    if valid.shape != pred3.shape:
        raise ValueError(
            f"valid must have shape (B, H, W) = {tuple(pred3.shape)}, got {tuple(valid.shape)}"
        )
    return valid


def _eager() -> bool:
    """Data-dependent checks (values, not shapes) run in eager mode only."""
    return not torch.compiler.is_compiling()


_DEBUG_CHECKS: bool | None = None  # None: the WESTAR_OPS_DEBUG environment variable


def set_debug_checks(enabled: bool | None) -> None:
    """Switch the GPU backends' data checks on or off (None: follow WESTAR_OPS_DEBUG).

    The CUDA and Triton kernels never wait for the host: a bad instance id, more contexts
    than ``max_contexts`` or a used ordinal pair outside the image makes the loss NaN
    (fast mode, the default). With debug checks on, in eager mode and outside CUDA graph
    capture, the wrappers read the kernels' error flags back (one host sync per call) and
    raise the errors of docs/ops.md instead. The CPU backend always raises them.
    """
    global _DEBUG_CHECKS
    _DEBUG_CHECKS = None if enabled is None else bool(enabled)


def debug_checks() -> bool:
    """Whether the GPU backends' data checks are on (see :func:`set_debug_checks`)."""
    if _DEBUG_CHECKS is not None:
        return _DEBUG_CHECKS
    return os.environ.get("WESTAR_OPS_DEBUG", "0") not in ("", "0")


def _host_checks(backend: str) -> bool:
    """Whether this call may read device values back to raise: the CPU backend always
    (eager), the GPU backends only with debug checks on, never while compiling or
    capturing a CUDA graph."""
    if not _eager():
        return False
    if backend == "cpu":
        return True
    if not debug_checks():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _raise_sa_hdn_info(info: torch.Tensor, instances, max_contexts: int) -> None:
    """The errors of docs/ops.md from a GPU kernel's info (K, N, first negative id,
    first id >= 2^31; positions flat in instances (B, L, H, W))."""
    found, _n, neg, huge = (int(v) for v in info.tolist())
    for at, negative in ((neg, True), (huge, False)):
        if at < 0:
            continue
        _b, levels, height, width = instances.shape
        x, y, bl = at % width, (at // width) % height, at // (height * width)
        where = f"instances[{bl // levels}, {bl % levels}, {y}, {x}]"
        if negative:
            raise ValueError(
                "instances must hold ids >= 0 (0 = no instance); found a negative id at " + where
            )
        raise ValueError("instances must hold ids < 2^31; found a larger id at " + where)
    if max_contexts > 0 and found > max_contexts:
        raise ValueError(
            f"sa_hdn: the batch has {found} contexts, more than max_contexts = {max_contexts}"
        )


def _prepare_sa_hdn(pred, target, instances, valid, eps, min_pixels, stats_grad):
    pred = _check_tensor("pred", pred)
    _check_float("pred", pred)
    pred3 = _image_view("pred", pred)
    target = _check_tensor("target", target)
    _check_float("target", target)
    _check_device("target", target, pred)
    target3 = _image_view("target", target)
    if target3.shape != pred3.shape:
        raise ValueError(
            f"target must have the shape of pred {tuple(pred.shape)}, got {tuple(target.shape)}"
        )
    if target3.dtype != pred3.dtype:
        # Mixed dtypes (e.g. a float32 teacher, a half student): run the kernel in pred's
        # compute dtype (float32 for half pred, as the kernels compute anyway), so that a
        # wider target is neither rounded nor overflowed to inf (= dropped pixels) by a
        # cast to pred's dtype. The caller casts the loss back to pred's dtype.
        compute = acc_dtype(pred3.dtype)
        pred3 = pred3.to(compute)
        target3 = target3.to(compute)
    batch, height, width = pred3.shape
    if instances is not None:
        instances = _check_tensor("instances", instances)
        _check_device("instances", instances, pred)
        if instances.dtype not in _ID_DTYPES:
            raise TypeError(
                "instances must be an integer tensor (uint8, int16, int32 or int64), "
                f"got {instances.dtype}"
            )
        if instances.dim() == 3:
            instances = instances.unsqueeze(1)
        if instances.dim() != 4 or (
            instances.shape[0],
            instances.shape[2],
            instances.shape[3],
        ) != (batch, height, width):
            raise ValueError(
                f"instances must have shape (B, H, W) or (B, L, H, W) with (B, H, W) = "
                f"{(batch, height, width)}, got {tuple(instances.shape)}"
            )
    if valid is not None:
        valid = _check_valid(valid, pred, pred3)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if isinstance(min_pixels, bool) or not isinstance(min_pixels, int):
        raise TypeError(f"min_pixels must be an int, got {type(min_pixels).__name__}")
    if min_pixels < 0:
        raise ValueError(f"min_pixels must be >= 0, got {min_pixels}")
    if stats_grad not in STATS_GRAD_MODES:
        raise ValueError(f"stats_grad must be one of {tuple(STATS_GRAD_MODES)}, got {stats_grad!r}")
    return pred3, target3, instances, valid


def _prepare_ordinal(pred, pairs, labels, kind, check_bounds: bool):
    pred = _check_tensor("pred", pred)
    _check_float("pred", pred)
    pred3 = _image_view("pred", pred)
    batch, height, width = pred3.shape
    pairs = _check_tensor("pairs", pairs)
    labels = _check_tensor("labels", labels)
    _check_device("pairs", pairs, pred)
    _check_device("labels", labels, pred)
    if pairs.dtype not in _INDEX_DTYPES:
        raise TypeError(f"pairs must be an integer tensor, got {pairs.dtype}")
    if labels.dtype not in _INDEX_DTYPES:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if pairs.dim() != 4 or pairs.shape[0] != batch or pairs.shape[2:] != (2, 2):
        raise ValueError(
            f"pairs must have shape (B, P, 2, 2) with B = {batch}, got {tuple(pairs.shape)}"
        )
    if labels.shape != pairs.shape[:2]:
        raise ValueError(
            f"labels must have shape (B, P) = {tuple(pairs.shape[:2])} to match pairs, "
            f"got {tuple(labels.shape)}"
        )
    if kind not in ORDINAL_KINDS:
        raise ValueError(f"kind must be one of {tuple(ORDINAL_KINDS)}, got {kind!r}")
    pairs = pairs.to(torch.int64).contiguous()
    labels = labels.to(torch.int64).contiguous()
    if check_bounds and pairs.numel() > 0:
        used = ((labels >= -1) & (labels <= 1))[..., None, None]
        y, x = pairs[..., 0], pairs[..., 1]
        outside = used & ((y < 0) | (y >= height) | (x < 0) | (x >= width))[..., None]
        if bool(outside.any()):
            b, p = (int(i) for i in outside.nonzero()[0][:2])
            raise ValueError(
                f"pairs[{b}, {p}] = {pairs[b, p].tolist()} lies outside the {height}x{width} "
                f"image (batch index {b}, pair {p}); coordinates are (y, x)"
            )
    return pred3, pairs, labels


# ------------------------------------------------------------------------ public ops


def sa_hdn_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    instances: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    *,
    include_global: bool = True,
    eps: float = 1e-6,
    min_pixels: int = 1,
    stats_grad: str = "full",
    backend: str = "auto",
    return_stats: bool = False,
    max_contexts: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, NormalizationStats]:
    """Semantics-aware hierarchical depth normalization loss (docs/ops.md).

    Args:
        pred: (B, H, W) or (B, 1, H, W) prediction, float16/bfloat16/float32/float64.
        target: same shape; the pseudo-label or ground truth (no gradient). If its
            dtype differs from pred's, both are computed in pred's compute dtype
            (float32 for half pred, else pred's dtype).
        instances: None, (B, H, W) or (B, L, H, W) integer ids; every id > 0 of a level
            is one context, 0 means none. Ids may be sparse and up to 2**31 - 1;
            a negative id or one of 2**31 and above raises ValueError. At most
            2**31 - 2 memberships (levels x B x H x W; docs/ops.md, Limits).
        valid: None or (B, H, W) bool; pixels that are False, or whose target is not
            finite, belong to no context.
        include_global: add one context of all valid pixels per image.
        eps: added to the mean absolute deviation before dividing.
        min_pixels: contexts with fewer valid pixels are skipped.
        stats_grad: "full" (differentiate median and scale of pred), "scale" (scale
            only) or "none" (both treated as constants).
        backend: "auto" | "cpu" | "triton" | "cuda".
        return_stats: also return the global contexts' statistics that the forward
            computed anyway (`NormalizationStats`, for
            `normalized_ordinal_ranking_loss`); needs include_global=True.
        max_contexts: None, or an upper bound on the number of contexts of the batch
            (e.g. B * (1 + L * (largest id))): the GPU kernels size their per-context
            arrays by it instead of the bound the shapes give (docs/ops.md, Capacity).
            More contexts than this: ValueError on the CPU (and with debug checks), a
            NaN loss on the GPU backends.

    Returns:
        0-dim tensor of pred's dtype: mean |pred_hat - target_hat| over all
        (context, pixel) memberships; 0 when the batch has no context.
        With return_stats: ``(loss, NormalizationStats)``.
    """
    pred3, target3, instances, valid = _prepare_sa_hdn(
        pred, target, instances, valid, eps, min_pixels, stats_grad
    )
    if return_stats and not include_global:
        raise ValueError(
            "return_stats=True needs include_global=True: the stats are those of the "
            "per-image global contexts"
        )
    if max_contexts is not None and (
        isinstance(max_contexts, bool) or not isinstance(max_contexts, int) or max_contexts < 1
    ):
        raise ValueError(f"max_contexts must be None or an int >= 1, got {max_contexts!r}")
    cap = int(max_contexts or 0)
    resolved = resolve_backend(backend, pred.device)
    family = _family(resolved)
    loss, seg, stats, median_index, info = family.sa_hdn_forward(
        pred3,
        target3,
        instances,
        valid,
        bool(include_global),
        float(eps),
        int(min_pixels),
        STATS_GRAD_MODES[stats_grad],
        cap,
    )
    if resolved != "cpu" and _host_checks(resolved):
        _raise_sa_hdn_info(info, instances, cap)
    if return_stats:
        return loss.to(pred.dtype), NormalizationStats(seg[0], stats, median_index)
    return loss.to(pred.dtype)


def ordinal_ranking_loss(
    pred: torch.Tensor,
    pairs: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float = 0.0,
    kind: str = "margin",
    equal_weight: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Batched pairwise ordinal loss (docs/ops.md).

    Args:
        pred: (B, H, W) or (B, 1, H, W) floating.
        pairs: (B, P, 2, 2) integer pixel coordinates, pairs[b, p, 0] = (y_a, x_a),
            pairs[b, p, 1] = (y_b, x_b).
        labels: (B, P) integer: +1 wants pred[a] > pred[b], -1 wants pred[a] < pred[b],
            0 wants equality; any other value (e.g. -100) marks an ignored pair, whose
            coordinates are not read.
        margin: hinge margin of kind="margin".
        kind: "margin" (max(0, margin - l d)) or "logistic" (log(1 + exp(-l d))).
        equal_weight: weight of the squared difference for label 0.
        backend: "auto" | "cpu" | "triton" | "cuda".

    Returns:
        0-dim tensor of pred's dtype: the mean over used pairs (0 if none).
    """
    resolved = resolve_backend(backend, pred.device)
    # The CPU kernel raises for pairs outside the image itself; the GPU kernels make the
    # loss NaN (fast mode), so the wrapper checks here only with debug checks.
    check = resolved != "cpu" and _host_checks(resolved)
    pred3, pairs, labels = _prepare_ordinal(pred, pairs, labels, kind, check)
    family = _family(resolved)
    loss, _count = family.ordinal_ranking_forward(
        pred3, pairs, labels, float(margin), ORDINAL_KINDS[kind], float(equal_weight)
    )
    return loss


# ------------------------------------------------------- normalized ordinal ranking


class _NormalizedPairValues(torch.autograd.Function):
    """The pair pixels' values normalized by their image's global context,
    (p[y, x] - t_b) / D_b, with the exact derivative with respect to pred
    (docs/ops.md, normalized_ordinal_ranking_loss).

    Forward: a gather of the 2P pair pixels per image; the statistics are the inputs'
    ``rows`` (B, 8) (columns of docs/internals.md; a dummy row with D = n = 1 where
    ``has`` is False), so there is no pass over the image. Backward: the pair pixels get
    g / D; with ``mode`` "scale" or "full" every pixel j of a context gets
    dL/dD * dD/dp_j, dD/dp_j = (sign(p_j - t) - [j == median] S3) / n (one elementwise
    pass), and with "full" the median pixel also gets dL/dt. ``ends`` (B, 2P) marks the
    ends of the used pairs (the others are 0 and get no gradient). ``member``: the (B, H, W)
    int32 global-context map (>= 0 inside), a bool usable mask, or None (every pixel).
    """

    @staticmethod
    def forward(ctx, pred3, member, rows, median_index, has, ys, xs, ends, mode):
        batch = pred3.shape[0]
        t, d = rows[:, 0:1], rows[:, 1:2]
        b_index = torch.arange(batch, device=pred3.device)[:, None]
        values = pred3[b_index, ys, xs].to(rows.dtype)
        normalized = torch.where(ends, (values - t) / d, 0)
        ctx.save_for_backward(pred3, member, rows, median_index, has, ys, xs, ends, normalized)
        ctx.mode = mode
        return normalized

    @staticmethod
    def backward(ctx, grad):
        pred3, member, rows, median_index, has, ys, xs, ends, normalized = ctx.saved_tensors
        batch, height, width = pred3.shape
        cdt = rows.dtype
        t, d, s3, n = rows[:, 0], rows[:, 1], rows[:, 6], rows[:, 7]
        grad = torch.where(ends, grad, 0) / d[:, None]  # d loss / d p at the pair pixels
        if ctx.mode == "none":
            out = torch.zeros((batch, height, width), dtype=cdt, device=pred3.device)
        else:
            # d loss / d D = -sum_i g_i (p_i - t) / D^2; spread by dD/dp_j = sign(p_j - t) / n
            coef = torch.where(has, -(grad * normalized).sum(1) / n, 0)
            out = torch.empty((batch, height, width), dtype=cdt, device=pred3.device)
            torch.sub(pred3.to(cdt), t[:, None, None], out=out)  # contiguous, any pred strides
            out.sign_()
            out.mul_(coef[:, None, None])
            if member is not None:  # times a float mask: faster than where / masked_fill
                inside = member if member.dtype == torch.bool else member >= 0
                out.mul_(inside.to(cdt))
        flat = out.view(-1)
        size = height * width
        offsets = torch.arange(batch, device=pred3.device)[:, None] * size
        flat.index_put_(
            ((offsets + ys * width + xs).reshape(-1),), grad.reshape(-1), accumulate=True
        )
        if ctx.mode == "full":  # the median's own path and the scale's path through it
            grad_t = torch.where(has, -grad.sum(1), 0)
            flat.index_put_((median_index,), grad_t - coef * s3, accumulate=True)
        return out.to(pred3.dtype), None, None, None, None, None, None, None, None


def _torch_global_stats(pred3, usable, eps):
    """Each image's lower median t, D = mean |p - t| + eps, S3 = sum sign(p - t) and n
    over its usable pixels, with torch (one selection and two reductions over the image).

    Returns rows (B, 8) in the stats layout of docs/internals.md (columns 0, 1, 6, 7
    filled; D = 1 and n = 1 for an image without usable pixels), median_index (B,) flat
    indices, has (B,) bool. No host synchronization: the per-image median ranks differ
    with the number of usable pixels, so unusable pixels are set to -inf or +inf in a
    number that puts every image's lower median at the same rank (N - 1) // 2, where one
    ``kthvalue`` finds them all.
    """
    batch, height, width = pred3.shape
    size = height * width
    cdt = acc_dtype(pred3.dtype)
    x = pred3.reshape(batch, size).to(cdt)
    rank = (size - 1) // 2
    if usable is None:
        n = torch.full((batch,), size, dtype=cdt, device=x.device)
        keyed = x
    else:
        ok = usable.reshape(batch, size)
        count = ok.sum(1)
        n = count.to(cdt)
        # m_b = rank - (n_b - 1) // 2 unusable pixels go below every value, the rest above
        # (m_b <= number of unusable pixels, for every n_b >= 1).
        below = rank - torch.div(count - 1, 2, rounding_mode="floor")
        order = torch.cumsum(~ok, 1)
        keyed = torch.where(ok, x, torch.where(order <= below[:, None], -torch.inf, torch.inf))
    t, index = keyed.kthvalue(rank + 1, dim=1)
    dev = x - t[:, None]
    absdev = dev.abs()
    signs = torch.sign(dev)
    if usable is not None:
        absdev = torch.where(ok, absdev, 0)
        signs = torch.where(ok, signs, 0)
    has = n > 0
    n_safe = torch.where(has, n, 1.0)
    d = torch.where(has, absdev.sum(1) / n_safe + eps, 1.0)
    t = torch.where(has, t, 0)
    rows = torch.zeros((batch, 8), dtype=cdt, device=x.device)
    rows[:, 0], rows[:, 1], rows[:, 6], rows[:, 7] = t, d, signs.sum(1), n_safe
    median_index = index + torch.arange(batch, device=x.device) * size
    return rows, median_index, has


def _check_stats(stats, pred3) -> NormalizationStats:
    if not isinstance(stats, tuple) or len(stats) != 3:
        raise TypeError(
            "stats must be the NormalizationStats returned by "
            f"sa_hdn_loss(..., return_stats=True), got {type(stats).__name__}"
        )
    seg, table, median_index = (_check_tensor(f"stats.{f}", v) for f, v in zip(
        NormalizationStats._fields, stats
    ))  # fmt: skip
    for name, t in (("seg", seg), ("stats", table), ("median_index", median_index)):
        _check_device(f"stats.{name}", t, pred3)
    if seg.dtype != torch.int32 or seg.shape != pred3.shape:
        raise ValueError(
            f"stats.seg must be (B, H, W) = {tuple(pred3.shape)} int32 (the stats of this "
            f"pred), got {tuple(seg.shape)} {seg.dtype}"
        )
    if table.dim() != 2 or table.shape[1] != 8 or median_index.shape != table.shape[:1]:
        raise ValueError(
            f"stats.stats must be (K, 8) and stats.median_index (K,), got "
            f"{tuple(table.shape)} and {tuple(median_index.shape)}"
        )
    return NormalizationStats(seg, table, median_index)


def normalized_ordinal_ranking_loss(
    pred: torch.Tensor,
    pairs: torch.Tensor,
    labels: torch.Tensor,
    *,
    stats: NormalizationStats | None = None,
    valid: torch.Tensor | None = None,
    eps: float = 1e-6,
    stats_grad: str = "full",
    margin: float = 0.0,
    kind: str = "margin",
    equal_weight: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """The ordinal ranking loss of the prediction normalized per image by its global
    context: p_hat = (p - t_b) / (s_b + eps), t_b the lower median and s_b the mean
    absolute deviation of pred over the image's usable pixels (docs/ops.md). The loss is
    invariant to a positive scale and to a shift of pred; ``margin`` is in normalized
    units.

    Args:
        pred: (B, H, W) or (B, 1, H, W) floating.
        pairs, labels, margin, kind, equal_weight, backend: as `ordinal_ranking_loss`.
        stats: the `NormalizationStats` of ``sa_hdn_loss(pred, ..., return_stats=True)``
            on this same pred: the normalization is read from them (no pass over the
            image in the forward; t, s + eps and the usable pixels are the SA-HDN
            global context's, with SA-HDN's eps). None: computed here with torch over
            the pixels where ``valid`` is True (all if None): an extra selection and
            two reductions over the image.
        valid: None or (B, H, W) bool; only with stats=None.
        eps: added to s_b; only with stats=None.
        stats_grad: "full" (differentiate t_b and s_b), "scale" (s_b only) or "none".

    Pairs with an unusable end (and every pair of an image without usable pixels) are
    ignored, like padding pairs. Returns a 0-dim tensor of pred's dtype: the mean over
    the used pairs, 0 when there are none.
    """
    resolved = resolve_backend(backend, pred.device)
    # The pair pixels are gathered here, before any kernel: the bounds are checked in
    # eager mode on the CPU (an error) and with debug checks; otherwise a used pair
    # outside the image is clamped and makes the loss NaN (as the GPU kernels do).
    pred3, pairs, labels = _prepare_ordinal(pred, pairs, labels, kind, _host_checks(resolved))
    if stats_grad not in STATS_GRAD_MODES:
        raise ValueError(f"stats_grad must be one of {tuple(STATS_GRAD_MODES)}, got {stats_grad!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if stats is not None:
        stats = _check_stats(stats, pred3)
        if valid is not None:
            raise ValueError(
                "valid: give it to sa_hdn_loss, not here, when stats are given (the "
                "stats define the usable pixels)"
            )
    elif valid is not None:
        valid = _check_valid(valid, pred, pred3)
    family = _family(resolved)
    args = (float(margin), ORDINAL_KINDS[kind], float(equal_weight))
    batch, height, width = pred3.shape
    num_pairs = pairs.shape[1]
    if num_pairs == 0 or pred3.numel() == 0:  # no pair can be used: 0, zero gradient
        return family.ordinal_ranking_forward(pred3, pairs, labels, *args)[0]

    cdt = acc_dtype(pred3.dtype)
    used = (labels >= -1) & (labels <= 1)  # (B, P)
    y, x = pairs[..., 0], pairs[..., 1]  # (B, P, 2)
    outside = ((y < 0) | (y >= height) | (x < 0) | (x >= width)).any(-1) & used
    ys = torch.where(used[..., None], y.clamp(0, height - 1), 0).reshape(batch, 2 * num_pairs)
    xs = torch.where(used[..., None], x.clamp(0, width - 1), 0).reshape(batch, 2 * num_pairs)
    rows_b = torch.arange(batch, device=pred3.device)[:, None]
    if stats is not None:
        member = stats.seg
        k = member[rows_b, ys, xs]  # (B, 2P) the global context of each pair pixel
        inside = k >= 0
        # (B,) -1: none (also for no used pair)
        k = torch.where(used.repeat_interleave(2, 1), k, -1).amax(1).long()
        table = stats.stats.to(cdt)
        dummy = table.new_zeros((1, 8))  # D = n = 1: an image without a context
        dummy[:, 1] = 1
        dummy[:, 7] = 1
        rows = torch.cat([table, dummy])[k]  # k = -1 picks the dummy row
        median_index = torch.cat([stats.median_index, stats.median_index.new_zeros(1)])[k]
        has = k >= 0
    else:
        member = valid
        rows, median_index, has = _torch_global_stats(pred3.detach(), valid, eps)
        inside = has[:, None].expand(batch, 2 * num_pairs)
        if valid is not None:
            inside = inside & valid[rows_b, ys, xs]
    ok = (inside.reshape(batch, num_pairs, 2).all(-1) & used) | outside
    labels = torch.where(ok, labels, IGNORED_LABEL)
    ends = ok.repeat_interleave(2, dim=1)  # (B, 2P): the ends of the used pairs
    normalized = _NormalizedPairValues.apply(
        pred3, member, rows, median_index, has, ys, xs, ends, stats_grad
    )  # (B, 2P): the a and b ends of pair p at 2p and 2p + 1 (0 for unused pairs)
    normalized = torch.where(outside.repeat_interleave(2, dim=1), float("nan"), normalized)
    flat = torch.arange(2 * num_pairs, device=pred3.device).reshape(1, num_pairs, 2)
    new_pairs = torch.stack([torch.zeros_like(flat), flat], -1).expand(batch, -1, -1, -1)
    loss, _count = family.ordinal_ranking_forward(
        normalized.unsqueeze(1), new_pairs.contiguous(), labels.contiguous(), *args
    )
    return loss.to(pred.dtype)


def lora_delta_sq_norm(
    A: torch.Tensor, B: torch.Tensor, scaling: float, *, backend: str = "auto"
) -> torch.Tensor:
    """|| scaling * B @ A ||_F^2 via the r x r Gram matrices (docs/ops.md).

    A: (r, d_in), B: (d_out, r), floating, same dtype and device. The op is written
    with ATen matrix products, so every backend runs the same code; ``backend`` is
    checked for consistency with the tensors' device only.
    """
    A = _check_tensor("A", A)
    B = _check_tensor("B", B)
    _check_float("A", A)
    _check_float("B", B)
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(
            f"A must be (r, d_in) and B (d_out, r) with the same r, got A {tuple(A.shape)} "
            f"and B {tuple(B.shape)}"
        )
    if B.device != A.device:
        raise ValueError(f"B is on {B.device} but A is on {A.device}")
    if B.dtype != A.dtype:
        raise TypeError(f"A and B must share a dtype, got {A.dtype} and {B.dtype}")
    if backend != "triton":
        resolve_backend(backend, A.device)
    elif backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return torch.ops.westar_ops.lora_delta_sq_norm(A, B, float(scaling))


register_family("westar_ops")
register_lora()
