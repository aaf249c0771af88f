"""Triton ordinal ranking ops vs the C++ CPU ops and westar_ops.reference."""

import pytest
import torch

from tests.matrix import assert_backends_agree, ordinal_backward_runs, ordinal_case
from westar_ops import ops


def _case(rng, dtype, pairs_per_image=9, **size):
    """The GPU suite's ordinal scenario, at a size the interpreter runs quickly."""
    size = {"batch": 2, "height": 5, "width": 7, **size}
    return ordinal_case(rng, dtype, pairs_per_image=pairs_per_image, **size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("kind", ["margin", "logistic"])
def test_loss_and_grad_match_cpu_and_reference(kind, dtype, rng, device):
    pred, pairs, labels = _case(rng, dtype)
    assert_backends_agree(
        "ordinal", ("triton", "cpu", None), device, pred, pairs, labels,
        loss_min_rtol=0.0, grad_factor=1, margin=0.2, kind=kind, equal_weight=0.7,
    )  # fmt: skip


@pytest.mark.parametrize("kind", [0, 1])
def test_raw_ops_match_cpu_deterministic_mode(kind, rng, device):
    pred, pairs, labels = _case(rng, torch.float32, pairs_per_image=40)
    pred[0, 0, 0] = pred[0, 0, 1]  # d == 0 and the margin hinge
    pairs[0, 5] = torch.tensor([[0, 0], [0, 1]])
    labels[0, 5] = 1
    args = (pairs, labels, 0.0, kind, 1.3)
    grad = torch.tensor(1.7)
    loss_c, count_c = torch.ops.westar_ops.ordinal_ranking_forward(pred, *args)
    g_c = torch.ops.westar_ops.ordinal_ranking_backward(grad, pred, *args)
    dargs = (pairs.to(device), labels.to(device), 0.0, kind, 1.3)
    loss_t, count_t = torch.ops.westar_triton.ordinal_ranking_forward(pred.to(device), *dargs)
    torch.testing.assert_close(loss_t.cpu(), loss_c, rtol=1e-6, atol=1e-7)
    assert count_t.dtype == torch.int64 and int(count_t) == int(count_c) > 0
    g1, g2 = ordinal_backward_runs(torch.ops.westar_triton, grad, pred, *args, device, times=2)
    assert torch.equal(g1, g2)  # bitwise repeatable
    # The segmented sum adds in pair order, as the CPU kernel does.
    torch.testing.assert_close(g1.cpu(), g_c, rtol=1e-6, atol=1e-8)
    g3 = torch.ops.westar_triton.ordinal_ranking_backward(grad.to(device), pred.to(device), *dargs)
    torch.testing.assert_close(g3.cpu(), g_c, rtol=1e-6, atol=1e-8)
    for deterministic in (False, True):  # the scale from the forward's count, both paths
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(deterministic)
        try:
            g4 = torch.ops.westar_triton.ordinal_ranking_backward(
                grad.to(device), pred.to(device), *dargs, count_t
            )
        finally:
            torch.use_deterministic_algorithms(previous)
        torch.testing.assert_close(g4.cpu(), g_c, rtol=1e-6, atol=1e-8)


def test_no_used_pairs(rng, device):
    pred, pairs, labels = _case(rng, torch.float32)
    labels = torch.full_like(labels, -100)
    p = pred.to(device).requires_grad_(True)
    loss = ops.ordinal_ranking_loss(p, pairs.to(device), labels.to(device), backend="triton")
    (grad,) = torch.autograd.grad(loss, p)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0
    empty = torch.zeros((2, 0, 2, 2), dtype=torch.int64, device=device)
    loss, count = torch.ops.westar_triton.ordinal_ranking_forward(
        p.detach(), empty, torch.zeros((2, 0), dtype=torch.int64, device=device), 0.0, 0, 1.0
    )
    assert loss.item() == 0.0 and int(count) == 0


def test_strided_pred(rng, device):
    pred, pairs, labels = _case(rng, torch.float32, height=6, width=6)
    strided = pred.transpose(1, 2).contiguous().transpose(1, 2)
    a, _ = torch.ops.westar_triton.ordinal_ranking_forward(
        strided.to(device), pairs.to(device), labels.to(device), 0.1, 1, 1.0
    )
    b, _ = torch.ops.westar_ops.ordinal_ranking_forward(pred, pairs, labels, 0.1, 1, 1.0)
    torch.testing.assert_close(a.cpu(), b)


def test_pair_outside_image_is_nan_or_raises_in_debug_mode(rng, device):
    """A used pair outside the image: the Triton kernels make the loss NaN (no host sync);
    with debug checks the wrapper raises the CPU op's error."""
    pred, pairs, labels = _case(rng, torch.float32)
    pairs[1, 2, 0] = torch.tensor([0, pred.shape[2]])
    labels[1, 2] = 1
    dev = [x.to(device) for x in (pred, pairs, labels)]
    with pytest.raises(ValueError) as cpu_err:
        ops.ordinal_ranking_loss(pred, pairs, labels, backend="cpu")
    for fn in (ops.ordinal_ranking_loss, ops.normalized_ordinal_ranking_loss):
        p = dev[0].clone().requires_grad_(True)
        loss = fn(p, *dev[1:], backend="triton")
        assert torch.isnan(loss)
        loss.backward()  # no out-of-bounds access in the backward either
        ops.set_debug_checks(True)
        try:
            with pytest.raises(ValueError) as triton_err:
                fn(*dev, backend="triton")
        finally:
            ops.set_debug_checks(None)
        assert str(triton_err.value) == str(cpu_err.value)


def test_opcheck(rng, device):
    pred, pairs, labels = _case(rng, torch.float32)
    p = pred.to(device).requires_grad_(True)
    args = (p, pairs.to(device), labels.to(device), 0.1, 0, 1.0)
    torch.library.opcheck(torch.ops.westar_triton.ordinal_ranking_forward.default, args)
    torch.library.opcheck(
        torch.ops.westar_triton.ordinal_ranking_backward.default,
        (torch.ones((), device=device), p.detach(), *args[1:]),
    )
    _, count = torch.ops.westar_triton.ordinal_ranking_forward(*args)
    torch.library.opcheck(
        torch.ops.westar_triton.ordinal_ranking_backward.default,
        (torch.ones((), device=device), p.detach(), *args[1:], count),
    )  # no double backward: the backward op has no autograd formula (as for the C++ ops)
