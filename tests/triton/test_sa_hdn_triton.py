"""Triton sa_hdn ops vs the C++ CPU ops and westar_ops.reference (tiny images)."""

from functools import partial

import pytest
import torch

from tests.matrix import (
    assert_backends_agree,
    assert_bitwise_equal_runs,
    assert_no_context_gives_zero,
    case,
    check_forward,
    raw_forward,
    sa_hdn_runs,
)
from tests.matrix import cpu_forward as _cpu_forward
from westar_ops import ops
from westar_ops.triton import sa_hdn as triton_sa_hdn

STATS_GRAD = ("none", "scale", "full")
TRITON = torch.ops.westar_triton

# The GPU suite's scenarios, at a size the interpreter runs quickly.
_case = partial(case, height=6, width=7)


@pytest.mark.parametrize("name", ["global", "levels", "invalid_nan", "uint8_ties"])
@pytest.mark.parametrize("path", ["small", "big"])
def test_forward_outputs_match_cpu(name, path, rng, device, request):
    if path == "big":
        request.getfixturevalue("big_path")
    pred, target, instances, valid = _case(name, rng)
    out_t = raw_forward(TRITON, pred, target, instances, valid, device)
    check_forward(out_t, _cpu_forward(pred, target, instances, valid), pred, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["small", "big"])
def test_forward_dtypes_match_cpu(dtype, path, rng, device, request):
    if path == "big":
        request.getfixturevalue("big_path")
    pred, target, instances, valid = _case("invalid_nan", rng, dtype=dtype, height=5, width=6)
    out_t = raw_forward(TRITON, pred, target, instances, valid, device)
    check_forward(out_t, _cpu_forward(pred, target, instances, valid), pred, dtype)


@pytest.mark.parametrize("stats_grad", STATS_GRAD)
@pytest.mark.parametrize("name", ["levels", "invalid_nan"])
def test_loss_and_grad_match_cpu_and_reference(name, stats_grad, rng, device):
    pred, target, instances, valid = _case(name, rng)
    kw = dict(include_global=True, eps=1e-6, min_pixels=1, stats_grad=stats_grad)
    assert_backends_agree(
        "sa_hdn", ("triton", "cpu", None), device, pred, target, instances, valid,
        loss_min_rtol=0.0, **kw,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("dtype", "stats_grad"),
    [(torch.float16, mode) for mode in STATS_GRAD] + [(torch.float64, "full")],
)
def test_loss_and_grad_dtypes(dtype, stats_grad, rng, device, big_path):
    pred, target, instances, valid = _case("levels", rng, dtype=dtype)
    assert_backends_agree(
        "sa_hdn", ("triton", "cpu"), device, pred, target, instances, valid,
        loss_min_rtol=0.0, grad_factor=1, min_pixels=2, stats_grad=stats_grad,
    )  # fmt: skip


@pytest.mark.parametrize("stats_grad", [0, 1, 2])
def test_backward_raw_matches_cpu(stats_grad, rng, device, big_path):
    pred, target, instances, valid = _case("levels", rng)
    out_c = _cpu_forward(pred, target, instances, valid)
    grad = torch.tensor(0.75)
    g_c = torch.ops.westar_ops.sa_hdn_backward(grad, pred, target, *out_c[1:4], stats_grad)
    saved = [x.to(device) for x in out_c[1:]]
    for info in (None, saved[3]):  # N summed from stats, or read from the forward's info
        g_t = torch.ops.westar_triton.sa_hdn_backward(
            grad.to(device), pred.to(device), target.to(device), *saved[:3], stats_grad, info
        )
        assert g_t.shape == pred.shape and g_t.dtype == pred.dtype
        torch.testing.assert_close(g_t.cpu(), g_c, rtol=1e-5, atol=1e-8)


def test_min_pixels_skips_and_no_context(rng, device):
    pred, target, instances, _ = _case("levels", rng)
    out_t = raw_forward(TRITON, pred, target, instances, None, device, False, 1e-6, 3)
    out_c = _cpu_forward(pred, target, instances, None, False, 1e-6, 3)
    check_forward(out_t, out_c, pred, torch.float32)
    assert_no_context_gives_zero(TRITON, "triton", pred, target, instances, device)


def test_strided_inputs_and_nan_pred(rng, device):
    pred, target, instances, valid = _case("invalid_nan", rng, height=7, width=6)
    pred_t = pred.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    inst_t = instances.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    out_t = raw_forward(TRITON, pred_t, target, inst_t, valid, device)
    check_forward(out_t, _cpu_forward(pred, target, instances, valid), pred, torch.float32)
    pred[0, 3, 3] = float("nan")  # non-finite pred propagates
    valid = None
    loss = ops.sa_hdn_loss(pred.to(device), target.to(device), backend="triton")
    assert torch.isnan(loss)


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic(deterministic, rng, device, big_path):
    """Bitwise-repeatable forward and backward, also under
    torch.use_deterministic_algorithms(True) (no op of the path may refuse to run)."""
    pred, target, instances, _ = _case("levels", rng, height=8, width=8)
    runs = sa_hdn_runs(TRITON, pred, target, instances, None, device, deterministic, times=2)
    assert_bitwise_equal_runs(runs)


def test_opcheck(rng, device):
    pred, target, instances, valid = _case("invalid_nan", rng, height=4, width=5)
    pred = pred.to(device).requires_grad_(True)
    args = (pred, target.to(device), instances.to(device), valid.to(device), True, 1e-6, 1, 2)
    torch.library.opcheck(torch.ops.westar_triton.sa_hdn_forward.default, args)
    loss, seg, stats, mi, info = torch.ops.westar_triton.sa_hdn_forward(*args)
    # max_contexts above K (below it the loss is NaN, which opcheck cannot compare)
    torch.library.opcheck(torch.ops.westar_triton.sa_hdn_forward.default, (*args, int(info[0]) + 3))
    bargs = (torch.ones((), device=device), pred.detach(), args[1], seg, stats, mi, 2)
    for extra in ((), (info,)):
        torch.library.opcheck(
            torch.ops.westar_triton.sa_hdn_backward.default,
            (*bargs, *extra),
            test_utils=("test_schema", "test_faketensor"),
        )


@pytest.mark.parametrize(
    ("bad_id", "message", "slot"),
    [
        (-3, r"negative id at instances\[1, 1, 2, 4\]", 2),
        (2**31, r"< 2\^31.*instances\[1, 1, 2, 4\]", 3),
    ],
)
def test_bad_ids_flagged_in_the_kernel(bad_id, message, slot, rng, device):
    """The raw op finds negative ids and ids >= 2^31 itself (also at an invalid pixel)
    without a host sync: the loss is NaN and info holds the first one's flat position.
    With debug checks the public op raises the CPU op's error, word for word."""
    pred, target, instances, _ = _case("levels", rng)
    instances[1, 1, 2, 4] = bad_id
    instances[1, 2, 5, 6] = bad_id  # a later one is not the one named
    valid = torch.ones(pred.shape, dtype=torch.bool)
    valid[1, 2, 4] = False
    dev = [x.to(device) for x in (pred, target, instances, valid)]
    loss, *_, info = torch.ops.westar_triton.sa_hdn_forward(*dev, True, 1e-6, 1, 2)
    assert torch.isnan(loss)
    assert int(info[slot]) == ((1 * instances.shape[1] + 1) * 6 + 2) * 7 + 4
    assert int(info[5 - slot]) == -1
    with pytest.raises(ValueError, match=message):
        _cpu_forward(pred, target, instances, valid)
    with pytest.raises(ValueError) as cpu_err:
        ops.sa_hdn_loss(pred, target, instances, valid, backend="cpu")
    assert torch.isnan(ops.sa_hdn_loss(*dev, backend="triton"))  # fast mode: no raise
    ops.set_debug_checks(True)
    try:
        with pytest.raises(ValueError) as triton_err:
            ops.sa_hdn_loss(*dev, backend="triton")
    finally:
        ops.set_debug_checks(None)
    assert str(triton_err.value) == str(cpu_err.value)


def test_max_contexts(rng, device):
    """max_contexts sizes stats; more contexts than that: NaN loss on the GPU backends,
    the same ValueError on the CPU and with debug checks."""
    pred, target, instances, _ = _case("levels", rng)
    valid = torch.rand(pred.shape, generator=rng) > 0.2
    dev = [x.to(device) for x in (pred, target, instances, valid)]
    out_c = _cpu_forward(pred, target, instances, valid)
    k = out_c[2].shape[0]
    out_t = TRITON.sa_hdn_forward(*dev, True, 1e-6, 1, 2, k + 3)
    assert out_t[2].shape == (k + 3, 8)
    check_forward(out_t, out_c, pred, torch.float32)
    loss = ops.sa_hdn_loss(*dev, backend="triton", max_contexts=k - 1)
    assert torch.isnan(loss)
    message = f"the batch has {k} contexts, more than max_contexts = {k - 1}"
    with pytest.raises(ValueError, match=message):
        ops.sa_hdn_loss(pred, target, instances, valid, backend="cpu", max_contexts=k - 1)
    ops.set_debug_checks(True)
    try:
        with pytest.raises(ValueError, match=message):
            ops.sa_hdn_loss(*dev, backend="triton", max_contexts=k - 1)
    finally:
        ops.set_debug_checks(None)


def test_too_many_memberships(device):
    """The C++ ops' limit (levels x B x H x W <= 2^31 - 2, docs/ops.md) with the same
    message, checked before anything is allocated (expanded inputs have no memory)."""
    pred = torch.zeros(1, 1, 1, device=device).expand(1024, 1024, 1024)
    inst = torch.ones(1, 1, 1, 1, dtype=torch.int32, device=device).expand(1024, 1, 1024, 1024)
    with pytest.raises(ValueError) as triton_err:
        ops.sa_hdn_loss(pred, pred, inst, backend="triton")
    with pytest.raises(ValueError) as cpu_err:
        ops.sa_hdn_loss(pred.cpu(), pred.cpu(), inst.cpu(), backend="cpu")
    assert str(triton_err.value) == str(cpu_err.value)
    assert "levels x B x H x W = 2147483648 memberships" in str(cpu_err.value)
    # The boundary itself (meta tensors: sizes without memory).
    triton_sa_hdn.check_memberships(1, torch.empty(2**31 - 2, device="meta"))
    with pytest.raises(ValueError, match="2147483647 memberships"):
        triton_sa_hdn.check_memberships(1, torch.empty(2**31 - 1, device="meta"))
