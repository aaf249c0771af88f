"""Seeded workloads shared by the benchmark suites (CPU and GPU).

Every function builds its tensors on the CPU from a seeded generator, then moves them to
``device``, so the same seed gives the same data on every device.

- :func:`instance_workload`: B images of HxW, one instance level with ``num_instances``
  instances of uneven size (weighted Voronoi cells, some background), plus the global
  context when the loss is called with ``include_global=True``; 10% invalid pixels.
- :func:`grid_workload`: the classic HDN grid contexts (4x4 and 2x2 cells, 21 contexts
  with the global one), 10% invalid pixels.
- :func:`ordinal_workload`: pairs and labels for the ordinal ranking loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from westar_ops.reference import grid_instances

__all__ = [
    "SaHdnWorkload",
    "OrdinalWorkload",
    "depth_maps",
    "instance_workload",
    "grid_workload",
    "ordinal_workload",
]


@dataclass
class SaHdnWorkload:
    """Arguments of ``sa_hdn_loss`` (pred has requires_grad=False; callers clone it)."""

    name: str
    pred: torch.Tensor
    target: torch.Tensor
    instances: torch.Tensor | None
    valid: torch.Tensor | None

    def args(self, pred: torch.Tensor | None = None):
        return (self.pred if pred is None else pred, self.target, self.instances, self.valid)


@dataclass
class OrdinalWorkload:
    name: str
    pred: torch.Tensor
    pairs: torch.Tensor
    labels: torch.Tensor


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def depth_maps(
    batch: int,
    height: int,
    width: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device="cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pred, target), each (B, H, W): a smooth positive disparity-like target plus noise,
    and a prediction that is an affine map of it plus noise (no ties, almost surely)."""
    g = _gen(seed)
    ys = torch.linspace(0, 1, height)[:, None]
    xs = torch.linspace(0, 1, width)[None, :]
    phase = torch.rand(batch, 4, generator=g) * 6.283
    freq = 1.0 + 3.0 * torch.rand(batch, 4, generator=g)
    target = torch.empty(batch, height, width)
    for b in range(batch):
        f, p = freq[b], phase[b]
        target[b] = (
            2.0
            + torch.sin(f[0] * 3.0 * ys + p[0]) * torch.cos(f[1] * 2.0 * xs + p[1])
            + 0.5 * torch.sin(f[2] * 5.0 * (xs + ys) + p[2])
            + 0.3 * ys
        )
    target = target + 0.05 * torch.rand(batch, height, width, generator=g)
    scale = 0.5 + torch.rand(batch, 1, 1, generator=g)
    shift = torch.randn(batch, 1, 1, generator=g)
    pred = scale * target + shift + 0.2 * torch.randn(batch, height, width, generator=g)
    return pred.to(device=device, dtype=dtype), target.to(device=device, dtype=dtype)


def _invalid_mask(batch: int, height: int, width: int, fraction: float, g: torch.Generator):
    return torch.rand(batch, height, width, generator=g) >= fraction


def uneven_instances(
    batch: int,
    height: int,
    width: int,
    num_instances: int = 64,
    *,
    seed: int = 0,
    sparse_ids: bool = False,
    background: float = 0.1,
) -> torch.Tensor:
    """(B, H, W) int32 label map with ``num_instances`` cells of uneven size per image.

    Multiplicatively weighted Voronoi cells (weights spread over ~10x), so sizes range
    from a few hundred pixels to a large part of the image. About ``background`` of the
    pixels (a band of the farthest ones from any seed) get id 0. With ``sparse_ids`` the
    ids 1..num_instances are replaced by distinct random ids in [1, 2**31 - 1].
    """
    g = _gen(seed + 1)
    ys = torch.arange(height, dtype=torch.float32)[:, None]
    xs = torch.arange(width, dtype=torch.float32)[None, :]
    out = torch.empty(batch, height, width, dtype=torch.int32)
    for b in range(batch):
        cy = torch.rand(num_instances, generator=g) * height
        cx = torch.rand(num_instances, generator=g) * width
        weight = torch.exp(torch.rand(num_instances, generator=g) * 2.3)
        best = torch.full((height, width), float("inf"))
        label = torch.zeros(height, width, dtype=torch.int32)
        for i in range(num_instances):
            dist = ((ys - cy[i]) ** 2 + (xs - cx[i]) ** 2).sqrt() / weight[i]
            closer = dist < best
            best = torch.where(closer, dist, best)
            label = torch.where(closer, torch.tensor(i + 1, dtype=torch.int32), label)
        if background > 0:
            cut = torch.quantile(best.flatten()[:: max(1, best.numel() // 100_000)], 1 - background)
            label = torch.where(best > cut, torch.zeros_like(label), label)
        out[b] = label
    if sparse_ids:
        table = torch.zeros(num_instances + 1, dtype=torch.int64)
        ids: list[int] = []
        while len(ids) < num_instances:  # distinct random ids in [1, 2**31 - 1]
            draw = int(torch.randint(1, 2**31, (1,), generator=g))
            if draw not in ids:
                ids.append(draw)
        table[1:] = torch.tensor(ids, dtype=torch.int64)
        out = table[out.long()].to(torch.int32)
    return out


def instance_workload(
    batch: int = 4,
    height: int = 518,
    width: int = 518,
    num_instances: int = 64,
    *,
    seed: int = 0,
    sparse_ids: bool = False,
    invalid: float = 0.1,
    dtype: torch.dtype = torch.float32,
    device="cpu",
) -> SaHdnWorkload:
    """Workload A: one instance level of uneven instances (+ the global context)."""
    pred, target = depth_maps(batch, height, width, seed=seed, dtype=dtype)
    inst = uneven_instances(batch, height, width, num_instances, seed=seed, sparse_ids=sparse_ids)
    valid = _invalid_mask(batch, height, width, invalid, _gen(seed + 2))
    name = f"instances{num_instances}{'-sparse' if sparse_ids else ''}-{batch}x{height}x{width}"
    return SaHdnWorkload(
        name,
        pred.to(device),
        target.to(device),
        inst.unsqueeze(1).to(device),
        valid.to(device),
    )


def grid_workload(
    batch: int = 4,
    height: int = 518,
    width: int = 518,
    grids: tuple[int, ...] = (4, 2),
    *,
    seed: int = 0,
    invalid: float = 0.1,
    dtype: torch.dtype = torch.float32,
    device="cpu",
) -> SaHdnWorkload:
    """Workload B: classic HDN grid contexts (21 with the global one for grids (4, 2))."""
    pred, target = depth_maps(batch, height, width, seed=seed, dtype=dtype)
    inst = grid_instances(batch, height, width, grids)
    valid = _invalid_mask(batch, height, width, invalid, _gen(seed + 2))
    name = f"grid{'x'.join(map(str, grids))}-{batch}x{height}x{width}"
    return SaHdnWorkload(
        name, pred.to(device), target.to(device), inst.to(device), valid.to(device)
    )


def ordinal_workload(
    batch: int = 4,
    height: int = 518,
    width: int = 518,
    pairs_per_image: int = 4096,
    *,
    seed: int = 0,
    ignored: float = 0.1,
    dtype: torch.dtype = torch.float32,
    device="cpu",
) -> OrdinalWorkload:
    """Random point pairs with labels in {-1, 0, +1} and ~``ignored`` padding (-100)."""
    pred, target = depth_maps(batch, height, width, seed=seed, dtype=dtype)
    g = _gen(seed + 3)
    ys = torch.randint(0, height, (batch, pairs_per_image, 2), generator=g)
    xs = torch.randint(0, width, (batch, pairs_per_image, 2), generator=g)
    pairs = torch.stack([ys, xs], dim=-1)  # (B, P, 2, 2)
    flat = ys * width + xs
    ta = target.reshape(batch, -1).float().gather(1, flat[..., 0])
    tb = target.reshape(batch, -1).float().gather(1, flat[..., 1])
    labels = torch.sign(ta - tb).to(torch.int64)
    labels[(ta - tb).abs() < 0.02] = 0
    labels[torch.rand(batch, pairs_per_image, generator=g) < ignored] = -100
    name = f"ordinal-{batch}x{pairs_per_image}"
    return OrdinalWorkload(name, pred.to(device), pairs.to(device), labels.to(device))
