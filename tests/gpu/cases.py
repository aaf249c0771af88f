"""Scenarios and output checks shared by the GPU tests (tests/gpu/test_*.py).

Inputs are built on the CPU from a seeded generator (the same data on every device);
``check_forward`` compares the raw outputs of a GPU op (loss, seg, stats, median_index)
with those of another backend. Not a test module (no GPU needed to import it).
"""

import torch

from westar_ops import reference

TOL = {  # (rtol, atol) for losses and gradients
    torch.float32: (2e-5, 1e-6),
    torch.float64: (1e-10, 1e-12),
    torch.float16: (5e-3, 1e-4),
    torch.bfloat16: (2e-2, 1e-3),
}
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SCENARIOS = ("global", "levels", "invalid_nan", "uint8_ties", "per_pixel", "uneven")


def to(x, device):
    return None if x is None else x.to(device)


def case(name, rng, dtype=torch.float32, batch=2, height=64, width=80):
    """pred, target, instances, valid of a named scenario (CPU tensors)."""
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


def check_forward(out_g, out_c, pred, dtype):
    loss_g, seg_g, stats_g, mi_g = (x.cpu() for x in out_g)
    loss_c, seg_c, stats_c, mi_c = out_c
    rtol, atol = TOL[dtype]
    assert seg_g.dtype == torch.int32 and seg_g.is_contiguous()
    assert torch.equal(seg_g, seg_c)
    assert stats_g.dtype == stats_c.dtype and stats_g.shape == stats_c.shape
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
    # Both backends pick the first pixel (ascending index) whose pred equals t_p.
    assert torch.equal(mi_g, mi_c)
    flat = pred.cpu().reshape(-1).to(stats_c.dtype)
    assert torch.equal(flat[mi_g], stats_c[:, 0])
    torch.testing.assert_close(loss_g, loss_c, rtol=max(rtol, 1e-4), atol=atol)
