"""Instance label maps for a folder of images (the contexts of SA-HDN).

- SAM2 through transformers (`Sam2Model`, the same hub as Depth Anything): ``--model
  facebook/sam2.1-hiera-tiny`` or a local directory. A grid of point prompts, three masks
  per point; writes a two-level hierarchy ``<out>/<stem>.npy`` int32 (2, H, W): level 0
  (coarse) from the largest good mask of each point, level 1 (fine) from all good masks;
  SA-HDN uses both levels as contexts. (`Sam2TransformersSegmenter`)
- SAM2's own package and a local checkpoint (``pip install westar[sam2]``, with
  ``--sam2-checkpoint`` and ``--sam2-config``), one level, as a 16-bit PNG;
- otherwise an offline fallback from scikit-image: Felzenszwalb's graph segmentation
  (default) or SLIC superpixels, as a 16-bit PNG.

0 = no instance, ids 1..K per level. Masks are painted largest first, so smaller
(nested) objects stay visible; pixels no mask covers stay 0.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from westar.data import DataError, list_images, read_image

__all__ = [
    "segment_fallback",
    "SAM2Segmenter",
    "Sam2TransformersSegmenter",
    "paint_masks",
    "make_instance_maps",
    "save_label_map",
]

METHODS = ("auto", "sam2", "felzenszwalb", "slic")


def save_label_map(labels: np.ndarray, path: str | Path) -> None:
    """Write an (H, W) label map as a 16-bit PNG (ids must be < 65536)."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() > 65535):
        raise ValueError(f"{path}: label ids must lie in 0..65535 for a 16-bit PNG")
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    Image.fromarray(labels.astype(np.uint16)).save(tmp)
    tmp.replace(path)


def _compact(labels: np.ndarray) -> np.ndarray:
    """Renumber the non-zero ids to 1..K in order of first appearance."""
    ids, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape)
    if ids[0] == 0:
        return inverse.astype(np.int64)
    return (inverse + 1).astype(np.int64)


def segment_fallback(
    rgb: np.ndarray,
    method: str = "felzenszwalb",
    *,
    scale: float = 200.0,
    sigma: float = 0.8,
    min_size: int | None = None,
    n_segments: int = 64,
    compactness: float = 10.0,
) -> np.ndarray:
    """int64 (H, W) ids 1..K from scikit-image (every pixel gets an id)."""
    from skimage.segmentation import felzenszwalb, slic

    h, w = rgb.shape[:2]
    if method == "felzenszwalb":
        if min_size is None:
            min_size = max(20, (h * w) // 400)
        labels = felzenszwalb(rgb, scale=scale, sigma=sigma, min_size=min_size) + 1
    elif method == "slic":
        labels = slic(rgb, n_segments=n_segments, compactness=compactness, start_label=1)
    else:
        raise ValueError(f"unknown fallback method {method!r} (felzenszwalb or slic)")
    return _compact(labels)


class SAM2Segmenter:
    """SAM2 automatic mask generation from a local checkpoint (no download)."""

    def __init__(self, checkpoint: str | Path, config: str, device: str | None = None, **kwargs):
        import torch
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
        from sam2.build_sam import build_sam2

        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{checkpoint}: SAM2 checkpoint not found")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = build_sam2(config, str(checkpoint), device=device)
        self.generator = SAM2AutomaticMaskGenerator(model, **kwargs)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        masks = self.generator.generate(rgb)
        labels = np.zeros(rgb.shape[:2], dtype=np.int64)
        for k, m in enumerate(sorted(masks, key=lambda m: -m["area"]), start=1):
            labels[np.asarray(m["segmentation"], dtype=bool)] = k
        return _compact(labels)


class Sam2TransformersSegmenter:
    """SAM2 automatic masks from transformers' `Sam2Model` (hub id or local directory).

    The image is resized to the model's square input and normalized (the
    preprocessor_config.json values when the directory has one, else ImageNet's, as
    SAM2's processor does); a points_per_side x points_per_side grid of single-point
    prompts, `points_per_batch` at a time, gives 3 candidate masks per point. A candidate
    is kept when its predicted IoU >= `pred_iou_thresh`, its stability (IoU of the mask
    at logit thresholds +-1) >= `stability_thresh` and its area >= `min_area` pixels.
    Returns int32 (2, H, W): coarse (largest kept mask per point) and fine (all kept).
    """

    def __init__(
        self,
        model: str | Path,
        device: str | None = None,
        *,
        points_per_side: int = 16,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.7,
        stability_thresh: float = 0.85,
        min_area: int = 16,
    ):
        import json

        import torch
        from transformers import Sam2Model

        name = str(model)
        path = Path(name).expanduser()
        local = path.exists()
        if local and not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a Hugging Face model directory (no config.json)")
        if not local and (name.startswith(("/", ".", "~")) or name.count("/") > 1):
            raise FileNotFoundError(f"{name}: SAM2 model directory not found")
        try:
            self.model = Sam2Model.from_pretrained(str(path) if local else name,
                                                   local_files_only=local)  # fmt: skip
        except OSError as err:
            raise FileNotFoundError(f"{name}: cannot load a SAM2 model ({err})") from err
        except ValueError as err:
            raise ValueError(f"{name}: not a SAM2 model ({err})") from err
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        size = self.model.config.vision_config.backbone_config.image_size
        self.input_size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        pre = path / "preprocessor_config.json"
        if local and pre.is_file():
            cfg = json.loads(pre.read_text())
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        if points_per_side < 1 or points_per_batch < 1:
            raise ValueError("points_per_side and points_per_batch must be >= 1")
        self.points_per_side, self.points_per_batch = points_per_side, points_per_batch
        self.pred_iou_thresh, self.stability_thresh = pred_iou_thresh, stability_thresh
        self.min_area = min_area

    def candidates(self, rgb: np.ndarray):
        """(masks bool (N, 3, H, W), predicted IoU (N, 3), stability (N, 3)) for the grid."""
        import torch
        import torch.nn.functional as F

        h, w = rgb.shape[:2]
        sh, sw = self.input_size
        x = torch.from_numpy(np.ascontiguousarray(rgb)).float().div(255).permute(2, 0, 1)[None]
        x = F.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=False)
        x = ((x - self.mean) / self.std).to(self.device)
        n = self.points_per_side
        centres = (torch.arange(n, dtype=torch.float32) + 0.5) / n
        gy, gx = torch.meshgrid(centres * sh, centres * sw, indexing="ij")
        points = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1)  # (x, y) model input
        masks, ious, stable = [], [], []
        with torch.no_grad():
            embeddings = self.model.get_image_embeddings(x)
            for i in range(0, points.shape[0], self.points_per_batch):
                chunk = points[i : i + self.points_per_batch].to(self.device)
                out = self.model(
                    input_points=chunk[None, :, None, :],
                    input_labels=torch.ones(1, chunk.shape[0], 1, dtype=torch.long,
                                            device=self.device),
                    image_embeddings=embeddings,
                    multimask_output=True,
                )  # fmt: skip
                logits = out.pred_masks[0].float()  # (P, 3, h', w')
                p, k = logits.shape[:2]
                logits = F.interpolate(
                    logits.reshape(p * k, 1, *logits.shape[-2:]), size=(h, w), mode="bilinear",
                    align_corners=False,
                ).reshape(p, k, h, w)  # fmt: skip
                hi, lo = (logits > 1.0).sum((2, 3)), (logits > -1.0).sum((2, 3))
                stable.append((hi.float() / lo.clamp(min=1).float()).cpu())
                masks.append((logits > 0).cpu())
                ious.append(out.iou_scores[0].float().cpu())
        return torch.cat(masks).numpy(), torch.cat(ious).numpy(), torch.cat(stable).numpy()

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        masks, ious, stable = self.candidates(rgb)
        area = masks.sum(axis=(2, 3))
        good = (ious >= self.pred_iou_thresh) & (stable >= self.stability_thresh)
        good &= area >= self.min_area
        coarse, fine = [], []
        for i in range(masks.shape[0]):
            kept = np.flatnonzero(good[i])
            if kept.size:
                coarse.append(masks[i, kept[np.argmax(area[i, kept])]])
                fine.extend(masks[i, j] for j in kept)
        return np.stack([paint_masks(coarse, rgb.shape[:2]), paint_masks(fine, rgb.shape[:2])])


def paint_masks(masks: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """int32 (H, W) ids 1..K from boolean masks painted largest first (0 = uncovered)."""
    labels = np.zeros(shape, dtype=np.int64)
    for k, m in enumerate(sorted(masks, key=lambda m: -int(m.sum())), start=1):
        labels[m] = k
    return _compact(labels).astype(np.int32)


def sam2_available() -> bool:
    return importlib.util.find_spec("sam2") is not None


_POSITIVE = {
    "n_segments": "--n-segments",
    "scale": "--scale",
    "min_size": "--min-size",
    "points_per_side": "--points-per-side",
    "points_per_batch": "--points-per-batch",
}
_UNIT_RANGE = {"pred_iou_thresh": "--pred-iou-thresh", "stability_thresh": "--stability-thresh"}


def check_mask_options(sam2_options: dict, fallback: dict) -> None:
    """Segmenter settings in range, before any model loads: one line naming the flag."""
    import math

    values = {**sam2_options, **fallback}
    for key, flag in _POSITIVE.items():
        v = values.get(key)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"{flag} must be positive, got {v}")
    for key, flag in _UNIT_RANGE.items():
        v = values.get(key)
        if v is not None and not 0 <= v <= 1:
            raise ValueError(f"{flag} must be in [0, 1], got {v}")
    sigma = values.get("sigma")
    if sigma is not None and not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"--sigma must be >= 0, got {sigma}")


def make_instance_maps(
    images_dir: str | Path,
    out_dir: str | Path,
    *,
    method: str = "auto",
    model: str | Path | None = None,
    sam2_checkpoint: str | Path | None = None,
    sam2_config: str | None = None,
    overwrite: bool = False,
    skip_bad: bool = False,
    device: str | None = None,
    sam2_options: dict | None = None,
    **fallback_kwargs,
) -> dict[str, object]:
    """Write <out_dir>/<stem>.png (one level) or, for SAM2 through transformers (`model`),
    <stem>.npy (two levels) per image; returns {"method", "written", "skipped"}."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_mask_options(sam2_options or {}, fallback_kwargs)
    if Path(out_dir).resolve() == Path(images_dir).resolve():
        raise ValueError(
            f"{out_dir}: --out is the image folder; label maps there would replace (or sit "
            "beside) the photos: choose another folder, e.g. <data>/instances"
        )
    if method == "auto":
        package = sam2_available() and sam2_checkpoint and sam2_config
        method = "sam2" if model is not None or package else "felzenszwalb"
    suffix = ".png"
    if method == "sam2" and model is not None:
        segment = Sam2TransformersSegmenter(model, device, **(sam2_options or {}))
        suffix = ".npy"
    elif method == "sam2":
        if not sam2_available():
            raise ImportError("method='sam2' needs the sam2 package: pip install 'westar[sam2]'")
        if not sam2_checkpoint or not sam2_config:
            raise ValueError(
                "method='sam2' needs --model (transformers SAM2, e.g. "
                "facebook/sam2.1-hiera-tiny) or --sam2-checkpoint and --sam2-config"
            )
        segment = SAM2Segmenter(sam2_checkpoint, sam2_config)
    else:

        def segment(rgb):
            return segment_fallback(rgb, method, **fallback_kwargs)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, skipped = 0, []
    for path in list_images(images_dir):
        target = out_dir / f"{path.stem}{suffix}"
        other = out_dir / f"{path.stem}{'.png' if suffix == '.npy' else '.npy'}"
        if (target.exists() or other.exists()) and not overwrite:
            continue  # an existing map (either format) is kept
        try:
            rgb = read_image(path)
        except DataError as err:
            if not skip_bad:
                raise
            warnings.warn(f"skipping {path.name}: {err}", stacklevel=2)
            skipped.append(path.name)
            continue
        labels = segment(rgb)
        if suffix == ".npy":
            tmp = target.with_name(f".{target.stem}.tmp.npy")
            np.save(tmp, labels.astype(np.int32))
            tmp.replace(target)
            if other.exists():  # --overwrite: one map per image, or the reader is ambiguous
                other.unlink()
        else:
            if labels.max() > 65535:
                raise ValueError(f"{path}: more than 65535 segments; raise the segment size")
            save_label_map(labels, target)
            if other.exists():
                other.unlink()
        written += 1
    return {"method": method, "written": written, "skipped": skipped}
