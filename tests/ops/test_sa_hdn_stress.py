"""sa_hdn_loss on larger inputs: many contexts, hash-unfriendly ids, mixed small and big
segments over threads, half precision in big contexts, non-finite predictions."""

from __future__ import annotations

import pytest
import torch

import westar_ops
from tests.matrix import assert_close
from tests.ops.helpers import distinct_values, random_instances, target_values
from westar_ops import reference

# Every test runs with the AVX-512 CPU loops (where available) and the portable ones.
pytestmark = pytest.mark.usefixtures("cpu_isa")

forward = torch.ops.westar_ops.sa_hdn_forward


def loss_and_grad(fn, pred, *args, **kw):
    x = pred.clone().requires_grad_(True)
    loss = fn(x, *args, **kw)
    loss.backward()
    return loss.detach(), x.grad


def test_one_context_per_pixel_huge_random_ids(rng):
    """128x128 unique, random, huge ids (16384 contexts per image): every context is a
    single pixel, so the loss is half the global-only loss and the gradient half the
    global-only gradient; K and n are as expected."""
    b, h, w = 2, 128, 128
    pred = distinct_values((b, h, w), torch.float32, rng)
    target = target_values((b, h, w), torch.float32, rng)
    ids = []
    for _ in range(b):
        pool = torch.randint(1, 2**31, (3 * h * w,), generator=rng).unique()
        ids.append(pool[torch.randperm(pool.numel(), generator=rng)[: h * w]])
    ids = torch.stack(ids)
    inst = ids.reshape(b, 1, h, w)
    loss, grad = loss_and_grad(westar_ops.sa_hdn_loss, pred, target, inst)
    loss_g, grad_g = loss_and_grad(westar_ops.sa_hdn_loss, pred, target)
    torch.testing.assert_close(loss, loss_g / 2, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, grad_g / 2, rtol=1e-6, atol=1e-12)
    _, seg, stats, median_index, _info = forward(pred, target, inst, None, True, 1e-6, 1, 2)
    assert stats.shape == (b + b * h * w, 8)
    assert (stats[b:, 7] == 1).all() and (stats[:b, 7] == h * w).all()
    # canonical order: within an image, context numbers sorted like the ids
    for bb in range(b):
        ks = seg[1, bb].flatten()
        assert torch.equal(ks.argsort(), ids[bb].argsort())
    flat = torch.arange(b * h * w).reshape(b, h * w)
    assert torch.equal(median_index[b:].sort().values, flat.flatten())


@pytest.mark.parametrize("stride_bits", [8, 16, 19])
def test_hash_unfriendly_ids(rng, stride_bits):
    """Ids that are multiples of a power of two (colliding under weak hashes) give the
    same outputs as compact ids."""
    b, h, w = 2, 48, 64
    pred = distinct_values((b, h, w), torch.float32, rng)
    target = target_values((b, h, w), torch.float32, rng)
    num = min(2000, (2**31 - 1) >> stride_bits)
    compact = torch.randint(0, num, (b, 2, h, w), generator=rng)
    spread = compact << stride_bits
    assert int(spread.max()) < 2**31
    outs = []
    for inst in (compact, spread):
        x = pred.clone().requires_grad_(True)
        res = forward(x, target, inst, None, True, 1e-6, 1, 2)
        res[0].backward()
        outs.append([t.detach() for t in res] + [x.grad])
    for a, c in zip(*outs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_many_mixed_contexts_multithreaded(rng, dtype):
    """Small and big contexts together over several levels, size split over threads."""
    b, h, w = 2, 96, 160
    pred = distinct_values((b, h, w), dtype, rng)
    target = target_values((b, h, w), dtype, rng)
    fine = random_instances(b, 1, h, w, rng, num_ids=150)  # ~100-pixel contexts
    coarse = torch.zeros(b, 1, h, w, dtype=torch.int64)
    coarse[:, 0, : h // 2] = 7  # one ~7700-pixel context
    coarse[:, 0, h // 2 :, : w // 3] = 3  # ~2500 pixels
    coarse[:, 0, -1, -1] = 9  # a single pixel
    inst = torch.cat([fine, coarse], dim=1)
    valid = torch.rand(b, h, w, generator=rng) > 0.05
    target[0, 10:20, 10:30] = float("nan")
    for stats_grad in ("full", "none"):
        kw = dict(min_pixels=2, stats_grad=stats_grad)
        loss, grad = loss_and_grad(westar_ops.sa_hdn_loss, pred, target, inst, valid, **kw)
        loss_r, grad_r = loss_and_grad(reference.sa_hdn_loss, pred, target, inst, valid, **kw)
        assert_close(loss, loss_r, "loss")
        assert_close(grad, grad_r, "grad")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_big_half_contexts(rng, dtype):
    """Half inputs in contexts above the 1024/16384-pixel thresholds. Ties are
    unavoidable there, so compare the loss and the gradient summed over equal values."""
    b, h, w = 1, 130, 140
    pred = (torch.randn(b, h, w, generator=rng) * 4).to(dtype)
    target = target_values((b, h, w), dtype, rng)
    inst = random_instances(b, 1, h, w, rng, num_ids=3)
    loss, grad = loss_and_grad(westar_ops.sa_hdn_loss, pred, target, inst)
    loss_r, grad_r = loss_and_grad(reference.sa_hdn_loss, pred, target, inst)
    assert_close(loss, loss_r, "loss")
    _, key = torch.unique(pred.float(), return_inverse=True)
    key = key.flatten()
    sums = torch.zeros(int(key.max()) + 1, dtype=torch.float64)
    s = sums.clone().index_add_(0, key, grad.double().flatten())
    s_r = sums.clone().index_add_(0, key, grad_r.double().flatten())
    # bf16/f16 rounding of each element's gradient: compare with an absolute tolerance
    # scaled by the largest gradient and the group size
    count = torch.zeros_like(sums).index_add_(0, key, torch.ones_like(key, dtype=torch.float64))
    bound = 2e-2 * grad_r.double().abs().max() * count
    assert ((s - s_r).abs() <= bound).all()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("size", [(1, 4, 5), (1, 40, 120)])
def test_nonfinite_pred_makes_nan(rng, value, size):
    pred = distinct_values(size, torch.float32, rng)
    target = target_values(size, torch.float32, rng)
    pred[0, 2, 3] = value
    assert torch.isnan(westar_ops.sa_hdn_loss(pred, target))
    assert torch.isnan(reference.sa_hdn_loss(pred, target))
