"""Photometric augmentations in torch, seeded, geometry-preserving.

The teacher sees a weak view and the student a strong view of the same pixels, so the
teacher's pseudo-label needs no warping. All random draws come from an explicit
`torch.Generator` on the CPU (`step_generator` derives one per training step), so a run
is reproducible and resumable without saving augmentation state.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["step_generator", "weak_augment", "strong_augment"]

_GRAY = (0.299, 0.587, 0.114)
_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _constant(name: str, x: torch.Tensor) -> torch.Tensor:
    """A constant of this module in x's dtype on x's device, made once per (name, device,
    dtype). Made on the CPU and copied: on a GPU, a tensor built from Python numbers is a
    blocking host-to-device copy, and `torch.linalg.inv` checks its result on the host;
    both would make every step wait for the device."""
    key = (name, x.device, x.dtype)
    value = _CONSTANTS.get(key)
    if value is None:
        if name == "gray":
            value = torch.tensor(_GRAY, dtype=x.dtype).view(1, 3, 1, 1)
        elif name == "to_yiq":
            value = torch.tensor(_TO_YIQ, dtype=x.dtype)
        elif name == "to_rgb":
            value = torch.linalg.inv(torch.tensor(_TO_YIQ, dtype=x.dtype))
        else:
            raise KeyError(name)
        value = _CONSTANTS[key] = value.to(x.device)
    return value


def step_generator(seed: int, step: int, rank: int = 0, stream: int = 0) -> torch.Generator:
    """A CPU generator determined by (seed, step, rank, stream) alone."""
    state = np.random.SeedSequence([seed, step, rank, stream]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return torch.rand(n, generator=gen, dtype=torch.float64).mul(hi - lo).add(lo).float()


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (x * _constant("gray", x)).sum(1, keepdim=True)


def _to(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A CPU draw moved to x's device: through pinned memory and non_blocking on a GPU (a
    pageable copy would make the host wait for the device's queue)."""
    if x.device.type == "cuda":
        v = v.pin_memory().to(x.device, non_blocking=True)
    return v.to(device=x.device, dtype=x.dtype)


def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _to(v, x).view(-1, 1, 1, 1)


def _brightness_contrast(x, gen, strength):
    b = x.shape[0]
    bright = _uniform(gen, b, 1 - strength, 1 + strength)
    contrast = _uniform(gen, b, 1 - strength, 1 + strength)
    x = x * _col(bright, x)
    mean = _gray(x).mean(dim=(2, 3), keepdim=True)
    return (mean + (x - mean) * _col(contrast, x)).clamp(0, 1)


def _saturation(x, gen, strength):
    sat = _uniform(gen, x.shape[0], 1 - strength, 1 + strength)
    g = _gray(x)
    return (g + (x - g) * _col(sat, x)).clamp(0, 1)


def _hue(x, gen, max_shift):
    """Rotate chroma in YIQ space by an angle up to max_shift * 2 pi."""
    angle = _uniform(gen, x.shape[0], -max_shift, max_shift) * (2 * math.pi)
    to_yiq, to_rgb = _constant("to_yiq", x), _constant("to_rgb", x)
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, x)
    c, s = _col(torch.cos(angle), x)[:, 0], _col(torch.sin(angle), x)[:, 0]
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], c * i - s * q, s * i + c * q], dim=1)
    return torch.einsum("ij,bjhw->bihw", to_rgb, yiq).clamp(0, 1)


def _gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=img.dtype, device=img.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = img.shape[0]
    x = img[None]
    pad_h, pad_w = min(radius, img.shape[-2] - 1), min(radius, img.shape[-1] - 1)
    kh = k[radius - pad_h : radius + pad_h + 1]
    kw = k[radius - pad_w : radius + pad_w + 1]
    kh, kw = kh / kh.sum(), kw / kw.sum()
    x = F.pad(x, (pad_w, pad_w, 0, 0), mode="reflect")
    x = F.conv2d(x, kw.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, pad_h, pad_h), mode="reflect")
    x = F.conv2d(x, kh.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x[0]


def weak_augment(x: torch.Tensor, gen: torch.Generator, jitter: float = 0.0) -> torch.Tensor:
    """The teacher's view: the image itself, or a mild brightness/contrast jitter."""
    if jitter <= 0:
        return x
    return _brightness_contrast(x, gen, jitter)


def strong_augment(
    x: torch.Tensor,
    gen: torch.Generator,
    *,
    jitter: float = 0.4,
    hue: float = 0.1,
    blur_prob: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    noise_prob: float = 0.5,
    noise_std: float = 0.05,
    gray_prob: float = 0.2,
) -> torch.Tensor:
    """The student's view: color jitter, grayscale, Gaussian blur, Gaussian noise.

    x: (B, 3, H, W) in [0, 1]. Every random number is drawn from `gen` in a fixed order
    (whether or not an effect is applied), so the stream never depends on the data.
    """
    b = x.shape[0]
    if jitter > 0:
        x = _brightness_contrast(x, gen, jitter)
        x = _saturation(x, gen, jitter)
    if hue > 0:
        x = _hue(x, gen, hue)
    gray = torch.rand(b, generator=gen) < gray_prob
    if bool(gray.any()):
        g = _gray(x).expand_as(x)
        x = torch.where(_col(gray, x).bool(), g, x)
    blur = torch.rand(b, generator=gen) < blur_prob
    sigmas = _uniform(gen, b, *blur_sigma)
    if bool(blur.any()):
        x = torch.stack(
            [_gaussian_blur(x[i], float(sigmas[i])) if blur[i] else x[i] for i in range(b)]
        )
    noisy = torch.rand(b, generator=gen) < noise_prob
    stds = _uniform(gen, b, 0.0, noise_std)
    noise = _to(torch.randn(x.shape, generator=gen, dtype=torch.float32), x)
    x = x + noise * _col(stds * noisy.float(), x)
    return x.clamp(0, 1).contiguous()
