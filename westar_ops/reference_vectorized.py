"""A vectorized plain-PyTorch SA-HDN loss: the same function as
``westar_ops.reference.sa_hdn_loss`` (docs/ops.md) with no Python loop over contexts
and no host sync, so that ``torch.compile(fullgraph=True)`` can take it whole.

It is what a careful PyTorch user writes instead of the per-context loop, and the
benchmarks' second baseline (benchmarks/gpu_bench.py), next to its torch.compile version.
All memberships (level, pixel) are processed at once (M = levels x B x H x W):

1. a segment key per membership, (level * B + image) * 2^31 + id, or a sentinel for an
   unusable pixel or id 0;
2. per channel (pred, target): a sort by value, then a stable sort by key: every
   context becomes a run of ascending values, so its lower median is the element at
   run start + (n - 1) // 2 (exact, as torch.median);
3. segment numbers from the run starts (a cumsum), per-segment sums with ``index_add``
   into arrays of M entries (a size known from the shapes, whatever the data);
4. the loss from one more segment sum. Gradients come from autograd: the median's path
   goes through the gather of the sorted values to the element of rank (n - 1) // 2.
"""

from __future__ import annotations

import inspect

import torch

from westar_ops import reference

__all__ = ["sa_hdn_loss"]


def _levels(ok: torch.Tensor, instances, include_global: bool) -> torch.Tensor:
    """(C, B, H, W) int64 ids of every level, 0 where the pixel is unusable."""
    levels = []
    if include_global:
        levels.append(torch.ones_like(ok, dtype=torch.int64).unsqueeze(0))
    if instances is not None:
        inst = instances.to(torch.int64)
        if inst.dim() == 3:
            inst = inst.unsqueeze(1)
        levels.append(inst.transpose(0, 1))
    if not levels:
        return torch.zeros((0, *ok.shape), dtype=torch.int64, device=ok.device)
    ids = torch.cat(levels, 0)
    return torch.where(ok.unsqueeze(0), ids, 0)


_SENTINEL = torch.iinfo(torch.int64).max
_REFERENCE_SIGNATURE = inspect.signature(reference.sa_hdn_loss)


def _normalized(x, key, eps: float, stats_grad: str, min_pixels: int):
    """x normalized per segment (x, key: (M,) flat memberships, in membership order) and
    whether each membership belongs to a kept context."""
    m = x.numel()
    # Sort by value, then stable by key: runs of ascending values per segment.
    by_value = torch.argsort(x.detach())
    by_key = torch.argsort(key[by_value], stable=True)
    perm = by_value[by_key]
    skey = key[perm]
    xs = x[perm]
    pos = torch.arange(m, device=x.device)
    is_start = torch.ones(m, dtype=torch.bool, device=x.device)
    is_start[1:] = skey[1:] != skey[:-1]
    seg = torch.cumsum(is_start, 0) - 1  # segment number of every sorted position
    start = torch.cummax(torch.where(is_start, pos, 0), 0).values  # its segment's start
    count = torch.zeros(m, dtype=torch.int64, device=x.device).index_add_(
        0, seg, torch.ones_like(pos)
    )
    n = count[seg]
    t = xs[start + (n - 1) // 2]  # the lower median of the membership's segment
    if stats_grad != "full":
        t = t.detach()
    dev = (xs - t).abs()
    s = torch.zeros(m, dtype=x.dtype, device=x.device).index_add(0, seg, dev)[seg] / n
    if stats_grad == "none":
        s = s.detach()
    x_hat = (xs - t) / (s + eps)
    kept = (n >= max(min_pixels, 1)) & (skey != _SENTINEL)
    # Back to membership order.
    out = torch.empty_like(x_hat).index_copy(0, perm, x_hat)
    keep = torch.empty_like(kept).index_copy(0, perm, kept)
    return out, keep


def sa_hdn_loss(*args, **kwargs) -> torch.Tensor:
    """As ``westar_ops.reference.sa_hdn_loss``, vectorized: the arguments and their
    defaults are the reference's own (bound against its signature, so they cannot drift
    apart), and so is the result."""
    bound = _REFERENCE_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    pred, target, instances, valid = a["pred"], a["target"], a["instances"], a["valid"]
    include_global, eps, min_pixels = a["include_global"], a["eps"], a["min_pixels"]
    stats_grad = a["stats_grad"]
    batch, height, width = pred.shape[0], pred.shape[-2], pred.shape[-1]
    cdt = torch.float64 if pred.dtype == torch.float64 else torch.float32
    p = pred.reshape(batch, height, width).to(cdt)
    q = target.reshape(batch, height, width).detach().to(cdt)
    ok = torch.isfinite(q)
    if valid is not None:
        ok = ok & valid.reshape(batch, height, width).bool()
    ids = _levels(ok, instances, include_global)  # (C, B, H, W)
    levels = ids.shape[0]
    if levels == 0 or p.numel() == 0:
        return (p.sum() * 0).to(pred.dtype)
    plane = torch.arange(levels * batch, device=p.device).reshape(levels, batch, 1, 1)
    member = ids > 0
    key = torch.where(member, plane * 2**31 + ids, _SENTINEL).reshape(-1)
    # Values of memberships in no context are set to 0: they must not leak a NaN into
    # the (masked) gradient.
    pm = torch.where(member, p, 0).reshape(-1)
    qm = torch.where(member, q, 0).reshape(-1)
    p_hat, kept = _normalized(pm, key, eps, stats_grad, min_pixels)
    q_hat, _ = _normalized(qm, key, eps, "none", min_pixels)
    diff = torch.where(kept, (p_hat - q_hat).abs(), 0)
    count = kept.sum()
    loss = torch.where(count > 0, diff.sum() / count.clamp_min(1), p.sum() * 0)
    return loss.to(pred.dtype)
