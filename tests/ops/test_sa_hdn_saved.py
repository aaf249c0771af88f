"""sa_hdn_forward's saved tensors (seg, stats, median_index) against an independent
computation (docs/internals.md), and sa_hdn_backward against the documented formula."""

from __future__ import annotations

import pytest
import torch

import westar_ops  # loads the library that defines torch.ops.westar_ops
from tests.matrix import DTYPES
from tests.ops.helpers import (
    distinct_values,
    expected_forward,
    random_instances,
    remap_ids,
    target_values,
)

# Every test runs with the AVX-512 CPU loops (where available) and the portable ones.
pytestmark = pytest.mark.usefixtures("cpu_isa")

forward = torch.ops.westar_ops.sa_hdn_forward
backward = torch.ops.westar_ops.sa_hdn_backward

STATS_TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-5, 1e-4),
    torch.bfloat16: (1e-5, 1e-4),
}


def check_saved(pred, target, inst, valid, include_global=True, eps=1e-6, min_pixels=1):
    loss, seg, stats, median_index, info = forward(
        pred, target, inst, valid, include_global, eps, min_pixels, 2
    )
    exp_loss, exp_seg, exp_stats, exp_medians = expected_forward(
        pred, target, inst, valid, include_global, eps, min_pixels
    )
    levels = int(include_global) + (inst.shape[1] if inst is not None else 0)
    b, h, w = pred.shape
    assert seg.dtype == torch.int32 and seg.is_contiguous()
    assert seg.shape == (levels, b, h, w)
    sdt = torch.float64 if pred.dtype == torch.float64 else torch.float32
    assert stats.dtype == sdt and stats.is_contiguous()
    assert median_index.dtype == torch.int64
    k = exp_stats.shape[0]
    assert stats.shape == (k, 8) and median_index.shape == (k,)  # exactly K rows on the CPU
    assert info.tolist() == [k, int(exp_stats[:, 7].sum()), -1, -1]
    # canonical order: seg numbers the contexts by (level, image, id ascending)
    assert torch.equal(seg, exp_seg)
    # medians are elements of the data: exact; n and S3 are integers: exact
    for col in (0, 2, 6, 7):
        assert torch.equal(stats[:, col], exp_stats[:, col]), f"stats column {col}"
    rtol, atol = STATS_TOL[pred.dtype]
    torch.testing.assert_close(stats[:, (1, 3)], exp_stats[:, (1, 3)], rtol=rtol, atol=atol)
    # S1 is an integer sum of signs; S2 a sum of |p_hat| sized terms
    torch.testing.assert_close(stats[:, 4], exp_stats[:, 4], rtol=0, atol=0)
    scale = exp_stats[:, 7].clamp_min(1)
    torch.testing.assert_close(stats[:, 5] / scale, exp_stats[:, 5] / scale, rtol=rtol, atol=atol)
    for kk in range(k):
        assert int(median_index[kk]) in exp_medians[kk].tolist(), f"median_index[{kk}]"
    assert loss.dtype == pred.dtype
    torch.testing.assert_close(
        loss.double(),
        torch.tensor(exp_loss, dtype=torch.float64),
        rtol={torch.float64: 1e-10, torch.float32: 1e-5}.get(pred.dtype, 1e-2),
        atol=1e-6,
    )
    return loss, seg, stats, median_index


@pytest.mark.parametrize("include_global", [True, False])
@pytest.mark.parametrize("levels", [None, 0, 1, 3])
def test_saved_levels(rng, levels, include_global):
    b, h, w = 2, 7, 13
    pred = distinct_values((b, h, w), torch.float64, rng)
    target = target_values((b, h, w), torch.float64, rng)
    inst = None if levels is None else random_instances(b, levels, h, w, rng, num_ids=5)
    valid = torch.rand(b, h, w, generator=rng) > 0.2
    check_saved(pred, target, inst, valid, include_global)


@pytest.mark.parametrize("dtype", DTYPES)
def test_saved_dtypes(rng, dtype):
    b, h, w = 2, 9, 10
    pred = distinct_values((b, h, w), dtype, rng)
    target = target_values((b, h, w), dtype, rng)
    inst = random_instances(b, 2, h, w, rng)
    target.view(-1)[::17] = float("nan")
    check_saved(pred, target, inst, None, min_pixels=3)


def test_saved_canonical_order_huge_ids(rng):
    """Ids in descending spatial order and huge: contexts still sorted by id per image."""
    b, h, w = 2, 6, 8
    pred = distinct_values((b, h, w), torch.float32, rng)
    target = target_values((b, h, w), torch.float32, rng)
    inst = remap_ids(random_instances(b, 2, h, w, rng, num_ids=6), rng)
    inst[:, 1] = inst[:, 1].flip(-1).flip(-2)
    _, seg, stats, _ = check_saved(pred, target, inst, None, include_global=False)
    # numbers increase with (level, image, id)
    for c in range(seg.shape[0]):
        for bb in range(b):
            ids = inst[bb, c][seg[c, bb] >= 0]
            ks = seg[c, bb][seg[c, bb] >= 0]
            order = ids.argsort()
            assert (ks[order].diff() >= 0).all()


def test_saved_skipped_and_invalid_are_minus_one(rng):
    b, h, w = 2, 6, 6
    pred = distinct_values((b, h, w), torch.float64, rng)
    target = target_values((b, h, w), torch.float64, rng)
    inst = torch.zeros(b, 1, h, w, dtype=torch.int16)
    inst[:, 0, :3] = 5  # 18 pixels
    inst[:, 0, 3:, :2] = 9  # 6 pixels: skipped with min_pixels=7
    valid = torch.ones(b, h, w, dtype=torch.bool)
    valid[1, 0, 0] = False
    target[0, 5, 5] = float("inf")
    _, seg, stats, _ = check_saved(pred, target, inst, valid, include_global=True, min_pixels=7)
    assert seg.shape[0] == 2
    assert (seg[1][inst[:, 0] == 9] == -1).all()  # skipped context
    assert (seg[1][inst[:, 0] == 0] == -1).all()  # id 0
    assert (seg[:, 1, 0, 0] == -1).all() and (seg[:, 0, 5, 5] == -1).all()  # unusable
    # contexts: global b0, global b1, id5 b0, id5 b1
    assert stats[:, 7].tolist() == [35.0, 35.0, 18.0, 17.0]


def test_saved_no_context(rng):
    pred = distinct_values((2, 3, 4), torch.float32, rng)
    target = target_values((2, 3, 4), torch.float32, rng)
    loss, seg, stats, median_index, _info = forward(pred, target, None, None, False, 1e-6, 1, 2)
    assert seg.shape == (0, 2, 3, 4)
    assert stats.shape == (0, 8) and median_index.shape == (0,)
    assert loss.item() == 0.0
    grad = backward(torch.tensor(1.0), pred, target, seg, stats, median_index, 2)
    assert grad.shape == pred.shape and not grad.any()


@pytest.mark.parametrize("stats_grad", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backward_formula(rng, dtype, stats_grad):
    """sa_hdn_backward against the pixel_grad formula of docs/internals.md, evaluated
    here from the saved stats."""
    b, h, w = 2, 6, 7
    pred = distinct_values((b, h, w), dtype, rng)
    target = target_values((b, h, w), dtype, rng)
    inst = random_instances(b, 2, h, w, rng)
    loss, seg, stats, mi, info = forward(pred, target, inst, None, True, 1e-6, 1, stats_grad)
    g = torch.tensor(0.7, dtype=dtype)
    grad = backward(g, pred, target, seg, stats, mi, stats_grad)
    assert grad.shape == pred.shape and grad.dtype == dtype and grad.is_contiguous()
    st = stats.double()
    p, q = pred.double().flatten(), target.double().flatten()
    n_total = st[:, 7].sum()
    expected = torch.zeros_like(p)
    for c in range(seg.shape[0]):
        ks = seg[c].flatten()
        j = (ks >= 0).nonzero().flatten()
        k = ks[j].long()
        tp, dp, tq, dq, s1, s2, s3, n = st[k].unbind(1)
        r = torch.sign((p[j] - tp) / dp - (q[j] - tq) / dq)
        pg = r / dp
        if stats_grad >= 1:
            pg = pg - s2 / (dp * n) * torch.sign(p[j] - tp)
        if stats_grad == 2:
            is_med = mi[k] == j
            pg = pg + is_med * (-s1 / dp + s2 / (dp * n) * s3)
        expected.index_add_(0, j, pg)
    expected = (expected * 0.7 / n_total).reshape(b, h, w)
    rtol, atol = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-7)}[dtype]
    torch.testing.assert_close(grad.double(), expected, rtol=rtol, atol=atol)


def test_max_contexts_on_the_cpu(rng):
    """The CPU op keeps exactly K rows; max_contexts below K raises the documented error
    (the GPU backends make the loss NaN, or raise it with debug checks)."""
    b, h, w = 2, 6, 7
    pred = distinct_values((b, h, w), torch.float32, rng)
    target = target_values((b, h, w), torch.float32, rng)
    inst = random_instances(b, 2, h, w, rng)
    _, _, stats, mi, info = forward(pred, target, inst, None, True, 1e-6, 1, 2)
    k = stats.shape[0]
    assert int(info[0]) == k and mi.shape == (k,)
    for cap in (k, k + 5):  # enough: the same outputs
        out = forward(pred, target, inst, None, True, 1e-6, 1, 2, cap)
        assert torch.equal(out[2], stats) and torch.equal(out[4], info)
    with pytest.raises(
        ValueError, match=f"the batch has {k} contexts, more than max_contexts = {k - 1}"
    ):
        westar_ops.sa_hdn_loss(pred, target, inst, max_contexts=k - 1)
    with pytest.raises(ValueError, match="max_contexts must be None or an int >= 1"):
        westar_ops.sa_hdn_loss(pred, target, inst, max_contexts=0)


def test_debug_checks_switch(monkeypatch):
    from westar_ops import ops

    monkeypatch.delenv("WESTAR_OPS_DEBUG", raising=False)
    assert not ops.debug_checks()
    monkeypatch.setenv("WESTAR_OPS_DEBUG", "1")
    assert ops.debug_checks()
    ops.set_debug_checks(False)
    try:
        assert not ops.debug_checks()
    finally:
        ops.set_debug_checks(None)
    assert ops.debug_checks()
