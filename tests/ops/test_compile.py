"""torch.compile(fullgraph=True) of the public ops, forward and backward, against eager.

Two compiles in all (they are slow): every op through aot_eager, and sa_hdn_loss
through inductor.
"""

from __future__ import annotations

import pytest
import torch

import westar_ops
from tests.matrix import random_pairs
from tests.ops.helpers import distinct_values, random_instances, target_values


def make_inputs(gen):
    b, h, w = 2, 6, 9
    pred = distinct_values((b, 1, h, w), torch.float32, gen)
    target = target_values((b, 1, h, w), torch.float32, gen)
    inst = random_instances(b, 2, h, w, gen).to(torch.int32)
    valid = torch.rand(b, h, w, generator=gen) > 0.2
    pairs, labels = random_pairs(b, h, w, 10, gen)
    A = torch.randn(3, 8, generator=gen)
    B = torch.randn(5, 3, generator=gen)
    return pred, target, inst, valid, pairs, labels, A, B


def total_loss(pred, target, inst, valid, pairs, labels, A, B):
    hdn = westar_ops.sa_hdn_loss(pred, target, inst, valid, min_pixels=2, stats_grad="full")
    hdn_scale = westar_ops.sa_hdn_loss(pred, target, None, None, stats_grad="scale")
    ordinal = westar_ops.ordinal_ranking_loss(pred, pairs, labels, margin=0.2, kind="margin")
    logistic = westar_ops.ordinal_ranking_loss(pred, pairs, labels, kind="logistic")
    reg = westar_ops.lora_delta_sq_norm(A, B, 0.5)
    return hdn + 0.5 * hdn_scale + ordinal + logistic + 1e-3 * reg


def eager_and_compiled(fn, compiled, inputs, grad_idx):
    results = []
    for f in (fn, compiled):
        args = [t.clone() for t in inputs]
        for i in grad_idx:
            args[i].requires_grad_(True)
        loss = f(*args)
        loss.backward()
        results.append((loss.detach(), [args[i].grad for i in grad_idx]))
    return results


def test_compile_aot_eager_all_ops(rng):
    torch._dynamo.reset()
    inputs = make_inputs(rng)
    compiled = torch.compile(total_loss, backend="aot_eager", fullgraph=True)
    (loss, grads), (closs, cgrads) = eager_and_compiled(total_loss, compiled, inputs, (0, 6, 7))
    torch.testing.assert_close(closs, loss, rtol=1e-6, atol=1e-7)
    for g, cg in zip(grads, cgrads):
        torch.testing.assert_close(cg, g, rtol=1e-6, atol=1e-7)
    # fresh inputs of the same shapes reuse the graph and stay correct
    inputs2 = make_inputs(torch.Generator().manual_seed(1))
    (loss2, grads2), (closs2, cgrads2) = eager_and_compiled(total_loss, compiled, inputs2, (0,))
    torch.testing.assert_close(closs2, loss2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(cgrads2[0], grads2[0], rtol=1e-6, atol=1e-7)


def hdn_in_graph(pred, target, inst, valid):
    # surrounding ops for inductor to fuse around the custom op
    p = pred * 2.0 + 1.0
    return westar_ops.sa_hdn_loss(p, target, inst, valid, include_global=True) * 3.0


@pytest.mark.filterwarnings("ignore")
def test_compile_inductor_sa_hdn(rng):
    torch._dynamo.reset()
    pred, target, inst, valid, *_ = make_inputs(rng)
    compiled = torch.compile(hdn_in_graph, backend="inductor", fullgraph=True)
    (loss, grads), (closs, cgrads) = eager_and_compiled(
        hdn_in_graph, compiled, (pred, target, inst, valid), (0,)
    )
    torch.testing.assert_close(closs, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cgrads[0], grads[0], rtol=1e-5, atol=1e-6)
