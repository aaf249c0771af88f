"""Instance label maps for a folder of images (the contexts of SA-HDN).

- SAM2's automatic mask generator when the `sam2` package and a local checkpoint are
  available (``pip install westar[sam2]``; pass the checkpoint and its model config);
- otherwise an offline fallback from scikit-image: Felzenszwalb's graph segmentation
  (default) or SLIC superpixels.

Output: one 16-bit PNG per image, ``<out>/<stem>.png``, 0 = no instance, ids 1..K.
SAM2 masks are painted largest first, so smaller (nested) objects stay visible; pixels
no mask covers stay 0.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from westar.data import DataError, list_images, read_image

__all__ = ["segment_fallback", "SAM2Segmenter", "make_instance_maps", "save_label_map"]

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


def sam2_available() -> bool:
    return importlib.util.find_spec("sam2") is not None


def make_instance_maps(
    images_dir: str | Path,
    out_dir: str | Path,
    *,
    method: str = "auto",
    sam2_checkpoint: str | Path | None = None,
    sam2_config: str | None = None,
    overwrite: bool = False,
    skip_bad: bool = False,
    **fallback_kwargs,
) -> dict[str, object]:
    """Write <out_dir>/<stem>.png for each image; returns {"method", "written", "skipped"}."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        method = "sam2" if sam2_available() and sam2_checkpoint and sam2_config else "felzenszwalb"
    if method == "sam2":
        if not sam2_available():
            raise ImportError("method='sam2' needs the sam2 package: pip install 'westar[sam2]'")
        if not sam2_checkpoint or not sam2_config:
            raise ValueError("method='sam2' needs --sam2-checkpoint and --sam2-config")
        segment = SAM2Segmenter(sam2_checkpoint, sam2_config)
    else:

        def segment(rgb):
            return segment_fallback(rgb, method, **fallback_kwargs)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, skipped = 0, []
    for path in list_images(images_dir):
        target = out_dir / f"{path.stem}.png"
        if target.exists() and not overwrite:
            continue
        try:
            rgb = read_image(path)
        except DataError as err:
            if not skip_bad:
                raise
            warnings.warn(f"skipping {path.name}: {err}", stacklevel=2)
            skipped.append(path.name)
            continue
        labels = segment(rgb)
        if labels.max() > 65535:
            raise ValueError(f"{path}: more than 65535 segments; raise the segment size")
        save_label_map(labels, target)
        written += 1
    return {"method": method, "written": written, "skipped": skipped}
