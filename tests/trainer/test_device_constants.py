"""Constants of the augmentations and of the input normalization are made once per
(device, dtype) (issue 20: on a GPU, building them every step was a host sync each time);
the results are the same as before, to the bit."""

from __future__ import annotations

import math

import torch

from westar import augment
from westar.model import DepthModel


def test_augment_constants_are_cached_per_dtype():
    x = torch.rand(2, 3, 8, 8)
    gray = augment._constant("gray", x)
    assert augment._constant("gray", x) is gray
    assert gray.dtype == torch.float32 and gray.shape == (1, 3, 1, 1)
    x64 = x.double()
    assert augment._constant("gray", x64).dtype == torch.float64
    to_yiq, to_rgb = augment._constant("to_yiq", x64), augment._constant("to_rgb", x64)
    torch.testing.assert_close(to_rgb @ to_yiq, torch.eye(3, dtype=torch.float64))


def test_gray_and_hue_unchanged():
    """The formulas before the cache, written out: same bits."""
    x = torch.rand(3, 3, 10, 12, generator=torch.Generator().manual_seed(0))
    w = torch.tensor(augment._GRAY, dtype=x.dtype).view(1, 3, 1, 1)
    assert torch.equal(augment._gray(x), (x * w).sum(1, keepdim=True))

    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    got = augment._hue(x, gen_a, 0.1)
    angle = augment._uniform(gen_b, x.shape[0], -0.1, 0.1) * (2 * math.pi)
    to_yiq = torch.tensor(augment._TO_YIQ, dtype=x.dtype)
    to_rgb = torch.linalg.inv(to_yiq)
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, x)
    c, s = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], c * i - s * q, s * i + c * q], dim=1)
    want = torch.einsum("ij,bjhw->bihw", to_rgb, yiq).clamp(0, 1)
    assert torch.equal(got, want)


def test_normalize_caches_mean_and_std():
    model = DepthModel(torch.nn.Linear(1, 1), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "x")
    x = torch.rand(2, 3, 4, 5)
    mean = torch.tensor(model.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.std).view(1, 3, 1, 1)
    assert torch.equal(model.normalize(x), (x - mean) / std)
    cached = model._norm[(x.device, x.dtype)]
    model.normalize(x)
    assert model._norm[(x.device, x.dtype)] is cached
    assert model.normalize(x.double()).dtype == torch.float64
