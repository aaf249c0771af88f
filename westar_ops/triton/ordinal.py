"""Triton kernels of ``westar_triton::ordinal_ranking_forward`` / ``_backward``.

Contract: docs/internals.md; per-pair math of csrc/include/westar/ordinal_math.h.

Forward (one kernel after a 4-byte zero fill): ``_pair_loss_kernel`` gathers
d = pred[a] - pred[b] for a block of pairs and writes the block's loss sum and used-pair
count; the last program to arrive (an atomic counter) adds the block partials in block
order and writes the loss and M, the number of used pairs: deterministic. M is an output
(the backward reads it).

Backward, with the forward's M (without it, ``_count_kernel`` counts the pairs again):
- default (1 launch): ``_scatter_kernel`` adds grad/M * g to grad_pred[a] and subtracts
  it at b with atomics (the order in which pairs sharing a pixel add up is not fixed, so
  the last bits may vary run to run);
- when ``torch.are_deterministic_algorithms_enabled()``:
  ``_contrib_kernel`` writes the signed contribution and the target pixel of both ends
  of every pair, ``torch.sort(stable=True)`` groups the contributions by pixel (pair
  order kept inside a pixel), and ``_segment_sum_kernel`` lets the first contribution of
  every pixel add the pixel's run serially in pair order and store it: no atomics, the
  gradient is bitwise repeatable (and adds in the CPU kernel's order).

A used pair outside the image cannot raise without a host sync: its loads are masked, it
adds NaN to the loss (the device-side error) and no gradient; the public wrapper raises
the error instead with debug checks (westar_ops.set_debug_checks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from westar_ops._registry import acc_dtype
from westar_ops.triton._common import device_guard

__all__ = ["ordinal_ranking_forward", "ordinal_ranking_backward"]

BLOCK_PAIRS = 256
BLOCK_REDUCE = 256


@triton.jit
def _log1p(u):
    """log(1 + u) for u in [0, 1], accurate for small u (Goldberg's correction)."""
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))


@triton.jit
def _pair_d(pred_ptr, pairs_ptr, labels_ptr, i, m, P, H, W, psb, psh, psw, acc: tl.constexpr):
    """Label, used flag, flat a/b pixel indices and d = pred[a] - pred[b] of pairs i."""
    lab = tl.load(labels_ptr + i, mask=m, other=2)
    used = m & (lab >= -1) & (lab <= 1)
    b = i // P
    ya = tl.load(pairs_ptr + i * 4 + 0, mask=used, other=0)
    xa = tl.load(pairs_ptr + i * 4 + 1, mask=used, other=0)
    yb = tl.load(pairs_ptr + i * 4 + 2, mask=used, other=0)
    xb = tl.load(pairs_ptr + i * 4 + 3, mask=used, other=0)
    inside = (ya >= 0) & (ya < H) & (xa >= 0) & (xa < W) & (yb >= 0) & (yb < H)
    inside = inside & (xb >= 0) & (xb < W)
    ld = used & inside
    pa = tl.load(pred_ptr + b * psb + ya * psh + xa * psw, mask=ld, other=0.0).to(acc)
    pb = tl.load(pred_ptr + b * psb + yb * psh + xb * psw, mask=ld, other=0.0).to(acc)
    ja = b * H * W + ya * W + xa
    jb = b * H * W + yb * W + xb
    return lab, used, ld, ja, jb, pa - pb


@triton.jit
def _pair_loss(d, lab, margin, equal_weight, KIND: tl.constexpr):
    lf = lab.to(d.dtype)
    if KIND == 0:
        z = margin - lf * d
        ranked = tl.where(z < 0, 0.0, z)  # NaN propagates
    else:
        z = -lf * d
        sp_pos = z + _log1p(tl.exp(-tl.abs(z)))
        sp_neg = _log1p(tl.exp(-tl.abs(z)))
        ranked = tl.where(z > 0, sp_pos, sp_neg)
    return tl.where(lab == 0, equal_weight * d * d, ranked)


@triton.jit
def _pair_grad(d, lab, margin, equal_weight, KIND: tl.constexpr):
    lf = lab.to(d.dtype)
    if KIND == 0:
        ranked = tl.where(margin - lf * d >= 0, -lf, 0.0)
    else:
        z = -lf * d
        e = tl.exp(-tl.abs(z))
        sig = tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        ranked = -lf * sig
    return tl.where(lab == 0, 2.0 * equal_weight * d, ranked)


@triton.jit
def _pair_loss_kernel(
    pred_ptr,
    pairs_ptr,
    labels_ptr,
    part_loss_ptr,
    part_cnt_ptr,
    counter_ptr,
    out_ptr,
    count_ptr,
    NBLK,
    NP,
    P,
    H,
    W,
    psb,
    psh,
    psw,
    params_ptr,
    KIND: tl.constexpr,
    F64: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    acc = tl.float64 if F64 else tl.float32
    pid = tl.program_id(0).to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = i < NP
    lab, used, inside, _ja, _jb, d = _pair_d(
        pred_ptr, pairs_ptr, labels_ptr, i, m, P, H, W, psb, psh, psw, acc
    )
    per = _pair_loss(d, lab, tl.load(params_ptr), tl.load(params_ptr + 1), KIND)
    per = tl.where(inside, per, float("nan"))  # a used pair outside the image: NaN
    tl.store(part_loss_ptr + pid, tl.sum(tl.where(used, per, 0.0), 0))
    tl.store(part_cnt_ptr + pid, tl.sum(used.to(tl.int64), 0))
    tl.debug_barrier()
    # acq_rel: this program's partials are visible to the program that arrives last.
    arrived = tl.atomic_add(counter_ptr, 1)
    if arrived == NBLK - 1:
        vs = tl.zeros([BLOCK_R], acc)
        vn = tl.zeros([BLOCK_R], tl.int64)
        for s in range(0, NBLK, BLOCK_R):
            j = s + tl.arange(0, BLOCK_R)
            mk = j < NBLK
            vs += tl.load(part_loss_ptr + j, mask=mk, other=0.0, volatile=True)
            vn += tl.load(part_cnt_ptr + j, mask=mk, other=0, volatile=True)
        total = tl.sum(vs, 0)
        count = tl.sum(vn, 0)
        tl.store(out_ptr, tl.where(count > 0, total / tl.maximum(count, 1).to(acc), 0.0))
        tl.store(count_ptr, count)


@triton.jit
def _count_kernel(labels_ptr, grad_ptr, scale_ptr, NP, F64: tl.constexpr, BLOCK: tl.constexpr):
    """scale = grad / M, M = number of used pairs (0 when M == 0)."""
    acc = tl.float64 if F64 else tl.float32
    vn = tl.zeros([BLOCK], tl.int64)
    for s in range(0, NP, BLOCK):
        i = s + tl.arange(0, BLOCK).to(tl.int64)
        lab = tl.load(labels_ptr + i, mask=i < NP, other=2)
        vn += ((lab >= -1) & (lab <= 1)).to(tl.int64)
    count = tl.sum(vn, 0)
    g = tl.load(grad_ptr).to(acc)
    tl.store(scale_ptr, tl.where(count > 0, g / tl.maximum(count, 1).to(acc), 0.0))


@triton.jit
def _scale(grad_ptr, count_ptr, acc: tl.constexpr):
    """grad / M from the forward's count M (0 when M == 0)."""
    count = tl.load(count_ptr)
    g = tl.load(grad_ptr).to(acc)
    return tl.where(count > 0, g / tl.maximum(count, 1).to(acc), 0.0)


@triton.jit
def _scatter_kernel(
    pred_ptr,
    pairs_ptr,
    labels_ptr,
    scale_ptr,
    grad_ptr,
    count_ptr,
    out_ptr,
    NP,
    P,
    H,
    W,
    psb,
    psh,
    psw,
    params_ptr,
    KIND: tl.constexpr,
    F64: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_COUNT: tl.constexpr,
):
    acc = tl.float64 if F64 else tl.float32
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = i < NP
    lab, used, inside, ja, jb, d = _pair_d(
        pred_ptr, pairs_ptr, labels_ptr, i, m, P, H, W, psb, psh, psw, acc
    )
    if HAS_COUNT:
        scale = _scale(grad_ptr, count_ptr, acc)
    else:
        scale = tl.load(scale_ptr)
    g = scale * _pair_grad(d, lab, tl.load(params_ptr), tl.load(params_ptr + 1), KIND)
    tl.atomic_add(out_ptr + ja, g, mask=inside)
    tl.atomic_add(out_ptr + jb, -g, mask=inside)


@triton.jit
def _contrib_kernel(
    pred_ptr,
    pairs_ptr,
    labels_ptr,
    scale_ptr,
    grad_ptr,
    count_ptr,
    vals_ptr,
    idx_ptr,
    NP,
    P,
    H,
    W,
    psb,
    psh,
    psw,
    params_ptr,
    KIND: tl.constexpr,
    F64: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_COUNT: tl.constexpr,
):
    """vals[2i] = +g_i, vals[2i+1] = -g_i; idx = target pixel, or -1 for unused pairs
    (and for used pairs outside the image)."""
    acc = tl.float64 if F64 else tl.float32
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = i < NP
    lab, _used, used, ja, jb, d = _pair_d(
        pred_ptr, pairs_ptr, labels_ptr, i, m, P, H, W, psb, psh, psw, acc
    )
    if HAS_COUNT:
        scale = _scale(grad_ptr, count_ptr, acc)
    else:
        scale = tl.load(scale_ptr)
    g = scale * _pair_grad(d, lab, tl.load(params_ptr), tl.load(params_ptr + 1), KIND)
    tl.store(vals_ptr + 2 * i, g, mask=m)
    tl.store(vals_ptr + 2 * i + 1, -g, mask=m)
    tl.store(idx_ptr + 2 * i, tl.where(used, ja, -1), mask=m)
    tl.store(idx_ptr + 2 * i + 1, tl.where(used, jb, -1), mask=m)


@triton.jit
def _segment_sum_kernel(sidx_ptr, perm_ptr, vals_ptr, out_ptr, NC, F64: tl.constexpr):
    """Program i: if sorted position i starts a pixel's run, add the run in order."""
    acc = tl.float64 if F64 else tl.float32
    i = tl.program_id(0).to(tl.int64)
    s = tl.load(sidx_ptr + i)
    prev = tl.load(sidx_ptr + i - 1, mask=i > 0, other=-1)
    if (s >= 0) & ((i == 0) | (prev != s)):
        total = tl.load(vals_ptr + tl.load(perm_ptr + i)).to(acc)
        j = i + 1
        nxt = tl.load(sidx_ptr + j, mask=j < NC, other=-1)
        while nxt == s:
            total += tl.load(vals_ptr + tl.load(perm_ptr + j))
            j += 1
            nxt = tl.load(sidx_ptr + j, mask=j < NC, other=-1)
        tl.store(out_ptr + s, total)


def _params(margin: float, equal_weight: float, dtype, device) -> torch.Tensor:
    """margin and equal_weight in the accumulation dtype, on the device without a host
    sync (a float kernel argument would be rounded to float32)."""
    params = torch.empty((2,), dtype=dtype, device=device)
    params[0] = float(margin)
    params[1] = float(equal_weight)
    return params


def _check(pred, pairs, labels, kind):
    if pred.dim() != 3:
        raise ValueError(f"ordinal_ranking: pred must be (B, H, W), got {tuple(pred.shape)}")
    if pairs.dim() != 4 or pairs.shape[0] != pred.shape[0] or tuple(pairs.shape[2:]) != (2, 2):
        raise ValueError(f"ordinal_ranking: pairs must be (B, P, 2, 2), got {tuple(pairs.shape)}")
    if tuple(labels.shape) != tuple(pairs.shape[:2]):
        raise ValueError(
            f"ordinal_ranking: labels must be (B, P) = {tuple(pairs.shape[:2])}, "
            f"got {tuple(labels.shape)}"
        )
    if kind not in (0, 1):
        raise ValueError(f"ordinal_ranking: kind must be 0 (margin) or 1 (logistic), got {kind}")
    return pairs.to(torch.int64).contiguous(), labels.to(torch.int64).contiguous()


def ordinal_ranking_forward(
    pred: torch.Tensor,
    pairs: torch.Tensor,
    labels: torch.Tensor,
    margin: float,
    kind: int,
    equal_weight: float,
) -> torch.Tensor:
    pairs, labels = _check(pred, pairs, labels, kind)
    B, H, W = pred.shape
    P = pairs.shape[1]
    NP = B * P
    adt = acc_dtype(pred.dtype)
    f64 = adt == torch.float64
    if NP == 0:
        zero = torch.zeros((), dtype=pred.dtype, device=pred.device)
        return zero, torch.zeros((), dtype=torch.int64, device=pred.device)
    out = torch.empty((), dtype=adt, device=pred.device)
    count = torch.empty((), dtype=torch.int64, device=pred.device)
    nblk = triton.cdiv(NP, BLOCK_PAIRS)
    part_loss = torch.empty((nblk,), dtype=adt, device=pred.device)
    part_cnt = torch.empty((nblk,), dtype=torch.int64, device=pred.device)
    counter = torch.zeros((1,), dtype=torch.int32, device=pred.device)
    with device_guard(pred):
        _pair_loss_kernel[(nblk,)](
            pred,
            pairs,
            labels,
            part_loss,
            part_cnt,
            counter,
            out,
            count,
            nblk,
            NP,
            P,
            H,
            W,
            *pred.stride(),
            _params(margin, equal_weight, adt, pred.device),
            KIND=int(kind),
            F64=f64,
            BLOCK=BLOCK_PAIRS,
            BLOCK_R=BLOCK_REDUCE,
            num_warps=4,
        )
    return (out if out.dtype == pred.dtype else out.to(pred.dtype)), count


def ordinal_ranking_backward(
    grad: torch.Tensor,
    pred: torch.Tensor,
    pairs: torch.Tensor,
    labels: torch.Tensor,
    margin: float,
    kind: int,
    equal_weight: float,
    count: torch.Tensor | None = None,
) -> torch.Tensor:
    pairs, labels = _check(pred, pairs, labels, kind)
    B, H, W = pred.shape
    P = pairs.shape[1]
    NP = B * P
    adt = acc_dtype(pred.dtype)
    f64 = adt == torch.float64
    dev = pred.device
    out = torch.zeros((B, H, W), dtype=adt, device=dev)
    if NP == 0:
        return out.to(pred.dtype)
    nblk = triton.cdiv(NP, BLOCK_PAIRS)
    scale = torch.empty((1,), dtype=adt, device=dev)
    args = (NP, P, H, W, *pred.stride(), _params(margin, equal_weight, adt, dev))
    has_count = count is not None
    meta = dict(KIND=int(kind), F64=f64, BLOCK=BLOCK_PAIRS, HAS_COUNT=has_count, num_warps=4)
    g1 = grad.reshape(1)
    cnt = count.reshape(1) if has_count else scale
    with device_guard(pred):
        if not has_count:  # counted again (a direct call of the op without the forward's M)
            _count_kernel[(1,)](labels, g1, scale, NP, F64=f64, BLOCK=BLOCK_REDUCE, num_warps=4)
        if not torch.are_deterministic_algorithms_enabled():
            _scatter_kernel[(nblk,)](pred, pairs, labels, scale, g1, cnt, out, *args, **meta)
        else:
            vals = torch.empty((2 * NP,), dtype=adt, device=dev)
            idx = torch.empty((2 * NP,), dtype=torch.int64, device=dev)
            _contrib_kernel[(nblk,)](pred, pairs, labels, scale, g1, cnt, vals, idx, *args, **meta)
            sidx, perm = torch.sort(idx, stable=True)
            _segment_sum_kernel[(2 * NP,)](
                sidx, perm.contiguous(), vals, out, 2 * NP, F64=f64, num_warps=1
            )
    return out if out.dtype == pred.dtype else out.to(pred.dtype)
