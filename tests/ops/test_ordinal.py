"""ordinal_ranking_loss against the reference, torch's own losses and gradcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import westar_ops
from tests.matrix import DTYPES, assert_close
from westar_ops import reference


def random_pairs(b, p, h, w, gen):
    ys = torch.randint(0, h, (b, p, 2), generator=gen)
    xs = torch.randint(0, w, (b, p, 2), generator=gen)
    return torch.stack([ys, xs], dim=-1)  # (B, P, 2, 2): [..., point, (y, x)]


def random_labels(b, p, gen, ignored=(-100, 5)):
    choices = torch.tensor([1, -1, 0, *ignored])
    return choices[torch.randint(0, len(choices), (b, p), generator=gen)]


def run_both(pred, pairs, labels, **kw):
    out = []
    for fn in (westar_ops.ordinal_ranking_loss, reference.ordinal_ranking_loss):
        x = pred.detach().clone().requires_grad_(True)
        loss = fn(x, pairs, labels, **kw)
        loss.backward()
        out += [loss.detach(), x.grad]
    return out


def check(pred, pairs, labels, **kw):
    loss, grad, loss_ref, grad_ref = run_both(pred, pairs, labels, **kw)
    assert loss.shape == () and loss.dtype == pred.dtype
    assert grad.shape == pred.shape and grad.dtype == pred.dtype
    assert_close(loss, loss_ref, "loss")
    assert_close(grad, grad_ref, "grad")
    return loss, grad


@pytest.mark.parametrize("margin", [0.0, 0.3, 2.0])
@pytest.mark.parametrize("kind", ["margin", "logistic"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_against_reference(rng, dtype, kind, margin):
    b, p, h, w = 3, 40, 7, 13
    pred = torch.randn(b, h, w, generator=rng).to(dtype)
    pairs = random_pairs(b, p, h, w, rng)
    labels = random_labels(b, p, rng)
    check(pred, pairs, labels, kind=kind, margin=margin, equal_weight=0.7)


@pytest.mark.parametrize("equal_weight", [0.0, 1.0, 2.5])
def test_equal_weight(rng, equal_weight):
    pred = torch.randn(2, 5, 6, generator=rng, dtype=torch.float64)
    pairs = random_pairs(2, 10, 5, 6, rng)
    labels = torch.zeros(2, 10, dtype=torch.int64)
    loss, _ = check(pred, pairs, labels, equal_weight=equal_weight)
    flat = pred.reshape(2, -1)
    d = flat.gather(1, pairs[:, :, 0, 0] * 6 + pairs[:, :, 0, 1]) - flat.gather(
        1, pairs[:, :, 1, 0] * 6 + pairs[:, :, 1, 1]
    )
    torch.testing.assert_close(loss, equal_weight * (d * d).mean())


def test_against_margin_ranking_loss(rng):
    """kind="margin" is nn.MarginRankingLoss on (pred[a], pred[b], label)."""
    b, p, h, w = 2, 30, 6, 8
    pred = torch.randn(b, h, w, generator=rng, dtype=torch.float64)
    pairs = random_pairs(b, p, h, w, rng)
    labels = torch.where(torch.rand(b, p, generator=rng) > 0.5, 1, -1)
    x = pred.clone().requires_grad_(True)
    loss = westar_ops.ordinal_ranking_loss(x, pairs, labels, margin=0.25)
    loss.backward()
    y = pred.clone().requires_grad_(True)
    flat = y.reshape(b, -1)
    xa = flat.gather(1, pairs[:, :, 0, 0] * w + pairs[:, :, 0, 1])
    xb = flat.gather(1, pairs[:, :, 1, 0] * w + pairs[:, :, 1, 1])
    expected = torch.nn.MarginRankingLoss(margin=0.25)(xa, xb, labels.double())
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(x.grad, y.grad)


def test_logistic_formula(rng):
    b, p, h, w = 2, 25, 5, 5
    pred = torch.randn(b, h, w, generator=rng, dtype=torch.float64) * 3
    pairs = random_pairs(b, p, h, w, rng)
    labels = torch.where(torch.rand(b, p, generator=rng) > 0.5, 1, -1)
    loss = westar_ops.ordinal_ranking_loss(pred, pairs, labels, kind="logistic")
    flat = pred.reshape(b, -1)
    d = flat.gather(1, pairs[:, :, 0, 0] * w + pairs[:, :, 0, 1]) - flat.gather(
        1, pairs[:, :, 1, 0] * w + pairs[:, :, 1, 1]
    )
    torch.testing.assert_close(loss, torch.log1p(torch.exp(-labels * d)).mean())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logistic_large_differences(dtype):
    """softplus without overflow: |d| = 200 gives a finite loss and gradient."""
    pred = torch.tensor([[[100.0, -100.0]]], dtype=dtype)
    pairs = torch.tensor([[[[0, 0], [0, 1]], [[0, 1], [0, 0]]]])
    for labels in (torch.tensor([[1, 1]]), torch.tensor([[-1, -1]])):
        loss, grad = check(pred, pairs, labels, kind="logistic")
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        torch.testing.assert_close(loss.double(), torch.tensor(100.0, dtype=torch.float64))


@pytest.mark.parametrize("label", [1, -1])
@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_hinge_at_zero_gradient(label, margin):
    """margin - l*d == 0 exactly: the gradient is that of torch.clamp_min /
    nn.MarginRankingLoss (passed through at the hinge)."""
    d = margin / label  # exactly representable
    pred = torch.tensor([[[1.0 + d, 1.0, 3.0]]], dtype=torch.float64)
    pairs = torch.tensor([[[[0, 0], [0, 1]]]])
    labels = torch.tensor([[label]])
    x = pred.clone().requires_grad_(True)
    loss = westar_ops.ordinal_ranking_loss(x, pairs, labels, margin=margin)
    loss.backward()
    assert loss.item() == 0.0
    y = pred.clone().requires_grad_(True)
    expected = F.margin_ranking_loss(
        y[0, 0, :1], y[0, 0, 1:2], torch.tensor([float(label)], dtype=torch.float64), margin=margin
    )
    expected.backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=0)
    assert x.grad[0, 0, 0].item() == -label  # the convention, stated explicitly


def test_ignored_labels(rng):
    b, p, h, w = 2, 20, 4, 6
    pred = torch.randn(b, h, w, generator=rng, dtype=torch.float64)
    pairs = random_pairs(b, p, h, w, rng)
    labels = random_labels(b, p, rng, ignored=(-100, 5, 2, -2, 127))
    loss, grad = check(pred, pairs, labels, margin=0.1)
    used = (labels >= -1) & (labels <= 1)
    # equals the loss over the used pairs alone
    flat = pred.reshape(b, -1)
    pa, pb = pairs[used][:, 0], pairs[used][:, 1]
    rows = used.nonzero()[:, 0]
    d = flat[rows, pa[:, 0] * w + pa[:, 1]] - flat[rows, pb[:, 0] * w + pb[:, 1]]
    lab = labels[used].double()
    per = torch.where(lab == 0, d * d, torch.clamp_min(0.1 - lab * d, 0))
    torch.testing.assert_close(loss, per.mean())
    # ignored pairs may point outside the image: their coordinates are never read
    pairs_out = pairs.clone()
    pairs_out[~used] = torch.tensor([[-5, 99], [1000, -1]])
    loss2, grad2 = check(pred, pairs_out, labels, margin=0.1)
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2)


def test_shared_pixels(rng):
    """Pairs sharing pixels (and a == b) accumulate their gradients."""
    h, w = 3, 3
    pred = torch.randn(2, h, w, generator=rng, dtype=torch.float64)
    pts = [[[0, 0], [1, 1]], [[1, 1], [0, 0]], [[1, 1], [2, 2]], [[2, 2], [2, 2]], [[0, 0], [1, 1]]]
    pairs = torch.tensor([pts, pts[::-1]])
    labels = torch.tensor([[1, -1, 1, 0, 0], [1, 1, -1, 0, -1]])
    for kind in ("margin", "logistic"):
        check(pred, pairs, labels, kind=kind, margin=1.0)


@pytest.mark.parametrize("case", ["all_ignored", "no_pairs", "empty_batch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_no_used_pairs(rng, case, dtype):
    b, p, h, w = 2, 6, 4, 4
    pred = torch.randn(b, h, w, generator=rng).to(dtype)
    pairs = random_pairs(b, p, h, w, rng)
    labels = torch.full((b, p), -100)
    if case == "no_pairs":
        pairs, labels = pairs[:, :0], labels[:, :0]
    elif case == "empty_batch":
        pred, pairs, labels = pred[:0], pairs[:0], labels[:0]
    x = pred.clone().requires_grad_(True)
    loss = westar_ops.ordinal_ranking_loss(x, pairs, labels, margin=1.0)
    assert loss.item() == 0.0 and loss.dtype == dtype
    loss.backward()
    assert x.grad.shape == pred.shape and not x.grad.any()


@pytest.mark.parametrize("index_dtype", [torch.uint8, torch.int16, torch.int32])
def test_index_dtypes(rng, index_dtype):
    pred = torch.randn(2, 5, 7, generator=rng, dtype=torch.float64)
    pairs = random_pairs(2, 12, 5, 7, rng)
    labels = random_labels(2, 12, rng, ignored=(-100 if index_dtype != torch.uint8 else 7,))
    l64 = check(pred, pairs, labels, margin=0.2)[0]
    small_labels = labels.to(torch.int16 if index_dtype == torch.uint8 else index_dtype)
    l_small = westar_ops.ordinal_ranking_loss(pred, pairs.to(index_dtype), small_labels, margin=0.2)
    assert torch.equal(l64, l_small)


def test_shapes_and_strides(rng):
    b, p, h, w = 2, 15, 6, 9
    leaf = torch.randn(b, w, h, generator=rng, dtype=torch.float64)
    pairs = random_pairs(b, 2 * p, h, w, rng)[:, ::2]
    labels = random_labels(b, 2 * p, rng)[:, ::2]
    assert not pairs.is_contiguous()
    x = leaf.clone().requires_grad_(True)
    loss = westar_ops.ordinal_ranking_loss(x.transpose(1, 2).unsqueeze(1), pairs, labels)
    loss.backward()
    y = leaf.clone().requires_grad_(True)
    ref = reference.ordinal_ranking_loss(y.transpose(1, 2).contiguous(), pairs, labels)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.parametrize("kind", ["margin", "logistic"])
def test_gradcheck(rng, kind):
    b, p, h, w = 2, 8, 3, 4
    pred = torch.randn(b, 1, h, w, generator=rng, dtype=torch.float64).requires_grad_(True)
    pairs = random_pairs(b, p, h, w, rng)
    labels = random_labels(b, p, rng)

    def fn(x):
        return westar_ops.ordinal_ranking_loss(
            x, pairs, labels, kind=kind, margin=0.05, equal_weight=0.5
        )

    assert torch.autograd.gradcheck(fn, (pred,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_deterministic(rng):
    """Many pairs on few pixels (heavy accumulation): bitwise-identical reruns."""
    b, p, h, w = 4, 20000, 8, 8
    pred = torch.randn(b, h, w, generator=rng)
    pairs = random_pairs(b, p, h, w, rng)
    labels = random_labels(b, p, rng, ignored=())
    outs = []
    for _ in range(2):
        x = pred.clone().requires_grad_(True)
        loss = westar_ops.ordinal_ranking_loss(x, pairs, labels, kind="logistic")
        loss.backward()
        outs.append((loss.detach(), x.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert_close(
        outs[0][0], reference.ordinal_ranking_loss(pred, pairs, labels, kind="logistic"), "loss"
    )


@pytest.mark.parametrize("kind", ["margin", "logistic"])
def test_module_matches_function(rng, kind):
    pred = torch.randn(2, 1, 5, 6, generator=rng)
    pairs = random_pairs(2, 10, 5, 6, rng)
    labels = random_labels(2, 10, rng)
    kw = dict(margin=0.4, kind=kind, equal_weight=1.5)
    module = westar_ops.OrdinalRankingLoss(**kw)
    assert f"kind={kind!r}" in repr(module)
    x = pred.clone().requires_grad_(True)
    y = pred.clone().requires_grad_(True)
    a = module(x, pairs, labels)
    b = westar_ops.ordinal_ranking_loss(y, pairs, labels, **kw)
    a.backward()
    b.backward()
    assert torch.equal(a, b) and torch.equal(x.grad, y.grad)


@pytest.mark.parametrize("kind", ["margin", "logistic"])
def test_nan_pred_propagates_only_through_used_pairs(kind):
    pred = torch.tensor([[[0.0, 1.0, float("nan")]]])
    pairs = torch.tensor([[[[0, 0], [0, 1]], [[0, 2], [0, 0]]]])
    used = westar_ops.ordinal_ranking_loss(pred, pairs, torch.tensor([[1, 1]]), kind=kind)
    assert torch.isnan(used)
    ignored = westar_ops.ordinal_ranking_loss(pred, pairs, torch.tensor([[1, -100]]), kind=kind)
    assert torch.isfinite(ignored)
