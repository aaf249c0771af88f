"""Image corruptions in the spirit of the corrupted depth benchmarks (NYU-C, KITTI-C).

Each corruption takes an RGB uint8 image (H, W, 3), a severity 1..5 and a seed, and
returns a new uint8 image of the same shape; the same arguments give the same result.
Fog uses a metric depth map when one is given (transmission exp(-beta d), beta scaled to
the image's median depth so that severities mean the same for rooms and streets), and
otherwise a plausible stand-in (farther towards the top of the image, with low-frequency
variation).

    corrupt_image(image, "fog", 3, seed=0, depth=depth)
    corrupt_folder("data/target", "data/target_fog3", "fog", 3, seed=0)

`westar corrupt --images SRC --out DST --corruption fog --severity 3` is the command-line front end
(`add_corrupt_arguments` / `run_corrupt`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

__all__ = [
    "CORRUPTIONS",
    "corrupt_image",
    "corrupt_folder",
    "add_corrupt_arguments",
    "run_corrupt",
    "contrast",
    "fog",
    "gaussian_noise",
    "jpeg",
    "low_light",
    "motion_blur",
    "rain",
]


def _check(severity: int) -> int:
    s = int(severity)
    if not 1 <= s <= 5:
        raise ValueError(f"severity must be 1..5, got {severity}")
    return s


def _to_float(img: np.ndarray) -> np.ndarray:
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {img.dtype} {img.shape}")
    return img.astype(np.float32) / 255.0


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _smooth_noise(shape, rng, scale: float) -> np.ndarray:
    """Low-frequency noise in [0, 1] of `shape` (H, W): upsampled coarse random grid."""
    H, W = shape
    gh = max(2, int(round(H / scale)))
    gw = max(2, int(round(W / scale)))
    coarse = rng.uniform(0, 1, size=(gh, gw)).astype(np.float32)
    up = ndimage.zoom(coarse, (H / gh, W / gw), order=3, mode="nearest")[:H, :W]
    up = np.pad(up, ((0, H - up.shape[0]), (0, W - up.shape[1])), mode="edge")
    lo, hi = up.min(), up.max()
    return (up - lo) / max(hi - lo, 1e-6)


# ------------------------------------------------------------------------- corruptions


def fog(img, severity, rng, depth=None):
    """Depth-dependent haze: I t + A (1 - t), t = exp(-beta d)."""
    s = _check(severity)
    x = _to_float(img)
    H, W = x.shape[:2]
    k = [0.25, 0.45, 0.75, 1.1, 1.6][s - 1]  # optical thickness at the median depth
    if depth is not None and np.isfinite(depth).any():
        d = np.asarray(depth, np.float32)
        valid = np.isfinite(d) & (d > 0)
        med = float(np.median(d[valid])) if valid.any() else 1.0
        far = float(d[valid].max()) if valid.any() else 1.0
        d = np.where(valid, d, far)  # invalid (sky, holes) behaves as the farthest point
        dn = d / max(med, 1e-6)
    else:
        # stand-in depth: the top of the frame is far, plus low-frequency variation
        rows = np.linspace(1.8, 0.4, H, dtype=np.float32)[:, None]
        dn = rows + 0.5 * _smooth_noise((H, W), rng, scale=max(H, W) / 4)
    t = np.exp(-k * dn)[..., None]
    airlight = np.float32(rng.uniform(0.75, 0.9)) * np.array(
        [1.0, 1.0, 1.0 + rng.uniform(0.0, 0.05)], np.float32
    )
    return _to_uint8(x * t + airlight * (1 - t))


def gaussian_noise(img, severity, rng, depth=None):
    s = _check(severity)
    x = _to_float(img)
    sigma = [0.04, 0.07, 0.10, 0.14, 0.20][s - 1]
    return _to_uint8(x + rng.normal(0, sigma, size=x.shape).astype(np.float32))


def _line_kernel(length: int, angle: float) -> np.ndarray:
    """A normalized line kernel of `length` pixels at `angle` radians, antialiased."""
    r = (length - 1) / 2
    size = 2 * int(np.ceil(r)) + 1
    k = np.zeros((size, size), np.float32)
    c = size // 2
    ts = np.linspace(-r, r, 4 * length)
    xs = c + ts * np.cos(angle)
    ys = c + ts * np.sin(angle)
    x0 = np.floor(xs).astype(int)
    y0 = np.floor(ys).astype(int)
    fx = xs - x0
    fy = ys - y0
    for dx, dy, w in (
        (0, 0, (1 - fx) * (1 - fy)),
        (1, 0, fx * (1 - fy)),
        (0, 1, (1 - fx) * fy),
        (1, 1, fx * fy),
    ):
        xx = np.clip(x0 + dx, 0, size - 1)
        yy = np.clip(y0 + dy, 0, size - 1)
        np.add.at(k, (yy, xx), w)
    return k / k.sum()


def motion_blur(img, severity, rng, depth=None):
    """Linear camera-motion blur; length relative to the image size, random direction."""
    s = _check(severity)
    x = _to_float(img)
    frac = [0.03, 0.05, 0.075, 0.10, 0.13][s - 1]
    length = max(3, int(round(frac * max(x.shape[:2]))))
    angle = rng.uniform(-np.pi / 4, np.pi / 4)  # mostly horizontal, as from panning
    k = _line_kernel(length, angle)
    out = np.stack([ndimage.convolve(x[..., c], k, mode="reflect") for c in range(3)], -1)
    return _to_uint8(out)


def low_light(img, severity, rng, depth=None):
    """Under-exposure: darker, gamma-compressed, with shot and read noise."""
    s = _check(severity)
    x = _to_float(img)
    gain = [0.6, 0.45, 0.33, 0.24, 0.16][s - 1]
    gamma = [1.1, 1.2, 1.3, 1.4, 1.5][s - 1]
    lin = (x**gamma) * gain
    photons = [400.0, 250.0, 150.0, 90.0, 60.0][s - 1]  # photons at full scale
    shot = rng.poisson(np.clip(lin, 0, None) * photons).astype(np.float32) / photons
    read = rng.normal(0, 0.01, size=x.shape).astype(np.float32)
    return _to_uint8(shot + read)


def contrast(img, severity, rng, depth=None):
    s = _check(severity)
    x = _to_float(img)
    c = [0.6, 0.45, 0.33, 0.22, 0.13][s - 1]
    m = x.mean(axis=(0, 1), keepdims=True)
    return _to_uint8((x - m) * c + m)


def jpeg(img, severity, rng, depth=None):
    s = _check(severity)
    _to_float(img)  # validates
    quality = [30, 18, 12, 8, 5][s - 1]
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB")).copy()


def rain(img, severity, rng, depth=None):
    """Slanted, motion-blurred rain streaks over a slightly darkened, hazier image."""
    s = _check(severity)
    x = _to_float(img)
    H, W = x.shape[:2]
    density = [0.004, 0.007, 0.011, 0.016, 0.022][s - 1]  # streaks per pixel
    n = int(density * H * W)
    length = max(4, int(round([0.07, 0.09, 0.11, 0.13, 0.16][s - 1] * H)))
    angle = np.pi / 2 + rng.uniform(-0.35, 0.35)  # from vertical
    bright = [0.5, 0.6, 0.7, 0.8, 0.9][s - 1]
    layer = np.zeros((H, W), np.float32)
    ys = rng.uniform(-length, H, size=n)
    xs = rng.uniform(-length, W + length, size=n)
    amp = rng.uniform(0.4, 1.0, size=n).astype(np.float32)
    # draw each streak as a 1-pixel seed then smear along the direction with a line kernel
    yi = np.clip(ys.astype(int), 0, H - 1)
    xi = np.clip(xs.astype(int), 0, W - 1)
    keep = (ys >= 0) & (xs >= 0) & (xs < W)
    np.add.at(layer, (yi[keep], xi[keep]), amp[keep])
    layer = ndimage.convolve(layer, _line_kernel(length, angle) * length, mode="constant")
    layer = ndimage.gaussian_filter(layer, 0.5)
    layer = np.clip(layer, 0, 1)[..., None]
    dim = [0.92, 0.88, 0.84, 0.8, 0.75][s - 1]
    haze = [0.04, 0.06, 0.08, 0.1, 0.12][s - 1]
    base = x * dim * (1 - haze) + haze * 0.7
    return _to_uint8(base + bright * layer * (1 - base))


CORRUPTIONS = {
    "fog": fog,
    "gaussian_noise": gaussian_noise,
    "motion_blur": motion_blur,
    "low_light": low_light,
    "contrast": contrast,
    "jpeg": jpeg,
    "rain": rain,
}


def _rng(seed: int, key: str = "") -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(key.encode())])


def corrupt_image(
    image: np.ndarray,
    corruption: str,
    severity: int,
    seed: int = 0,
    depth: np.ndarray | None = None,
) -> np.ndarray:
    """Apply one named corruption at severity 1..5; deterministic in (image, seed)."""
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; one of {sorted(CORRUPTIONS)}")
    if depth is not None and depth.shape != image.shape[:2]:
        raise ValueError(f"depth {depth.shape} does not match image {image.shape[:2]}")
    return CORRUPTIONS[corruption](image, severity, _rng(seed, corruption), depth)


# ------------------------------------------------------------------------- folders


def corrupt_folder(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    corruption: str,
    severity: int,
    seed: int = 0,
    depth_dir: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    skip_bad: bool = False,
) -> dict:
    """Write a corrupted copy of an image folder or of a dataset folder.

    - Dataset folder (``src/images`` exists): ``dst/images/<stem>.png`` are the corrupted
      images; every other sub-folder of src (depth/, instances/, ...) is copied unchanged,
      so dst is a complete dataset. Depth for fog is read from ``depth_dir`` or else from
      ``src/depth/<stem>.{npy,png,exr}`` when present.
    - Plain image folder: ``dst/<stem>.png`` for each image of src; depth from
      ``depth_dir/<stem>.*`` when given.

    `corruption` is a name from CORRUPTIONS or "mixed" (one corruption per image, drawn
    from the seed and the stem). Output images are PNG (the JPEG corruption's artifacts
    are baked in losslessly). The per-image randomness depends on (seed, stem), not on
    the order of files. Returns a summary dict, also written as dst/corruption.json.

    Files are read with westar.data's readers (the dataset format's one definition). The
    output is written to a temporary folder beside `dst` and renamed into place: an
    existing non-empty `dst` is only replaced with `overwrite`, a bad image leaves no
    partial output (or is skipped with a warning with `skip_bad`), and links inside an
    old `dst` are never written through.
    """
    from westar.data import DataError, find_depth_file, list_images, read_depth, read_image
    from westar.outputs import check_output_folder, replace_dir

    src, dst = Path(src), Path(dst)
    severity = _check(severity)
    if corruption != "mixed" and corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; one of {sorted(CORRUPTIONS)}")
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: source folder not found")
    protected = {"source folder": src}
    if depth_dir is not None:
        protected["depth folder"] = Path(depth_dir)
    check_output_folder(dst, overwrite, protected)
    dataset = (src / "images").is_dir()
    img_src = src / "images" if dataset else src
    if depth_dir is None and dataset and (src / "depth").is_dir():
        depth_dir = src / "depth"
    depth_dir = Path(depth_dir) if depth_dir is not None else None
    files = list_images(img_src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".tmp-{dst.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    img_tmp = tmp / "images" if dataset else tmp
    img_tmp.mkdir(parents=True)
    names = sorted(CORRUPTIONS)
    used: dict[str, str] = {}
    skipped: list[str] = []
    fog_with_depth = 0
    try:
        for f in tqdm(files, desc=f"corrupt {corruption}", disable=None):
            stem = f.stem
            try:
                image = read_image(f)
                depth = None
                depth_file = find_depth_file(depth_dir, stem) if depth_dir is not None else None
                if depth_file is not None:
                    depth = read_depth(depth_file)
                    if depth.shape != image.shape[:2]:
                        raise DataError(
                            depth_file,
                            f"depth is {depth.shape[1]}x{depth.shape[0]} but {f.name} is "
                            f"{image.shape[1]}x{image.shape[0]}",
                        )
            except DataError as err:
                if not skip_bad:
                    raise
                warnings.warn(f"skipping {f.name}: {err}", stacklevel=2)
                skipped.append(stem)
                continue
            name = corruption
            if corruption == "mixed":
                name = names[int(_rng(seed, "mixed/" + stem).integers(len(names)))]
            out = CORRUPTIONS[name](image, severity, _rng(seed, name + "/" + stem), depth)
            Image.fromarray(out, "RGB").save(img_tmp / f"{stem}.png")
            used[stem] = name
            fog_with_depth += int(name == "fog" and depth is not None)
        if not used:
            raise DataError(img_src, "no image could be read (all skipped)")
        if dataset:
            for sub in sorted(p for p in src.iterdir() if p.is_dir() and p.name != "images"):
                shutil.copytree(sub, tmp / sub.name)
        summary = dict(
            source=str(src),
            corruption=corruption,
            severity=severity,
            seed=int(seed),
            n_images=len(used),
            skipped=skipped,
            depth_used=fog_with_depth > 0,
            fog_with_depth=fog_with_depth,
            per_image=used if corruption == "mixed" else None,
        )
        (tmp / "corruption.json").write_text(json.dumps(summary, indent=2) + "\n")
        replace_dir(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return summary


# ------------------------------------------------------------------------- CLI


def add_corrupt_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `westar corrupt` (register on a subparser)."""
    from westar.cli_flags import deprecated_alias

    parser.add_argument("--images", help="image folder, or dataset folder with images/ (required)")
    parser.add_argument("--out", help="output folder, created; see --overwrite (required)")
    parser.add_argument("src", nargs="?", help=argparse.SUPPRESS)  # deprecated positionals
    parser.add_argument("dst", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument(
        "--corruption",
        "-c",
        default="fog",
        choices=sorted(CORRUPTIONS) + ["mixed"],
        help="which corruption; 'mixed' draws one per image (default: fog)",
    )
    parser.add_argument(
        "--severity", "-s", type=int, default=3, choices=range(1, 6), help="severity 1..5"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random corruptions")
    parser.add_argument(
        "--depth",
        default=None,
        help="folder of <stem>.{npy,png,exr} metric depth for fog "
        "(default: <images>/depth if present)",
    )
    deprecated_alias(parser, "--depth-dir", "--depth", "depth")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing non-empty --out"
    )
    parser.add_argument("--skip-bad", action="store_true", help="skip bad files with a warning")
    return parser


def run_corrupt(args: argparse.Namespace) -> int:
    from westar.cli_flags import legacy_positional

    legacy_positional(args, "src", "images", "--images")
    legacy_positional(args, "dst", "out", "--out")
    if not args.images or not args.out:
        raise ValueError("corrupt needs --images (image or dataset folder) and --out")
    summary = corrupt_folder(
        args.images,
        args.out,
        args.corruption,
        args.severity,
        args.seed,
        args.depth,
        overwrite=getattr(args, "overwrite", False),
        skip_bad=getattr(args, "skip_bad", False),
    )
    from westar.cli_flags import counted

    note = ""
    if summary["fog_with_depth"]:
        note = f" (fog from depth maps for {counted(summary['fog_with_depth'], 'image')})"
    if summary["skipped"]:
        note += f"; skipped {counted(len(summary['skipped']), 'bad image')}"
    print(
        f"corrupt: {counted(summary['n_images'], 'image')}, {args.corruption} severity "
        f"{args.severity} -> {args.out}{note}"
    )
    per_image = summary["per_image"] or {}
    fogged = (
        summary["n_images"] if args.corruption == "fog" else list(per_image.values()).count("fog")
    )
    uniform = fogged - summary["fog_with_depth"]
    if uniform:
        print(
            f"note: no depth map for {counted(uniform, 'fogged image')}: their fog is uniform, "
            "not depth-dependent (give --depth, or a dataset folder with depth/)"
        )
    return 0


# The plugin protocol of westar/cli.py (`westar corrupt`).
CLI_HELP = "write a corrupted copy (fog, noise, blur, low light, contrast, JPEG, rain) of a folder"
cli_arguments = add_corrupt_arguments
cli_run = run_corrupt


if __name__ == "__main__":  # python -m westar.corrupt --images SRC --out DST ...
    raise SystemExit(run_corrupt(add_corrupt_arguments(argparse.ArgumentParser()).parse_args()))
