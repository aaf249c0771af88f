"""Triton: normalized_ordinal_ranking_loss (the ordinal op and, for stats from
sa_hdn_loss(return_stats=True), the SA-HDN forward on the Triton family) against the
reference and the C++ CPU backend."""

import pytest
import torch

from tests.matrix import assert_close, normalized_ordinal_case, normalized_ordinal_loss_and_grad


@pytest.mark.parametrize("source", ["sa_hdn", "torch"])
@pytest.mark.parametrize("kind", ["margin", "logistic"])
@pytest.mark.parametrize("stats_grad", ["full", "scale", "none"])
def test_against_reference_and_cpu(rng, device, stats_grad, kind, source):
    case = normalized_ordinal_case(rng, torch.float64, batch=3, height=5, width=7)
    kw = dict(stats_grad=stats_grad, kind=kind, margin=0.3, equal_weight=0.7)
    loss, grad = normalized_ordinal_loss_and_grad("triton", device, source, *case, **kw)
    loss_ref, grad_ref = normalized_ordinal_loss_and_grad(None, device, source, *case, **kw)
    assert_close(loss, loss_ref, "loss")
    assert_close(grad, grad_ref, "grad")
    loss_cpu, grad_cpu = normalized_ordinal_loss_and_grad("cpu", device, source, *case, **kw)
    torch.testing.assert_close(loss, loss_cpu, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, grad_cpu, rtol=1e-12, atol=1e-14)
    assert loss.item() > 0


def test_float32_strided(rng, device):
    pred, target, valid, pairs, labels = normalized_ordinal_case(rng, torch.float32, 2, 6, 6)
    strided = pred.transpose(1, 2).contiguous().transpose(1, 2)
    case = (strided, target, valid, pairs, labels)
    loss, grad = normalized_ordinal_loss_and_grad("triton", device, "sa_hdn", *case)
    loss_ref, grad_ref = normalized_ordinal_loss_and_grad(None, device, "sa_hdn", *case)
    assert_close(loss, loss_ref, "loss")
    assert_close(grad, grad_ref, "grad")


def test_no_used_pairs(rng, device):
    pred, target, valid, pairs, labels = normalized_ordinal_case(rng, torch.float32)
    labels = torch.full_like(labels, -100)
    loss, grad = normalized_ordinal_loss_and_grad(
        "triton", device, "sa_hdn", pred, target, valid, pairs, labels
    )
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0
