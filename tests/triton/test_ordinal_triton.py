"""Triton ordinal ranking ops vs the C++ CPU ops and westar_ops.reference."""

import pytest
import torch

from westar_ops import ops, reference

TOL = {
    torch.float32: (1e-5, 1e-7),
    torch.float64: (1e-10, 1e-12),
    torch.float16: (5e-3, 1e-4),
}


def _case(rng, dtype, batch=2, height=5, width=7, pairs_per_image=9):
    pred = (torch.randn(batch, height, width, generator=rng) * 0.5).to(dtype)
    ys = torch.randint(0, height, (batch, pairs_per_image, 2), generator=rng)
    xs = torch.randint(0, width, (batch, pairs_per_image, 2), generator=rng)
    pairs = torch.stack([ys, xs], -1)  # (B, P, 2 points, (y, x))
    labels = torch.randint(-1, 2, (batch, pairs_per_image), generator=rng)
    labels[0, 0] = -100  # ignored pairs, one with coordinates outside the image
    labels[1, 3] = 7
    pairs[1, 3] = torch.tensor([[99, -4], [0, 0]])
    pairs[1, 1] = pairs[1, 0]  # pixels shared by several pairs
    pairs[0, 2, 0] = pairs[0, 1, 1]
    return pred, pairs, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("kind", ["margin", "logistic"])
def test_loss_and_grad_match_cpu_and_reference(kind, dtype, rng, device):
    pred, pairs, labels = _case(rng, dtype)
    kw = dict(margin=0.2, kind=kind, equal_weight=0.7)
    out = []
    for backend in ("triton", "cpu", None):
        dev = device if backend == "triton" else "cpu"
        p = pred.to(dev).requires_grad_(True)
        if backend is None:
            loss = reference.ordinal_ranking_loss(p, pairs, labels, **kw)
        else:
            loss = ops.ordinal_ranking_loss(p, pairs.to(dev), labels.to(dev), backend=backend, **kw)
        (grad,) = torch.autograd.grad(loss, p)
        assert loss.dtype == dtype and grad.dtype == dtype
        out.append((loss.detach().cpu(), grad.cpu()))
    rtol, atol = TOL[dtype]
    for other in (1, 2):
        torch.testing.assert_close(out[0][0], out[other][0], rtol=rtol, atol=atol)
        torch.testing.assert_close(out[0][1], out[other][1], rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind", [0, 1])
def test_raw_ops_match_cpu_deterministic_mode(kind, rng, device):
    pred, pairs, labels = _case(rng, torch.float32, pairs_per_image=40)
    pred[0, 0, 0] = pred[0, 0, 1]  # d == 0 and the margin hinge
    pairs[0, 5] = torch.tensor([[0, 0], [0, 1]])
    labels[0, 5] = 1
    args = (pairs, labels, 0.0, kind, 1.3)
    grad = torch.tensor(1.7)
    loss_c = torch.ops.westar_ops.ordinal_ranking_forward(pred, *args)
    g_c = torch.ops.westar_ops.ordinal_ranking_backward(grad, pred, *args)
    dargs = (pairs.to(device), labels.to(device), 0.0, kind, 1.3)
    loss_t = torch.ops.westar_triton.ordinal_ranking_forward(pred.to(device), *dargs)
    torch.testing.assert_close(loss_t.cpu(), loss_c, rtol=1e-6, atol=1e-7)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        g1 = torch.ops.westar_triton.ordinal_ranking_backward(
            grad.to(device), pred.to(device), *dargs
        )
        g2 = torch.ops.westar_triton.ordinal_ranking_backward(
            grad.to(device), pred.to(device), *dargs
        )
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(g1, g2)  # bitwise repeatable
    # The segmented sum adds in pair order, as the CPU kernel does.
    torch.testing.assert_close(g1.cpu(), g_c, rtol=1e-6, atol=1e-8)
    g3 = torch.ops.westar_triton.ordinal_ranking_backward(grad.to(device), pred.to(device), *dargs)
    torch.testing.assert_close(g3.cpu(), g_c, rtol=1e-6, atol=1e-8)


def test_no_used_pairs(rng, device):
    pred, pairs, labels = _case(rng, torch.float32)
    labels = torch.full_like(labels, -100)
    p = pred.to(device).requires_grad_(True)
    loss = ops.ordinal_ranking_loss(p, pairs.to(device), labels.to(device), backend="triton")
    (grad,) = torch.autograd.grad(loss, p)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0
    empty = torch.zeros((2, 0, 2, 2), dtype=torch.int64, device=device)
    loss = torch.ops.westar_triton.ordinal_ranking_forward(
        p.detach(), empty, torch.zeros((2, 0), dtype=torch.int64, device=device), 0.0, 0, 1.0
    )
    assert loss.item() == 0.0


def test_strided_pred(rng, device):
    pred, pairs, labels = _case(rng, torch.float32, height=6, width=6)
    strided = pred.transpose(1, 2).contiguous().transpose(1, 2)
    a = torch.ops.westar_triton.ordinal_ranking_forward(
        strided.to(device), pairs.to(device), labels.to(device), 0.1, 1, 1.0
    )
    b = torch.ops.westar_ops.ordinal_ranking_forward(pred, pairs, labels, 0.1, 1, 1.0)
    torch.testing.assert_close(a.cpu(), b)


def test_opcheck(rng, device):
    pred, pairs, labels = _case(rng, torch.float32)
    p = pred.to(device).requires_grad_(True)
    args = (p, pairs.to(device), labels.to(device), 0.1, 0, 1.0)
    torch.library.opcheck(torch.ops.westar_triton.ordinal_ranking_forward.default, args)
    torch.library.opcheck(
        torch.ops.westar_triton.ordinal_ranking_backward.default,
        (torch.ones((), device=device), p.detach(), *args[1:]),
    )  # no double backward: the backward op has no autograd formula (as for the C++ ops)
