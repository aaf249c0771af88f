"""Plain-PyTorch implementations that define each op in code (see docs/ops.md).

They are slow on purpose: a loop over contexts with ``torch.median`` each, the loss a
user would write by hand. The kernels are tested against them, and the benchmarks use
them as the baseline. Gradients come from PyTorch's autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "sa_hdn_loss",
    "ordinal_ranking_loss",
    "normalized_ordinal_ranking_loss",
    "lora_delta_sq_norm",
    "grid_instances",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _normalize(x: torch.Tensor, eps: float, stats_grad: str) -> torch.Tensor:
    """(x - t) / (s + eps) with t the lower median and s the mean absolute deviation."""
    t = x.median()  # lower median; its gradient goes to the selected element
    if stats_grad != "full":
        t = t.detach()
    s = (x - t).abs().mean()
    if stats_grad == "none":
        s = s.detach()
    return (x - t) / (s + eps)


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
) -> torch.Tensor:
    """Semantics-aware hierarchical depth normalization loss, one context at a time.

    pred, target: (B, H, W) or (B, 1, H, W). instances: None, (B, H, W) or (B, L, H, W)
    integer ids (0 = no instance). valid: None or (B, H, W) bool. Returns a 0-dim
    tensor of pred's dtype: the mean of |pred_hat - target_hat| over all (context,
    pixel) memberships of the batch.
    """
    batch, height, width = pred.shape[0], pred.shape[-2], pred.shape[-1]
    cdt = _compute_dtype(pred.dtype)
    p = pred.reshape(batch, height, width).to(cdt)
    q = target.reshape(batch, height, width).detach().to(cdt)
    ok = torch.isfinite(q)
    if valid is not None:
        ok = ok & valid.reshape(batch, height, width).bool()
    levels: list[torch.Tensor] = []
    if include_global:
        levels.append(torch.ones_like(ok, dtype=torch.int64))
    if instances is not None:
        inst = instances.to(torch.int64)
        if inst.dim() == 3:
            inst = inst.unsqueeze(1)
        levels.extend(inst.unbind(1))

    total = p.new_zeros(())
    count = 0
    for labels in levels:
        for b in range(batch):
            lab = torch.where(ok[b], labels[b], torch.zeros_like(labels[b]))
            for ident in torch.unique(lab).tolist():
                if ident <= 0:
                    continue
                member = lab == ident
                n = int(member.sum())
                if n < min_pixels:
                    continue
                x_hat = _normalize(p[b][member], eps, stats_grad)
                y_hat = _normalize(q[b][member], eps, "none")
                total = total + (x_hat - y_hat).abs().sum()
                count += n
    if count == 0:
        return (p.sum() * 0).to(pred.dtype)
    return (total / count).to(pred.dtype)


def ordinal_ranking_loss(
    pred: torch.Tensor,
    pairs: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float = 0.0,
    kind: str = "margin",
    equal_weight: float = 1.0,
) -> torch.Tensor:
    """Mean pairwise ordinal loss over the pairs whose label is -1, 0 or +1.

    pred: (B, H, W) or (B, 1, H, W). pairs: (B, P, 2, 2) integer (y, x) of points a and
    b. labels: (B, P); +1 wants pred[a] > pred[b], -1 the opposite, 0 equality.
    """
    batch, height, width = pred.shape[0], pred.shape[-2], pred.shape[-1]
    p = pred.reshape(batch, height * width).to(_compute_dtype(pred.dtype))
    labels = labels.to(torch.int64)
    used = (labels >= -1) & (labels <= 1)
    b_idx, p_idx = used.nonzero(as_tuple=True)
    if b_idx.numel() == 0:
        return (p.sum() * 0).to(pred.dtype)
    pts = pairs.to(torch.int64)[b_idx, p_idx]  # (n, 2, 2)
    flat_a = pts[:, 0, 0] * width + pts[:, 0, 1]
    flat_b = pts[:, 1, 0] * width + pts[:, 1, 1]
    d = p[b_idx, flat_a] - p[b_idx, flat_b]
    lab = labels[b_idx, p_idx].to(d.dtype)
    if kind == "margin":
        ranked = torch.clamp_min(margin - lab * d, 0)
    elif kind == "logistic":
        ranked = F.softplus(-lab * d)
    else:
        raise ValueError(f"kind must be 'margin' or 'logistic', got {kind!r}")
    per_pair = torch.where(lab == 0, equal_weight * d * d, ranked)
    return per_pair.mean().to(pred.dtype)


def normalized_ordinal_ranking_loss(
    pred: torch.Tensor,
    pairs: torch.Tensor,
    labels: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    eps: float = 1e-6,
    stats_grad: str = "full",
    margin: float = 0.0,
    kind: str = "margin",
    equal_weight: float = 1.0,
) -> torch.Tensor:
    """`ordinal_ranking_loss` of pred normalized image by image: every usable pixel
    (valid True, or all) becomes (p - t) / (s + eps), t the lower median and s the mean
    absolute deviation of the image's usable pixels (`torch.median`, autograd through
    both). Pairs with an unusable end are ignored.
    """
    batch, height, width = pred.shape[0], pred.shape[-2], pred.shape[-1]
    p = pred.reshape(batch, height * width).to(_compute_dtype(pred.dtype))
    usable = torch.ones_like(p, dtype=torch.bool)
    if valid is not None:
        usable = valid.reshape(batch, height * width).bool()
    images = []
    for b in range(batch):
        where = usable[b].nonzero().flatten()
        image = torch.zeros_like(p[b])
        if where.numel() > 0:
            image = image.index_put((where,), _normalize(p[b][where], eps, stats_grad))
        images.append(image)
    normalized = torch.stack(images).reshape(batch, height, width)
    labels = labels.to(torch.int64)
    pairs = pairs.to(torch.int64)
    used = (labels >= -1) & (labels <= 1)
    flat = torch.where(used[..., None], pairs[..., 0] * width + pairs[..., 1], 0)
    ends_usable = usable.gather(1, flat.reshape(batch, -1)).reshape(flat.shape).all(-1)
    labels = torch.where(used & ends_usable, labels, -100)
    loss = ordinal_ranking_loss(
        normalized, pairs, labels, margin=margin, kind=kind, equal_weight=equal_weight
    )
    return loss.to(pred.dtype)


def lora_delta_sq_norm(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """|| scaling * B @ A ||_F^2, forming the full (d_out, d_in) product."""
    return (scaling * (B @ A)).pow(2).sum()


def grid_instances(
    batch: int, height: int, width: int, grids: tuple[int, ...] = (4, 2), device=None
) -> torch.Tensor:
    """Classic HDN contexts as label maps: one level per grid size, one id per cell.

    Returns (batch, len(grids), height, width) int32; cell (i, j) of a g x g grid gets id
    1 + i * g + j. With include_global this gives the 16 + 4 + 1 = 21 contexts of HDN.
    """
    levels = []
    for g in grids:
        rows = torch.arange(height, device=device) * g // height
        cols = torch.arange(width, device=device) * g // width
        levels.append(1 + rows[:, None] * g + cols[None, :])
    stacked = torch.stack(levels).to(torch.int32)
    return stacked.unsqueeze(0).expand(batch, -1, -1, -1).contiguous()
