"""torch.compile(fullgraph=True) of the public ops with backend="triton", forward and
backward, against eager (the Triton ops are opaque custom ops in the graph)."""

import torch

import westar_ops
from tests.matrix import assert_compiled_matches_eager, random_pairs


def _inputs(rng, device):
    b, h, w = 2, 5, 6
    pred = torch.randn(b, 1, h, w, generator=rng)
    target = torch.rand(b, 1, h, w, generator=rng) + 0.5
    inst = torch.randint(0, 3, (b, 1, h, w), generator=rng, dtype=torch.int32)
    valid = torch.rand(b, h, w, generator=rng) > 0.2
    pairs, labels = random_pairs(b, h, w, 6, rng)
    return [t.to(device) for t in (pred, target, inst, valid, pairs, labels)]


def _loss(pred, target, inst, valid, pairs, labels):
    hdn = westar_ops.sa_hdn_loss(pred, target, inst, valid, stats_grad="full", backend="triton")
    ordinal = westar_ops.ordinal_ranking_loss(
        pred, pairs, labels, margin=0.1, kind="logistic", backend="triton"
    )
    return hdn + 0.5 * ordinal


def test_compile_aot_eager_fullgraph(rng, device):
    torch._dynamo.reset()
    inputs = _inputs(rng, device)
    assert_compiled_matches_eager(_loss, "aot_eager", *inputs, rtol=1e-6, atol=1e-7)
