"""Affine-invariant depth evaluation: AbsRel and delta1, per image then averaged.

Protocol (the standard one for relative-depth models): on the valid pixels of an image
(ground-truth depth > min_depth and <= max_depth), fit scale and shift of the predicted
disparity to the ground-truth disparity 1/depth by least squares, clip the aligned
disparity to [1/max_depth, 1/min_depth], invert to depth d, and with g the ground truth

    AbsRel = mean |d - g| / g        delta1 = mean(max(d/g, g/d) < 1.25).

The prediction is resized (bilinear) to the ground truth's resolution first. For a model
whose output is depth (output_space="depth"), the fit is done on depth directly.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from westar.data import (
    DataError,
    check_depth_options,
    find_depth_file,
    list_images,
    read_depth,
    read_image,
)
from westar.model import DepthModel, check_adapter, load_adapter, load_depth_model, predict

__all__ = [
    "align_scale_shift",
    "image_metrics",
    "inference_size",
    "colorize",
    "load_samples",
    "predict_samples",
    "score_predictions",
    "aligned_panels",
    "comparison_grid",
    "error_panel",
    "evaluate",
]

# A perceptual dark-to-bright colour ramp (near = bright for disparity).
_RAMP = np.array(
    [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
     [250, 193, 39], [252, 255, 164]],
    dtype=np.float64,
)  # fmt: skip


def align_scale_shift(pred: np.ndarray, target: np.ndarray, mask: np.ndarray):
    """(s, t) minimizing sum over mask of (s * pred + t - target)^2 (float64)."""
    p = pred[mask].astype(np.float64)
    g = target[mask].astype(np.float64)
    a = np.stack([p, np.ones_like(p)], axis=1)
    (s, t), *_ = np.linalg.lstsq(a, g, rcond=None)
    return float(s), float(t)


def image_metrics(
    pred: np.ndarray,
    gt_depth: np.ndarray,
    max_depth: float,
    min_depth: float = 1e-3,
    output_space: str = "disparity",
) -> dict[str, float] | None:
    """AbsRel / delta1 of one image, or None when it has fewer than 2 valid pixels."""
    if pred.shape != gt_depth.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt_depth.shape} differ")
    mask = np.isfinite(gt_depth) & (gt_depth > min_depth) & (gt_depth <= max_depth)
    mask &= np.isfinite(pred)
    if mask.sum() < 2:
        return None
    g = gt_depth[mask].astype(np.float64)
    if output_space == "disparity":
        s, t = align_scale_shift(pred, 1.0 / np.where(mask, gt_depth, 1.0), mask)
        disp = np.clip(s * pred[mask].astype(np.float64) + t, 1.0 / max_depth, 1.0 / min_depth)
        d = 1.0 / disp
    else:
        s, t = align_scale_shift(pred, gt_depth, mask)
        d = np.clip(s * pred[mask].astype(np.float64) + t, min_depth, max_depth)
    ratio = np.maximum(d / g, g / d)
    return {
        "abs_rel": float(np.mean(np.abs(d - g) / g)),
        "delta1": float(np.mean(ratio < 1.25)),
        "scale": s,
        "shift": t,
        "pixels": int(mask.sum()),
    }


# Largest inference side (--image-size / --size) and the bound on the longer side: at
# most MAX_ASPECT times the shorter one's `size`, so a 1 x 5000 strip is not blown up to
# 126 x 630000 (its shorter side then ends below `size`).
MAX_INFERENCE_SIZE = 2048
MAX_ASPECT = 4


def check_inference_size(size: int | None, flag: str = "--image-size") -> None:
    """A clear error for an inference side outside 1..MAX_INFERENCE_SIZE."""
    if size is not None and not 1 <= size <= MAX_INFERENCE_SIZE:
        raise ValueError(f"{flag} must be in 1..{MAX_INFERENCE_SIZE} pixels, got {size}")


def inference_size(h: int, w: int, size: int, multiple: int = 14) -> tuple[int, int]:
    """Shorter side -> `size`, keeping the aspect ratio, both sides multiples of 14; the
    longer side at most MAX_ASPECT * size (then the shorter side is smaller than `size`)."""
    scale = min(size / min(h, w), MAX_ASPECT * size / max(h, w))
    return (
        max(multiple, int(round(h * scale / multiple)) * multiple),
        max(multiple, int(round(w * scale / multiple)) * multiple),
    )


def colorize(
    values: np.ndarray, lo: float, hi: float, mask: np.ndarray | None = None
) -> np.ndarray:
    """uint8 RGB of values in [lo, hi] on a dark-to-bright ramp; masked-out pixels grey."""
    x = np.clip((values - lo) / max(hi - lo, 1e-12), 0, 1) * (len(_RAMP) - 1)
    i = np.minimum(np.floor(x).astype(int), len(_RAMP) - 2)
    f = (x - i)[..., None]
    rgb = _RAMP[i] * (1 - f) + _RAMP[i + 1] * f
    if mask is not None:
        rgb[~mask] = 128
    return rgb.astype(np.uint8)


@torch.no_grad()
def _predict_image(model, depth_model, rgb: np.ndarray, size: int, device) -> np.ndarray:
    h, w = rgb.shape[:2]
    ih, iw = inference_size(h, w, size, depth_model.patch_size)
    x = torch.as_tensor(np.array(rgb, np.float32)).div(255).permute(2, 0, 1)[None].to(device)
    x = F.interpolate(x, size=(ih, iw), mode="bicubic", align_corners=False).clamp(0, 1)
    out = predict(model, depth_model, x).float()
    out = F.interpolate(out[:, None], size=(h, w), mode="bilinear", align_corners=False)
    return out[0, 0].cpu().numpy()


def _summary(per_image: dict[str, dict | None]) -> dict[str, Any]:
    scored = {k: v for k, v in per_image.items() if v is not None}
    return {
        "abs_rel": float(np.mean([v["abs_rel"] for v in scored.values()])) if scored else None,
        "delta1": float(np.mean([v["delta1"] for v in scored.values()])) if scored else None,
        "images": len(scored),
        "images_without_valid_depth": sorted(k for k, v in per_image.items() if v is None),
        "per_image": scored,
    }


def load_samples(
    images_dir: str | Path,
    depth_dir: str | Path,
    *,
    depth_scale: float = 1000.0,
    skip_bad: bool = False,
    limit: int | None = None,
    without_depth: list[str] | None = None,
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """[(stem, rgb uint8 (H, W, 3), depth float32 (H, W) meters)] of a folder pair, sorted
    by name. An image without a depth file is skipped (as `westar pairs` does), its file
    name appended to `without_depth` when given, or a DataError when `without_depth` is
    None; a broken depth file or a mismatched size raises a DataError (or is skipped with
    a warning when `skip_bad`)."""
    samples = []
    for path in list_images(images_dir)[:limit]:
        try:
            gt_file = find_depth_file(depth_dir, path.stem)
            if gt_file is None and without_depth is not None:
                without_depth.append(path.name)
                continue
            if gt_file is None:
                raise DataError(
                    Path(depth_dir) / f"{path.stem}.npy", "ground-truth depth not found"
                )
            rgb = read_image(path)
            gt = read_depth(gt_file, depth_scale)
            if gt.shape != rgb.shape[:2]:
                raise DataError(
                    gt_file, f"depth is {gt.shape[1]}x{gt.shape[0]} but {path.name} is "
                    f"{rgb.shape[1]}x{rgb.shape[0]}"
                )  # fmt: skip
        except DataError as err:
            if not skip_bad:
                raise
            warnings.warn(f"skipping {path.name}: {err}", stacklevel=2)
            continue
        samples.append((path.stem, rgb, gt))
    return samples


def predict_samples(
    model: str | Path | DepthModel,
    samples: list[tuple[str, np.ndarray, np.ndarray]],
    *,
    base: str | None = "base",
    adapters: dict[str, str | Path] | None = None,
    size: int | None = None,
    device: str | torch.device | None = None,
    local_files_only: bool = False,
) -> dict[str, dict[str, np.ndarray]]:
    """{name: {stem: prediction (H, W)}} of the base model (under the name `base`, or not
    at all when None) and of each adapter {name: peft adapter folder}, one image at a time
    at inference size `size` (None: the model's native size), resized back to the image.
    `model`: a hub id or folder, or a loaded `DepthModel` (left without adapters)."""
    adapters = dict(adapters or {})
    if base is None and not adapters:
        raise ValueError("nothing to evaluate: include the base model or give an adapter")
    if base is not None and base in adapters:
        raise ValueError(f"{base!r} names the base model; give the adapter another name")
    for adapter in adapters.values():  # before any work: a typo should not cost a pass
        check_adapter(adapter)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(model, DepthModel):
        depth_model = model
    else:
        depth_model = load_depth_model(str(model), local_files_only=local_files_only)
    size = size or depth_model.input_size
    net = depth_model.model.to(device).eval()
    preds: dict[str, dict[str, np.ndarray]] = {}
    if base is not None:
        preds[base] = {
            stem: _predict_image(net, depth_model, rgb, size, device) for stem, rgb, _ in samples
        }
    if adapters:
        peft_model = None
        for i, (name, adapter) in enumerate(adapters.items()):
            peft_model = load_adapter(net, adapter, peft_model, adapter_name=f"a{i}")
            peft_model.set_adapter(f"a{i}")
            peft_model.to(device).eval()
            preds[name] = {
                stem: _predict_image(peft_model, depth_model, rgb, size, device)
                for stem, rgb, _ in samples
            }
        peft_model.unload()  # the base model back without adapter layers
    return preds


def score_predictions(
    preds: dict[str, dict[str, np.ndarray]],
    samples: list[tuple[str, np.ndarray, np.ndarray]],
    max_depth: float,
    min_depth: float = 1e-3,
    output_space: str = "disparity",
) -> dict[str, dict[str, Any]]:
    """{name: summary} (mean AbsRel / delta1 over the images and the per-image metrics,
    with each image's alignment) of predictions from `predict_samples`."""
    return {
        name: _summary(
            {
                stem: image_metrics(by_stem[stem], gt, max_depth, min_depth, output_space)
                for stem, _, gt in samples
            }
        )
        for name, by_stem in preds.items()
    }


def evaluate(
    model: str,
    images_dir: str | Path,
    depth_dir: str | Path,
    *,
    adapters: list[str] | None = None,
    include_base: bool = True,
    max_depth: float = 80.0,
    min_depth: float = 1e-3,
    depth_scale: float = 1000.0,
    size: int | None = None,
    output_space: str = "disparity",
    output: str | Path | None = None,
    pictures_dir: str | Path | None = None,
    device: str | None = None,
    skip_bad: bool = False,
    limit: int | None = None,
) -> dict[str, Any]:
    """Metrics of the base model and/or adapters on a folder of images with GT depth.

    Returns (and writes to `output` as JSON) {"results": {name: summary}, ...}; names are
    "base", then "adapted" for one adapter or "adapted:<path>" for several. `size`: the
    inference shorter side (rounded to the patch size); None = the model's native size.
    """
    adapters = list(adapters or [])
    if not include_base and not adapters:
        raise ValueError("nothing to evaluate: include the base model or give an adapter")
    if size is not None and size < 1:
        raise ValueError(f"--size must be a positive number of pixels, got {size}")
    check_inference_size(size, "--size")
    check_depth_options(max_depth=max_depth, min_depth=min_depth, depth_scale=depth_scale)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be a positive number of images, got {limit}")
    _check_writable(output, pictures_dir)  # before the evaluation, not after it
    _check_not_an_input(output, pictures_dir, [images_dir, depth_dir, *adapters])
    for adapter in adapters:  # before any work: a typo should not cost a base-model pass
        check_adapter(adapter)
    depth_model = load_depth_model(model)
    size = size or depth_model.input_size
    without_depth: list[str] = []
    samples = load_samples(
        images_dir,
        depth_dir,
        depth_scale=depth_scale,
        skip_bad=skip_bad,
        limit=limit,
        without_depth=without_depth,
    )
    if not samples:
        if without_depth:
            names = ", ".join(without_depth[:3]) + (" ..." if len(without_depth) > 3 else "")
            raise DataError(depth_dir, f"no depth map for {names}: nothing left to evaluate")
        raise DataError(images_dir, "every image was skipped: nothing left to evaluate")
    named = dict(
        zip(["adapted"] if len(adapters) == 1 else [f"adapted:{a}" for a in adapters], adapters)
    )
    preds = predict_samples(
        depth_model,
        samples,
        base="base" if include_base else None,
        adapters=named,
        size=size,
        device=device,
    )
    names = list(preds)
    results = score_predictions(preds, samples, max_depth, min_depth, output_space)
    report = {
        "model": model,
        "adapters": adapters,
        "max_depth": max_depth,
        "min_depth": min_depth,
        "size": size,
        "protocol": "least-squares scale+shift in disparity space, per image, then averaged",
        "without_depth": without_depth,
        "results": results,
    }
    if output is not None:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2))
    if pictures_dir is not None:
        _write_pictures(Path(pictures_dir), samples, preds, names, results, max_depth, min_depth)
    return report


def _is_eval_report(path: Path) -> bool:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and "results" in doc and "protocol" in doc


def _check_not_an_input(output, pictures_dir, inputs: list) -> None:
    """--out never replaces a file that is not an earlier eval report (e.g. pairs.json);
    --pictures (<stem>.png per image) is never an input folder (images, depth, adapter)."""
    if output is not None and Path(output).is_file() and not _is_eval_report(Path(output)):
        raise FileExistsError(
            17, "--out exists and is not a westar eval report; choose another file", str(output)
        )
    if pictures_dir is not None:
        target = Path(pictures_dir).resolve()
        for folder in inputs:
            if Path(folder).resolve() == target:
                raise ValueError(
                    f"{pictures_dir}: --pictures is an input folder ({folder}); its files "
                    "would be replaced: choose another folder"
                )


def _check_writable(output: str | Path | None, pictures_dir: str | Path | None) -> None:
    """Refuse an --out that is a folder and unwritable targets before any work."""
    targets = []
    if output is not None:
        output = Path(output)
        if output.is_dir():
            raise IsADirectoryError(21, "--out is a folder; give a file name", str(output))
        targets.append(output)
    if pictures_dir is not None:
        pictures_dir = Path(pictures_dir)
        if pictures_dir.exists() and not pictures_dir.is_dir():
            raise NotADirectoryError(20, "--pictures exists and is not a folder", str(pictures_dir))
        targets.append(pictures_dir / "x")
    for target in targets:
        if target.exists() and not os.access(target, os.W_OK):
            raise PermissionError(13, "Permission denied", str(target))
        folder = target.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent  # the nearest existing folder must let us create the rest
        if not folder.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(folder))
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", str(folder))


def aligned_panels(
    rgb: np.ndarray,
    gt: np.ndarray,
    models: list[tuple[np.ndarray, dict | None]],
    max_depth: float,
    min_depth: float = 1e-3,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]] | None:
    """(input, ground-truth disparity, [each model's aligned disparity]) as RGB panels on
    one colour scale (the ground truth's 2-98 percentiles), or None when the image has
    fewer than 2 valid pixels. `models`: (prediction, its `image_metrics`) pairs; a model
    without metrics gets a blank panel."""
    mask = np.isfinite(gt) & (gt > min_depth) & (gt <= max_depth)
    if mask.sum() < 2:
        return None
    gt_disp = np.where(mask, 1.0 / np.where(mask, gt, 1.0), 0.0)
    lo, hi = np.percentile(gt_disp[mask], [2, 98])
    panels = []
    for pred, m in models:
        aligned = m["scale"] * pred + m["shift"] if m else np.zeros_like(gt_disp)
        panels.append(colorize(aligned, lo, hi))
    return rgb, colorize(gt_disp, lo, hi, mask), panels


def error_panel(
    gt: np.ndarray,
    pred: np.ndarray,
    m: dict | None,
    max_depth: float,
    min_depth: float = 1e-3,
    worst: float = 0.5,
) -> np.ndarray:
    """Per-pixel absolute relative depth error |d_aligned - d_gt| / d_gt of a prediction
    (aligned with its `image_metrics` scale and shift, in disparity) as an RGB panel:
    black = 0, bright = `worst` or more; pixels without valid depth grey."""
    mask = np.isfinite(gt) & (gt > min_depth) & (gt <= max_depth)
    if m is None:
        return colorize(np.zeros_like(gt), 0.0, 1.0, mask)
    disp = np.maximum(m["scale"] * pred + m["shift"], 1.0 / max_depth)
    err = np.where(mask, np.abs(1.0 / disp - gt) / np.where(mask, gt, 1.0), 0.0)
    return colorize(err, 0.0, worst, mask)


def comparison_grid(
    path: str | Path,
    samples: list[tuple[str, np.ndarray, np.ndarray]],
    preds: dict[str, dict[str, np.ndarray]],
    results: dict[str, dict[str, Any]],
    columns: dict[str, str],
    max_depth: float,
    min_depth: float = 1e-3,
    rows: int = 4,
    error_maps: bool = False,
) -> Path:
    """One PNG: a title row, then one row per image (the first `rows` with valid depth):
    input | ground truth | each model of `columns` ({title: name in preds}), aligned, with
    its AbsRel on that image; with `error_maps`, then each model's per-pixel relative
    error (`error_panel`: black = right, bright = 50 % off or more)."""
    from PIL import ImageDraw

    lines, labels = [], []
    for stem, rgb, gt in samples:
        models = [(preds[n][stem], results[n]["per_image"].get(stem)) for n in columns.values()]
        panels = aligned_panels(rgb, gt, models, max_depth, min_depth)
        if panels is not None:
            extra = (
                [error_panel(gt, p, m, max_depth, min_depth) for p, m in models]
                if error_maps
                else []
            )
            lines.append(np.concatenate([panels[0], panels[1], *panels[2], *extra], axis=1))
            labels.append([m["abs_rel"] if m else None for _, m in models])
        if len(lines) == rows:
            break
    if not lines:
        raise ValueError("no image with valid ground truth to show")
    w = samples[0][1].shape[1]
    titles = ["input", "ground truth", *columns]
    if error_maps:
        titles += [f"{t} error" for t in columns]
    canvas = titled(np.concatenate(lines, axis=0), titles, w)
    draw = ImageDraw.Draw(canvas)
    y = TITLE_HEIGHT
    for line, values in zip(lines, labels):
        for j, v in enumerate(values):  # each model's AbsRel on this image, in its panel
            if v is not None:
                xy = ((2 + j) * w + 3, y + line.shape[0] - 13)
                draw.rectangle([xy[0] - 2, xy[1] - 1, xy[0] + 56, xy[1] + 11], fill=(0, 0, 0))
                draw.text(xy, f"AbsRel {v:.2f}", fill=(255, 255, 255))
        y += line.shape[0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


TITLE_HEIGHT = 14  # pixels of the title row above the panels


def titled(strip: np.ndarray, titles: list[str], panel_width: int) -> Image.Image:
    """The panels `strip` (H, len(titles) * panel_width, 3) uint8 under a white title row
    naming each panel (black text, cut to fit the panel)."""
    from PIL import ImageDraw

    h, w = strip.shape[:2]
    canvas = Image.new("RGB", (w, TITLE_HEIGHT + h), "white")
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(titles):
        draw.text((j * panel_width + 3, 1), title[: max(4, panel_width // 6)], fill=(0, 0, 0))
    canvas.paste(Image.fromarray(strip), (0, TITLE_HEIGHT))
    return canvas


def _write_pictures(folder, samples, preds, names, results, max_depth, min_depth) -> None:
    """<stem>.png: a title row over image | each model's aligned disparity | ground-truth
    disparity."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem, rgb, gt in samples:
        scored = [n for n in names if results[n]["per_image"].get(stem) is not None]
        models = [(preds[n][stem], results[n]["per_image"][stem]) for n in scored]
        panels = aligned_panels(rgb, gt, models, max_depth, min_depth)
        if panels is None:
            continue
        _, gt_panel, model_panels = panels
        strip = np.concatenate([rgb, *model_panels, gt_panel], axis=1)
        titled(strip, ["input", *scored, "ground truth"], rgb.shape[1]).save(folder / f"{stem}.png")
