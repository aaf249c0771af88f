"""The op tests' shared matrix: dtypes, one tolerance table, the scenarios every backend
runs, and the helpers that compare backends (tests/ops, tests/triton, tests/gpu).

Inputs are built on the CPU from a seeded generator, so every device sees the same data.
Not a test module (it needs no GPU and no triton to import).
"""

from __future__ import annotations

import contextlib

import torch

from westar_ops import ops, reference

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SCENARIOS = ("global", "levels", "invalid_nan", "uint8_ties", "per_pixel", "uneven")

# (rtol, atol) per dtype and comparison:
# - "loss", "grad": an op against westar_ops.reference on tie-free inputs (tests/ops).
#   The reference computes half inputs in float32, as the kernels do, so what differs is
#   the summation order and the final rounding to the output dtype.
# - "backends": two backends (or a backend and the reference) on the scenarios below,
#   which have ties, NaN targets and contexts on both kernel paths; losses compare with
#   rtol at least 1e-4, gradients with 10 x rtol and a few outliers allowed where a sign
#   flips at a near tie (assert_backends_agree).
TOLERANCES = {
    torch.float64: {"loss": (1e-10, 1e-12), "grad": (1e-9, 1e-12), "backends": (1e-10, 1e-12)},
    torch.float32: {"loss": (1e-5, 1e-6), "grad": (1e-4, 1e-7), "backends": (2e-5, 1e-6)},
    torch.float16: {"loss": (2e-3, 1e-4), "grad": (2e-3, 1e-5), "backends": (5e-3, 1e-4)},
    torch.bfloat16: {"loss": (1.6e-2, 1e-3), "grad": (1.6e-2, 1e-4), "backends": (2e-2, 1e-3)},
}


def tolerance(dtype: torch.dtype, kind: str) -> tuple[float, float]:
    return TOLERANCES[dtype][kind]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, kind: str, msg: str = ""):
    """Compare with the tolerance of ``expected``'s dtype for ``kind`` ("loss"/"grad")."""
    rtol, atol = tolerance(expected.dtype, kind)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True, msg=msg or None
    )


def to(x, device):
    return None if x is None else x.to(device)


# ------------------------------------------------------------------------- scenarios


def case(name, rng, dtype=torch.float32, batch=2, height=64, width=80):
    """pred, target, instances, valid of a named sa_hdn scenario (CPU tensors)."""
    pred = torch.randn(batch, height, width, generator=rng).to(dtype)
    target = (torch.rand(batch, height, width, generator=rng) * 4 + 0.5).to(dtype)
    instances, valid = None, None
    if name == "global":
        pass
    elif name == "levels":  # grid cells, sparse huge ids, single pixels
        grid = reference.grid_instances(batch, height, width, grids=(2,))[:, 0]
        sparse = torch.randint(0, 3, (batch, height, width), generator=rng) * 700_000_001
        sparse[0, 0, 0] = 2**31 - 1  # a one-pixel context with the largest id
        single = torch.zeros(batch, height, width, dtype=torch.int64)
        single[:, 1, 2] = 5
        single[1, 3, 3] = 9
        instances = torch.stack([grid.to(torch.int64), sparse, single], 1)
    elif name == "invalid_nan":  # invalid pixels, NaN and inf targets, a whole-image id
        instances = torch.randint(0, 4, (batch, 2, height, width), generator=rng, dtype=torch.int32)
        instances[:, 1] = 3
        valid = torch.rand(batch, height, width, generator=rng) > 0.25
        target[0, 0, :4] = float("nan")
        target[1, 2, 1] = float("inf")
    elif name == "uint8_ties":  # uint8 ids, tied values in pred and target
        instances = torch.randint(0, 3, (batch, 1, height, width), generator=rng).to(torch.uint8)
        pred = torch.randint(-2, 3, (batch, height, width), generator=rng).to(dtype)
        target = torch.randint(1, 4, (batch, height, width), generator=rng).to(dtype)
    elif name == "per_pixel":  # every pixel its own context (K = B*H*W on one level)
        hw = height * width  # distinct ids spread over [1, 2^31 - 1], shuffled
        ids = (torch.arange(hw) * 104_729 + 7)[torch.randperm(hw, generator=rng)] + 1
        instances = ids.reshape(1, 1, height, width).expand(batch, 1, height, width).clone()
    elif name == "uneven":  # 1 pixel, a few, ~1000 (warp path edge), >1024, whole rest
        inst = torch.zeros(batch, height, width, dtype=torch.int16)
        inst[:, 0, 0] = 1  # 1 pixel
        inst[:, 1, :7] = 2  # 7 pixels
        inst[:, 2:18, :64] = 3  # 1024 pixels: largest warp-path context
        inst[:, 18:35, :61] = 4  # 1037 pixels: smallest tiled contexts
        inst[:, 35:, :] = 5  # the rest (2320)
        instances = inst.unsqueeze(1)
        valid = torch.ones(batch, height, width, dtype=torch.bool)
    else:
        raise ValueError(name)
    return pred, target, instances, valid


def ordinal_case(rng, dtype=torch.float32, batch=3, height=17, width=23, pairs_per_image=300):
    """pred, pairs, labels with ignored pairs (one outside the image), pixels shared by
    many pairs and a pair with both ends on one pixel (CPU tensors; P >= 6, H, W >= 5)."""
    pred = (torch.randn(batch, height, width, generator=rng) * 0.5).to(dtype)
    ys = torch.randint(0, height, (batch, pairs_per_image, 2), generator=rng)
    xs = torch.randint(0, width, (batch, pairs_per_image, 2), generator=rng)
    pairs = torch.stack([ys, xs], -1)  # (B, P, 2 points, (y, x))
    labels = torch.randint(-1, 2, (batch, pairs_per_image), generator=rng)
    labels[0, 0] = -100  # ignored pairs, one with coordinates outside the image
    labels[1, 3] = 7
    pairs[1, 3] = torch.tensor([[99, -4], [0, 0]])
    pairs[1, 5 : 5 + max(1, pairs_per_image // 6)] = pairs[1, 4]  # pairs sharing pixels
    pairs[0, 2, 0] = pairs[0, 1, 1]
    pairs[-1, 5] = torch.tensor([[4, 4], [4, 4]])  # both ends on one pixel
    return pred, pairs, labels


# ------------------------------------------------------------------ running backends


def raw_forward(family, pred, target, instances, valid, device, include_global=True, eps=1e-6,
                min_pixels=1):  # fmt: skip
    """``family.sa_hdn_forward`` (torch.ops.westar_ops or westar_triton) on ``device``."""
    return family.sa_hdn_forward(
        pred.to(device), target.to(device), to(instances, device), to(valid, device),
        include_global, eps, min_pixels, 2,
    )  # fmt: skip


def cpu_forward(pred, target, instances, valid, include_global=True, eps=1e-6, min_pixels=1):
    """The C++ CPU op's raw outputs: what every other backend is compared with."""
    return raw_forward(torch.ops.westar_ops, pred, target, instances, valid, "cpu",
                       include_global, eps, min_pixels)  # fmt: skip


def loss_and_grad(op: str, backend: str | None, device, pred, *inputs, **kw):
    """Loss and d loss / d pred of ``op`` ("sa_hdn" or "ordinal") with ``backend``
    (None: westar_ops.reference, on the CPU), as CPU tensors; checks their dtypes."""
    dev = "cpu" if backend in ("cpu", None) else device
    p = pred.to(dev).requires_grad_(True)
    args = (p, *(to(x, dev) for x in inputs))
    if op == "sa_hdn":
        fn = reference.sa_hdn_loss if backend is None else ops.sa_hdn_loss
    else:
        fn = reference.ordinal_ranking_loss if backend is None else ops.ordinal_ranking_loss
    loss = fn(*args, **kw) if backend is None else fn(*args, backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss, p)
    assert loss.dtype == pred.dtype and grad.dtype == pred.dtype and grad.shape == pred.shape
    return loss.detach().cpu(), grad.cpu()


def assert_backends_agree(op, backends, device, pred, *inputs, loss_min_rtol=1e-4, grad_factor=10,
                          grad_min_rtol=0.0, grad_outliers=0, **kw):  # fmt: skip
    """Runs ``op`` with every backend of ``backends`` (None: the reference) and compares
    the first one's loss and gradient with each other's, at the "backends" tolerance
    (rtol, atol) of pred's dtype.

    Losses: rtol at least ``loss_min_rtol``. Gradients: |a - b| <= atol + r |b| with
    r = max(grad_factor * rtol, grad_min_rtol), except for at most ``grad_outliers``
    pixels (a sign flip at a near tie changes one pixel's gradient)."""
    out = [loss_and_grad(op, b, device, pred, *inputs, **kw) for b in backends]
    rtol, atol = tolerance(pred.dtype, "backends")
    grad_rtol = max(grad_factor * rtol, grad_min_rtol)
    for other in range(1, len(out)):
        torch.testing.assert_close(
            out[0][0], out[other][0], rtol=max(rtol, loss_min_rtol), atol=atol
        )
        diff = (out[0][1].double() - out[other][1].double()).abs()
        tol = atol + grad_rtol * out[other][1].double().abs()
        assert int((diff > tol).sum()) <= grad_outliers, (backends[other], float(diff.max()))


def check_forward(out, out_ref, pred, dtype):
    """The raw outputs (loss, seg, stats, median_index, info) of one backend against
    another's (usually the CPU op's, which has exactly K rows of stats). A GPU backend's
    stats and median_index have the capacity's rows (docs/internals.md): K like the
    reference's, then zeros and -1."""
    loss_g, seg_g, stats_g, mi_g, info_g = (x.cpu() for x in out)
    loss_c, seg_c, stats_c, mi_c, info_c = out_ref
    rtol, atol = tolerance(dtype, "backends")
    assert seg_g.dtype == torch.int32 and seg_g.is_contiguous()
    assert torch.equal(seg_g, seg_c)
    assert info_g.dtype == torch.int64 and torch.equal(info_g, info_c)
    k = stats_c.shape[0]
    assert stats_g.dtype == stats_c.dtype and stats_g.shape[1:] == stats_c.shape[1:]
    assert stats_g.shape[0] >= k and mi_g.shape == stats_g.shape[:1]
    assert not stats_g[k:].any() and bool((mi_g[k:] == -1).all())
    stats_g, mi_g = stats_g[:k], mi_g[:k]
    assert mi_g.dtype == torch.int64 and mi_g.shape == mi_c.shape
    assert loss_g.dtype == pred.dtype and loss_g.shape == ()
    # Medians, counts and S3 are exact; D is equal up to rounding of the MAD sum.
    assert torch.equal(stats_g[:, [0, 2, 6, 7]], stats_c[:, [0, 2, 6, 7]])
    s_rtol = 1e-10 if stats_g.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(stats_g[:, [1, 3]], stats_c[:, [1, 3]], rtol=s_rtol, atol=s_rtol)
    # S1/S2 are sums of signs: a sign of a near-zero normalized difference may flip with
    # a last-bit difference of D (S1 moves by at most 2 per flip).
    torch.testing.assert_close(stats_g[:, 4], stats_c[:, 4], rtol=0, atol=4.0)
    torch.testing.assert_close(stats_g[:, 5], stats_c[:, 5], rtol=1e-3, atol=4.0)
    # Every backend picks the first pixel (ascending index) whose pred equals t_p.
    assert torch.equal(mi_g, mi_c)
    flat = pred.cpu().reshape(-1).to(stats_c.dtype)
    assert torch.equal(flat[mi_g], stats_c[:, 0])
    torch.testing.assert_close(loss_g, loss_c, rtol=max(rtol, 1e-4), atol=atol)


# -------------------------------------------------------------- repeatability, K == 0


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True):
    """torch.use_deterministic_algorithms(enabled) inside the block, restored after."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def sa_hdn_runs(family, pred, target, instances, valid, device, deterministic, times=3):
    """Raw forward outputs and the gradient of ``times`` identical calls (CPU tensors)."""
    runs = []
    with deterministic_algorithms(deterministic):
        for _ in range(times):
            p = pred.to(device).requires_grad_(True)
            out = raw_forward(family, p, target, instances, valid, device)
            (grad,) = torch.autograd.grad(out[0], p)
            runs.append([x.detach().cpu() for x in out] + [grad.cpu()])
    return runs


def assert_bitwise_equal_runs(runs):
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def assert_no_context_gives_zero(family, backend, pred, target, instances, device):
    """No usable pixel: K == 0, loss 0 and gradient 0 (never NaN), no stats, seg all -1."""
    p = pred.to(device).requires_grad_(True)
    valid = torch.zeros(pred.shape, dtype=torch.bool, device=device)
    loss = ops.sa_hdn_loss(p, target.to(device), instances.to(device), valid, backend=backend)
    (grad,) = torch.autograd.grad(loss, p)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0
    _, seg, stats, mi, info = raw_forward(family, pred, target, None, valid, device)
    assert not stats.any() and bool((mi == -1).all()) and bool((seg == -1).all())
    assert info.tolist() == [0, 0, -1, -1]
    if family is torch.ops.westar_ops and device == "cpu":
        assert stats.shape == (0, 8) and mi.shape == (0,)


def ordinal_backward_runs(family, grad, pred, pairs, labels, margin, kind, equal_weight, device,
                          times=3, count=None):  # fmt: skip
    """``family.ordinal_ranking_backward`` ``times`` times in deterministic mode (CPU
    tensors); ``count``: the forward's used-pair count (None: the op counts again)."""
    args = (pairs.to(device), labels.to(device), margin, kind, equal_weight, count)
    with deterministic_algorithms(True):
        return [
            family.ordinal_ranking_backward(grad.to(device), pred.to(device), *args).cpu()
            for _ in range(times)
        ]


def assert_compiled_matches_eager(fn, compile_backend, pred, *inputs, rtol=1e-5, atol=1e-6,
                                  grad_atol=1e-7):  # fmt: skip
    """``fn(pred, *inputs)`` (a 0-dim loss) under torch.compile(fullgraph=True) gives the
    eager loss and gradient."""
    compiled = torch.compile(fn, backend=compile_backend, fullgraph=True)
    out = []
    for f in (fn, compiled):
        p = pred.clone().requires_grad_(True)
        loss = f(p, *inputs)
        (grad,) = torch.autograd.grad(loss, p)
        out.append((loss.detach(), grad))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=rtol, atol=atol)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=rtol, atol=grad_atol)


# ------------------------------------------------------ normalized ordinal ranking


def normalized_ordinal_case(rng, dtype=torch.float64, batch=3, height=5, width=7,
                            pairs_per_image=12):  # fmt: skip
    """pred, target, valid, pairs, labels (CPU tensors) for normalized_ordinal_ranking_loss:
    a tie-free pred (so the median pixel is unique), invalid pixels, a NaN target, the
    last image with no usable pixel, ignored pairs (one with coordinates outside the
    image), pairs with an unusable end, pairs sharing pixels."""
    from tests.ops.helpers import distinct_values

    pred = distinct_values((batch, height, width), dtype, rng)
    target = (torch.rand(batch, height, width, generator=rng) * 4 + 0.5).to(dtype)
    valid = torch.rand(batch, height, width, generator=rng) > 0.3
    target[0, 0, 1] = float("nan")
    valid[-1] = False
    ys = torch.randint(0, height, (batch, pairs_per_image, 2), generator=rng)
    xs = torch.randint(0, width, (batch, pairs_per_image, 2), generator=rng)
    pairs = torch.stack([ys, xs], -1)
    labels = torch.randint(-1, 2, (batch, pairs_per_image), generator=rng)
    labels[0, 0] = -100
    labels[0, 1] = 7
    pairs[0, 1] = torch.tensor([[99, -4], [0, 0]])
    pairs[0, 2] = torch.tensor([[0, 1], [1, 1]])  # an end on the NaN target
    pairs[min(1, batch - 1), 3:6] = pairs[min(1, batch - 1), 2]
    return pred, target, valid, pairs, labels


def normalized_ordinal_loss_and_grad(backend, device, source, pred, target, valid, pairs, labels,
                                     **kw):  # fmt: skip
    """Loss and d loss / d pred (CPU tensors) of normalized_ordinal_ranking_loss with
    ``backend`` (None: the reference, on the CPU). ``source``: "sa_hdn" (stats from
    sa_hdn_loss(..., return_stats=True) on the same backend; the reference's usable
    pixels are valid & finite target) or "torch" (stats=None, valid passed)."""
    dev = "cpu" if backend is None else device
    p = pred.to(dev).requires_grad_(True)
    pairs, labels = pairs.to(dev), labels.to(dev)
    usable = valid if source == "torch" else valid & torch.isfinite(target)
    if backend is None:
        loss = reference.normalized_ordinal_ranking_loss(p, pairs, labels, valid=usable, **kw)
    elif source == "torch":
        loss = ops.normalized_ordinal_ranking_loss(
            p, pairs, labels, valid=to(valid, dev), backend=backend, **kw
        )
    else:
        _, stats = ops.sa_hdn_loss(
            p, target.to(dev), None, to(valid, dev), backend=backend, return_stats=True
        )
        loss = ops.normalized_ordinal_ranking_loss(
            p, pairs, labels, stats=stats, backend=backend, **kw
        )
    (grad,) = torch.autograd.grad(loss, p)
    assert loss.dtype == pred.dtype and grad.dtype == pred.dtype and grad.shape == pred.shape
    return loss.detach().cpu(), grad.cpu()


def random_pairs(batch: int, height: int, width: int, n: int, gen: torch.Generator):
    """(pairs (batch, n, 2, 2) of (y, x) inside the image, labels (batch, n) drawn from
    {1, -1, 0, -100}: ordered both ways, equal, ignored) for the compile tests."""
    pairs = torch.stack(
        [
            torch.randint(0, height, (batch, n, 2), generator=gen),
            torch.randint(0, width, (batch, n, 2), generator=gen),
        ],
        dim=-1,
    )
    labels = torch.tensor([1, -1, 0, -100])[torch.randint(0, 4, (batch, n), generator=gen)]
    return pairs, labels
