"""Bad input raises a clear ValueError / TypeError naming the argument, before any kernel
runs (docs/ops.md); backend selection errors."""

from __future__ import annotations

import re

import pytest
import torch

import westar_ops
from westar_ops import ops

B, H, W = 2, 4, 5


@pytest.fixture
def pq(rng):
    return torch.randn(B, H, W, generator=rng), torch.randn(B, H, W, generator=rng)


def ids(*shape, dtype=torch.int64, device="cpu"):
    return torch.zeros(shape, dtype=dtype, device=device)


def mask(*shape, device="cpu"):
    return torch.ones(shape, dtype=torch.bool, device=device)


# ------------------------------------------------------------------------ sa_hdn_loss

SA_HDN_CASES = [
    # (id, kwargs builder, exception, message regex)
    ("int_pred", lambda p, q: dict(pred=p.long()), TypeError, r"pred must be a floating"),
    ("bool_pred", lambda p, q: dict(pred=p > 0), TypeError, r"pred must be a floating"),
    ("int_target", lambda p, q: dict(target=q.int()), TypeError, r"target must be a floating"),
    ("list_pred", lambda p, q: dict(pred=p.tolist()), TypeError, r"pred must be a torch\.Tensor"),
    ("pred_2d", lambda p, q: dict(pred=p[0], target=q[0]), ValueError, r"pred must have shape"),
    (
        "pred_two_channels",
        lambda p, q: dict(pred=p.reshape(1, 2, H, W), target=q.reshape(1, 2, H, W)),
        ValueError,
        r"pred must have shape \(B, H, W\) or \(B, 1, H, W\)",
    ),
    ("target_shape", lambda p, q: dict(target=q[:, :3]), ValueError, r"target must have the shape"),
    ("target_batch", lambda p, q: dict(target=q[:1]), ValueError, r"target must have the shape"),
    (
        "instances_hw",
        lambda p, q: dict(instances=ids(B, 1, H, W + 1)),
        ValueError,
        r"instances must have shape .*got \(2, 1, 4, 6\)",
    ),
    (
        "instances_batch",
        lambda p, q: dict(instances=ids(B + 1, H, W)),
        ValueError,
        r"instances must have shape",
    ),
    (
        "instances_5d",
        lambda p, q: dict(instances=ids(B, 1, 1, H, W)),
        ValueError,
        r"instances must have shape",
    ),
    (
        "instances_float",
        lambda p, q: dict(instances=torch.ones(B, H, W)),
        TypeError,
        r"instances must be an integer tensor",
    ),
    (
        "instances_bool",
        lambda p, q: dict(instances=mask(B, H, W)),
        TypeError,
        r"instances must be an integer tensor",
    ),
    (
        "instances_int8",
        lambda p, q: dict(instances=ids(B, H, W, dtype=torch.int8)),
        TypeError,
        r"instances must be an integer tensor",
    ),
    (
        "negative_id",
        lambda p, q: dict(
            instances=ids(B, 2, H, W).index_put_((torch.tensor(1),), torch.tensor(-3))
        ),
        ValueError,
        r"instances must hold ids >= 0",
    ),
    (
        "negative_id_int16",
        lambda p, q: dict(instances=-torch.ones(B, H, W, dtype=torch.int16)),
        ValueError,
        r"instances must hold ids >= 0",
    ),
    (
        "valid_float",
        lambda p, q: dict(valid=torch.ones(B, H, W)),
        TypeError,
        r"valid must be a bool",
    ),
    ("valid_int", lambda p, q: dict(valid=ids(B, H, W)), TypeError, r"valid must be a bool"),
    (
        "valid_shape",
        lambda p, q: dict(valid=mask(B, H, W - 1)),
        ValueError,
        r"valid must have shape",
    ),
    ("valid_batch", lambda p, q: dict(valid=mask(1, H, W)), ValueError, r"valid must have shape"),
    (
        "stats_grad",
        lambda p, q: dict(stats_grad="partial"),
        ValueError,
        r"stats_grad must be one of .*'partial'",
    ),
    ("eps_negative", lambda p, q: dict(eps=-1e-3), ValueError, r"eps must be >= 0"),
    ("eps_nan", lambda p, q: dict(eps=float("nan")), ValueError, r"eps must be >= 0"),
    ("min_pixels_negative", lambda p, q: dict(min_pixels=-1), ValueError, r"min_pixels must be"),
    (
        "min_pixels_fraction",
        lambda p, q: dict(min_pixels=2.5),
        TypeError,
        r"min_pixels must be an int",
    ),
    ("backend_unknown", lambda p, q: dict(backend="gpu"), ValueError, r"backend must be one of"),
    (
        "backend_cuda_on_cpu",
        lambda p, q: dict(backend="cuda"),
        ValueError,
        r"backend='cuda' needs CUDA tensors",
    ),
    (
        "target_device",
        lambda p, q: dict(target=q.to("meta")),
        ValueError,
        r"target is on meta but pred is on cpu",
    ),
    (
        "instances_device",
        lambda p, q: dict(instances=ids(B, H, W, device="meta")),
        ValueError,
        r"instances is on meta but pred is on cpu",
    ),
    (
        "valid_device",
        lambda p, q: dict(valid=mask(B, H, W, device="meta")),
        ValueError,
        r"valid is on meta but pred is on cpu",
    ),
    (
        "unsupported_device",
        lambda p, q: dict(pred=p.to("meta"), target=q.to("meta")),
        ValueError,
        r"CPU and CUDA tensors, got device meta",
    ),
]


@pytest.mark.parametrize(
    "build,exc,match", [c[1:] for c in SA_HDN_CASES], ids=[c[0] for c in SA_HDN_CASES]
)
@pytest.mark.parametrize("use_module", [False, True])
def test_sa_hdn_bad_input(pq, build, exc, match, use_module):
    p, q = pq
    kw = dict(pred=p, target=q, instances=None, valid=None)
    kw.update(build(p, q))
    if use_module:
        settings = {k: kw.pop(k) for k in ("eps", "min_pixels", "stats_grad", "backend") if k in kw}
        fn = westar_ops.SAHDNLoss(**settings)
        args = (kw.pop("pred"), kw.pop("target"), kw.pop("instances"), kw.pop("valid"))
    else:
        fn = westar_ops.sa_hdn_loss
        args = (kw.pop("pred"), kw.pop("target"), kw.pop("instances"), kw.pop("valid"))
    with pytest.raises(exc, match=match):
        fn(*args, **kw)


def test_sa_hdn_negative_id_message_names_argument(pq):
    p, q = pq
    inst = ids(B, H, W)
    inst[1, 2, 3] = -7
    with pytest.raises(ValueError, match="instances"):
        westar_ops.sa_hdn_loss(p, q, inst)


def test_sa_hdn_kernel_rejects_negative_ids(pq):
    """The internal op checks again (it can be called without the wrapper)."""
    p, q = pq
    inst = ids(B, 1, H, W)
    inst[0, 0, 1, 1] = -1
    with pytest.raises((ValueError, RuntimeError), match="negative id"):
        torch.ops.westar_ops.sa_hdn_forward(p, q, inst, None, True, 1e-6, 1, 2)


@pytest.mark.parametrize("big", [2**31, 2**31 + 5, 2**62])
def test_sa_hdn_ids_from_2_31_raise(pq, big):
    """Ids of 2^31 and above raise on the CPU as on the GPU backends (docs/ops.md), naming
    the first one in (b, l, y, x) order; 2^31 - 1 is still a valid id."""
    p, q = pq
    inst = torch.randint(0, 5, (B, 2, H, W), generator=torch.Generator().manual_seed(3))
    inst[1, 0, 3, 4] = big
    inst[1, 1, 0, 0] = big  # later in (b, l, y, x) order, earlier plane order (level 1)
    inst[0, 1, 2, 2] = big  # earliest: named
    valid = mask(B, H, W)
    valid[0, 2, 2] = False  # found at an invalid pixel too
    expected = re.escape(
        "instances must hold ids < 2^31; found a larger id at instances[0, 1, 2, 2]"
    )
    with pytest.raises(ValueError, match=expected):
        westar_ops.sa_hdn_loss(p, q, inst, valid)
    with pytest.raises(ValueError, match=expected):
        torch.ops.westar_ops.sa_hdn_forward(p, q, inst, valid, True, 1e-6, 1, 2)
    inst[inst == big] = 2**31 - 1
    loss = westar_ops.sa_hdn_loss(p, q, inst, valid)
    assert torch.isfinite(loss)


def test_sa_hdn_negative_ids_are_reported_before_large_ones(pq):
    p, q = pq
    inst = ids(B, 1, H, W)
    inst[0, 0, 0, 0] = 2**31
    inst[1, 0, 3, 4] = -2
    with pytest.raises(ValueError, match=re.escape("negative id at instances[1, 0, 3, 4]")):
        torch.ops.westar_ops.sa_hdn_forward(p, q, inst, None, True, 1e-6, 1, 2)


@pytest.mark.parametrize(("shape", "levels"), [((2048, 1024, 1024), 1), ((1024, 1024, 1024), 2)])
def test_sa_hdn_too_many_memberships(shape, levels):
    """levels x B x H x W above 2^31 - 2 raises before anything is allocated (expanded
    inputs: no memory behind them)."""
    pred = torch.zeros(1, 1, 1).expand(*shape)
    inst = torch.ones(1, 1, 1, 1, dtype=torch.int32).expand(shape[0], levels - 1, *shape[1:])
    expected = re.escape(f"levels x B x H x W = {levels * pred.numel()} memberships, more than")
    with pytest.raises(ValueError, match=expected):
        westar_ops.sa_hdn_loss(pred, pred, inst if levels > 1 else None)
    with pytest.raises(ValueError, match=expected):
        torch.ops.westar_ops.sa_hdn_forward(pred, pred, inst, None, True, 1e-6, 1, 2)


def test_sa_hdn_kernel_rejects_bad_shapes(pq):
    p, q = pq
    with pytest.raises((ValueError, RuntimeError), match="target"):
        torch.ops.westar_ops.sa_hdn_forward(p, q[:, :2], None, None, True, 1e-6, 1, 2)
    with pytest.raises((ValueError, RuntimeError), match="stats_grad"):
        torch.ops.westar_ops.sa_hdn_forward(p, q, None, None, True, 1e-6, 1, 7)


# ------------------------------------------------------------------ ordinal_ranking_loss


def pairs_labels(p=3):
    return torch.zeros(B, p, 2, 2, dtype=torch.int64), torch.ones(B, p, dtype=torch.int64)


ORDINAL_CASES = [
    ("int_pred", lambda p, a, lab: dict(pred=p.long()), TypeError, r"pred must be a floating"),
    ("pred_2d", lambda p, a, lab: dict(pred=p[0]), ValueError, r"pred must have shape"),
    ("pairs_3d", lambda p, a, lab: dict(pairs=a[..., 0]), ValueError, r"pairs must have shape"),
    (
        "pairs_three_points",
        lambda p, a, lab: dict(pairs=torch.zeros(B, 3, 3, 2, dtype=torch.long)),
        ValueError,
        r"pairs must have shape \(B, P, 2, 2\)",
    ),
    (
        "pairs_batch",
        lambda p, a, lab: dict(pairs=a[:1], labels=lab[:1]),
        ValueError,
        r"pairs must have shape .*B = 2",
    ),
    (
        "pairs_float",
        lambda p, a, lab: dict(pairs=a.float()),
        TypeError,
        r"pairs must be an integer",
    ),
    (
        "labels_float",
        lambda p, a, lab: dict(labels=lab.float()),
        TypeError,
        r"labels must be an integer",
    ),
    (
        "labels_shape",
        lambda p, a, lab: dict(labels=lab[:, :2]),
        ValueError,
        r"labels must have shape",
    ),
    (
        "labels_3d",
        lambda p, a, lab: dict(labels=lab[..., None]),
        ValueError,
        r"labels must have shape",
    ),
    ("kind", lambda p, a, lab: dict(kind="hinge"), ValueError, r"kind must be one of .*'hinge'"),
    ("backend", lambda p, a, lab: dict(backend="tpu"), ValueError, r"backend must be one of"),
    (
        "backend_cuda_on_cpu",
        lambda p, a, lab: dict(backend="cuda"),
        ValueError,
        r"backend='cuda' needs CUDA tensors",
    ),
    (
        "pairs_device",
        lambda p, a, lab: dict(pairs=a.to("meta")),
        ValueError,
        r"pairs is on meta but pred is on cpu",
    ),
    (
        "labels_device",
        lambda p, a, lab: dict(labels=lab.to("meta")),
        ValueError,
        r"labels is on meta but pred is on cpu",
    ),
]


@pytest.mark.parametrize(
    "build,exc,match", [c[1:] for c in ORDINAL_CASES], ids=[c[0] for c in ORDINAL_CASES]
)
def test_ordinal_bad_input(pq, build, exc, match):
    p, _ = pq
    a, lab = pairs_labels()
    kw = dict(pred=p, pairs=a, labels=lab)
    kw.update(build(p, a, lab))
    with pytest.raises(exc, match=match):
        westar_ops.ordinal_ranking_loss(kw.pop("pred"), kw.pop("pairs"), kw.pop("labels"), **kw)


@pytest.mark.parametrize(
    "b,p,point,coord",
    [(1, 2, 1, (H, 0)), (0, 0, 0, (0, -1)), (1, 1, 0, (-1, 2)), (0, 2, 1, (1, W))],
)
def test_ordinal_pair_outside_image(pq, b, p, point, coord):
    pred, _ = pq
    pairs, labels = pairs_labels()
    pairs[b, p, point] = torch.tensor(coord)
    msg = rf"pairs\[{b}, {p}\].*outside the {H}x{W} image \(batch index {b}, pair {p}\)"
    with pytest.raises(ValueError, match=msg):
        westar_ops.ordinal_ranking_loss(pred, pairs, labels)


def test_ordinal_kernel_rejects_pair_outside_image(pq):
    """The internal op checks again and names the batch index and pair."""
    pred, _ = pq
    pairs, labels = pairs_labels()
    pairs[1, 2, 0] = torch.tensor([0, W])
    with pytest.raises((ValueError, RuntimeError), match=re.escape("pairs[1, 2]")):
        torch.ops.westar_ops.ordinal_ranking_forward(pred, pairs, labels, 0.0, 0, 1.0)


# ------------------------------------------------------------------ lora_delta_sq_norm

LORA_CASES = [
    (
        "rank_mismatch",
        lambda: (torch.randn(3, 4), torch.randn(5, 2)),
        {},
        ValueError,
        r"A must be \(r, d_in\) and B \(d_out, r\) with the same r",
    ),
    ("A_1d", lambda: (torch.randn(3), torch.randn(5, 3)), {}, ValueError, r"A must be \(r, d_in\)"),
    (
        "A_int",
        lambda: (torch.ones(3, 4, dtype=torch.long), torch.randn(5, 3)),
        {},
        TypeError,
        r"A must be a floating",
    ),
    (
        "B_int",
        lambda: (torch.randn(3, 4), torch.ones(5, 3, dtype=torch.long)),
        {},
        TypeError,
        r"B must be a floating",
    ),
    (
        "dtype_mismatch",
        lambda: (torch.randn(3, 4), torch.randn(5, 3, dtype=torch.float64)),
        {},
        TypeError,
        r"A and B must share a dtype",
    ),
    (
        "device_mismatch",
        lambda: (torch.randn(3, 4), torch.randn(5, 3, device="meta")),
        {},
        ValueError,
        r"B is on meta but A is on cpu",
    ),
    (
        "backend",
        lambda: (torch.randn(3, 4), torch.randn(5, 3)),
        {"backend": "x"},
        ValueError,
        r"backend must be one of",
    ),
    (
        "backend_cuda_on_cpu",
        lambda: (torch.randn(3, 4), torch.randn(5, 3)),
        {"backend": "cuda"},
        ValueError,
        r"backend='cuda' needs CUDA tensors",
    ),
]


@pytest.mark.parametrize(
    "build,kw,exc,match", [c[1:] for c in LORA_CASES], ids=[c[0] for c in LORA_CASES]
)
def test_lora_bad_input(build, kw, exc, match):
    A, Bm = build()
    with pytest.raises(exc, match=match):
        westar_ops.lora_delta_sq_norm(A, Bm, 1.0, **kw)


# ---------------------------------------------------------------------------- backends


def test_triton_on_cpu_without_interpreter(monkeypatch, pq):
    p, q = pq
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"backend='triton' on CPU tensors .*TRITON_INTERPRET=1"):
        westar_ops.sa_hdn_loss(p, q, backend="triton")
    pairs, labels = pairs_labels()
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1"):
        westar_ops.ordinal_ranking_loss(p, pairs, labels, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1"):
        ops.resolve_backend("triton", torch.device("cpu"))
    assert "triton" not in westar_ops.available_backends("cpu")


def test_resolve_backend():
    cpu = torch.device("cpu")
    assert ops.resolve_backend("auto", cpu) == "cpu"
    assert ops.resolve_backend("cpu", cpu) == "cpu"
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.resolve_backend("CPU", cpu)
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        ops.resolve_backend("cuda", cpu)
    with pytest.raises(ValueError, match="got device meta"):
        ops.resolve_backend("auto", torch.device("meta"))
    assert "cpu" in westar_ops.available_backends("cpu")
    assert westar_ops.available_backends("meta") == []


def test_explicit_cpu_backend_same_result(pq):
    p, q = pq
    assert torch.equal(
        westar_ops.sa_hdn_loss(p, q, backend="cpu"), westar_ops.sa_hdn_loss(p, q, backend="auto")
    )
    pairs, labels = pairs_labels()
    assert torch.equal(
        westar_ops.ordinal_ranking_loss(p, pairs, labels, backend="cpu"),
        westar_ops.ordinal_ranking_loss(p, pairs, labels),
    )
