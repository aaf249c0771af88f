"""torch.library.opcheck on every op of the westar_ops family: schema, fake kernel,
autograd registration and AOT dispatch."""

from __future__ import annotations

import pytest
import torch

import westar_ops  # noqa: F401  (loads the library that defines torch.ops.westar_ops)
from tests.ops.helpers import distinct_values, random_instances, target_values

OPS = torch.ops.westar_ops


def sa_hdn_samples(gen):
    out = []
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        b, h, w = 2, 5, 6
        pred = distinct_values((b, h, w), dtype, gen).requires_grad_(True)
        target = target_values((b, h, w), dtype, gen)
        inst = random_instances(b, 2, h, w, gen).to(torch.int32)
        valid = torch.rand(b, h, w, generator=gen) > 0.2
        out.append((pred, target, inst, valid, True, 1e-6, 1, 2))
    pred = distinct_values((1, 3, 4), torch.float32, gen).requires_grad_(True)
    target = target_values((1, 3, 4), torch.float32, gen)
    out.append((pred, target, None, None, True, 0.01, 2, 1))
    # non-contiguous inputs, (B, 0, H, W) instances
    leaf = distinct_values((2, 6, 5), torch.float32, gen)
    out.append(
        (
            leaf.transpose(1, 2).requires_grad_(True),
            target_values((2, 5, 6), torch.float32, gen),
            random_instances(2, 0, 5, 6, gen).to(torch.uint8),
            None,
            True,
            1e-6,
            1,
            0,
        )
    )
    return out


@pytest.mark.parametrize("i", range(5))
def test_opcheck_sa_hdn_forward(rng, i):
    args = sa_hdn_samples(rng)[i]
    torch.library.opcheck(OPS.sa_hdn_forward.default, args)


@pytest.mark.parametrize("stats_grad", [0, 1, 2])
def test_opcheck_sa_hdn_backward(rng, stats_grad):
    pred, target, inst, valid, *rest = sa_hdn_samples(rng)[1]
    pred = pred.detach()
    _, seg, stats, median_index, info = OPS.sa_hdn_forward(pred, target, inst, valid, *rest)
    grad = torch.tensor(0.5)
    torch.library.opcheck(
        OPS.sa_hdn_backward.default, (grad, pred, target, seg, stats, median_index, stats_grad)
    )
    torch.library.opcheck(
        OPS.sa_hdn_backward.default,
        (grad, pred, target, seg, stats, median_index, stats_grad, info),
    )


def ordinal_samples(gen):
    out = []
    for dtype, kind in ((torch.float64, 0), (torch.float32, 1), (torch.float16, 0)):
        b, p, h, w = 2, 7, 4, 5
        pred = torch.randn(b, h, w, generator=gen).to(dtype).requires_grad_(True)
        pairs = torch.stack(
            [
                torch.randint(0, h, (b, p, 2), generator=gen),
                torch.randint(0, w, (b, p, 2), generator=gen),
            ],
            dim=-1,
        )
        labels = torch.tensor([1, -1, 0, -100])[torch.randint(0, 4, (b, p), generator=gen)]
        out.append((pred, pairs, labels, 0.3, kind, 0.8))
    return out


@pytest.mark.parametrize("i", range(3))
def test_opcheck_ordinal_forward(rng, i):
    torch.library.opcheck(OPS.ordinal_ranking_forward.default, ordinal_samples(rng)[i])


@pytest.mark.parametrize("i", range(3))
def test_opcheck_ordinal_backward(rng, i):
    pred, pairs, labels, margin, kind, ew = ordinal_samples(rng)[i]
    grad = torch.tensor(1.5, dtype=pred.dtype)
    torch.library.opcheck(
        OPS.ordinal_ranking_backward.default,
        (grad, pred.detach(), pairs, labels, margin, kind, ew),
    )
    _, count = OPS.ordinal_ranking_forward(pred.detach(), pairs, labels, margin, kind, ew)
    assert count.dtype == torch.int64 and count.dim() == 0
    assert int(count) == int(((labels >= -1) & (labels <= 1)).sum())
    torch.library.opcheck(
        OPS.ordinal_ranking_backward.default,
        (grad, pred.detach(), pairs, labels, margin, kind, ew, count),
    )


@pytest.mark.parametrize("shape", [(1, 5, 3), (4, 7, 6)])
def test_opcheck_lora(rng, shape):
    r, d_in, d_out = shape
    A = torch.randn(r, d_in, generator=rng, dtype=torch.float64, requires_grad=True)
    B = torch.randn(d_out, r, generator=rng, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(OPS.lora_delta_sq_norm.default, (A, B, 0.5))
    grad = torch.tensor(2.0, dtype=torch.float64)
    torch.library.opcheck(
        OPS.lora_delta_sq_norm_backward.default, (grad, A.detach(), B.detach(), 0.5)
    )
