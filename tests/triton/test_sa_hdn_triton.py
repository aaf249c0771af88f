"""Triton sa_hdn ops vs the C++ CPU ops and westar_ops.reference (tiny images)."""

from functools import partial

import pytest
import torch

from tests.gpu.cases import TOL, case, to
from westar_ops import ops, reference

STATS_GRAD = ("none", "scale", "full")


# The GPU suite's scenarios, at a size the interpreter runs quickly.
_case = partial(case, height=6, width=7)


def _cpu_forward(pred, target, instances, valid, include_global, eps, min_pixels):
    return torch.ops.westar_ops.sa_hdn_forward(
        pred.cpu(), target.cpu(), to(instances, "cpu"), to(valid, "cpu"),
        include_global, eps, min_pixels, 2,
    )  # fmt: skip


def _check_forward(out_t, out_c, pred, dtype):
    loss_t, seg_t, stats_t, mi_t = (x.cpu() for x in out_t)
    loss_c, seg_c, stats_c, mi_c = out_c
    rtol, atol = TOL[dtype]
    assert seg_t.dtype == torch.int32 and seg_t.is_contiguous()
    assert torch.equal(seg_t, seg_c)
    assert stats_t.dtype == stats_c.dtype and stats_t.shape == stats_c.shape
    assert mi_t.dtype == torch.int64 and mi_t.shape == mi_c.shape
    assert loss_t.dtype == pred.dtype and loss_t.shape == ()
    # Medians, counts and S3 are exact; the sums are equal up to rounding.
    s_rtol = 1e-10 if stats_t.dtype == torch.float64 else 1e-5
    assert torch.equal(stats_t[:, [0, 2, 6, 7]], stats_c[:, [0, 2, 6, 7]])
    torch.testing.assert_close(stats_t, stats_c, rtol=s_rtol, atol=s_rtol * 100, equal_nan=True)
    # median_index may differ at ties only: it must point at a pixel equal to t_p.
    flat = pred.cpu().reshape(-1).to(stats_c.dtype)
    assert torch.equal(flat[mi_t], stats_c[:, 0])
    torch.testing.assert_close(loss_t, loss_c, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", ["global", "levels", "invalid_nan", "uint8_ties"])
@pytest.mark.parametrize("path", ["small", "big"])
def test_forward_outputs_match_cpu(name, path, rng, device, request):
    if path == "big":
        request.getfixturevalue("big_path")
    pred, target, instances, valid = _case(name, rng)
    args = (pred, target, instances, valid, True, 1e-6, 1)
    out_t = torch.ops.westar_triton.sa_hdn_forward(
        pred.to(device), target.to(device), to(instances, device), to(valid, device),
        True, 1e-6, 1, 2,
    )  # fmt: skip
    _check_forward(out_t, _cpu_forward(*args), pred, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["small", "big"])
def test_forward_dtypes_match_cpu(dtype, path, rng, device, request):
    if path == "big":
        request.getfixturevalue("big_path")
    pred, target, instances, valid = _case("invalid_nan", rng, dtype=dtype, height=5, width=6)
    out_t = torch.ops.westar_triton.sa_hdn_forward(
        pred.to(device), target.to(device), to(instances, device), to(valid, device),
        True, 1e-6, 1, 2,
    )  # fmt: skip
    _check_forward(out_t, _cpu_forward(pred, target, instances, valid, True, 1e-6, 1), pred, dtype)


@pytest.mark.parametrize("stats_grad", STATS_GRAD)
@pytest.mark.parametrize("name", ["levels", "invalid_nan"])
def test_loss_and_grad_match_cpu_and_reference(name, stats_grad, rng, device):
    pred, target, instances, valid = _case(name, rng)
    kw = dict(include_global=True, eps=1e-6, min_pixels=1, stats_grad=stats_grad)
    losses, grads = [], []
    for backend in ("triton", "cpu", None):
        dev = device if backend == "triton" else "cpu"
        p = pred.to(dev).requires_grad_(True)
        args = (p, target.to(dev), to(instances, dev), to(valid, dev))
        if backend is None:
            loss = reference.sa_hdn_loss(*args, **kw)
        else:
            loss = ops.sa_hdn_loss(*args, backend=backend, **kw)
        (grad,) = torch.autograd.grad(loss, p)
        losses.append(loss.detach().cpu())
        grads.append(grad.cpu())
    for other in (1, 2):
        torch.testing.assert_close(losses[0], losses[other], rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(grads[0], grads[other], rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("dtype", "stats_grad"),
    [(torch.float16, mode) for mode in STATS_GRAD] + [(torch.float64, "full")],
)
def test_loss_and_grad_dtypes(dtype, stats_grad, rng, device, big_path):
    pred, target, instances, valid = _case("levels", rng, dtype=dtype)
    kw = dict(min_pixels=2, stats_grad=stats_grad)
    out = []
    for backend, dev in (("triton", device), ("cpu", "cpu")):
        p = pred.to(dev).requires_grad_(True)
        loss = ops.sa_hdn_loss(
            p, target.to(dev), to(instances, dev), to(valid, dev), backend=backend, **kw
        )
        (grad,) = torch.autograd.grad(loss, p)
        assert loss.dtype == dtype and grad.dtype == dtype
        out.append((loss.detach().cpu(), grad.cpu()))
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out[0][0], out[1][0], rtol=rtol, atol=atol)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=rtol, atol=atol)


@pytest.mark.parametrize("stats_grad", [0, 1, 2])
def test_backward_raw_matches_cpu(stats_grad, rng, device, big_path):
    pred, target, instances, valid = _case("levels", rng)
    out_c = _cpu_forward(pred, target, instances, valid, True, 1e-6, 1)
    grad = torch.tensor(0.75)
    g_c = torch.ops.westar_ops.sa_hdn_backward(grad, pred, target, *out_c[1:], stats_grad)
    g_t = torch.ops.westar_triton.sa_hdn_backward(
        grad.to(device), pred.to(device), target.to(device),
        *(x.to(device) for x in out_c[1:]), stats_grad,
    )  # fmt: skip
    assert g_t.shape == pred.shape and g_t.dtype == pred.dtype
    torch.testing.assert_close(g_t.cpu(), g_c, rtol=1e-5, atol=1e-8)


def test_min_pixels_skips_and_no_context(rng, device):
    pred, target, instances, _ = _case("levels", rng)
    out_t = torch.ops.westar_triton.sa_hdn_forward(
        pred.to(device), target.to(device), instances.to(device), None, False, 1e-6, 3, 2
    )
    _check_forward(out_t, _cpu_forward(pred, target, instances, None, False, 1e-6, 3), pred,
                   torch.float32)  # fmt: skip
    # No usable pixel at all: K == 0, loss 0, gradient 0, never NaN.
    p = pred.to(device).requires_grad_(True)
    valid = torch.zeros(pred.shape, dtype=torch.bool, device=device)
    loss = ops.sa_hdn_loss(p, target.to(device), instances.to(device), valid, backend="triton")
    (grad,) = torch.autograd.grad(loss, p)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0
    _, seg, stats, mi = torch.ops.westar_triton.sa_hdn_forward(
        p.detach(), target.to(device), None, valid, True, 1e-6, 1, 2
    )
    assert stats.shape == (0, 8) and mi.shape == (0,) and bool((seg == -1).all())


def test_strided_inputs_and_nan_pred(rng, device):
    pred, target, instances, valid = _case("invalid_nan", rng, height=7, width=6)
    pred_t = pred.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    inst_t = instances.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    out_t = torch.ops.westar_triton.sa_hdn_forward(
        pred_t.to(device), target.to(device), inst_t.to(device), to(valid, device),
        True, 1e-6, 1, 2,
    )  # fmt: skip
    _check_forward(out_t, _cpu_forward(pred, target, instances, valid, True, 1e-6, 1), pred,
                   torch.float32)  # fmt: skip
    pred[0, 3, 3] = float("nan")  # non-finite pred propagates
    valid = None
    loss = ops.sa_hdn_loss(pred.to(device), target.to(device), backend="triton")
    assert torch.isnan(loss)


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic(deterministic, rng, device, big_path):
    """Bitwise-repeatable forward and backward, also under
    torch.use_deterministic_algorithms(True) (no op of the path may refuse to run)."""
    pred, target, instances, valid = _case("levels", rng, height=8, width=8)
    runs = []
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        for _ in range(2):
            p = pred.to(device).requires_grad_(True)
            out = torch.ops.westar_triton.sa_hdn_forward(
                p, target.to(device), instances.to(device), None, True, 1e-6, 1, 2
            )
            (grad,) = torch.autograd.grad(out[0], p)
            runs.append([x.detach().cpu() for x in out] + [grad.cpu()])
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_opcheck(rng, device):
    pred, target, instances, valid = _case("invalid_nan", rng, height=4, width=5)
    pred = pred.to(device).requires_grad_(True)
    args = (pred, target.to(device), instances.to(device), valid.to(device), True, 1e-6, 1, 2)
    torch.library.opcheck(torch.ops.westar_triton.sa_hdn_forward.default, args)
    loss, seg, stats, mi = torch.ops.westar_triton.sa_hdn_forward(*args)
    bargs = (torch.ones((), device=device), pred.detach(), args[1], seg, stats, mi, 2)
    torch.library.opcheck(
        torch.ops.westar_triton.sa_hdn_backward.default,
        bargs,
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize(
    ("bad_id", "message"),
    [(-3, r"negative id at instances\[1, 1, 2, 4\]"), (2**31, r"< 2\^31.*instances\[1, 1, 2, 4\]")],
)
def test_bad_ids_raise_in_the_kernel(bad_id, message, rng, device):
    """The raw op finds negative ids and ids >= 2^31 itself (also at an invalid pixel),
    as the C++ kernels do, and names the first one; no extra pass in the wrapper."""
    pred, target, instances, _ = _case("levels", rng)
    instances[1, 1, 2, 4] = bad_id
    instances[1, 2, 5, 6] = bad_id  # a later one is not the one named
    valid = torch.ones(pred.shape, dtype=torch.bool)
    valid[1, 2, 4] = False
    with pytest.raises(ValueError, match=message):
        torch.ops.westar_triton.sa_hdn_forward(
            pred.to(device), target.to(device), instances.to(device), valid.to(device),
            True, 1e-6, 1, 2,
        )  # fmt: skip
    if bad_id < 0:  # the C++ op names the same position
        with pytest.raises(ValueError, match=message):
            _cpu_forward(pred, target, instances, valid, True, 1e-6, 1)
