"""normalized_ordinal_ranking_loss (and sa_hdn_loss(return_stats=True)) against the
reference, gradcheck, and its invariance to the scale and shift of the prediction.

The Triton backend runs the same parity checks in tests/triton/test_normalized_ordinal_triton.py.
"""

from __future__ import annotations

import pytest
import torch

import westar_ops
from tests.matrix import (
    DTYPES,
    assert_close,
    normalized_ordinal_case,
    normalized_ordinal_loss_and_grad,
)
from tests.ops.helpers import distinct_values
from westar_ops import reference

CUDA = torch.cuda.is_available() and "cuda" in westar_ops.available_backends("cuda")
BACKENDS = [
    ("cpu", "cpu"),
    pytest.param("cuda", "cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA kernels")),
]
MODES = ("full", "scale", "none")


def check_against_reference(backend, device, source, case, **kw):
    pred = case[0]
    loss, grad = normalized_ordinal_loss_and_grad(backend, device, source, *case, **kw)
    loss_ref, grad_ref = normalized_ordinal_loss_and_grad(None, device, source, *case, **kw)
    assert_close(loss, loss_ref, "loss")
    assert_close(grad, grad_ref, "grad")
    assert loss.item() > 0 and grad.abs().sum() > 0, "a case that tests nothing"
    return loss, grad, pred


@pytest.mark.parametrize("source", ["sa_hdn", "torch"])
@pytest.mark.parametrize("kind", ["margin", "logistic"])
@pytest.mark.parametrize("stats_grad", MODES)
@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_against_reference(rng, backend, device, stats_grad, kind, source):
    case = normalized_ordinal_case(rng, torch.float64, batch=4, height=6, width=11)
    check_against_reference(
        backend, device, source, case,
        stats_grad=stats_grad, kind=kind, margin=0.3, equal_weight=0.7,
    )  # fmt: skip


@pytest.mark.parametrize("source", ["sa_hdn", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes(rng, dtype, source):
    case = normalized_ordinal_case(rng, dtype, batch=3, height=9, width=13, pairs_per_image=40)
    check_against_reference("cpu", "cpu", source, case, kind="logistic", margin=0.5)


@pytest.mark.parametrize("source", ["sa_hdn", "torch"])
def test_stats_grad_modes_differ(rng, source):
    """The three modes are different gradients (the reference detaches t, then s)."""
    pred, target, valid, pairs, labels = normalized_ordinal_case(rng, torch.float64, 2, 6, 8)
    valid[0] = True  # 48 usable pixels in image 0: an even count, S3 = 1
    target = target.nan_to_num(1.0)
    case = (pred, target, valid, pairs, labels)
    grads = {
        m: normalized_ordinal_loss_and_grad("cpu", "cpu", source, *case, stats_grad=m)[1]
        for m in MODES
    }
    assert not torch.allclose(grads["full"], grads["none"])
    assert not torch.allclose(grads["scale"], grads["none"])
    # for an even number of usable pixels S3 = 1: the median's path shows
    assert not torch.allclose(grads["full"], grads["scale"])


def test_sources_agree(rng):
    """stats from sa_hdn_loss and stats computed with torch over the same pixels."""
    pred, target, valid, pairs, labels = normalized_ordinal_case(rng, torch.float64)
    usable = valid & torch.isfinite(target)
    a = normalized_ordinal_loss_and_grad("cpu", "cpu", "sa_hdn", pred, target, valid, pairs, labels)
    b = normalized_ordinal_loss_and_grad("cpu", "cpu", "torch", pred, target, usable, pairs, labels)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["margin", "logistic"])
def test_gradcheck(rng, kind):
    """The exact derivative (stats_grad="full"; the other modes are not derivatives of
    the loss, and are checked against the reference with detached statistics)."""
    pred, target, valid, pairs, labels = normalized_ordinal_case(rng, torch.float64, batch=3)
    kw = dict(kind=kind, margin=0.2, equal_weight=0.5)

    def from_sa_hdn(x):
        _, stats = westar_ops.sa_hdn_loss(x, target, None, valid, return_stats=True)
        return westar_ops.normalized_ordinal_ranking_loss(x, pairs, labels, stats=stats, **kw)

    def from_torch(x):
        return westar_ops.normalized_ordinal_ranking_loss(x, pairs, labels, valid=valid, **kw)

    for fn in (from_sa_hdn, from_torch):
        x = pred.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-7, atol=1e-6, rtol=1e-5)


def _normalized(p, target, valid, pairs, labels, source, **kw):
    """normalized_ordinal_ranking_loss with the statistics of sa_hdn_loss (source
    "sa_hdn") or computed by the op itself (source "torch")."""
    if source == "sa_hdn":
        _, stats = westar_ops.sa_hdn_loss(p, target, None, valid, return_stats=True)
        return westar_ops.normalized_ordinal_ranking_loss(p, pairs, labels, stats=stats, **kw)
    return westar_ops.normalized_ordinal_ranking_loss(p, pairs, labels, valid=valid, **kw)


def _invariance_case(rng):
    """Positive disparity-like values with a mean absolute deviation of about 2, so that
    eps = 1e-6 stays far below the deviation of the scaled predictions."""
    b, h, w, p = 3, 12, 17, 60
    pred = torch.rand(b, h, w, generator=rng) * 8 + 1
    target = torch.rand(b, h, w, generator=rng) + 0.5
    valid = torch.rand(b, h, w, generator=rng) > 0.2
    ys = torch.randint(0, h, (b, p, 2), generator=rng)
    xs = torch.randint(0, w, (b, p, 2), generator=rng)
    labels = torch.randint(-1, 2, (b, p), generator=rng)
    return pred, target, valid, torch.stack([ys, xs], -1), labels


@pytest.mark.parametrize("source", ["sa_hdn", "torch"])
@pytest.mark.parametrize("kind", ["margin", "logistic"])
def test_scale_and_shift_invariance(rng, kind, source):
    pred, target, valid, pairs, labels = _invariance_case(rng)
    kw = dict(kind=kind, margin=0.5)

    def run(p):
        x = p.clone().requires_grad_(True)
        loss = _normalized(x, target, valid, pairs, labels, source, **kw)
        (grad,) = torch.autograd.grad(loss, x)
        return loss.detach(), grad

    base, grad = run(pred)
    assert base > 0.05
    for c in (0.1, 7.3, 100.0):
        scaled, grad_c = run(pred * c)
        torch.testing.assert_close(scaled, base, rtol=1e-5, atol=0)
        torch.testing.assert_close(grad_c * c, grad, rtol=1e-4, atol=1e-7)  # d/d(c p) = grad / c
    for shift in (-3.0, 25.0):
        torch.testing.assert_close(run(pred + shift)[0], base, rtol=1e-5, atol=0)
    # the raw term is not scale-free
    raw = westar_ops.ordinal_ranking_loss(pred, pairs, labels, **kw)
    raw_small = westar_ops.ordinal_ranking_loss(pred * 0.01, pairs, labels, **kw)
    assert abs(float(raw_small) - float(raw)) > 0.1 * float(raw)


@pytest.mark.parametrize("source", ["sa_hdn", "torch"])
def test_non_contiguous_and_4d_pred(rng, source):
    pred, target, valid, pairs, labels = normalized_ordinal_case(
        rng, torch.float32, height=6, width=9
    )
    leaf = pred.transpose(1, 2).contiguous()  # (B, W, H)
    kw = dict(margin=0.1, kind="logistic")
    outs = []
    for view in (lambda x: x.transpose(1, 2), lambda x: x.transpose(1, 2).contiguous()[:, None]):
        x = leaf.clone().requires_grad_(True)
        loss = _normalized(view(x), target, valid, pairs, labels, source, **kw)
        (grad,) = torch.autograd.grad(loss, x)
        outs.append((loss.detach(), grad))
    assert not leaf.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(outs[0], outs[1])
    usable = valid & torch.isfinite(target) if source == "sa_hdn" else valid
    y = leaf.clone().requires_grad_(True)
    ref = reference.normalized_ordinal_ranking_loss(
        y.transpose(1, 2), pairs, labels, valid=usable, **kw
    )
    (grad_ref,) = torch.autograd.grad(ref, y)
    assert_close(outs[0][0], ref.detach(), "loss")
    assert_close(outs[0][1], grad_ref, "grad")


@pytest.mark.parametrize("source", ["sa_hdn", "torch"])
@pytest.mark.parametrize("case", ["no_pairs", "all_ignored", "no_usable_pixel", "empty_batch"])
def test_nothing_to_use_gives_zero(rng, case, source):
    pred, target, valid, pairs, labels = normalized_ordinal_case(rng, torch.float32)
    if case == "no_pairs":
        pairs, labels = pairs[:, :0], labels[:, :0]
    elif case == "all_ignored":
        labels = torch.full_like(labels, -100)
    elif case == "no_usable_pixel":
        valid = torch.zeros_like(valid)
    else:
        pred, target, valid, pairs, labels = (t[:0] for t in (pred, target, valid, pairs, labels))
    x = pred.clone().requires_grad_(True)
    loss = _normalized(x, target, valid, pairs, labels, source)
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0.0 and loss.dtype == pred.dtype
    assert grad.shape == pred.shape and torch.count_nonzero(grad) == 0


def test_no_valid_means_every_pixel(rng):
    pred, _, _, pairs, labels = normalized_ordinal_case(rng, torch.float64)
    everywhere = torch.ones(pred.shape, dtype=torch.bool)
    a = westar_ops.normalized_ordinal_ranking_loss(pred, pairs, labels)
    b = westar_ops.normalized_ordinal_ranking_loss(pred, pairs, labels, valid=everywhere)
    ref = reference.normalized_ordinal_ranking_loss(pred, pairs, labels)
    assert torch.equal(a, b)
    assert_close(a, ref, "loss")


def test_eps(rng):
    """eps is added to the deviation (stats=None); with stats, SA-HDN's eps is in them."""
    pred, target, _, pairs, labels = normalized_ordinal_case(rng, torch.float64)
    for eps in (0.0, 0.5):
        a = westar_ops.normalized_ordinal_ranking_loss(pred, pairs, labels, eps=eps, margin=1)
        ref = reference.normalized_ordinal_ranking_loss(pred, pairs, labels, eps=eps, margin=1)
        assert_close(a, ref, "loss")
        _, stats = westar_ops.sa_hdn_loss(pred, target.nan_to_num(1.0), eps=eps, return_stats=True)
        b = westar_ops.normalized_ordinal_ranking_loss(pred, pairs, labels, stats=stats, margin=1)
        assert_close(b, ref, "loss")


# ------------------------------------------------------------- sa_hdn_loss stats


def test_return_stats(rng):
    pred = distinct_values((2, 6, 7), torch.float32, rng)
    target = torch.rand(2, 6, 7, generator=rng) + 0.5
    instances = torch.randint(0, 3, (2, 1, 6, 7), generator=rng)
    x = pred.clone().requires_grad_(True)
    loss, stats = westar_ops.sa_hdn_loss(x, target, instances, return_stats=True)
    assert isinstance(stats, westar_ops.NormalizationStats)
    plain = westar_ops.sa_hdn_loss(pred, target, instances)
    assert torch.equal(loss.detach(), plain)
    raw = torch.ops.westar_ops.sa_hdn_forward(pred, target, instances, None, True, 1e-6, 1, 2)
    assert torch.equal(stats.seg, raw[1][0]) and stats.seg.shape == (2, 6, 7)
    assert torch.equal(stats.stats, raw[2]) and torch.equal(stats.median_index, raw[3])
    assert not any(t.requires_grad for t in stats)
    loss.backward()  # the loss still differentiates
    assert x.grad.abs().sum() > 0


def test_errors(rng):
    pred, target, valid, pairs, labels = normalized_ordinal_case(rng, torch.float32)
    with pytest.raises(ValueError, match="include_global"):
        westar_ops.sa_hdn_loss(pred, target, include_global=False, return_stats=True)
    _, stats = westar_ops.sa_hdn_loss(pred, target, None, valid, return_stats=True)
    fn = westar_ops.normalized_ordinal_ranking_loss
    with pytest.raises(ValueError, match="valid: give it to sa_hdn_loss"):
        fn(pred, pairs, labels, stats=stats, valid=valid)
    with pytest.raises(TypeError, match="stats must be the NormalizationStats"):
        fn(pred, pairs, labels, stats=stats.stats)
    with pytest.raises(ValueError, match="stats.seg must be"):
        fn(pred[:2], pairs[:2], labels[:2], stats=stats)
    with pytest.raises(ValueError, match="stats_grad"):
        fn(pred, pairs, labels, stats_grad="all")
    with pytest.raises(ValueError, match="eps"):
        fn(pred, pairs, labels, eps=-1.0)
    with pytest.raises(TypeError, match="valid must be a bool"):
        fn(pred, pairs, labels, valid=valid.float())
    bad = pairs.clone()
    bad[1, 0] = torch.tensor([[0, 0], [0, 99]])
    labels = labels.clone()
    labels[1, 0] = 1
    with pytest.raises(ValueError, match=r"pairs\[1, 0\] .* lies outside"):
        fn(pred, bad, labels, stats=stats)
