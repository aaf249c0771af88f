"""Triton kernels (torch.ops.westar_triton) on a CUDA device, at their default routing
thresholds: contexts of <= 64 and <= 1024 members on the register kernels, larger ones
on the tiled radix select (tiles of 4096). tests/triton runs the same kernels on tiny
images (under the interpreter without a GPU) with lowered thresholds; here images of
64x80 put the global context on 2 tiles. Compared with the C++ CPU op and
westar_ops.reference; opcheck, torch.compile and deterministic mode on CUDA tensors.

Needs a GPU and triton, not the CUDA C++ kernels (runs on a WESTAR_CUDA=0 build too).
"""

import importlib.util

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

import westar_ops  # noqa: E402
import westar_ops.triton  # noqa: E402,F401  (registers torch.ops.westar_triton)
from tests.matrix import (  # noqa: E402
    DTYPES,
    SCENARIOS,
    assert_backends_agree,
    assert_bitwise_equal_runs,
    assert_compiled_matches_eager,
    case,
    check_forward,
    ordinal_backward_runs,
    ordinal_case,
    sa_hdn_runs,
)
from tests.matrix import cpu_forward as _cpu_forward  # noqa: E402
from tests.matrix import raw_forward as _forward  # noqa: E402
from westar_ops import ops  # noqa: E402

DEV = "cuda"
TRITON = torch.ops.westar_triton


@pytest.mark.parametrize("name", SCENARIOS)
def test_forward_outputs_match_cpu(name, rng):
    pred, target, instances, valid = case(name, rng)
    out_t = _forward(TRITON, pred, target, instances, valid, DEV)
    check_forward(out_t, _cpu_forward(pred, target, instances, valid), pred, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["invalid_nan", "uneven"])
def test_forward_dtypes_match_cpu(name, dtype, rng):
    pred, target, instances, valid = case(name, rng, dtype=dtype)
    out_t = _forward(TRITON, pred, target, instances, valid, DEV)
    check_forward(out_t, _cpu_forward(pred, target, instances, valid), pred, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stats_grad", ["none", "scale", "full"])
@pytest.mark.parametrize("name", ["levels", "invalid_nan", "uneven"])
def test_loss_and_grad_match_cpu_and_reference(name, stats_grad, dtype, rng):
    pred, target, instances, valid = case(name, rng, dtype=dtype)
    kw = dict(include_global=True, eps=1e-6, min_pixels=1, stats_grad=stats_grad)
    # torch.median in the reference may pick another of several tied elements for the
    # median's gradient (half dtypes have many ties): compare with it for fp32/fp64.
    backends = ["triton", "cpu"] + ([None] if dtype in (torch.float32, torch.float64) else [])
    assert_backends_agree(
        "sa_hdn", backends, DEV, pred, target, instances, valid, grad_outliers=4, **kw
    )


@pytest.mark.parametrize("stats_grad", [0, 1, 2])
def test_backward_raw_matches_cpu(stats_grad, rng):
    pred, target, instances, valid = case("uneven", rng)
    out_c = _cpu_forward(pred, target, instances, valid)
    grad = torch.tensor(0.75)
    g_c = torch.ops.westar_ops.sa_hdn_backward(grad, pred, target, *out_c[1:4], stats_grad)
    g_t = TRITON.sa_hdn_backward(
        grad.to(DEV), pred.to(DEV), target.to(DEV), *(x.to(DEV) for x in out_c[1:]), stats_grad
    )
    assert g_t.device.type == "cuda" and g_t.dtype == pred.dtype
    torch.testing.assert_close(g_t.cpu(), g_c, rtol=1e-5, atol=1e-9)


def test_sa_hdn_deterministic_mode_bitwise(rng):
    pred, target, instances, valid = case("uneven", rng)
    assert_bitwise_equal_runs(sa_hdn_runs(TRITON, pred, target, instances, valid, DEV, True))


@pytest.mark.parametrize("kind", [0, 1])
def test_ordinal_deterministic_mode_bitwise(kind, rng):
    pred, pairs, labels = ordinal_case(rng)
    args = (pairs, labels, 0.1, kind, 1.3)
    grad = torch.tensor(1.7)
    g_c = torch.ops.westar_ops.ordinal_ranking_backward(grad, pred, *args)
    runs = ordinal_backward_runs(TRITON, grad, pred, *args, DEV)
    for r in runs[1:]:
        assert torch.equal(r, runs[0])
    torch.testing.assert_close(runs[0], g_c, rtol=1e-5, atol=1e-7)


def test_opcheck_default_thresholds(rng):
    pred, target, instances, valid = case("uneven", rng)
    args = (pred.to(DEV).requires_grad_(True), target.to(DEV), instances.to(DEV),
            valid.to(DEV), True, 1e-6, 1, 2)  # fmt: skip
    torch.library.opcheck(TRITON.sa_hdn_forward.default, args)
    _, seg, stats, mi, info = TRITON.sa_hdn_forward(*args)
    torch.library.opcheck(
        TRITON.sa_hdn_backward.default,
        (torch.ones((), device=DEV), args[0].detach(), args[1], seg, stats, mi, 2, info),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(compile_backend, rng):
    pred, target, instances, _ = case("levels", rng)
    pred, target, instances = pred.to(DEV), target.to(DEV), instances.to(DEV)
    pairs = torch.randint(0, 64, (2, 16, 2, 2), generator=rng).to(DEV)
    labels = torch.randint(-1, 2, (2, 16), generator=rng).to(DEV)

    def f(p, t, i):
        return ops.sa_hdn_loss(p * 1.5, t, i, backend="triton") + ops.ordinal_ranking_loss(
            p, pairs, labels, backend="triton"
        )

    torch._dynamo.reset()
    assert_compiled_matches_eager(f, compile_backend, pred, target, instances)


def test_backend_choice_on_cuda():
    """ "auto" takes the CUDA C++ kernels when built (the smaller byte model,
    BENCHMARKS.md), else Triton; "triton" is always available with triton installed."""
    dev = torch.device(DEV)
    assert "triton" in westar_ops.available_backends(dev)
    expected = "cuda" if westar_ops.build_info()["with_cuda"] else "triton"
    assert ops.resolve_backend("auto", dev) == expected
