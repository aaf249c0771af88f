"""CUDA C++ kernels (torch.ops.westar_ops on CUDA tensors) vs the CPU ops, the Triton ops
and westar_ops.reference: raw outputs (loss, seg, stats, median_index), loss and
gradient, opcheck, torch.compile, determinism. Skipped without a GPU (conftest.py).

The CUDA kernels route contexts of at most 1024 members to the one-warp path and larger
ones to the tiled radix-select path (tiles of 4096): images of 64x80 = 5120 pixels put
the global context on the tiled path (2 tiles) and most instances on the warp path.
"""

import importlib.util

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

import westar_ops  # noqa: E402
from westar_ops import ops  # noqa: E402

if not westar_ops.build_info()["with_cuda"]:
    pytest.skip(
        "westar_ops was built without CUDA kernels (rebuild with WESTAR_CUDA=1)",
        allow_module_level=True,
    )

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    import westar_ops.triton  # noqa: E402,F401  (registers torch.ops.westar_triton)

from tests.matrix import (  # noqa: E402
    DTYPES,
    SCENARIOS,
    assert_backends_agree,
    assert_bitwise_equal_runs,
    assert_compiled_matches_eager,
    assert_no_context_gives_zero,
    ordinal_backward_runs,
    ordinal_case,
    raw_forward,
    sa_hdn_runs,
)
from tests.matrix import case as _case  # noqa: E402
from tests.matrix import check_forward as _check_forward  # noqa: E402

DEV = "cuda"
OPS = torch.ops.westar_ops


def _forward(pred, target, instances, valid, device, include_global=True, eps=1e-6, min_pixels=1):
    return raw_forward(OPS, pred, target, instances, valid, device, include_global, eps, min_pixels)


@pytest.mark.parametrize("name", SCENARIOS)
def test_forward_outputs_match_cpu(name, rng):
    pred, target, instances, valid = _case(name, rng)
    out_c = _forward(pred, target, instances, valid, "cpu")
    _check_forward(_forward(pred, target, instances, valid, DEV), out_c, pred, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["invalid_nan", "uneven"])
def test_forward_dtypes_match_cpu(name, dtype, rng):
    pred, target, instances, valid = _case(name, rng, dtype=dtype)
    out_c = _forward(pred, target, instances, valid, "cpu")
    _check_forward(_forward(pred, target, instances, valid, DEV), out_c, pred, dtype)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("name", SCENARIOS)
def test_forward_outputs_match_triton(name, rng):
    pred, target, instances, valid = _case(name, rng)
    out_t = raw_forward(torch.ops.westar_triton, pred, target, instances, valid, DEV)
    out_c = _forward(pred, target, instances, valid, "cpu")
    out_t = (out_t[0].cpu(), out_t[1].cpu(), out_t[2].cpu(), out_t[3].cpu())
    _check_forward(_forward(pred, target, instances, valid, DEV), out_t, pred, torch.float32)
    assert torch.equal(out_t[1], out_c[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stats_grad", ["none", "scale", "full"])
@pytest.mark.parametrize("name", ["levels", "invalid_nan", "uneven"])
def test_loss_and_grad_match_cpu_triton_reference(name, stats_grad, dtype, rng):
    pred, target, instances, valid = _case(name, rng, dtype=dtype)
    kw = dict(include_global=True, eps=1e-6, min_pixels=1, stats_grad=stats_grad)
    # The reference's torch.median may pick another of several tied elements (half
    # dtypes have many ties) for the median's gradient: compare with it for fp32/fp64.
    ref = [None] if dtype in (torch.float32, torch.float64) else []
    backends = ["cuda", "cpu", *ref] + (["triton"] if HAS_TRITON else [])
    assert_backends_agree(
        "sa_hdn", backends, DEV, pred, target, instances, valid, grad_outliers=4, **kw
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stats_grad", [0, 1, 2])
def test_backward_raw_matches_cpu(stats_grad, dtype, rng):
    pred, target, instances, valid = _case("levels", rng, dtype=dtype)
    out_c = _forward(pred, target, instances, valid, "cpu")
    grad = torch.tensor(0.75, dtype=dtype)
    g_c = OPS.sa_hdn_backward(grad, pred, target, *out_c[1:4], stats_grad)
    saved = [x.to(DEV) for x in out_c[1:]]
    for info in (None, saved[3]):  # N summed from stats, or the forward's info
        g_g = OPS.sa_hdn_backward(
            grad.to(DEV), pred.to(DEV), target.to(DEV), *saved[:3], stats_grad, info
        )
        assert g_g.shape == pred.shape and g_g.dtype == pred.dtype and g_g.device.type == "cuda"
        rtol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(g_g.cpu(), g_c, rtol=rtol, atol=1e-9)


def test_huge_sparse_ids_and_id_dtypes(rng):
    pred, target, _, valid = _case("global", rng)
    ids = torch.tensor([0, 1, 2**31 - 1, 2**31 - 2, 123_456_789, 2**16 + 3])
    inst64 = ids[torch.randint(0, len(ids), (2, 1, 64, 80), generator=rng)]
    out_c = _forward(pred, target, inst64, valid, "cpu")
    _check_forward(_forward(pred, target, inst64, valid, DEV), out_c, pred, torch.float32)
    small = torch.randint(0, 100, (2, 2, 64, 80), generator=rng)
    for id_dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        inst = small.to(id_dtype)
        out_c = _forward(pred, target, inst, valid, "cpu")
        _check_forward(_forward(pred, target, inst, valid, DEV), out_c, pred, torch.float32)


def test_negative_id_flagged_without_sync(rng):
    """No host sync: the loss is NaN and info holds the position; debug checks raise."""
    pred, target, instances, _ = _case("levels", rng)
    instances[1, 2, 3, 4] = -3
    loss, *_, info = _forward(pred, target, instances, None, DEV)
    assert torch.isnan(loss) and int(info[2]) >= 0 and int(info[3]) == -1
    dev = [x.to(DEV) for x in (pred, target, instances)]
    assert torch.isnan(ops.sa_hdn_loss(*dev, backend="cuda"))
    ops.set_debug_checks(True)
    try:
        with pytest.raises(ValueError, match=r"negative id at instances\[1, 2, 3, 4\]"):
            ops.sa_hdn_loss(*dev, backend="cuda")
    finally:
        ops.set_debug_checks(None)


def test_min_pixels_no_context_and_empty(rng):
    pred, target, instances, _ = _case("levels", rng)
    out_c = _forward(pred, target, instances, None, "cpu", include_global=False, min_pixels=3)
    out_g = _forward(pred, target, instances, None, DEV, include_global=False, min_pixels=3)
    _check_forward(out_g, out_c, pred, torch.float32)
    assert_no_context_gives_zero(OPS, "cuda", pred, target, instances, DEV)
    # Empty batch and empty images.
    for shape in ((0, 4, 5), (2, 0, 5)):
        e = torch.zeros(shape, device=DEV)
        loss, seg, stats, mi, info = _forward(e, e, None, None, DEV)
        assert loss.item() == 0.0 and seg.shape == (1, *shape) and not stats.any()
        assert info.tolist() == [0, 0, -1, -1]
        g = OPS.sa_hdn_backward(torch.ones((), device=DEV), e, e, seg, stats, mi, 2, info)
        assert g.shape == shape


def test_strided_inputs_and_nan_pred(rng):
    pred, target, instances, valid = _case("invalid_nan", rng)
    pred_t = pred.transpose(1, 2).contiguous().transpose(1, 2)
    inst_t = instances.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    out_c = _forward(pred, target, instances, valid, "cpu")
    _check_forward(_forward(pred_t, target, inst_t, valid, DEV), out_c, pred, torch.float32)
    pred[0, 3, 3] = float("nan")
    loss = ops.sa_hdn_loss(pred.to(DEV), target.to(DEV), backend="cuda")
    assert torch.isnan(loss)


@pytest.mark.parametrize("deterministic", [False, True])
def test_sa_hdn_bitwise_repeatable(deterministic, rng):
    pred, target, instances, valid = _case("levels", rng)
    assert_bitwise_equal_runs(sa_hdn_runs(OPS, pred, target, instances, valid, DEV, deterministic))


def test_opcheck_sa_hdn(rng):
    pred, target, instances, valid = _case("invalid_nan", rng, height=6, width=7)
    pred = pred.to(DEV).requires_grad_(True)
    args = (pred, target.to(DEV), instances.to(DEV), valid.to(DEV), True, 1e-6, 1, 2)
    torch.library.opcheck(OPS.sa_hdn_forward.default, args)
    big = _case("uneven", rng)
    bargs = (big[0].to(DEV).requires_grad_(True), big[1].to(DEV), big[2].to(DEV), None,
             True, 1e-6, 1, 2)  # fmt: skip
    torch.library.opcheck(OPS.sa_hdn_forward.default, bargs)
    loss, seg, stats, mi, info = OPS.sa_hdn_forward(*args)
    torch.library.opcheck(OPS.sa_hdn_forward.default, (*args, int(info[0]) + 3))  # max_contexts
    for stats_grad in (0, 1, 2):
        torch.library.opcheck(
            OPS.sa_hdn_backward.default,
            (torch.ones((), device=DEV), pred.detach(), args[1], seg, stats, mi, stats_grad, info),
        )


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend, rng):
    pred, target, instances, valid = _case("levels", rng)
    pred, target, instances = pred.to(DEV), target.to(DEV), instances.to(DEV)

    def f(p, t, i):
        return ops.sa_hdn_loss(p, t, i, backend="cuda") + ops.ordinal_ranking_loss(
            p, pairs, labels, backend="cuda"
        )

    pairs = torch.randint(0, 64, (2, 16, 2, 2), generator=rng).to(DEV)
    labels = torch.randint(-1, 2, (2, 16), generator=rng).to(DEV)
    assert_compiled_matches_eager(f, backend, pred, target, instances)


# --------------------------------------------------------------------------- ordinal


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["margin", "logistic"])
def test_ordinal_matches_cpu_triton_reference(kind, dtype, rng):
    pred, pairs, labels = ordinal_case(rng, dtype)
    kw = dict(margin=0.2, kind=kind, equal_weight=0.7)
    backends = ["cuda", "cpu", None] + (["triton"] if HAS_TRITON else [])
    assert_backends_agree(
        "ordinal", backends, DEV, pred, pairs, labels,
        loss_min_rtol=1e-5, grad_factor=1, grad_min_rtol=1e-5, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", [0, 1])
def test_ordinal_deterministic_mode(kind, dtype, rng):
    pred, pairs, labels = ordinal_case(rng, dtype)
    args = (pairs, labels, 0.1, kind, 1.3)
    grad = torch.tensor(1.7, dtype=dtype)
    g_c = OPS.ordinal_ranking_backward(grad, pred, *args)
    _, count = OPS.ordinal_ranking_forward(pred.to(DEV), pairs.to(DEV), labels.to(DEV), *args[2:])
    runs = ordinal_backward_runs(OPS, grad, pred, *args, DEV)
    runs += ordinal_backward_runs(OPS, grad, pred, *args, DEV, count=count)  # forward's count
    for r in runs[1:]:
        assert torch.equal(r, runs[0])
    if kind == 0:  # same operations in the same order as the CPU kernel: same bits
        assert torch.equal(runs[0], g_c)
    else:  # exp/log1p of the device math library may differ in the last bit
        torch.testing.assert_close(runs[0], g_c, rtol=1e-5, atol=1e-7)


def test_ordinal_no_used_pairs_and_empty(rng):
    pred, pairs, labels = ordinal_case(rng, torch.float32)
    labels[:] = -100
    p = pred.to(DEV).requires_grad_(True)
    loss = ops.ordinal_ranking_loss(p, pairs.to(DEV), labels.to(DEV), backend="cuda")
    (grad,) = torch.autograd.grad(loss, p)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0
    e_pairs = torch.zeros(3, 0, 2, 2, dtype=torch.int64, device=DEV)
    e_labels = torch.zeros(3, 0, dtype=torch.int64, device=DEV)
    loss, count = OPS.ordinal_ranking_forward(pred.to(DEV), e_pairs, e_labels, 0.0, 0, 1.0)
    assert int(count) == 0
    g = OPS.ordinal_ranking_backward(torch.ones((), device=DEV), pred.to(DEV), e_pairs, e_labels,
                                     0.0, 0, 1.0)  # fmt: skip
    assert loss.item() == 0.0 and g.shape == pred.shape and torch.count_nonzero(g) == 0


def test_opcheck_ordinal(rng):
    pred, pairs, labels = ordinal_case(rng, torch.float32, pairs_per_image=20)
    pred = pred.to(DEV).requires_grad_(True)
    for kind in (0, 1):
        args = (pred, pairs.to(DEV), labels.to(DEV), 0.1, kind, 0.5)
        torch.library.opcheck(OPS.ordinal_ranking_forward.default, args)
        bargs = (torch.ones((), device=DEV), pred.detach(), *args[1:])
        torch.library.opcheck(OPS.ordinal_ranking_backward.default, bargs)
        _, count = OPS.ordinal_ranking_forward(*args)
        torch.library.opcheck(OPS.ordinal_ranking_backward.default, (*bargs, count))
