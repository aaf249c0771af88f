"""The vectorized PyTorch SA-HDN loss (a benchmark baseline) against the per-context
reference that defines the op, on fresh random inputs."""

import pytest
import torch

from westar_ops import reference, reference_vectorized


def _inputs(rng, batch, height, width, levels, dtype, id_dtype, num_ids):
    pred = torch.randn(batch, height, width, generator=rng).to(dtype)
    target = torch.randn(batch, height, width, generator=rng).exp().to(dtype)
    target[0, 0, : width // 2] = float("nan")
    ids = torch.randint(0, num_ids, (batch, levels, height, width), generator=rng)
    if num_ids > 3:
        ids[ids == 2] = 2**31 - 1  # a sparse, large id
    valid = torch.rand(batch, height, width, generator=rng) > 0.2
    return pred, target, ids.to(id_dtype), valid


@pytest.mark.parametrize("stats_grad", ["full", "scale", "none"])
@pytest.mark.parametrize(
    ("shape", "dtype", "id_dtype", "num_ids", "min_pixels", "include_global"),
    [
        ((2, 7, 9, 2), torch.float64, torch.int64, 5, 1, True),
        ((3, 5, 4, 1), torch.float32, torch.int32, 3, 2, False),
        ((1, 11, 6, 3), torch.float64, torch.uint8, 8, 4, True),
        ((2, 4, 4, 0), torch.float32, torch.int64, 2, 1, True),  # global only
    ],
)
def test_matches_the_loop_reference(
    shape, dtype, id_dtype, num_ids, min_pixels, include_global, stats_grad, rng
):
    b, h, w, levels = shape
    pred, target, ids, valid = _inputs(rng, b, h, w, levels, dtype, id_dtype, num_ids)
    # Ties in pred, so that the median's gradient path meets equal values.
    pred[0, 1, :3] = pred[0, 2, 0]
    instances = ids if levels > 0 else None
    kw = dict(include_global=include_global, min_pixels=min_pixels, stats_grad=stats_grad)
    grads = []
    losses = []
    for fn in (reference.sa_hdn_loss, reference_vectorized.sa_hdn_loss):
        x = pred.clone().requires_grad_(True)
        loss = fn(x, target, instances, valid, **kw)
        loss.backward()
        losses.append(loss.detach())
        grads.append(x.grad)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses[1], losses[0], **tol)
    # With ties the median's own gradient may go to another tied element: compare sums
    # over the tied group and every other pixel exactly.
    tied = pred == pred[0, 2, 0]
    torch.testing.assert_close(grads[1][~tied], grads[0][~tied], **tol)
    torch.testing.assert_close(grads[1][tied].sum(), grads[0][tied].sum(), **tol)


def test_non_contiguous_and_no_context(rng):
    pred, target, ids, valid = _inputs(rng, 2, 6, 8, 2, torch.float64, torch.int64, 4)
    strided = pred.transpose(1, 2).contiguous().transpose(1, 2)
    a = reference.sa_hdn_loss(pred, target, ids, valid)
    b = reference_vectorized.sa_hdn_loss(strided, target, ids.transpose(2, 3).contiguous()
                                         .transpose(2, 3), valid)  # fmt: skip
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    x = pred.clone().requires_grad_(True)
    loss = reference_vectorized.sa_hdn_loss(x, target, ids, torch.zeros_like(valid))
    loss.backward()
    assert loss.item() == 0.0 and not x.grad.any()
    empty = torch.zeros(0, 3, 4, dtype=torch.float64)
    assert reference_vectorized.sa_hdn_loss(empty, empty).item() == 0.0
