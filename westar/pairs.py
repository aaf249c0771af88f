"""Ordinal annotations from ground-truth depth (a stand-in for human annotation).

The paper's weak labels: per image, a few structured samples, each an anchor with a
farther and a closer point, giving the transitivity-consistent pairs

    (farther, anchor), (closer, anchor), (farther, closer)

labelled "farther" / "closer" / "equal" from the true depths, "equal" when the two
depths are within a ratio (max(d1/d2, d2/d1) < equal_ratio, 1.03 by default).
Coordinates are pixel (x, y) of the depth map (= the image).
"""

from __future__ import annotations

import math
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from westar.data import (
    DataError,
    check_depth_options,
    find_depth_file,
    image_size,
    list_images,
    read_depth,
    save_pairs,
)

__all__ = ["relation", "sample_pairs", "make_pairs_file"]


def relation(d_a: float, d_b: float, equal_ratio: float = 1.03) -> str:
    """ "farther" / "closer" / "equal": how far point a is compared with point b."""
    if max(d_a / d_b, d_b / d_a) < equal_ratio:
        return "equal"
    return "farther" if d_a > d_b else "closer"


def sample_pairs(
    depth: np.ndarray,
    rng: np.random.Generator,
    samples: int = 5,
    equal_ratio: float = 1.03,
    max_depth: float | None = None,
) -> list[dict[str, Any]]:
    """Structured ordinal pairs for one depth map (0 / non-finite = invalid)."""
    valid = np.isfinite(depth) & (depth > 0)
    if max_depth is not None:
        valid &= depth <= max_depth
    ys, xs = np.nonzero(valid)
    if ys.size < 2:
        return []
    values = depth[ys, xs]
    out = []
    for _ in range(samples):
        i = int(rng.integers(ys.size))
        anchor = float(values[i])
        far = np.flatnonzero(values > anchor)
        near = np.flatnonzero(values < anchor)
        points = {"anchor": i}
        if far.size:
            points["farther"] = int(far[rng.integers(far.size)])
        if near.size:
            points["closer"] = int(near[rng.integers(near.size)])
        if len(points) == 1:  # flat depth: compare with any other pixel ("equal")
            j = int(rng.integers(ys.size - 1))
            points["farther"] = j if j < i else j + 1
        chain = [("farther", "anchor"), ("closer", "anchor"), ("farther", "closer")]
        for a, b in chain:
            if a in points and b in points:
                ia, ib = points[a], points[b]
                out.append(
                    {
                        "a": [int(xs[ia]), int(ys[ia])],
                        "b": [int(xs[ib]), int(ys[ib])],
                        "relation": relation(float(values[ia]), float(values[ib]), equal_ratio),
                    }
                )
    return out


def check_pairs_options(*, samples: int, equal_ratio: float, seed: int) -> None:
    """--samples >= 1, --equal-ratio >= 1 (finite), --seed >= 0: one line naming the flag."""
    if samples < 1:
        raise ValueError(f"--samples must be a positive number of anchors per image, got {samples}")
    if not (math.isfinite(equal_ratio) and equal_ratio >= 1):
        raise ValueError(f"--equal-ratio must be a ratio >= 1, got {equal_ratio}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")


def _check_output(output: Path, overwrite: bool) -> None:
    if output.is_dir():
        raise IsADirectoryError(21, "--out is a folder; give a file name", str(output))
    if output.is_symlink():
        raise FileExistsError(17, "--out is a symbolic link; give a real file", str(output))
    if output.exists() and not overwrite:
        raise FileExistsError(
            17, "exists (it may hold annotations); pass --overwrite to replace it", str(output)
        )


def make_pairs_file(
    images_dir: str | Path,
    depth_dir: str | Path,
    output: str | Path,
    *,
    samples: int = 5,
    equal_ratio: float = 1.03,
    depth_scale: float = 1000.0,
    max_depth: float | None = None,
    seed: int = 0,
    skip_bad: bool = False,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write a pairs JSON for every image of `images_dir` with a depth map in `depth_dir`.

    Images without a depth map get no pairs and are counted, not an error (a DataError if
    none has one); an image whose depth has fewer than 2 valid pixels gets no pairs, with a
    warning. Each image's pairs depend only on (seed, stem), not on the other files present.
    Returns {"images", "pairs", "skipped_without_depth", "without_depth", "without_pairs"}.
    An existing `output` (e.g. answers of `westar annotate`) is replaced only with
    `overwrite`; an input file never.
    """
    check_pairs_options(samples=samples, equal_ratio=equal_ratio, seed=seed)
    check_depth_options(max_depth=max_depth, depth_scale=depth_scale)
    _check_output(Path(output), overwrite)
    images = {}
    total = 0
    without_depth: list[str] = []
    without_pairs: list[str] = []
    if not Path(depth_dir).is_dir():
        raise DataError(depth_dir, "depth folder not found")
    for path in list_images(images_dir):
        depth_file = find_depth_file(depth_dir, path.stem)
        if depth_file is None:  # an unannotated image: no pairs for it, not an error
            without_depth.append(path.name)
            continue
        try:
            h, w = image_size(path)
            depth = read_depth(depth_file, depth_scale)
            if depth.shape != (h, w):
                raise DataError(
                    depth_file,
                    f"depth is {depth.shape[1]}x{depth.shape[0]} but {path.name} is {w}x{h}",
                )
        except DataError as err:
            if not skip_bad:
                raise
            warnings.warn(f"skipping {path.name}: {err}", stacklevel=2)
            continue
        rng = np.random.default_rng([seed, zlib.crc32(path.stem.encode())])
        pairs = sample_pairs(depth, rng, samples, equal_ratio, max_depth)
        if not pairs and samples > 0:
            cap = f" at most --max-depth {max_depth}" if max_depth is not None else ""
            warnings.warn(
                f"{depth_file}: fewer than 2 valid depth pixels (> 0, finite{cap}): "
                f"no pairs for {path.name}",
                stacklevel=2,
            )
            without_pairs.append(path.stem)
        images[path.stem] = {"width": w, "height": h, "pairs": pairs}
        total += len(pairs)
    if not images:
        raise DataError(
            depth_dir,
            f"no depth map (.npy, .png, .exr) for any of the {len(without_depth)} images",
        )
    save_pairs(
        output,
        images,
        source="westar pairs (from ground-truth depth)",
        samples_per_image=samples,
        equal_ratio=equal_ratio,
        seed=seed,
    )
    return {
        "images": len(images),
        "pairs": total,
        "skipped_without_depth": len(without_depth),
        "without_depth": without_depth,
        "without_pairs": without_pairs,
    }
