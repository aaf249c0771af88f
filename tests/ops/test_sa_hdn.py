"""sa_hdn_loss: loss and gradient against the plain-PyTorch reference (docs/ops.md)."""

from __future__ import annotations

import pytest
import torch

import westar_ops
from tests.matrix import DTYPES, assert_close
from tests.ops.helpers import ID_DTYPES, distinct_values, random_instances, remap_ids, target_values
from westar_ops import reference

# Every test runs with the AVX-512 CPU loops (where available) and the portable ones.
pytestmark = pytest.mark.usefixtures("cpu_isa")

MODES = ("full", "scale", "none")


def run_both(pred, target, instances=None, valid=None, *, leaf=None, **kw):
    """(loss, grad) of the op and of the reference for the same inputs.

    ``pred`` may be a view of ``leaf`` (non-contiguous inputs); gradients are those of
    the leaf. Returns (loss_op, grad_op, loss_ref, grad_ref).
    """
    if leaf is None:
        leaf, view = pred, (lambda x: x)
    else:
        view = pred  # a function leaf -> pred
    results = []
    for fn in (westar_ops.sa_hdn_loss, reference.sa_hdn_loss):
        x = leaf.detach().clone().requires_grad_(True)
        loss = fn(view(x), target, instances, valid, **kw)
        loss.backward()
        results += [loss.detach(), x.grad]
    return tuple(results)


def check(pred, target, instances=None, valid=None, **kw):
    loss, grad, loss_ref, grad_ref = run_both(pred, target, instances, valid, **kw)
    assert loss.shape == () and loss.dtype == pred.dtype
    assert grad.shape == pred.shape and grad.dtype == pred.dtype
    assert_close(loss, loss_ref, "loss")
    assert_close(grad, grad_ref, "grad")
    assert torch.isfinite(grad).all()
    return loss, grad


# ------------------------------------------------------------------ instance levels


@pytest.mark.parametrize("include_global", [True, False])
@pytest.mark.parametrize("levels", [None, "3d", 0, 1, 2, 3])
def test_instance_levels(rng, levels, include_global):
    b, h, w = 2, 7, 13
    pred = distinct_values((b, h, w), torch.float64, rng)
    target = target_values((b, h, w), torch.float64, rng)
    if levels is None:
        inst = None
    elif levels == "3d":
        inst = random_instances(b, 1, h, w, rng)[:, 0]
    else:
        inst = random_instances(b, levels, h, w, rng, num_ids=3 + levels)
    loss, grad = check(pred, target, inst, include_global=include_global)
    if not include_global and (inst is None or inst.numel() == 0):
        assert loss.item() == 0.0 and not grad.any()
    else:
        assert loss.item() > 0


@pytest.mark.parametrize("id_dtype", ID_DTYPES)
def test_instance_dtypes(rng, id_dtype):
    b, h, w = 2, 9, 11
    pred = distinct_values((b, h, w), torch.float32, rng)
    target = target_values((b, h, w), torch.float32, rng)
    # sparse ids within the dtype's range, including its largest value
    top = {torch.uint8: 255, torch.int16: 32767, torch.int32: 2**31 - 1, torch.int64: 2**31 - 1}
    table = torch.tensor([0, 3, 77, top[id_dtype] - 1, top[id_dtype]])
    inst = table[random_instances(b, 2, h, w, rng, num_ids=5)].to(id_dtype)
    loss, grad = check(pred, target, inst)
    # the same ids as int64 give the same result
    loss64 = westar_ops.sa_hdn_loss(pred, target, inst.long())
    assert torch.equal(loss, loss64)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_huge_sparse_ids_equal_compact_ids(rng, id_dtype):
    """Cost and result independent of the largest id: remapping ids 1..m to huge sparse
    values (order-preserving, up to 2^31-1) gives bitwise-identical outputs."""
    b, h, w = 2, 8, 10
    pred = distinct_values((b, h, w), torch.float32, rng)
    target = target_values((b, h, w), torch.float32, rng)
    compact = random_instances(b, 3, h, w, rng, num_ids=6)
    huge = remap_ids(compact, rng).to(id_dtype)
    assert int(huge.max()) == 2**31 - 1
    outs = []
    for inst in (compact.to(id_dtype), huge):
        x = pred.clone().requires_grad_(True)
        fwd = torch.ops.westar_ops.sa_hdn_forward(x, target, inst, None, True, 1e-6, 1, 2)
        fwd[0].backward()
        outs.append([t.detach() for t in fwd] + [x.grad])
    for a, b_ in zip(*outs):
        assert torch.equal(a, b_)
    # and the reference agrees
    check(pred, target, huge)


def test_ids_permuted_same_loss(rng):
    """A permutation of the ids changes the context order, not the loss or gradient."""
    b, h, w = 2, 8, 9
    pred = distinct_values((b, h, w), torch.float64, rng)
    target = target_values((b, h, w), torch.float64, rng)
    inst = random_instances(b, 2, h, w, rng, num_ids=6)
    perm = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(5, generator=rng)])
    _, g1, l1, _ = run_both(pred, target, inst)
    _, g2, l2, _ = run_both(pred, target, perm[inst] * 1000 + 17 * (perm[inst] > 0))
    assert_close(l1, l2, "loss")
    assert_close(g1, g2, "grad")


# -------------------------------------------------------- dtypes and stats_grad modes


@pytest.mark.parametrize("stats_grad", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_and_modes(rng, dtype, stats_grad):
    b, h, w = 2, 7, 13
    pred = distinct_values((b, h, w), dtype, rng)
    target = target_values((b, h, w), dtype, rng)
    inst = random_instances(b, 2, h, w, rng)
    valid = torch.rand(b, h, w, generator=rng) > 0.15
    check(pred, target, inst, valid, stats_grad=stats_grad, min_pixels=2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_modes_differ(rng, dtype):
    """The three modes give the same loss and different gradients (sanity of the flag)."""
    pred = distinct_values((2, 6, 7), dtype, rng)
    target = target_values((2, 6, 7), dtype, rng)
    inst = random_instances(2, 1, 6, 7, rng)
    out = {m: run_both(pred, target, inst, stats_grad=m) for m in MODES}
    for m in MODES:
        assert torch.equal(out[m][0], out["full"][0])
    assert not torch.allclose(out["full"][1], out["scale"][1])
    assert not torch.allclose(out["scale"][1], out["none"][1])


def test_target_dtype_cast(rng):
    pred = distinct_values((2, 5, 6), torch.float32, rng)
    target = target_values((2, 5, 6), torch.float64, rng)
    loss = westar_ops.sa_hdn_loss(pred, target)
    assert loss.dtype == torch.float32
    assert torch.equal(loss, westar_ops.sa_hdn_loss(pred, target.float()))


@pytest.mark.parametrize(
    "dtype,scale",
    [(torch.bfloat16, 1.0), (torch.float16, 1.0), (torch.float16, 1e5), (torch.bfloat16, 1e5)],
)
def test_half_pred_float32_target(rng, dtype, scale):
    """A float32 target with a half pred (e.g. a float32 teacher and an autocast student).
    Every finite target pixel belongs to its contexts (spec), whatever its magnitude: a
    target of metric depth in mm above 65504 must not be dropped by a cast to float16."""
    b, h, w = 2, 6, 7
    pred = distinct_values((b, h, w), dtype, rng)
    target = (torch.rand(b, h, w, generator=rng, dtype=torch.float64) + 0.1).float() * scale
    loss, grad, loss_ref, grad_ref = run_both(pred, target)
    assert_close(loss, loss_ref, "loss")
    assert_close(grad, grad_ref, "grad")


def test_target_gets_no_gradient(rng):
    pred = distinct_values((2, 5, 6), torch.float64, rng).requires_grad_(True)
    target = target_values((2, 5, 6), torch.float64, rng).requires_grad_(True)
    westar_ops.sa_hdn_loss(pred, target).backward()
    assert pred.grad is not None
    assert target.grad is None or not target.grad.any()


def test_upstream_gradient_scales(rng):
    pred = distinct_values((2, 6, 5), torch.float64, rng)
    target = target_values((2, 6, 5), torch.float64, rng)
    inst = random_instances(2, 2, 6, 5, rng)
    x = pred.clone().requires_grad_(True)
    westar_ops.sa_hdn_loss(x, target, inst).backward()
    y = pred.clone().requires_grad_(True)
    (westar_ops.sa_hdn_loss(y, target, inst) * -2.5).backward()
    torch.testing.assert_close(y.grad, -2.5 * x.grad, rtol=1e-12, atol=0)


# --------------------------------------------------------- masks and non-finite data


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_valid_and_nonfinite_target(rng, dtype):
    b, h, w = 3, 8, 9
    pred = distinct_values((b, h, w), dtype, rng)
    target = target_values((b, h, w), dtype, rng)
    flat = target.view(-1)
    idx = torch.randperm(flat.numel(), generator=rng)[:12]
    flat[idx[:4]] = float("nan")
    flat[idx[4:8]] = float("inf")
    flat[idx[8:]] = float("-inf")
    valid = torch.rand(b, h, w, generator=rng) > 0.3
    inst = random_instances(b, 2, h, w, rng)
    loss, grad = check(pred, target, inst, valid)
    assert torch.isfinite(loss)
    # pixels outside every context get exactly zero gradient
    unusable = ~valid | ~torch.isfinite(target)
    assert not grad[unusable].any()
    # a non-finite target is the same as an invalid pixel
    loss2 = westar_ops.sa_hdn_loss(pred, target.nan_to_num(0.0), inst, valid & ~unusable)
    assert_close(loss2, loss, "loss")


@pytest.mark.parametrize("min_pixels", [0, 1, 2, 5, 20, 1000])
def test_min_pixels(rng, min_pixels):
    b, h, w = 2, 6, 9
    pred = distinct_values((b, h, w), torch.float64, rng)
    target = target_values((b, h, w), torch.float64, rng)
    inst = random_instances(b, 2, h, w, rng, num_ids=12)
    valid = torch.rand(b, h, w, generator=rng) > 0.2
    loss, grad = check(pred, target, inst, valid, min_pixels=min_pixels)
    if min_pixels == 1000:
        assert loss.item() == 0.0 and not grad.any()


@pytest.mark.parametrize("eps", [1e-6, 0.1, 3.0])
def test_eps(rng, eps):
    pred = distinct_values((2, 5, 7), torch.float64, rng)
    target = target_values((2, 5, 7), torch.float64, rng)
    check(pred, target, random_instances(2, 1, 5, 7, rng), eps=eps)


def test_nonfinite_pred_propagates(rng):
    pred = distinct_values((2, 5, 7), torch.float32, rng)
    target = target_values((2, 5, 7), torch.float32, rng)
    pred[1, 2, 3] = float("nan")
    assert torch.isnan(westar_ops.sa_hdn_loss(pred, target))


# ------------------------------------------------------------- shapes and strides


@pytest.mark.parametrize(
    "shape", [(2, 7, 13), (2, 1, 7, 13), (1, 1, 1), (3, 1, 1), (2, 1, 9), (2, 9, 1), (1, 2, 2)]
)
def test_shapes(rng, shape):
    pred = distinct_values(shape, torch.float64, rng)
    target = target_values(shape, torch.float64, rng)
    b, h, w = shape[0], shape[-2], shape[-1]
    inst = random_instances(b, 2, h, w, rng, num_ids=3)
    check(pred, target, inst)
    check(pred, target, None, include_global=True, stats_grad="scale")


def test_4d_equals_3d(rng):
    pred = distinct_values((2, 1, 6, 7), torch.float32, rng)
    target = target_values((2, 1, 6, 7), torch.float32, rng)
    valid = torch.rand(2, 1, 6, 7, generator=rng) > 0.2
    inst = random_instances(2, 2, 6, 7, rng)
    a = westar_ops.sa_hdn_loss(pred, target, inst, valid)
    b = westar_ops.sa_hdn_loss(pred[:, 0], target[:, 0], inst, valid[:, 0])
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_non_contiguous(rng, dtype):
    b, h, w = 2, 7, 11
    # pred: a transposed view of a leaf; target: sliced; instances: transposed and with a
    # level stride; valid: transposed.
    leaf = distinct_values((b, w, h), dtype, rng)
    target = target_values((b, h, 2 * w), dtype, rng)[:, :, ::2]
    inst = random_instances(b, 4, w, h, rng).transpose(2, 3)[:, ::2]
    valid = (torch.rand(b, w, h, generator=rng) > 0.2).transpose(1, 2)
    assert not target.is_contiguous() and not inst.is_contiguous()
    loss, grad, loss_ref, grad_ref = run_both(
        lambda x: x.transpose(1, 2), target, inst, valid, leaf=leaf
    )
    assert_close(loss, loss_ref, "loss")
    assert_close(grad, grad_ref, "grad")
    # same as contiguous copies
    contiguous = westar_ops.sa_hdn_loss(
        leaf.transpose(1, 2).contiguous(),
        target.contiguous(),
        inst.contiguous(),
        valid.contiguous(),
    )
    assert_close(loss, contiguous, "loss")


def test_expanded_instances(rng):
    """Stride-0 (expanded) instances, e.g. one grid shared by the batch."""
    b, h, w = 3, 8, 8
    pred = distinct_values((b, h, w), torch.float64, rng)
    target = target_values((b, h, w), torch.float64, rng)
    grid = westar_ops.grid_instances(1, h, w, (4, 2)).expand(b, -1, -1, -1)
    check(pred, target, grid)


# ------------------------------------------------------------- degenerate contexts


def test_single_pixel_contexts(rng):
    """Every pixel is its own instance: those contexts add 0 to the numerator, n to the
    denominator, and nothing to the gradient."""
    b, h, w = 2, 4, 5
    pred = distinct_values((b, h, w), torch.float64, rng)
    target = target_values((b, h, w), torch.float64, rng)
    inst = torch.arange(1, h * w + 1).reshape(1, 1, h, w).expand(b, 1, h, w)
    loss, grad = check(pred, target, inst, include_global=False)
    assert loss.item() == 0.0 and not grad.any()
    loss_g, grad_g = check(pred, target, inst, include_global=True)
    loss_only_global = westar_ops.sa_hdn_loss(pred, target)
    torch.testing.assert_close(loss_g, loss_only_global / 2)


def test_image_without_valid_pixel(rng):
    b, h, w = 3, 5, 6
    pred = distinct_values((b, h, w), torch.float32, rng)
    target = target_values((b, h, w), torch.float32, rng)
    valid = torch.ones(b, h, w, dtype=torch.bool)
    valid[1] = False
    target[2] = float("nan")
    inst = random_instances(b, 2, h, w, rng)
    loss, grad = check(pred, target, inst, valid)
    assert not grad[1:].any()
    # equals the loss of image 0 alone
    assert_close(loss, westar_ops.sa_hdn_loss(pred[:1], target[:1], inst[:1]), "loss")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "case", ["no_levels", "ids_zero", "all_invalid", "target_nan", "min_pixels", "empty_batch"]
)
def test_batch_without_context(rng, dtype, case):
    """No context at all: the loss is exactly 0 and the gradient all zeros, never NaN."""
    b, h, w = 2, 4, 5
    pred = distinct_values((b, h, w), dtype, rng)
    target = target_values((b, h, w), dtype, rng)
    inst, valid, kw = None, None, {}
    if case == "no_levels":
        kw["include_global"] = False
    elif case == "ids_zero":
        inst, kw["include_global"] = torch.zeros(b, 2, h, w, dtype=torch.int32), False
    elif case == "all_invalid":
        valid = torch.zeros(b, h, w, dtype=torch.bool)
    elif case == "target_nan":
        target.fill_(float("nan"))
    elif case == "min_pixels":
        kw["min_pixels"] = h * w + 1
    elif case == "empty_batch":
        pred, target = pred[:0], target[:0]
    x = pred.clone().requires_grad_(True)
    loss = westar_ops.sa_hdn_loss(x, target, inst, valid, **kw)
    assert loss.dtype == dtype and loss.shape == ()
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad.shape == pred.shape
    assert not x.grad.any() and not torch.isnan(x.grad).any()


@pytest.mark.parametrize("shape", [(2, 0, 5), (2, 5, 0), (0, 1, 3, 3)])
def test_empty_images(shape):
    pred = torch.randn(shape, requires_grad=True)
    loss = westar_ops.sa_hdn_loss(pred, torch.randn(shape))
    assert loss.item() == 0.0
    loss.backward()
    assert pred.grad.shape == pred.shape


# ------------------------------------------------------------------------- ties


@pytest.mark.parametrize("stats_grad", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ties_group_sums(rng, dtype, stats_grad):
    """Quantized pred: only the summed gradient over elements of equal value (per image)
    is defined; it and the loss must match the reference."""
    b, h, w = 2, 9, 10
    pred = torch.randint(0, 6, (b, h, w), generator=rng).to(dtype)
    target = target_values((b, h, w), dtype, rng)
    inst = random_instances(b, 2, h, w, rng, num_ids=3)
    valid = torch.rand(b, h, w, generator=rng) > 0.1
    loss, grad, loss_ref, grad_ref = run_both(pred, target, inst, valid, stats_grad=stats_grad)
    assert_close(loss, loss_ref, "loss")
    key = (torch.arange(b)[:, None, None] * 100 + pred.long()).flatten()
    sums = torch.zeros(b * 100, dtype=torch.float64).index_add_(0, key, grad.double().flatten())
    sums_ref = torch.zeros_like(sums).index_add_(0, key, grad_ref.double().flatten())
    rtol, atol = {torch.float64: (1e-9, 1e-12), torch.float32: (1e-4, 1e-6)}[dtype]
    torch.testing.assert_close(sums, sums_ref, rtol=rtol, atol=atol)


def test_constant_prediction(rng):
    """All pred equal (s = 0, D = eps): finite loss and gradient."""
    pred = torch.full((2, 6, 6), 0.5, dtype=torch.float64)
    target = target_values((2, 6, 6), torch.float64, rng)
    loss, grad, loss_ref, grad_ref = run_both(pred, target, random_instances(2, 1, 6, 6, rng))
    assert_close(loss, loss_ref, "loss")
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.sum(), grad_ref.sum(), rtol=1e-9, atol=1e-6)


# ------------------------------------------------------------ big contexts, threads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_big_contexts(rng, dtype):
    """Contexts above the kernels' small/blocked thresholds (1024 and 16384 pixels)."""
    b, h, w = 1, 150, 151
    pred = distinct_values((b, h, w), dtype, rng)
    target = target_values((b, h, w), dtype, rng)
    inst = random_instances(b, 2, h, w, rng, num_ids=3)
    valid = torch.rand(b, h, w, generator=rng) > 0.05
    check(pred, target, inst, valid)


def _pattern(name: str, n: int, gen: torch.Generator) -> torch.Tensor:
    j = torch.arange(n, dtype=torch.float64)
    if name == "ascending":
        return j
    if name == "descending":
        return -j
    if name == "sawtooth":
        return (j % 97) + j / n
    if name == "strided_outliers":
        # large values at every position that a strided sample could pick
        x = torch.rand(n, generator=gen, dtype=torch.float64)
        for stride in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
            x[::stride] += 10.0
        return x
    if name == "two_values":
        return (j % 2) * 1.0
    if name == "one_outlier":
        x = torch.zeros(n, dtype=torch.float64)
        x[n // 3] = 1e6
        return x
    raise AssertionError(name)


@pytest.mark.parametrize(
    "pattern",
    ["ascending", "descending", "sawtooth", "strided_outliers", "two_values", "one_outlier"],
)
def test_big_adversarial_patterns(rng, pattern):
    """Sorted, periodic and heavily tied data in big contexts (the kernels' pivot
    selection must fall back correctly): loss against the reference, gradient sums."""
    b, h, w = 1, 40, 120  # 4800 pixels: above the 1024-pixel direct-selection threshold
    pred = _pattern(pattern, h * w, rng).reshape(b, h, w).float()
    target = target_values((b, h, w), torch.float32, rng)
    loss, grad, loss_ref, grad_ref = run_both(pred, target)
    assert_close(loss, loss_ref, "loss")
    torch.testing.assert_close(grad.sum(), grad_ref.sum(), rtol=1e-4, atol=1e-6)
    fwd = torch.ops.westar_ops.sa_hdn_forward(pred, target, None, None, True, 1e-6, 1, 2)
    stats = fwd[2]
    assert stats[0, 0].item() == pred.flatten().median().item()


def _loss_and_grad(pred, target, inst, valid=None):
    x = pred.clone().requires_grad_(True)
    loss = westar_ops.sa_hdn_loss(x, target, inst, valid)
    loss.backward()
    return loss.detach(), x.grad


def test_deterministic_multithreaded(rng):
    """Two runs on a size that the kernels split over threads are bitwise identical."""
    b, h, w = 2, 128, 160
    pred = torch.randn(b, h, w, generator=rng)
    target = target_values((b, h, w), torch.float32, rng)
    inst = random_instances(b, 2, h, w, rng, num_ids=5)
    valid = torch.rand(b, h, w, generator=rng) > 0.1
    old = torch.get_num_threads()
    torch.set_num_threads(max(2, old))
    try:
        outs = [_loss_and_grad(pred, target, inst, valid) for _ in range(2)]
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])


def test_independent_of_thread_count(rng):
    """Tasks' results depend on the task, not on the thread that ran it
    (docs/internals.md), so 1 and 2 threads give the same bits."""
    b, h, w = 2, 128, 160
    pred = torch.randn(b, h, w, generator=rng, dtype=torch.float64)
    target = target_values((b, h, w), torch.float64, rng)
    inst = random_instances(b, 1, h, w, rng, num_ids=4)
    old = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(_loss_and_grad(pred, target, inst))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])


# ------------------------------------------------------------------------ gradcheck


@pytest.mark.parametrize("min_pixels", [1, 3])
def test_gradcheck(rng, min_pixels):
    """Only stats_grad="full" is the true derivative ("scale"/"none" drop terms on
    purpose and are checked against the reference above)."""
    b, h, w = 2, 4, 5
    pred = distinct_values((b, h, w), torch.float64, rng).requires_grad_(True)
    target = target_values((b, h, w), torch.float64, rng)
    inst = random_instances(b, 2, h, w, rng, num_ids=3)
    valid = torch.rand(b, h, w, generator=rng) > 0.1

    def fn(x):
        return westar_ops.sa_hdn_loss(x, target, inst, valid, min_pixels=min_pixels)

    assert torch.autograd.gradcheck(fn, (pred,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_4d_noncontiguous(rng):
    leaf = distinct_values((2, 5, 4), torch.float64, rng).requires_grad_(True)
    target = target_values((2, 1, 4, 5), torch.float64, rng)
    inst = random_instances(2, 1, 4, 5, rng, num_ids=3)

    def fn(x):
        return westar_ops.sa_hdn_loss(x.transpose(1, 2).unsqueeze(1), target, inst, eps=0.01)

    assert torch.autograd.gradcheck(fn, (leaf,), eps=1e-6, atol=1e-6, rtol=1e-5)


# -------------------------------------------------------------------------- modules


@pytest.mark.parametrize("stats_grad", MODES)
def test_module_matches_function(rng, stats_grad):
    pred = distinct_values((2, 6, 7), torch.float32, rng)
    target = target_values((2, 6, 7), torch.float32, rng)
    inst = random_instances(2, 2, 6, 7, rng)
    valid = torch.rand(2, 6, 7, generator=rng) > 0.2
    kw = dict(include_global=False, eps=0.01, min_pixels=3, stats_grad=stats_grad)
    module = westar_ops.SAHDNLoss(**kw)
    assert "min_pixels=3" in repr(module)
    x = pred.clone().requires_grad_(True)
    y = pred.clone().requires_grad_(True)
    a = module(x, target, inst, valid)
    b = westar_ops.sa_hdn_loss(y, target, inst, valid, **kw)
    a.backward()
    b.backward()
    assert torch.equal(a, b) and torch.equal(x.grad, y.grad)


def test_storage_offset_and_broadcast_views(rng):
    """pred: a batch-broadcast (stride 0) view of one image; target: an offset slice;
    valid: expanded."""
    b, h, w = 3, 6, 7
    leaf = distinct_values((1, h, w), torch.float64, rng)
    target = target_values((b + 1, h + 2, w + 3), torch.float64, rng)[1:, 2:, 3:]
    assert target.storage_offset() > 0
    valid = (torch.rand(1, h, w, generator=rng) > 0.2).expand(b, h, w)
    inst = random_instances(b, 2, h, w, rng)
    loss, grad, loss_ref, grad_ref = run_both(
        lambda x: x.expand(b, h, w), target, inst, valid, leaf=leaf
    )
    assert_close(loss, loss_ref, "loss")
    assert_close(grad, grad_ref, "grad")


def test_target_equal_to_pred_gives_zero(rng):
    pred = distinct_values((2, 5, 6), torch.float32, rng)
    inst = random_instances(2, 2, 5, 6, rng)
    x = pred.clone().requires_grad_(True)
    loss = westar_ops.sa_hdn_loss(x, x.detach(), inst)
    loss.backward()
    assert loss.item() == 0.0 and not x.grad.any()


def test_inference_mode(rng):
    pred = distinct_values((2, 5, 6), torch.float32, rng)
    target = target_values((2, 5, 6), torch.float32, rng)
    expected = westar_ops.sa_hdn_loss(pred, target)
    with torch.inference_mode():
        assert torch.equal(westar_ops.sa_hdn_loss(pred, target), expected)
    with torch.no_grad():
        loss = westar_ops.sa_hdn_loss(pred.clone().requires_grad_(True), target)
        assert not loss.requires_grad and torch.equal(loss, expected)
