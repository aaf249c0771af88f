#!/usr/bin/env python
"""Pretrain the small source depth model shipped in westar/assets/source_model.

A Depth Anything V2 architecture (transformers' DepthAnythingForDepthEstimation with a
small Dinov2 backbone), random init, trained on clean procedural scenes
(westar.synth.scenes) with a scale-and-shift-invariant loss on disparity (MiDaS style:
median / mean-absolute-deviation normalization per image, L1, plus a multi-scale gradient
matching term). Nothing is downloaded.

    python scripts/pretrain_source.py                      # train (resumes), save, evaluate
    python scripts/pretrain_source.py --eval-only          # evaluate the shipped model

Progress is printed every --log-every steps; a checkpoint is written to --work-dir every
--ckpt-every steps and training resumes from it when the script is started again. The
learning rate follows a cosine schedule over --steps (so the result does not depend on
the machine's speed); --max-minutes is only a safety stop that saves what it has.

Evaluation: held-out clean scenes (seeds from 10_000_000), and the same scenes corrupted by
westar.corrupt at each --eval-severity, AbsRel and delta1 after least-squares scale and shift in
disparity space (the standard affine-invariant protocol).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from westar.synth.scenes import SceneParams, render_scene  # noqa: E402

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
EVAL_SEED0 = 10_000_000


def build_model(size: int, width: int = 128, patch: int = 7):
    """Depth Anything V2 architecture, random init; ``patch`` px per token side.

    The patch size is set in both the backbone config and the model config: the DPT head
    resizes its output to ``tokens * config.patch_size``, so the two must agree.
    """
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    heads = width // 32
    backbone = Dinov2Config(
        image_size=size,
        patch_size=patch,
        hidden_size=width,
        num_hidden_layers=6,
        num_attention_heads=heads,
        intermediate_size=4 * width,
        out_indices=[2, 4, 5, 6],
        reshape_hidden_states=False,
    )
    cfg = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=width,
        patch_size=patch,
        neck_hidden_sizes=[width // 4, width // 2, width, width],
        fusion_hidden_size=width * 3 // 8,
        head_hidden_size=width // 8 + 8,
        depth_estimation_type="relative",
    )
    return DepthAnythingForDepthEstimation(cfg)


def to_input(images_u8: torch.Tensor) -> torch.Tensor:
    """(B,H,W,3) uint8 -> normalized (B,3,H,W) float32."""
    x = images_u8.permute(0, 3, 1, 2).float() / 255.0
    return (x - IMAGENET_MEAN) / IMAGENET_STD


# ------------------------------------------------------------------------------ losses


def _normalize(d: torch.Tensor, valid: torch.Tensor):
    """Per-image median / mean-absolute-deviation normalization over valid pixels."""
    B = d.shape[0]
    flat = d.reshape(B, -1)
    vm = valid.reshape(B, -1)
    big = torch.where(vm, flat, torch.full_like(flat, float("nan")))
    med = torch.nanmedian(big, dim=1).values
    dev = (flat - med[:, None]).abs() * vm
    mad = dev.sum(1) / vm.sum(1).clamp_min(1)
    return ((flat - med[:, None]) / (mad[:, None] + 1e-6)).reshape(d.shape)


def ssi_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, grad_w: float):
    p = _normalize(pred, valid)
    q = _normalize(target, valid)
    vf = valid.float()
    loss = ((p - q).abs() * vf).sum() / vf.sum().clamp_min(1)
    if grad_w > 0:
        r = (p - q) * vf
        m = vf
        g = 0.0
        for _ in range(4):
            gx = (r[:, :, 1:] - r[:, :, :-1]).abs() * (m[:, :, 1:] * m[:, :, :-1])
            gy = (r[:, 1:, :] - r[:, :-1, :]).abs() * (m[:, 1:, :] * m[:, :-1, :])
            g = g + (gx.sum() + gy.sum()) / m.sum().clamp_min(1)
            r = r[:, ::2, ::2]
            m = m[:, ::2, ::2]
        loss = loss + grad_w * g
    return loss


def range_loss(pred: torch.Tensor, weight: float) -> torch.Tensor:
    """Keep the raw output positive (hinge at 0.05) with a per-image median near 1.

    The affine-invariant loss leaves scale and shift free; this pins them loosely so that
    the shipped model's final ReLU never clips, and outputs have a familiar range.
    """
    if weight <= 0:
        return pred.new_zeros(())
    med = pred.flatten(1).median(dim=1).values
    return weight * (F.relu(0.05 - pred).mean() + 0.1 * ((med - 1.0) ** 2).mean())


# ------------------------------------------------------------------------------ eval


def align_metrics(pred_disp: np.ndarray, gt_depth: np.ndarray, max_depth: float = 100.0):
    """AbsRel, delta1 of one image after LS scale+shift in disparity space."""
    valid = np.isfinite(gt_depth) & (gt_depth > 0) & (gt_depth <= max_depth)
    g = 1.0 / gt_depth[valid].astype(np.float64)
    p = pred_disp[valid].astype(np.float64)
    A = np.stack([p, np.ones_like(p)], 1)
    (s, t), *_ = np.linalg.lstsq(A, g, rcond=None)
    d = np.clip(s * p + t, 1.0 / max_depth, None)
    dep = 1.0 / d
    gd = gt_depth[valid].astype(np.float64)
    absrel = float(np.mean(np.abs(dep - gd) / gd))
    delta1 = float(np.mean(np.maximum(dep / gd, gd / dep) < 1.25))
    return absrel, delta1


@torch.no_grad()
def predict(model, images_u8: np.ndarray, batch: int = 16) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(images_u8), batch):
        x = to_input(torch.from_numpy(np.ascontiguousarray(images_u8[i : i + batch])))
        out.append(model(pixel_values=x).predicted_depth.float().numpy())
    return np.concatenate(out)


def evaluate(model, images, depths):
    pred = predict(model, images)
    m = np.array([align_metrics(p, g) for p, g in zip(pred, depths)])
    return float(m[:, 0].mean()), float(m[:, 1].mean())


def _eval_set(n: int, size: int):
    """Held-out clean scenes (seeds from EVAL_SEED0): (images (n,H,W,3) uint8, depths)."""
    prm = SceneParams(height=size, width=size)
    scenes = [render_scene(EVAL_SEED0 + i, prm) for i in range(n)]
    return np.stack([s.image for s in scenes]), np.stack([s.depth for s in scenes])


def eval_table(model, n: int, size: int, severities=(3, 4), seed: int = 0):
    images, depths = _eval_set(n, size)
    rows = [("clean", 0, *evaluate(model, images, depths))]
    try:
        from westar.corrupt import CORRUPTIONS, corrupt_image
    except ImportError:
        print("westar.corrupt not available: clean evaluation only")
        return rows
    for severity in severities:
        for name in CORRUPTIONS:
            cor = np.stack(
                [
                    corrupt_image(im, name, severity, seed=seed + i, depth=dp)
                    for i, (im, dp) in enumerate(zip(images, depths))
                ]
            )
            rows.append((name, severity, *evaluate(model, cor, depths)))
    return rows


def print_table(rows):
    print(f"{'split':<16}{'sev':>4}{'AbsRel':>9}{'delta1':>9}")
    for name, sev, a, d in rows:
        print(f"{name:<16}{sev:>4}{a:>9.4f}{d:>9.4f}")


# ------------------------------------------------------------------------------ training


class ScenePool:
    """In-memory pool of clean scenes, refreshed with new seeds as training goes."""

    def __init__(self, n, size, seed0, rng):
        self.prm = SceneParams(height=size, width=size)
        self.next_seed = seed0
        self.rng = rng
        t0 = time.perf_counter()
        self.images = np.zeros((n, size, size, 3), np.uint8)
        self.depths = np.zeros((n, size, size), np.float32)
        for i in range(n):
            self._fill(i)
        print(f"pool: {n} scenes in {time.perf_counter() - t0:.1f} s", flush=True)

    def _fill(self, i):
        s = render_scene(self.next_seed, self.prm)
        self.next_seed += 1
        self.images[i] = s.image
        self.depths[i] = s.depth

    def refresh(self, k):
        for i in self.rng.integers(0, len(self.images), size=k):
            self._fill(int(i))

    def batch(self, b):
        idx = self.rng.integers(0, len(self.images), size=b)
        img = torch.from_numpy(self.images[idx])
        dep = torch.from_numpy(self.depths[idx])
        flip = torch.from_numpy(self.rng.uniform(size=b) < 0.5)
        img = torch.where(flip[:, None, None, None], img.flip(2), img)
        dep = torch.where(flip[:, None, None], dep.flip(2), dep)
        return img, dep


def photometric_jitter(x: torch.Tensor, rng) -> torch.Tensor:
    """Mild brightness / contrast / saturation jitter on (B,3,H,W) in [0,1]."""
    B = x.shape[0]
    br = torch.from_numpy(rng.uniform(0.9, 1.1, size=(B, 1, 1, 1))).float()
    ct = torch.from_numpy(rng.uniform(0.9, 1.1, size=(B, 1, 1, 1))).float()
    sat = torch.from_numpy(rng.uniform(0.85, 1.15, size=(B, 1, 1, 1))).float()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * ct + mean
    gray = x.mean(dim=1, keepdim=True)
    x = (x - gray) * sat + gray
    return (x * br).clamp(0, 1)


def train(args):
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt_path = work / "ckpt.pt"
    model = build_model(args.size, args.width, args.patch)
    # Train on the raw output: the relative head's final ReLU would let pixels (or whole
    # images) die at zero with no gradient; range_loss keeps the output positive so the
    # ReLU, restored for saving, changes nothing.
    model.head.activation2 = torch.nn.Identity()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters, width {args.width}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    step, elapsed = 0, 0.0
    if ckpt_path.exists() and not args.restart:
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, elapsed = ck["step"], ck["elapsed"]
        rng = np.random.default_rng([args.seed, step])
        print(f"resumed from {ckpt_path} at step {step} ({elapsed / 60:.1f} min)", flush=True)
    pool = ScenePool(args.pool, args.size, seed0=1000 + step * args.refresh, rng=rng)
    budget = args.max_minutes * 60.0
    t_start = time.perf_counter() - elapsed
    model.train()
    ema = None
    while True:
        elapsed = time.perf_counter() - t_start
        frac = step / args.steps
        if frac >= 1.0:
            break
        if elapsed >= budget:
            print(f"--max-minutes {args.max_minutes} reached at step {step}: stopping early")
            break
        warm = min(1.0, (step + 1) / args.warmup)
        lr = args.lr * warm * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        img, dep = pool.batch(args.batch)
        x = photometric_jitter(img.permute(0, 3, 1, 2).float() / 255.0, rng)
        x = (x - IMAGENET_MEAN) / IMAGENET_STD
        valid = torch.isfinite(dep) & (dep > 0)
        disp = torch.where(valid, 1.0 / dep.clamp_min(1e-3), torch.zeros_like(dep))
        pred = model(pixel_values=x).predicted_depth  # raw head output (no final ReLU)
        if pred.shape[-2:] != disp.shape[-2:]:
            pred = F.interpolate(pred[:, None], disp.shape[-2:], mode="bilinear")[:, 0]
        loss = ssi_loss(pred, disp, valid, args.grad_weight) + range_loss(pred, args.range_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if args.refresh:
            pool.refresh(args.refresh)
        if step % args.log_every == 0:
            print(
                f"step {step:5d}  loss {ema:.4f}  lr {lr:.2e}  "
                f"{(time.perf_counter() - t_start) / 60:.1f} min  frac {frac:.2f}",
                flush=True,
            )
        if args.eval_every and step % args.eval_every == 0:
            t_ev = time.perf_counter()
            model.head.activation2 = torch.nn.ReLU()
            absrel, delta1 = evaluate(model, *_eval_set(args.eval_n_train, args.size))
            model.head.activation2 = torch.nn.Identity()
            model.train()
            t_start += time.perf_counter() - t_ev  # evaluation time is not training time
            print(f"eval step {step}: AbsRel {absrel:.4f}  delta1 {delta1:.4f}", flush=True)
        if step % args.ckpt_every == 0:
            el = time.perf_counter() - t_start
            torch.save(
                dict(model=model.state_dict(), opt=opt.state_dict(), step=step, elapsed=el),
                ckpt_path,
            )
    elapsed = time.perf_counter() - t_start
    print(f"trained {step} steps in {elapsed / 60:.1f} min", flush=True)
    model.head.activation2 = torch.nn.ReLU()
    torch.save(
        dict(model=model.state_dict(), opt=opt.state_dict(), step=step, elapsed=elapsed),
        ckpt_path,
    )
    return model, step, elapsed


def write_preprocessor_config(out: Path, size: int, patch: int) -> None:
    """preprocessor_config.json as Depth Anything V2 checkpoints have (DPT processor)."""
    cfg = dict(
        image_processor_type="DPTImageProcessor",
        do_resize=True,
        size=dict(height=size, width=size),
        keep_aspect_ratio=True,
        ensure_multiple_of=patch,
        resample=3,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_pad=False,
    )
    (out / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def save(model, out: Path, info: dict):
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    write_preprocessor_config(out, info["size"], info["patch"])
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved to {out}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "westar" / "assets" / "source_model"))
    ap.add_argument("--work-dir", default=str(ROOT / "runs" / "pretrain_source"))
    ap.add_argument("--size", type=int, default=126)
    ap.add_argument("--width", type=int, default=128, help="ViT hidden size (96 = tiny)")
    ap.add_argument("--patch", type=int, default=7, help="ViT patch size in pixels")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--max-minutes", type=float, default=90.0, help="safety stop")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--grad-weight", type=float, default=0.5)
    ap.add_argument("--range-weight", type=float, default=1.0)
    ap.add_argument("--pool", type=int, default=2000, help="scenes kept in memory")
    ap.add_argument("--refresh", type=int, default=2, help="new scenes per step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--eval-n", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=1000, help="0: no evaluation while training")
    ap.add_argument("--eval-n-train", type=int, default=48, help="scenes per evaluation while training")
    ap.add_argument("--eval-severity", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.eval_only:
        from transformers import DepthAnythingForDepthEstimation

        model = DepthAnythingForDepthEstimation.from_pretrained(out, local_files_only=True)
        model.float()
        if not (out / "preprocessor_config.json").exists():
            write_preprocessor_config(out, args.size, model.config.patch_size)
    else:
        t0 = time.perf_counter()
        model, steps, elapsed = train(args)
        info = dict(
            steps=steps,
            batch=args.batch,
            size=args.size,
            width=args.width,
            patch=args.patch,
            train_minutes=round(elapsed / 60, 2),
            wall_minutes=round((time.perf_counter() - t0) / 60, 2),
            cpu_count=os.cpu_count(),
            torch_threads=torch.get_num_threads(),
            lr=args.lr,
            loss=f"ssi-disparity (median/MAD, L1) + {args.grad_weight} * multiscale gradient"
            f" + {args.range_weight} * range (positive output, median ~1)",
            data=f"westar.synth.scenes, clean, seeds from 1000, pool {args.pool}, "
            f"{args.refresh} new scenes per step",
        )
        save(model, out, info)
    rows = eval_table(model, args.eval_n, args.size, args.eval_severity)
    print_table(rows)
    res = out / "metrics.json"
    if out.exists():
        res.write_text(
            json.dumps(
                [dict(split=n, severity=s, absrel=a, delta1=d) for n, s, a, d in rows], indent=2
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
