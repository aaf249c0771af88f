"""Tiny offline fixtures: a random-init Depth Anything V2 and a synthetic dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_tiny_depth_anything(path: Path, seed: int = 0) -> Path:
    """Save a ~1 M parameter random-init DepthAnythingForDepthEstimation to `path`."""
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    torch.manual_seed(seed)
    backbone = Dinov2Config(
        image_size=126,
        patch_size=14,
        hidden_size=96,
        num_hidden_layers=6,
        num_attention_heads=3,
        out_indices=[2, 4, 5, 6],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=96,
        patch_size=14,
        neck_hidden_sizes=[24, 48, 96, 96],
        fusion_hidden_size=32,
        head_hidden_size=16,
    )
    model = DepthAnythingForDepthEstimation(config).eval()
    model.save_pretrained(str(path))
    return path


def make_tiny_dpt(path: Path) -> Path:
    """Save a tiny random-init DPTForDepthEstimation (ViT, patch 16, 64x64) to `path`."""
    from transformers import DPTConfig, DPTForDepthEstimation

    config = DPTConfig(
        image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=4,
        num_attention_heads=2, intermediate_size=64, backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[16, 16, 32, 32], fusion_hidden_size=16,
    )  # fmt: skip
    DPTForDepthEstimation(config).save_pretrained(str(path))
    return path


def synthetic_scene(rng: np.random.Generator, h: int, w: int):
    """(rgb uint8, depth float32 meters, instances uint16) of boxes in front of a wall."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    depth = 4.0 + 4.0 * (1 - yy / h) + 0.5 * xx / w
    base = rng.uniform(60, 200, size=3)
    rgb = np.clip(base[None, None] * (0.6 + 0.4 * yy[..., None] / h), 0, 255)
    instances = np.zeros((h, w), np.uint16)
    instances[:] = 1
    for k in range(2, 5):
        y0, x0 = rng.integers(0, h - h // 3), rng.integers(0, w - w // 3)
        y1, x1 = y0 + rng.integers(h // 6, h // 3), x0 + rng.integers(w // 6, w // 3)
        d = rng.uniform(1.0, 3.5)
        depth[y0:y1, x0:x1] = d + 0.1 * (yy[y0:y1, x0:x1] - y0) / h
        rgb[y0:y1, x0:x1] = rng.uniform(0, 255, size=3) * (1.2 - d / 4)
        instances[y0:y1, x0:x1] = k
    rgb = np.clip(rgb + rng.normal(0, 4, rgb.shape), 0, 255).astype(np.uint8)
    return rgb, depth.astype(np.float32), instances


def make_dataset(root: Path, n: int = 6, size=(56, 56), seed: int = 0, pairs: bool = True) -> Path:
    """<root>/{images,instances,depth}/ and <root>/pairs.json."""
    rng = np.random.default_rng(seed)
    for sub in ("images", "instances", "depth"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rgb, depth, inst = synthetic_scene(rng, *size)
        stem = f"img_{i:03d}"
        Image.fromarray(rgb).save(root / "images" / f"{stem}.png")
        Image.fromarray(inst).save(root / "instances" / f"{stem}.png")
        np.save(root / "depth" / f"{stem}.npy", depth)
    if pairs:
        from westar.pairs import make_pairs_file

        make_pairs_file(root / "images", root / "depth", root / "pairs.json")
    return root


def train_config(model: Path, data: Path, out: Path, **overrides):
    """A TrainConfig for a few fast CPU steps on the tiny model and dataset."""
    from westar.config import TrainConfig

    values = dict(
        model=str(model),
        data=str(data),
        output_dir=str(out),
        image_size=(56, 56),
        steps=4,
        batch_size=4,
        lr=1e-3,
        save_every=2,
        log_every=1,
        progress=False,
        tensorboard=False,
    )
    values.update(overrides)
    return TrainConfig(**values)
