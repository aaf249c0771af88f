"""No host sync and data-independent shapes on the GPU backends (issue 19): forward and
backward of every op captured in a CUDA graph, replayed on new inputs, equal to eager;
``torch.compile(mode="reduce-overhead", fullgraph=True)`` runs with CUDA graphs on; the
eager calls pass under ``torch.cuda.set_sync_debug_mode("error")``.

Only collected with a CUDA device (tests/gpu/conftest.py).
"""

import contextlib

import pytest
import torch

import westar_ops
from westar_ops import ops

DEV = "cuda"
B, H, W, L, P = 2, 37, 45, 2, 64

BACKENDS = [b for b in ("cuda", "triton") if b in ops.available_backends(DEV)]


def _inputs(gen, id_dtype=torch.int64):
    pred = torch.randn(B, H, W, generator=gen)
    target = torch.randn(B, H, W, generator=gen).exp()
    target[0, :3, :5] = float("nan")  # unusable pixels
    instances = torch.randint(0, 7, (B, L, H, W), generator=gen)
    instances[1, 0] = torch.randint(0, 2, (H, W), generator=gen) * 2_000_000_000  # sparse ids
    instances[:, 1, :20] = 5  # one large context per image (the tiled path)
    valid = torch.rand(B, H, W, generator=gen) > 0.1
    ys = torch.randint(0, H, (B, P, 2), generator=gen)
    xs = torch.randint(0, W, (B, P, 2), generator=gen)
    pairs = torch.stack([ys, xs], -1)
    labels = torch.tensor([1, -1, 0, -100])[torch.randint(0, 4, (B, P), generator=gen)]
    out = dict(pred=pred, target=target, instances=instances.to(id_dtype), valid=valid,
               pairs=pairs, labels=labels)  # fmt: skip
    return {k: v.to(DEV) for k, v in out.items()}


def _losses(backend):
    """name -> loss(x, inputs) for every op on ``backend``."""
    kw = dict(backend=backend)

    def sa_hdn(x, d):
        return westar_ops.sa_hdn_loss(x, d["target"], d["instances"], d["valid"], **kw)

    def ordinal(x, d):
        return westar_ops.ordinal_ranking_loss(x, d["pairs"], d["labels"], margin=0.1, **kw)

    def normalized_with_stats(x, d):
        st, stats = westar_ops.sa_hdn_loss(
            x, d["target"], d["instances"], d["valid"], return_stats=True, **kw
        )
        weak = westar_ops.normalized_ordinal_ranking_loss(
            x, d["pairs"], d["labels"], stats=stats, **kw
        )
        return st + 0.5 * weak

    def normalized_no_stats(x, d):
        return westar_ops.normalized_ordinal_ranking_loss(
            x, d["pairs"], d["labels"], valid=d["valid"], kind="logistic", **kw
        )

    return {
        "sa_hdn": sa_hdn,
        "ordinal": ordinal,
        "normalized_with_stats": normalized_with_stats,
        "normalized_no_stats": normalized_no_stats,
    }


def _step(loss_fn, x, d):
    loss = loss_fn(x, d)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


@contextlib.contextmanager
def _no_sync():
    """Any synchronizing CUDA call that torch can see raises inside the block."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "name", ["sa_hdn", "ordinal", "normalized_with_stats", "normalized_no_stats"]
)
def test_eager_call_does_not_sync(backend, name, rng):
    loss_fn = _losses(backend)[name]
    d = _inputs(rng)
    x = d["pred"].clone().requires_grad_(True)
    _step(loss_fn, x, d)  # warm-up: Triton compiles, allocator pools
    torch.cuda.synchronize()
    with _no_sync():
        loss, grad = _step(loss_fn, x, d)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "name", ["sa_hdn", "ordinal", "normalized_with_stats", "normalized_no_stats"]
)
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.uint8])
def test_cuda_graph_replay_matches_eager(backend, name, id_dtype, rng):
    loss_fn = _losses(backend)[name]
    static = _inputs(rng, id_dtype)
    x = static["pred"].clone().requires_grad_(True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph asks
        for _ in range(2):
            _step(loss_fn, x, static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss_g, grad_g = _step(loss_fn, x, static)
    for _ in range(3):  # new inputs each replay
        fresh = _inputs(rng, id_dtype)
        with torch.no_grad():
            x.copy_(fresh["pred"])
            for k, v in fresh.items():
                if k != "pred":
                    static[k].copy_(v)
        graph.replay()
        loss_e, grad_e = _step(loss_fn, fresh["pred"].clone().requires_grad_(True), fresh)
        torch.testing.assert_close(loss_g, loss_e, rtol=1e-5, atol=1e-6)
        # Float atomics (ordinal scatter) may add in another order than eager.
        torch.testing.assert_close(grad_g, grad_e, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_reduce_overhead_uses_cuda_graphs(backend, rng):
    from torch._dynamo.utils import counters

    losses = _losses(backend)

    def total(x, d):
        return losses["normalized_with_stats"](x, d) + losses["ordinal"](x, d)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(_step_total(total), mode="reduce-overhead", fullgraph=True)
    for _ in range(4):  # record, then replays
        d = _inputs(rng)
        loss_c, grad_c = compiled(d["pred"].clone(), d)
        loss_e, grad_e = _step(total, d["pred"].clone().requires_grad_(True), d)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_c, grad_e, rtol=1e-4, atol=1e-7)
    skips = dict(counters["inductor"]).get("cudagraph_skips", 0)
    assert skips == 0, f"CUDA graphs skipped: {dict(counters['inductor'])}"


def _step_total(total):
    def step(pred, d):
        x = pred.requires_grad_(True)
        with torch.enable_grad():
            loss = total(x, d)
            (grad,) = torch.autograd.grad(loss, x)
        return loss.detach(), grad

    return step


@pytest.mark.parametrize("backend", BACKENDS)
def test_capacity_shapes_do_not_depend_on_data(backend, rng):
    """stats has the capacity's rows for any data: the default bound, or max_contexts."""
    d = _inputs(rng, torch.uint8)
    args = (d["pred"], d["target"], d["instances"], d["valid"])
    _, stats = westar_ops.sa_hdn_loss(*args, backend=backend, return_stats=True)
    assert stats.stats.shape == (B + L * B * 255, 8)  # uint8 ids: 255 per level and image
    _, stats = westar_ops.sa_hdn_loss(*args, backend=backend, return_stats=True, max_contexts=90)
    assert stats.stats.shape == (90, 8) and stats.median_index.shape == (90,)
    d["instances"].zero_()
    _, stats2 = westar_ops.sa_hdn_loss(*args, backend=backend, return_stats=True, max_contexts=90)
    assert stats2.stats.shape == (90, 8)
    assert not stats2.stats[B:].any() and bool((stats2.median_index[B:] == -1).all())
