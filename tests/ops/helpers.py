"""Input generators of the CPU op tests: tie-free random inputs, sparse ids, and an
independent computation of the saved per-context stats of ``sa_hdn_forward``. The dtypes,
the tolerance table and the compare helpers shared with the Triton and GPU tests are in
tests/matrix.py.
"""

from __future__ import annotations

import torch

ID_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)


def distinct_values(
    shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator
) -> torch.Tensor:
    """Values exactly representable in ``dtype`` and pairwise distinct within each image
    (the last two dims), so that medians and signs have no ties.

    Images of at most 256 pixels are exact even in bfloat16 (8-bit significand), 2048
    in float16; float32/float64 get continuous values.
    """
    *lead, h, w = shape
    n = h * w
    batch = 1
    for s in lead:
        batch *= s
    if dtype in (torch.float32, torch.float64):
        # randn is tie-free with probability 1; add a permutation to keep values apart.
        perm = torch.stack([torch.randperm(n, generator=gen) for _ in range(batch)]).double()
        noise = torch.rand(batch, n, generator=gen, dtype=torch.float64) * 0.5
        out = (perm + noise) / max(n, 1) * 4.0 - 2.0
        return out.reshape(shape).to(dtype)
    limit = 256 if dtype == torch.bfloat16 else 2048
    assert n <= limit, f"{n} pixels cannot be tie-free in {dtype}"
    perm = torch.stack([torch.randperm(n, generator=gen) for _ in range(batch)])
    # integers < limit are exact; shift so that values are centred near 0.
    return (perm - n // 2).reshape(shape).to(dtype)


def target_values(shape, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random targets (ties in the target are harmless: it gets no gradient)."""
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1).to(dtype)


def random_instances(
    batch: int, levels: int, h: int, w: int, gen: torch.Generator, num_ids: int = 4
) -> torch.Tensor:
    """(B, L, H, W) int64 ids in [0, num_ids)."""
    return torch.randint(0, num_ids, (batch, levels, h, w), generator=gen)


def remap_ids(instances: torch.Tensor, gen: torch.Generator, high: int = 2**31 - 1):
    """Map ids 1..m to distinct large sparse values, preserving their order (so that the
    canonical context order is unchanged); 0 stays 0."""
    m = int(instances.max()) if instances.numel() else 0
    big = torch.randperm(1_000_000, generator=gen)[:m].sort().values
    values = torch.cat([torch.zeros(1, dtype=torch.int64), high - 1_000_000 + big.long()])
    values[-1] = high if m > 0 else 0
    return values[instances.long()]


def expected_forward(
    pred: torch.Tensor,
    target: torch.Tensor,
    instances: torch.Tensor | None,
    valid: torch.Tensor | None,
    include_global: bool,
    eps: float,
    min_pixels: int,
):
    """Independent computation of (loss, seg, stats, median_index) of sa_hdn_forward.

    pred/target (B, H, W); instances None or (B, L, H, W). Stats are in float64 for
    float64 inputs, else float32 (the values are computed in float64 from the inputs and
    rounded, so compare with a tolerance).
    """
    batch, h, w = pred.shape
    p = pred.double().reshape(batch, -1)
    q = target.double().reshape(batch, -1)
    usable = torch.isfinite(q)
    if valid is not None:
        usable &= valid.reshape(batch, -1)
    levels = []
    if include_global:
        levels.append(torch.ones(batch, h * w, dtype=torch.int64))
    if instances is not None:
        for lv in range(instances.shape[1]):
            levels.append(instances[:, lv].reshape(batch, -1).long())
    seg = torch.full((len(levels), batch, h * w), -1, dtype=torch.int32)
    rows, medians = [], []
    total, count = 0.0, 0
    for c, lab in enumerate(levels):
        for b in range(batch):
            ids = lab[b][usable[b] & (lab[b] > 0)]
            for ident in sorted(set(ids.tolist())):
                member = usable[b] & (lab[b] == ident)
                n = int(member.sum())
                if n < max(min_pixels, 1):
                    continue
                k = len(rows)
                seg[c, b, member] = k
                idx = member.nonzero().flatten()
                pv, qv = p[b, idx], q[b, idx]
                tp, tq = pv.median(), qv.median()
                dp = (pv - tp).abs().mean() + eps
                dq = (qv - tq).abs().mean() + eps
                ph, qh = (pv - tp) / dp, (qv - tq) / dq
                r = torch.sign(ph - qh)
                s3 = torch.sign(pv - tp).sum()
                rows.append([tp, dp, tq, dq, r.sum(), (r * ph).sum(), s3, float(n)])
                medians.append(idx[pv == tp] + b * h * w)
                total += float((ph - qh).abs().sum())
                count += n
    sdt = torch.float64 if pred.dtype == torch.float64 else torch.float32
    stats = torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)
    stats = stats.reshape(len(rows), 8).to(sdt)
    loss = total / count if count else 0.0
    return loss, seg.reshape(len(levels), batch, h, w), stats, medians
