"""Write generated scenes as a dataset folder, and read such folders back.

Layout (one stem per sample; the trainer's documented formats, docs/formats.md):

    <root>/images/<stem>.png      RGB, 8 bit
    <root>/instances/<stem>.png   16-bit grayscale, 0 = no instance
    <root>/depth/<stem>.npy       float32 (H, W), meters; 0 or non-finite = invalid

All writing goes through `write_sample`; reading goes through `read_sample`, which uses
the trainer's readers (`westar.data`, the format's one definition), so a folder written
here reads back exactly as the trainer sees it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .scenes import SceneParams, render_scene

__all__ = ["write_sample", "write_split_scene", "read_sample", "write_dataset", "list_stems"]

IMAGES, INSTANCES, DEPTH = "images", "instances", "depth"


def write_sample(
    root: str | os.PathLike,
    stem: str,
    image: np.ndarray,
    depth: np.ndarray | None = None,
    instances: np.ndarray | None = None,
) -> None:
    """Write one sample (image required; depth and instances optional) under `root`."""
    root = Path(root)
    (root / IMAGES).mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB").save(
        root / IMAGES / f"{stem}.png"
    )
    if instances is not None:
        if instances.min() < 0 or instances.max() > 65535:
            raise ValueError("instance ids must fit in 16 bits (0..65535)")
        (root / INSTANCES).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(instances, dtype=np.uint16)).save(
            root / INSTANCES / f"{stem}.png"
        )
    if depth is not None:
        (root / DEPTH).mkdir(parents=True, exist_ok=True)
        np.save(root / DEPTH / f"{stem}.npy", np.ascontiguousarray(depth, dtype=np.float32))


def write_split_scene(root: str | os.PathLike, split: str, scene_seed: int, scene, image) -> None:
    """Scene `scene_seed` of a split as sample <split>_<seed:08d>: `image` (the scene's
    image, corrupted or not), its depth, and its instance map on the train split only (the
    layout the benchmark and the demo write)."""
    instances = scene.instances if split == "train" else None
    write_sample(root, f"{split}_{scene_seed:08d}", image, depth=scene.depth, instances=instances)


def read_sample(root: str | os.PathLike, stem: str):
    """Return (image uint8 (H,W,3), depth float32 or None, instances int32 or None).

    Depth: meters, invalid pixels 0 (as `westar.data.read_depth` gives them).
    """
    from westar.data import find_depth_file, read_depth, read_image, read_instances

    root = Path(root)
    image = read_image(root / IMAGES / f"{stem}.png")
    depth_file = find_depth_file(root / DEPTH, stem)
    depth = read_depth(depth_file) if depth_file is not None else None
    instances = None
    if (root / INSTANCES / f"{stem}.png").exists():
        instances = read_instances(root / INSTANCES / f"{stem}.png")[0]
    return image, depth, instances


def list_stems(root: str | os.PathLike) -> list[str]:
    """Sorted stems of the images in `root`/images (`westar.data.list_images`)."""
    from westar.data import list_images

    return [p.stem for p in list_images(Path(root) / IMAGES)]


def write_dataset(
    root: str | os.PathLike,
    n: int,
    seed: int = 0,
    params: SceneParams | None = None,
    prefix: str = "scene",
    with_depth: bool = True,
    with_instances: bool = True,
    verbose: bool = False,
) -> list[str]:
    """Render `n` scenes with seeds seed, seed+1, ... and write them under `root`.

    Stems are ``f"{prefix}_{seed + i:06d}"``. Returns the list of stems.
    """
    stems = []
    t0 = time.perf_counter()
    for i in range(n):
        s = render_scene(seed + i, params)
        stem = f"{prefix}_{seed + i:06d}"
        write_sample(
            root,
            stem,
            s.image,
            s.depth if with_depth else None,
            s.instances if with_instances else None,
        )
        stems.append(stem)
    if verbose:
        dt = time.perf_counter() - t0
        print(f"wrote {n} scenes to {root} in {dt:.1f} s ({n / max(dt, 1e-9):.0f} img/s)")
    return stems
