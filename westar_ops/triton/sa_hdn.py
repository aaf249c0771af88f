"""Triton kernels of ``westar_triton::sa_hdn_forward`` / ``sa_hdn_backward``.

Contract: docs/internals.md (same outputs as the C++ ops). Design and cost account:
docs/triton_kernels.md. In short, with C levels, N = B*H*W pixels, M <= C*N memberships:

Forward, in the steps of the CUDA kernels' sections (csrc/cuda/sa_hdn_cuda.cu), each a
host function here:
  1. ``_keys`` (``_keys_kernel``, 1 launch, reads target, valid, ids): one int64 key per
     (level, pixel): (level*B + image) << 31 | id, or a sentinel for pixels in no context.
  2. ``_group``, with torch ops on the device: stable ``torch.sort`` of the keys (pixels
     of a context become one contiguous run, in ascending pixel order; runs in canonical
     order level, image, id), run boundaries, counts (``searchsorted``), min_pixels
     filter, context numbering (``cumsum``). Cost does not depend on the id values.
  3. No host sync: K, the class counts and the bad-id flags stay on the device; launch
     grids are upper bounds from the shapes (the capacity, docs/internals.md), programs
     past the counts return at once. Bad ids or K > capacity make the loss NaN.
  4. ``_small_contexts`` (n <= a size class, 64 or 1024 by default): one program per
     context, everything in registers: gather pred/target through the sort permutation,
     exact lower median by a bitwise radix select (one reduction per key bit), mean
     absolute deviation, S1, S2, S3, loss numerator, median index, seg. One launch per
     size class.
  5. ``_large_contexts``: tiles of TILE members, multi-pass radix select with
     per-context histograms of 8-bit digits (int32 atomics, so the counts are exact and
     repeatable):
       pass 0: gather pred/target into contiguous segment arrays + histogram of digit 0;
       pass r: filter by the digits chosen so far + histogram of digit r (r = 1..3);
       the last pass also sums, per tile, the distances of the elements outside the
       final 256-key window to the window's edges, so that the MAD needs no extra pass;
       between passes a scan kernel per (context, pred|target) picks the digit;
       sums pass: S1, S2, loss numerator, first median position per tile;
     per-tile partial sums are combined per context in tile order: deterministic.
  6. ``_loss_kernel``: sum of the per-context loss numerators in context order / N.
Backward
  ``_count_kernel`` (N = sum of stats[:, 7]) and one elementwise pass over the pixels
  (``_backward_kernel``), looping over the C levels; no atomics: deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from westar_ops._registry import NUM_STATS, acc_dtype, context_capacity
from westar_ops.triton._common import device_guard, from_skey, sign, skey

__all__ = ["sa_hdn_forward", "sa_hdn_backward"]

# Routing by context size (module globals, read at call time; tests lower them to reach
# the large-context path on tiny images). Contexts with at most SMALL_SIZES[i] members
# (and more than SMALL_SIZES[i-1]) go to the register kernel with that block size; larger
# ones go to the tiled radix-select path with tiles of TILE members.
SMALL_SIZES = (64, 1024)
TILE = 4096
BLOCK_PIXELS = 1024  # elementwise kernels (keys, backward)
BLOCK_REDUCE = 256  # fixed-order reductions over tiles / contexts

_SENTINEL = torch.iinfo(torch.int64).max


def _num_warps(block: int) -> int:
    return 1 if block <= 64 else (4 if block <= 1024 else 8)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _keys_kernel(
    target_ptr,
    valid_ptr,
    inst_ptr,
    keys_ptr,
    bad_ptr,
    B,
    H,
    W,
    C,
    tsb,
    tsh,
    tsw,
    vsb,
    vsh,
    vsw,
    isb,
    isl,
    ish,
    isw,
    HAS_VALID: tl.constexpr,
    GLOBAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """keys[c, j] = (c*B + b) << 31 | id for pixel j = (b, y, x) in a context at level c,
    else the sentinel INT64_MAX. Reads target and valid once, the ids of every level.
    bad[0] / bad[1]: smallest flat index into instances (B, L, H, W) of a negative id / of
    an id >= 2^31 (atomic min; INT64_MAX when there is none)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    hw = H * W
    n = B * hw
    m = offs < n
    b = offs // hw
    rem = offs % hw
    y = rem // W
    x = rem % W
    q = tl.load(target_ptr + b * tsb + y * tsh + x * tsw, mask=m, other=0.0)
    ok = m & (q == q) & (tl.abs(q) < float("inf"))
    if HAS_VALID:
        v = tl.load(valid_ptr + b * vsb + y * vsh + x * vsw, mask=m, other=0)
        ok = ok & (v != 0)
    if GLOBAL:
        tl.store(keys_ptr + offs, tl.where(ok, (b << 31) | 1, 0x7FFFFFFFFFFFFFFF), mask=m)
    for c in range(GLOBAL, C):
        c64 = tl.cast(c, tl.int64)
        lev = c64 - GLOBAL
        # Every pixel's id is read (also unusable pixels'), so that a bad id is found
        # wherever it is, as the C++ kernels do.
        ident = tl.load(inst_ptr + b * isb + lev * isl + y * ish + x * isw, mask=m, other=0)
        ident = ident.to(tl.int64)
        at = ((b * (C - GLOBAL) + lev) * H + y) * W + x
        neg = tl.min(tl.where(m & (ident < 0), at, 0x7FFFFFFFFFFFFFFF), 0)
        huge = tl.min(tl.where(m & (ident > 0x7FFFFFFF), at, 0x7FFFFFFFFFFFFFFF), 0)
        tl.atomic_min(bad_ptr, neg)
        tl.atomic_min(bad_ptr + 1, huge)
        key = ((c64 * B + b) << 31) | ident
        key = tl.where(ok & (ident > 0) & (ident <= 0x7FFFFFFF), key, 0x7FFFFFFFFFFFFFFF)
        tl.store(keys_ptr + c64 * n + offs, key, mask=m)


@triton.jit
def _small_kernel(
    pred_ptr,
    target_ptr,
    order_ptr,
    ks_ptr,
    seg_off_ptr,
    seg_len_ptr,
    stats_ptr,
    median_ptr,
    loss_part_ptr,
    seg_ptr,
    H,
    W,
    N,
    psb,
    psh,
    psw,
    tsb,
    tsh,
    tsw,
    eps,
    BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One context per program, all in registers."""
    acc = tl.float64 if BITS == 64 else tl.float32
    k = tl.load(ks_ptr + tl.program_id(0)).to(tl.int64)
    if k < 0:  # the grid is an upper bound: programs past the class's count are dead
        return
    live = k >= 0
    start = tl.load(seg_off_ptr + k)
    n = tl.where(live, tl.load(seg_len_ptr + k), 0)
    idx = tl.arange(0, BLOCK)
    m = idx < n
    jf = tl.load(order_ptr + start + idx, mask=m, other=0)
    tl.store(seg_ptr + jf, k.to(tl.int32), mask=m)
    pix = jf % N
    hw = H * W
    b = pix // hw
    rem = pix % hw
    y = rem // W
    x = rem % W
    p = tl.load(pred_ptr + b * psb + y * psh + x * psw, mask=m, other=0.0).to(acc)
    q = tl.load(target_ptr + b * tsb + y * tsh + x * tsw, mask=m, other=0.0).to(acc)
    krank = ((n - 1) // 2).to(tl.int32)
    kp = skey(p, BITS)
    kq = skey(q, BITS)
    tkp, less_p, eq_p = _select_bits(kp, m, krank, BITS)
    tkq, _less_q, _eq_q = _select_bits(kq, m, krank, BITS)
    tp = from_skey(tkp, BITS)
    tq = from_skey(tkq, BITS)
    nf = n.to(acc)
    dp = tl.sum(tl.where(m, tl.abs(p - tp), 0.0), 0) / nf + eps
    dq = tl.sum(tl.where(m, tl.abs(q - tq), 0.0), 0) / nf + eps
    ph = (p - tp) / dp
    d = ph - (q - tq) / dq
    sg = sign(d)
    s1 = tl.sum(tl.where(m, sg, 0.0), 0)
    s2 = tl.sum(tl.where(m, sg * ph, 0.0), 0)
    ls = tl.sum(tl.where(m, tl.abs(d), 0.0), 0)
    s3 = (n.to(tl.int32) - less_p - eq_p) - less_p
    med = tl.min(tl.where(m & (kp == tkp), pix, 0x7FFFFFFFFFFFFFFF), 0)
    row = stats_ptr + k * 8
    tl.store(row + 0, tp, mask=live)
    tl.store(row + 1, dp, mask=live)
    tl.store(row + 2, tq, mask=live)
    tl.store(row + 3, dq, mask=live)
    tl.store(row + 4, s1, mask=live)
    tl.store(row + 5, s2, mask=live)
    tl.store(row + 6, s3.to(acc), mask=live)
    tl.store(row + 7, nf, mask=live)
    tl.store(median_ptr + k, med, mask=live)
    tl.store(loss_part_ptr + k, ls, mask=live)


@triton.jit
def _select_bits(key, m, krank, BITS: tl.constexpr):
    """Exact k-th smallest (0-based) of the masked keys by a bitwise radix select on the
    unsigned key (skey ^ sign bit). Returns (key, #less, #equal)."""
    active = m
    less = tl.sum(tl.zeros_like(krank + m.to(tl.int32)), 0)
    kr = krank
    for i in tl.static_range(BITS):
        bp = BITS - 1 - i  # constexpr (static_range); Triton >= 3.6 forbids re-annotating it
        bit = ((key >> bp) & 1).to(tl.int32)
        if bp == BITS - 1:
            bit = 1 - bit
        zero = active & (bit == 0)
        c0 = tl.sum(zero.to(tl.int32), 0)
        one = kr >= c0
        kr = tl.where(one, kr - c0, kr)
        less = tl.where(one, less + c0, less)
        active = active & tl.where(one, bit == 1, bit == 0)
    if BITS == 64:
        lowest = -0x7FFFFFFFFFFFFFFF - 1
    else:
        lowest = -0x7FFFFFFF - 1
    t = tl.max(tl.where(active, key, lowest), 0)
    return t, less, tl.sum(active.to(tl.int32), 0)


@triton.jit
def _digit(key, R: tl.constexpr, BITS: tl.constexpr):
    """Digit R (0 = most significant) of the unsigned key, as int32 in [0, 256)."""
    d = ((key >> (BITS - 8 * (R + 1))) & 255).to(tl.int32)
    if R == 0:
        d = d ^ 128
    return d


@triton.jit
def _hist_one(
    x,
    m,
    t,
    bi,
    w: tl.constexpr,
    NB,
    hist_ptr,
    prefix_ptr,
    part_mad_ptr,
    R: tl.constexpr,
    BITS: tl.constexpr,
    LAST: tl.constexpr,
):
    """Filter by the digits chosen so far, histogram digit R (pred w=0, target w=1)."""
    key = skey(x, BITS)
    if R == 0:
        match = m
    else:
        prefix = tl.load(prefix_ptr + bi * 2 + w)
        match = m & (((key ^ prefix) >> (BITS - 8 * R)) == 0)
    d = _digit(key, R, BITS)
    # Unmatched elements are counted in bin 0 and taken out again: tl.histogram's mask
    # argument needs Triton >= 3.4, and torch 2.6 / 2.7 ship Triton 3.2 / 3.3.
    bins = tl.arange(0, 256)
    h = tl.histogram(tl.where(match, d, 0), 256)
    h = h - tl.where(bins == 0, tl.sum(tl.where(match, 0, 1), 0), 0)
    tl.atomic_add(hist_ptr + ((R * NB + bi) * 2 + w) * 256 + bins, h, mask=bins < 256)
    if LAST:
        # Elements outside the final window [prefix, prefix | 255]: distance to the edges.
        lo = from_skey(prefix, BITS)
        hi = from_skey(prefix | 255, BITS)
        below = m & (key < prefix) & ~match
        above = m & (key > prefix) & ~match
        s_lo = tl.sum(tl.where(below, lo - x, 0.0), 0)
        s_hi = tl.sum(tl.where(above, x - hi, 0.0), 0)
        tl.store(part_mad_ptr + (t * 2 + w) * 2 + 0, s_lo)
        tl.store(part_mad_ptr + (t * 2 + w) * 2 + 1, s_hi)


@triton.jit
def _big_pass_kernel(
    pred_ptr,
    target_ptr,
    order_ptr,
    sp_ptr,
    sq_ptr,
    seg_ptr,
    tile_seg_ptr,
    tile_start_ptr,
    tile_end_ptr,
    big_k_ptr,
    hist_ptr,
    prefix_ptr,
    part_mad_ptr,
    NB,
    H,
    W,
    N,
    psb,
    psh,
    psw,
    tsb,
    tsh,
    tsw,
    R: tl.constexpr,
    BITS: tl.constexpr,
    LAST: tl.constexpr,
    TILE_SIZE: tl.constexpr,
):
    """Pass R over the tiles of the large contexts (R = 0 gathers)."""
    acc = tl.float64 if BITS == 64 else tl.float32
    t = tl.program_id(0).to(tl.int64)
    bi = tl.load(tile_seg_ptr + t).to(tl.int64)
    start = tl.load(tile_start_ptr + t)
    end = tl.load(tile_end_ptr + t)
    if start >= end:  # a dead tile (the grid is an upper bound)
        return
    offs = start + tl.arange(0, TILE_SIZE).to(tl.int64)
    m = offs < end
    if R == 0:
        jf = tl.load(order_ptr + offs, mask=m, other=0)
        k = tl.load(big_k_ptr + bi)
        tl.store(seg_ptr + jf, k.to(tl.int32), mask=m)
        pix = jf % N
        hw = H * W
        b = pix // hw
        rem = pix % hw
        y = rem // W
        x = rem % W
        p = tl.load(pred_ptr + b * psb + y * psh + x * psw, mask=m, other=0.0).to(acc)
        q = tl.load(target_ptr + b * tsb + y * tsh + x * tsw, mask=m, other=0.0).to(acc)
        tl.store(sp_ptr + offs, p, mask=m)
        tl.store(sq_ptr + offs, q, mask=m)
    else:
        p = tl.load(sp_ptr + offs, mask=m, other=0.0)
        q = tl.load(sq_ptr + offs, mask=m, other=0.0)
    _hist_one(p, m, t, bi, 0, NB, hist_ptr, prefix_ptr, part_mad_ptr, R, BITS, LAST)
    _hist_one(q, m, t, bi, 1, NB, hist_ptr, prefix_ptr, part_mad_ptr, R, BITS, LAST)


@triton.jit
def _scan_kernel(
    hist_ptr,
    prefix_ptr,
    rank_ptr,
    nless_ptr,
    ngreat_ptr,
    part_mad_ptr,
    tile0_ptr,
    ntile_ptr,
    big_k_ptr,
    big_len_ptr,
    stats_ptr,
    NB,
    eps,
    R: tl.constexpr,
    BITS: tl.constexpr,
    LAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Per (large context, pred|target): choose digit R from its histogram. The last
    scan also finishes the median and the mean absolute deviation."""
    acc = tl.float64 if BITS == 64 else tl.float32
    kt = tl.int64 if BITS == 64 else tl.int32
    pid = tl.program_id(0).to(tl.int64)
    bi = pid // 2
    w = pid % 2
    if tl.load(big_k_ptr + bi) < 0:  # past the number of large contexts
        return
    bins = tl.arange(0, 256)
    h = tl.load(hist_ptr + ((R * NB + bi) * 2 + w) * 256 + bins).to(tl.int64)
    kr = tl.load(rank_ptr + pid)
    cs = tl.cumsum(h, 0)
    d = tl.sum((cs <= kr).to(tl.int32), 0)
    below = tl.sum(tl.where(bins < d, h, 0), 0)
    above = tl.sum(tl.where(bins > d, h, 0), 0)
    nl = tl.load(nless_ptr + pid)
    ng = tl.load(ngreat_ptr + pid)
    if R == 0:
        prefix = tl.zeros_like(d).to(kt)
        sd = d ^ 128
    else:
        prefix = tl.load(prefix_ptr + pid)
        sd = d
    newp = prefix | (sd.to(kt) << (BITS - 8 * (R + 1)))
    if not LAST:
        tl.store(prefix_ptr + pid, newp)
        tl.store(rank_ptr + pid, kr - below)
        tl.store(nless_ptr + pid, nl + below)
        tl.store(ngreat_ptr + pid, ng + above)
    else:
        t = from_skey(newp, BITS)
        lo = from_skey(prefix, BITS)
        hi = from_skey(prefix | 255, BITS)
        vals = from_skey(prefix | bins.to(kt), BITS)
        window = tl.sum(tl.where(h > 0, h.to(acc) * tl.abs(vals - t), 0.0), 0)
        t0 = tl.load(tile0_ptr + bi)
        nt = tl.load(ntile_ptr + bi)
        vlo = tl.zeros([BLOCK_T], acc)
        vhi = tl.zeros([BLOCK_T], acc)
        for s in range(0, nt, BLOCK_T):
            ti = s + tl.arange(0, BLOCK_T)
            mt = ti < nt
            base = part_mad_ptr + ((t0 + ti) * 2 + w) * 2
            vlo += tl.load(base + 0, mask=mt, other=0.0)
            vhi += tl.load(base + 1, mask=mt, other=0.0)
        s_lo = tl.sum(vlo, 0)
        s_hi = tl.sum(vhi, 0)
        abs_sum = s_lo + s_hi + window
        abs_sum += tl.where(nl > 0, nl.to(acc) * (t - lo), 0.0)
        abs_sum += tl.where(ng > 0, ng.to(acc) * (hi - t), 0.0)
        n = tl.load(big_len_ptr + bi)
        k = tl.load(big_k_ptr + bi)
        live = k >= 0  # bi past the number of large contexts (the grid is a bound)
        row = stats_ptr + tl.maximum(k, 0) * 8
        tl.store(row + 2 * w, t, mask=live)
        tl.store(row + 2 * w + 1, abs_sum / tl.maximum(n, 1).to(acc) + eps, mask=live)
        s3 = (ng + above) - (nl + below)
        tl.store(row + 6, s3.to(acc), mask=live & (w == 0))
        tl.store(row + 7, n.to(acc), mask=live & (w == 0))


@triton.jit
def _big_sums_kernel(
    sp_ptr,
    sq_ptr,
    tile_seg_ptr,
    tile_start_ptr,
    tile_end_ptr,
    big_k_ptr,
    stats_ptr,
    part_sum_ptr,
    part_med_ptr,
    BITS: tl.constexpr,
    TILE_SIZE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    bi = tl.load(tile_seg_ptr + t).to(tl.int64)
    start = tl.load(tile_start_ptr + t)
    end = tl.load(tile_end_ptr + t)
    if start >= end:  # a dead tile
        return
    offs = start + tl.arange(0, TILE_SIZE).to(tl.int64)
    m = offs < end
    k = tl.load(big_k_ptr + bi)
    row = stats_ptr + tl.maximum(k, 0) * 8  # k < 0: a dead tile (empty range)
    tp = tl.load(row + 0)
    dp = tl.load(row + 1)
    tq = tl.load(row + 2)
    dq = tl.load(row + 3)
    p = tl.load(sp_ptr + offs, mask=m, other=0.0)
    q = tl.load(sq_ptr + offs, mask=m, other=0.0)
    ph = (p - tp) / dp
    d = ph - (q - tq) / dq
    sg = sign(d)
    tl.store(part_sum_ptr + t * 3 + 0, tl.sum(tl.where(m, sg, 0.0), 0))
    tl.store(part_sum_ptr + t * 3 + 1, tl.sum(tl.where(m, sg * ph, 0.0), 0))
    tl.store(part_sum_ptr + t * 3 + 2, tl.sum(tl.where(m, tl.abs(d), 0.0), 0))
    is_med = m & (skey(p, BITS) == skey(tp, BITS))
    tl.store(part_med_ptr + t, tl.min(tl.where(is_med, offs, 0x7FFFFFFFFFFFFFFF), 0))


@triton.jit
def _big_finish_kernel(
    part_sum_ptr,
    part_med_ptr,
    tile0_ptr,
    ntile_ptr,
    big_k_ptr,
    order_ptr,
    stats_ptr,
    median_ptr,
    loss_part_ptr,
    N,
    BITS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Per large context: combine the per-tile sums in tile order."""
    acc = tl.float64 if BITS == 64 else tl.float32
    bi = tl.program_id(0).to(tl.int64)
    if tl.load(big_k_ptr + bi) < 0:  # past the number of large contexts
        return
    t0 = tl.load(tile0_ptr + bi)
    nt = tl.load(ntile_ptr + bi)
    v1 = tl.zeros([BLOCK_T], acc)
    v2 = tl.zeros([BLOCK_T], acc)
    v3 = tl.zeros([BLOCK_T], acc)
    vm = tl.full([BLOCK_T], 0x7FFFFFFFFFFFFFFF, tl.int64)
    for s in range(0, nt, BLOCK_T):
        ti = s + tl.arange(0, BLOCK_T)
        mt = ti < nt
        base = part_sum_ptr + (t0 + ti) * 3
        v1 += tl.load(base + 0, mask=mt, other=0.0)
        v2 += tl.load(base + 1, mask=mt, other=0.0)
        v3 += tl.load(base + 2, mask=mt, other=0.0)
        vm = tl.minimum(vm, tl.load(part_med_ptr + t0 + ti, mask=mt, other=0x7FFFFFFFFFFFFFFF))
    k = tl.load(big_k_ptr + bi)
    live = k >= 0  # bi past the number of large contexts (the grid is a bound)
    k = tl.maximum(k, 0)
    row = stats_ptr + k * 8
    tl.store(row + 4, tl.sum(v1, 0), mask=live)
    tl.store(row + 5, tl.sum(v2, 0), mask=live)
    tl.store(loss_part_ptr + k, tl.sum(v3, 0), mask=live)
    pos = tl.where(live, tl.min(vm, 0), 0)
    jf = tl.load(order_ptr + pos)
    tl.store(median_ptr + k, jf % N, mask=live)


@triton.jit
def _loss_kernel(loss_part_ptr, seg_len_ptr, out_ptr, K, BITS: tl.constexpr, BLOCK: tl.constexpr):
    """loss = sum_k loss_part[k] / sum_k n_k, in context order; 0 when K == 0."""
    acc = tl.float64 if BITS == 64 else tl.float32
    vs = tl.zeros([BLOCK], acc)
    vn = tl.zeros([BLOCK], tl.int64)
    for s in range(0, K, BLOCK):
        i = s + tl.arange(0, BLOCK)
        mk = i < K
        vs += tl.load(loss_part_ptr + i, mask=mk, other=0.0)
        vn += tl.load(seg_len_ptr + i, mask=mk, other=0)
    total = tl.sum(vs, 0)
    count = tl.sum(vn, 0)
    loss = tl.where(count > 0, total / tl.maximum(count, 1).to(acc), 0.0)
    tl.store(out_ptr, loss)


@triton.jit
def _count_kernel(stats_ptr, grad_ptr, scale_ptr, K, BITS: tl.constexpr, BLOCK: tl.constexpr):
    """scale = grad / N with N = sum_k stats[k, 7] (0 when N == 0)."""
    acc = tl.float64 if BITS == 64 else tl.float32
    vn = tl.zeros([BLOCK], tl.int64)
    for s in range(0, K, BLOCK):
        i = s + tl.arange(0, BLOCK)
        vn += tl.load(stats_ptr + i.to(tl.int64) * 8 + 7, mask=i < K, other=0.0).to(tl.int64)
    count = tl.sum(vn, 0)
    g = tl.load(grad_ptr).to(acc)
    tl.store(scale_ptr, tl.where(count > 0, g / tl.maximum(count, 1).to(acc), 0.0))


@triton.jit
def _backward_kernel(
    pred_ptr,
    target_ptr,
    seg_ptr,
    stats_ptr,
    median_ptr,
    scale_ptr,
    out_ptr,
    C,
    H,
    W,
    N,
    psb,
    psh,
    psw,
    tsb,
    tsh,
    tsw,
    STATS_GRAD: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """grad_pred[j] = grad / N * sum_c pixel_grad(p_j, q_j, stats[seg[c, j]], ...)."""
    acc = tl.float64 if BITS == 64 else tl.float32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = offs < N
    hw = H * W
    b = offs // hw
    rem = offs % hw
    y = rem // W
    x = rem % W
    p = tl.load(pred_ptr + b * psb + y * psh + x * psw, mask=m, other=0.0).to(acc)
    q = tl.load(target_ptr + b * tsb + y * tsh + x * tsw, mask=m, other=0.0).to(acc)
    g = tl.zeros([BLOCK], acc)
    for c in range(0, C):
        k = tl.load(seg_ptr + c * N + offs, mask=m, other=-1).to(tl.int64)
        has = k >= 0
        row = stats_ptr + tl.where(has, k, 0) * 8
        tp = tl.load(row + 0, mask=has, other=0.0)
        dp = tl.load(row + 1, mask=has, other=1.0)
        tq = tl.load(row + 2, mask=has, other=0.0)
        dq = tl.load(row + 3, mask=has, other=1.0)
        ph = (p - tp) / dp
        r = sign(ph - (q - tq) / dq)
        pg = r / dp
        if STATS_GRAD >= 1:
            s2 = tl.load(row + 5, mask=has, other=0.0)
            n = tl.load(row + 7, mask=has, other=1.0)
            scale_term = s2 / (dp * n)
            pg -= scale_term * sign(p - tp)
            if STATS_GRAD == 2:
                s1 = tl.load(row + 4, mask=has, other=0.0)
                s3 = tl.load(row + 6, mask=has, other=0.0)
                mi = tl.load(median_ptr + tl.where(has, k, 0), mask=has, other=-1)
                pg += tl.where(mi == offs, -s1 / dp + scale_term * s3, 0.0)
        g += tl.where(has, pg, 0.0)
    scale = tl.load(scale_ptr)
    tl.store(out_ptr + offs, g * scale, mask=m)


# ------------------------------------------------------------------------ host code

# The kernels keep context numbers (seg) in int32 and multiply int32 sizes (H * W,
# level * N): levels x B x H x W must stay at or below this, as in the C++ ops
# (kMaxMemberships, csrc/include/westar/op_checks.h).
MAX_MEMBERSHIPS = 2**31 - 2


def check_memberships(levels: int, pred: torch.Tensor) -> None:
    """The C++ ops' error for more memberships than the kernels can number."""
    memberships = levels * pred.numel()
    if memberships > MAX_MEMBERSHIPS:
        raise ValueError(
            f"sa_hdn: levels x B x H x W = {memberships} memberships, more than the ops "
            "support (2^31 - 2)"
        )


def _first_true(mask_cumsum: torch.Tensor, bound: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the first ``bound`` True entries of a mask, given its inclusive cumsum
    (searchsorted: no host sync), and whether each exists (``bound`` is an upper bound
    known from the shapes; the missing ones get index 0)."""
    want = torch.arange(1, bound + 1, device=mask_cumsum.device, dtype=mask_cumsum.dtype)
    found = want <= mask_cumsum[-1]
    return torch.searchsorted(mask_cumsum, want).masked_fill_(~found, 0), found


@dataclass
class _Problem:
    """One forward call: the inputs and their sizes (C = G + L levels, N pixels)."""

    pred: torch.Tensor
    target: torch.Tensor
    instances: torch.Tensor | None
    valid: torch.Tensor | None
    B: int
    H: int
    W: int
    N: int
    L: int
    G: int
    C: int
    eps: float
    bits: int  # 64 for float64 inputs, else 32
    sdt: torch.dtype  # stats / accumulation dtype
    seg: torch.Tensor  # (C, B, H, W) int32 output, -1 where no context
    cap: int  # rows of stats (context_capacity)

    @property
    def n_tot(self) -> int:
        return self.C * self.N


@dataclass
class _Groups:
    """Step 2's result: sorted memberships grouped into runs (one run per context
    candidate), and the stored contexts (the first ``cap`` kept ones) in canonical order.
    Counts stay on the device; the host only knows bounds from the shapes."""

    order: torch.Tensor  # sorted position -> flat membership index (level * N + pixel)
    starts: torch.Tensor  # run r covers sorted positions [starts[r], starts[r + 1])
    counts: torch.Tensor  # members of run r
    k_of_run: torch.Tensor  # context number of a kept run
    keep_cs: torch.Tensor  # inclusive cumsum of "run r is a kept context"
    big_cs: torch.Tensor  # ... of "run r is a stored large context"
    class_cs: list  # ... of "run r is a stored context of small size class i"
    class_bound: list  # upper bound of the number of contexts of each small class
    ntiles_run: torch.Tensor  # tiles of a large run, else 0
    nb_bound: int  # upper bound of the number of large contexts
    seg_off: torch.Tensor | None = None  # (cap,) first sorted position of context k
    seg_len: torch.Tensor | None = None  # (cap,) its number of members (0 past K)


def _keys(pr: _Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: one key per membership, and the first bad id positions (bad[0] negative,
    bad[1] >= 2^31), both on the device."""
    keys = torch.empty(pr.n_tot, dtype=torch.int64, device=pr.pred.device)
    bad = torch.full((2,), _SENTINEL, dtype=torch.int64, device=pr.pred.device)
    valid, instances = pr.valid, pr.instances
    vview = valid.view(torch.uint8) if valid is not None else pr.pred
    vstr = valid.stride() if valid is not None else (0, 0, 0)
    inst = instances if instances is not None else pr.pred
    istr = instances.stride() if instances is not None else (0, 0, 0, 0)
    _keys_kernel[(triton.cdiv(pr.N, BLOCK_PIXELS),)](
        pr.target,
        vview,
        inst,
        keys,
        bad,
        pr.B,
        pr.H,
        pr.W,
        pr.C,
        *pr.target.stride(),
        *vstr,
        *istr,
        HAS_VALID=valid is not None,
        GLOBAL=pr.G,
        BLOCK=BLOCK_PIXELS,
        num_warps=4,
    )
    return keys, bad


def _group(pr: _Problem, keys: torch.Tensor, min_pixels: int) -> _Groups:
    """Steps 2 and 3: stable sort of the keys, runs, min_pixels filter, numbering, all
    with torch ops on the device; launch grids use bounds from the shapes (no sync)."""
    n_tot, dev = pr.n_tot, pr.pred.device
    small_sizes = tuple(sorted(SMALL_SIZES))
    sorted_keys, order = torch.sort(keys, stable=True)
    del keys
    is_start = torch.ones(n_tot, dtype=torch.bool, device=dev)
    is_start[1:] = sorted_keys[1:] != sorted_keys[:-1]
    run = torch.cumsum(is_start, 0) - 1  # run number of every sorted position
    starts = torch.searchsorted(run, torch.arange(n_tot + 1, device=dev))
    counts = starts[1:] - starts[:-1]  # 0 for run numbers past the last run
    run_key = sorted_keys[starts[:-1].clamp(max=n_tot - 1)]
    keep = (counts >= max(int(min_pixels), 1)) & (run_key != _SENTINEL)
    keep_cs = torch.cumsum(keep, 0)
    stored = keep & (keep_cs <= pr.cap)  # contexts past the capacity are dropped (NaN loss)
    big_run = stored & (counts > small_sizes[-1])
    big_cs = torch.cumsum(big_run, 0)
    ntiles_run = torch.where(big_run, (counts + TILE - 1) // TILE, 0)
    class_cs, class_bound = [], []
    lower = 0
    for size in small_sizes:
        cls = stored & (counts > lower) & (counts <= size)
        class_cs.append(torch.cumsum(cls, 0))
        class_bound.append(min(pr.cap, n_tot // (lower + 1)))
        lower = size
    return _Groups(
        order=order.contiguous(),
        starts=starts,
        counts=counts,
        k_of_run=keep_cs - 1,
        keep_cs=keep_cs,
        big_cs=big_cs,
        class_cs=class_cs,
        class_bound=class_bound,
        ntiles_run=ntiles_run,
        nb_bound=min(pr.cap, n_tot // (small_sizes[-1] + 1)),
    )


def _small_contexts(pr: _Problem, g: _Groups, out: dict) -> None:
    """Step 4: contexts of at most max(SMALL_SIZES) members, one launch per size class,
    one program (all in registers) per context; the grid is the class's bound, programs
    past its count do nothing."""
    for size, cs, bound in zip(sorted(SMALL_SIZES), g.class_cs, g.class_bound):
        if bound == 0:
            continue
        runs, found = _first_true(cs, bound)
        ks = torch.where(found, g.k_of_run[runs], -1)
        block = triton.next_power_of_2(size)
        _small_kernel[(bound,)](
            pr.pred,
            pr.target,
            g.order,
            ks,
            g.seg_off,
            g.seg_len,
            out["stats"],
            out["median_index"],
            out["loss_part"],
            pr.seg,
            pr.H,
            pr.W,
            pr.N,
            *pr.pred.stride(),
            *pr.target.stride(),
            pr.eps,
            BITS=pr.bits,
            BLOCK=block,
            num_warps=_num_warps(block),
        )


def _large_contexts(pr: _Problem, g: _Groups, out: dict) -> None:
    """Step 5: the other contexts in tiles of TILE members, by a multi-pass radix select
    on 8-bit digits (pass 0 also gathers), then the sums pass and a per-context finish
    that combines the tiles in tile order. Grids are bounds from the shapes: NB large
    contexts at most, T tiles at most; the dead ones have no members."""
    dev, NB, bits = pr.pred.device, g.nb_bound, pr.bits
    T = pr.n_tot // TILE + NB
    big_runs, found = _first_true(g.big_cs, NB)
    big_k = torch.where(found, g.k_of_run[big_runs], -1).contiguous()
    big_len = torch.where(found, g.counts[big_runs], 0).contiguous()
    big_off = g.starts[big_runs]
    ntile = torch.where(found, g.ntiles_run[big_runs], 0).contiguous()
    tile_cs = torch.cumsum(ntile, 0)
    tile0 = (tile_cs - ntile).contiguous()
    tiles = torch.arange(T, device=dev)
    tile_seg = torch.searchsorted(tile_cs, tiles, right=True)
    live = tile_seg < NB  # tiles past the last large context's are dead (empty range)
    tile_seg = tile_seg.clamp_(max=NB - 1)
    tile_start = big_off[tile_seg] + (tiles - tile0[tile_seg]) * TILE
    tile_end = torch.where(live, (big_off + big_len)[tile_seg], 0).contiguous()
    tile_start = torch.where(live, tile_start, 0).contiguous()
    tile_seg = tile_seg.contiguous()
    sp = torch.empty(pr.n_tot, dtype=pr.sdt, device=dev)
    sq = torch.empty(pr.n_tot, dtype=pr.sdt, device=dev)
    digits = bits // 8
    kdt = torch.int64 if bits == 64 else torch.int32
    hist = torch.zeros((digits, NB, 2, 256), dtype=torch.int32, device=dev)
    prefix = torch.zeros((NB, 2), dtype=kdt, device=dev)
    rank = ((big_len - 1) // 2).repeat_interleave(2).contiguous()
    nless = torch.zeros((NB, 2), dtype=torch.int64, device=dev)
    ngreat = torch.zeros((NB, 2), dtype=torch.int64, device=dev)
    part_mad = torch.empty((T, 2, 2), dtype=pr.sdt, device=dev)
    stats, median_index, loss_part = out["stats"], out["median_index"], out["loss_part"]
    tw = _num_warps(TILE)
    tiling = (tile_seg, tile_start, tile_end, big_k)
    for r in range(digits):
        last = r == digits - 1
        _big_pass_kernel[(T,)](
            pr.pred,
            pr.target,
            g.order,
            sp,
            sq,
            pr.seg,
            *tiling,
            hist,
            prefix,
            part_mad,
            NB,
            pr.H,
            pr.W,
            pr.N,
            *pr.pred.stride(),
            *pr.target.stride(),
            R=r,
            BITS=bits,
            LAST=last,
            TILE_SIZE=TILE,
            num_warps=tw,
        )
        _scan_kernel[(NB * 2,)](
            hist,
            prefix,
            rank,
            nless,
            ngreat,
            part_mad,
            tile0,
            ntile,
            big_k,
            big_len,
            stats,
            NB,
            pr.eps,
            R=r,
            BITS=bits,
            LAST=last,
            BLOCK_T=BLOCK_REDUCE,
            num_warps=1,
        )
    part_sum = torch.empty((T, 3), dtype=pr.sdt, device=dev)
    part_med = torch.empty((T,), dtype=torch.int64, device=dev)
    _big_sums_kernel[(T,)](
        sp,
        sq,
        *tiling,
        stats,
        part_sum,
        part_med,
        BITS=bits,
        TILE_SIZE=TILE,
        num_warps=tw,
    )
    _big_finish_kernel[(NB,)](
        part_sum,
        part_med,
        tile0,
        ntile,
        big_k,
        g.order,
        stats,
        median_index,
        loss_part,
        pr.N,
        BITS=bits,
        BLOCK_T=BLOCK_REDUCE,
        num_warps=1,
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
    max_contexts: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if pred.dim() != 3 or target.shape != pred.shape:
        raise ValueError(
            f"sa_hdn: pred and target must have shape (B, H, W), got {tuple(pred.shape)} "
            f"and {tuple(target.shape)}"
        )
    if max_contexts < 0:
        raise ValueError(f"sa_hdn: max_contexts must be >= 0, got {max_contexts}")
    levels = int(bool(include_global)) + (instances.shape[1] if instances is not None else 0)
    check_memberships(levels, pred)
    if target.dtype != pred.dtype:
        target = target.to(pred.dtype)
    cap = context_capacity(pred, instances, include_global, min_pixels, max_contexts)
    with device_guard(pred):
        return _forward(pred, target, instances, valid, include_global, eps, min_pixels, cap)


def _forward(pred, target, instances, valid, include_global, eps, min_pixels, cap):
    """Steps 1-6 of the module docstring."""
    dev = pred.device
    B, H, W = pred.shape
    L = instances.shape[1] if instances is not None else 0
    G = int(bool(include_global))
    sdt = acc_dtype(pred.dtype)
    pr = _Problem(
        pred=pred,
        target=target,
        instances=instances,
        valid=valid,
        B=B,
        H=H,
        W=W,
        N=B * H * W,
        L=L,
        G=G,
        C=G + L,
        eps=eps,
        bits=64 if sdt == torch.float64 else 32,
        sdt=sdt,
        seg=torch.full((G + L, B, H, W), -1, dtype=torch.int32, device=dev),
        cap=cap,
    )
    # Rows past the K contexts: zeros (n = 0) and median_index -1.
    stats = torch.zeros((cap, NUM_STATS), dtype=sdt, device=dev)
    median_index = torch.full((cap,), -1, dtype=torch.int64, device=dev)
    if pr.n_tot == 0:
        info = torch.full((4,), -1, dtype=torch.int64, device=dev)
        info[:2] = 0
        return torch.zeros((), dtype=pred.dtype, device=dev), pr.seg, stats, median_index, info

    keys, bad = _keys(pr)
    g = _group(pr, keys, min_pixels)
    out = {
        "stats": stats,
        "median_index": median_index,
        "loss_part": torch.zeros((cap,), dtype=sdt, device=dev),
    }
    kept_runs, found = _first_true(g.keep_cs, cap)
    g.seg_off = g.starts[kept_runs].contiguous()
    g.seg_len = torch.where(found, g.counts[kept_runs], 0).contiguous()
    _small_contexts(pr, g, out)
    if g.nb_bound > 0:
        _large_contexts(pr, g, out)
    # 6. Loss.
    loss = torch.empty((), dtype=pred.dtype, device=dev)
    _loss_kernel[(1,)](
        out["loss_part"], g.seg_len, loss, cap, BITS=pr.bits, BLOCK=BLOCK_REDUCE, num_warps=4
    )
    # info: K found, N stored, first bad ids (-1: none). Bad ids or more contexts than
    # the capacity make the loss NaN: the kernels cannot raise without a host sync.
    found_k = g.keep_cs[-1]
    bad = torch.where(bad == _SENTINEL, -1, bad)
    info = torch.stack([found_k, g.seg_len.sum(), bad[0], bad[1]])
    error = (bad >= 0).any() | (found_k > cap)
    loss = torch.where(error, torch.nan, loss)
    return loss, pr.seg, stats, median_index, info


def sa_hdn_backward(
    grad: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor,
    seg: torch.Tensor,
    stats: torch.Tensor,
    median_index: torch.Tensor,
    stats_grad: int,
    info: torch.Tensor | None = None,
) -> torch.Tensor:
    if pred.dim() != 3 or target.shape != pred.shape:
        raise ValueError("sa_hdn_backward: pred and target must have shape (B, H, W)")
    if seg.dim() != 4 or tuple(seg.shape[1:]) != tuple(pred.shape) or seg.dtype != torch.int32:
        raise ValueError(
            f"sa_hdn_backward: seg must be int32 (C, B, H, W), got {seg.dtype} {tuple(seg.shape)}"
        )
    if stats_grad not in (0, 1, 2):
        raise ValueError(f"sa_hdn_backward: stats_grad must be 0, 1 or 2, got {stats_grad}")
    sdt = acc_dtype(pred.dtype)
    if stats.dtype != sdt or stats.dim() != 2 or stats.shape[1] != NUM_STATS:
        raise ValueError(f"sa_hdn_backward: stats must be (K, 8) {sdt}, got {stats.dtype}")
    if target.dtype != pred.dtype:
        target = target.to(pred.dtype)
    B, H, W = pred.shape
    N = B * H * W
    C = seg.shape[0]
    K = stats.shape[0]
    bits = 64 if sdt == torch.float64 else 32
    out = torch.empty((B, H, W), dtype=pred.dtype, device=pred.device)
    if N == 0:
        return out
    with device_guard(pred):
        seg = seg.contiguous()
        stats = stats.contiguous()
        median_index = median_index.contiguous()
        if info is not None:  # N from the forward: no pass over the (capacity) rows
            n = info[1].to(sdt)
            scale = torch.where(n > 0, grad.reshape(1).to(sdt) / n.clamp_min(1), 0.0)
        else:
            scale = torch.empty((1,), dtype=sdt, device=pred.device)
            _count_kernel[(1,)](
                stats, grad.reshape(1), scale, K, BITS=bits, BLOCK=BLOCK_REDUCE, num_warps=4
            )
        _backward_kernel[(triton.cdiv(N, BLOCK_PIXELS),)](
            pred,
            target,
            seg,
            stats,
            median_index,
            scale,
            out,
            C,
            H,
            W,
            N,
            *pred.stride(),
            *target.stride(),
            STATS_GRAD=int(stats_grad),
            BITS=bits,
            BLOCK=BLOCK_PIXELS,
            num_warps=4,
        )
    return out
