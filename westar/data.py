"""Datasets on disk: images, instance label maps, ordinal pairs, ground-truth depth.

Formats (full description in docs/formats.md):

    <root>/images/<stem>.{png,jpg,jpeg,bmp,tif,tiff,webp}   RGB (8-bit; 16-bit scaled by 1/257)
    <root>/instances/<stem>.png   16-bit (or 8-bit) label map, 0 = no instance
    <root>/instances/<stem>.npy   integer (H, W) or (L, H, W) label maps (L levels)
    <root>/pairs.json             ordinal annotations, one file per dataset
    <root>/depth/<stem>.npy       float depth in meters, 0 / non-finite = invalid
    <root>/depth/<stem>.png       16-bit depth, meters = value / depth_scale
    <root>/depth/<stem>.exr       float depth (needs imageio with an EXR plugin)

Every reader raises `DataError` naming the file; nothing is silently cropped, resized
or clipped to make an inconsistent sample fit. This module is the one definition of the
format: `westar.corrupt` and `westar.synth` read and list files through it.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DataError",
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "read_json_file",
    "loads_strict",
    "check_depth_options",
    "RELATIONS",
    "IGNORE_LABEL",
    "relation_to_label",
    "list_images",
    "read_image",
    "read_instances",
    "read_depth",
    "find_depth_file",
    "load_pairs",
    "save_pairs",
    "Sample",
    "AdaptationDataset",
    "collate",
    "resize_keep_aspect",
    "crop_offset",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DEPTH_EXTENSIONS = (".npy", ".png", ".exr")
INSTANCE_EXTENSIONS = (".png", ".npy")
RELATIONS = ("farther", "closer", "equal")
IGNORE_LABEL = -100  # label of a padding pair (ignored by westar_ops.ordinal_ranking_loss)
PAIRS_VERSION = 1
# Largest image read (width x height): PIL's decompression-bomb limit (about 89 M pixels,
# 0.27 GB as RGB); `westar predict --max-pixels` raises it.
MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
_EXIF_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees
# westar's own check (`_check_pixels`) refuses what PIL would only warn about
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class DataError(ValueError):
    """A problem with an input file; the message names the file."""

    def __init__(self, path: str | Path, message: str | None = None):
        if message is None:  # rebuilt from its text, e.g. re-raised by a DataLoader worker
            lines = [ln for ln in str(path).splitlines() if ln.strip()]
            text = lines[-1] if lines else ""
            prefix = f"{DataError.__module__}.DataError: "
            self.path = ""
            super().__init__(text[len(prefix) :] if text.startswith(prefix) else text)
            return
        self.path = str(path)
        super().__init__(f"{path}: {message}")


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def loads_strict(text: str) -> Any:
    """json.loads refusing Infinity, NaN and numbers too large for a float (1e999) with a
    ValueError; too deep nesting raises RecursionError."""
    return json.loads(text, parse_constant=_no_constant, parse_float=_finite)


def read_json_file(path: str | Path, what: str = "JSON file") -> Any:
    """Parse a JSON file strictly (`loads_strict`); a DataError naming it for non-UTF-8
    text, bad syntax, Infinity / NaN / 1e999 and nesting too deep."""
    path = Path(path)

    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            path, f"{what} is not UTF-8 text ({err.reason} at byte {err.start})"
        ) from err
    try:
        return loads_strict(text)
    except RecursionError as err:
        raise DataError(path, f"{what} is nested too deeply") from err
    except ValueError as err:  # JSONDecodeError and the two checks above
        raise DataError(path, f"{what} is not valid JSON ({err})") from err


# ---------------------------------------------------------------- ordinal labels


def relation_to_label(relation: str, output_space: str = "disparity") -> int:
    """Map "a is <relation> than b" to the sign wanted for pred[a] - pred[b].

    The single place where depth order meets the model's output space: for a disparity
    (inverse depth) output, "a is farther" means pred[a] < pred[b], label -1; for a depth
    output it is +1. "equal" is 0 in both.
    """
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
    if output_space not in ("disparity", "depth"):
        raise ValueError(f"output_space must be 'disparity' or 'depth', got {output_space!r}")
    depth_sign = {"farther": 1, "closer": -1, "equal": 0}[relation]
    return depth_sign if output_space == "depth" else -depth_sign


# ---------------------------------------------------------------- file readers


def list_images(folder: str | Path) -> list[Path]:
    """Image files of `folder`, sorted by name; a DataError if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "image folder not found")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(folder, f"no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    stems: dict[str, Path] = {}
    for p in files:
        if p.stem in stems:
            raise DataError(p, f"two images share the stem {p.stem!r} (also {stems[p.stem].name})")
        stems[p.stem] = p
    return files


_IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError)


def _check_pixels(im: Image.Image, path: Path, max_pixels: int | None) -> None:
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    w, h = im.size
    if w * h > limit:
        raise DataError(
            path,
            f"image is {w}x{h} = {w * h} pixels, more than the limit of {limit} "
            "(westar predict --max-pixels raises it)",
        )


def _open(path: Path) -> Image.Image:
    """Image.open; PIL's own bomb limit (an error at twice MAX_PIXELS) named as westar's."""
    try:
        return Image.open(path)
    except Image.DecompressionBombError as err:
        raise DataError(
            path, f"{err} (westar predict --max-pixels raises the limit)".replace("could be", "is")
        ) from err


def _open_checked(path: Path, max_pixels: int | None) -> Image.Image:
    """`_open` of an existing file with at most `max_pixels` pixels (`_check_pixels`)."""
    if not path.is_file():
        raise DataError(path, "file not found")
    im = _open(path)
    try:
        _check_pixels(im, path, max_pixels)
    except DataError:
        im.close()
        raise
    return im


def _exif_orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block: the stored orientation
        return 1


def image_size(path: str | Path, max_pixels: int | None = None) -> tuple[int, int]:
    """(H, W) of an image as shown (EXIF orientation applied) from its header, checking
    that the file is intact and has at most `max_pixels` (default MAX_PIXELS) pixels."""
    path = Path(path)
    try:
        with _open_checked(path, max_pixels) as im:
            w, h = im.size
            im.verify()
        with _open(path) as im:  # verify() leaves the image unusable: the EXIF from a new open
            if _exif_orientation(im) in _EXIF_SWAPS_SIDES:
                w, h = h, w
    except DataError:
        raise
    except _IMAGE_ERRORS as err:
        raise DataError(path, f"cannot read image ({err})") from err
    return h, w


HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16-bit (or int32) grayscale


def _rgb8(im: Image.Image, path: Path) -> np.ndarray:
    """uint8 (H, W, 3) of an opened image; 16-bit grayscale scaled by its range (/257)."""
    if im.mode in HIGH_BIT_MODES:
        # PIL's convert("RGB") clips these to 255 (an all-white image): scale instead
        arr = np.asarray(im).astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise DataError(
                path, f"{im.mode} image with values outside 0..65535: save it as 8 or 16 bit"
            )
        gray = np.round(arr / 257.0).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode == "F":
        raise DataError(path, "floating-point image: save it as an 8- or 16-bit image")
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def read_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """uint8 (H, W, 3) RGB as shown (EXIF orientation applied); 16-bit grayscale is scaled
    by 255/65535, not clipped; more than `max_pixels` (default MAX_PIXELS) is refused."""
    path = Path(path)
    try:
        with _open_checked(path, max_pixels) as im:
            if _exif_orientation(im) != 1:
                im.load()
                return _rgb8(ImageOps.exif_transpose(im), path)
            return _rgb8(im, path)
    except DataError:
        raise
    except _IMAGE_ERRORS as err:
        raise DataError(path, f"cannot read image ({err})") from err


def read_instances(path: str | Path) -> np.ndarray:
    """int32 (L, H, W) label maps (L = 1 for a PNG), ids >= 0."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "instance map not found")
    try:
        if path.suffix.lower() == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as im:
                if im.mode not in ("I;16", "I;16B", "I;16L", "I", "L", "P"):
                    raise DataError(
                        path, f"instance PNG must be 8- or 16-bit grayscale, got mode {im.mode}"
                    )
                arr = np.asarray(im)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(path, f"cannot read instance map ({err})") from err
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(path, f"instance map must hold integers, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise DataError(path, f"instance map must be (H, W) or (L, H, W), got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
        raise DataError(path, "instance ids must lie in [0, 2**31 - 1] (0 = no instance)")
    return arr.astype(np.int32)


def find_depth_file(folder: str | Path, stem: str) -> Path | None:
    for ext in DEPTH_EXTENSIONS:
        p = Path(folder) / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def read_depth(path: str | Path, depth_scale: float = 1000.0) -> np.ndarray:
    """float32 (H, W) depth in meters; invalid pixels are 0.

    .npy: float meters (or integers, divided by `depth_scale`); .png: 16-bit, divided by
    `depth_scale` (1000 for millimetres, 256 for KITTI); .exr: float meters.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "depth file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
            if np.issubdtype(arr.dtype, np.integer):
                arr = arr.astype(np.float64) / depth_scale
        elif suffix == ".png":
            with Image.open(path) as im:
                if im.mode not in ("I;16", "I;16B", "I;16L", "I"):
                    raise DataError(path, f"depth PNG must be 16-bit grayscale, got mode {im.mode}")
                arr = np.asarray(im).astype(np.float64) / depth_scale
        elif suffix == ".exr":
            try:
                import imageio.v3 as iio

                arr = np.asarray(iio.imread(path))
            except Exception as err:  # plugin missing or unreadable
                raise DataError(
                    path, f"cannot read EXR ({err}); convert it to .npy or install an EXR plugin"
                ) from err
            if arr.ndim == 3:
                arr = arr[..., 0]
        else:
            raise DataError(path, f"unsupported depth format {suffix} (use .npy, .png or .exr)")
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(path, f"cannot read depth ({err})") from err
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise DataError(path, f"depth must be (H, W), got shape {arr.shape}")
    arr = arr.astype(np.float32)
    arr[~np.isfinite(arr) | (arr < 0)] = 0.0
    return arr


def check_depth_options(
    *,
    max_depth: float | None = None,
    min_depth: float | None = None,
    depth_scale: float | None = None,
) -> None:
    """--max-depth, --min-depth and --depth-scale: finite and positive (max > min)."""
    for flag, value in (("--max-depth", max_depth), ("--min-depth", min_depth),
                        ("--depth-scale", depth_scale)):  # fmt: skip
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} must be a positive number, got {value}")
    if max_depth is not None and min_depth is not None and max_depth <= min_depth:
        raise ValueError(f"--max-depth {max_depth} must be larger than --min-depth {min_depth}")


# ---------------------------------------------------------------- ordinal pairs


def load_pairs(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a pairs JSON; returns {stem: {"width", "height", "pairs": [...]}}, checked."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "pairs file not found")
    doc = read_json_file(path, "pairs file")
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), dict):
        raise DataError(path, 'expected an object with an "images" mapping (docs/formats.md)')
    if doc.get("coordinates", "xy") != "xy":
        raise DataError(path, f'"coordinates" must be "xy", got {doc.get("coordinates")!r}')
    out = {}
    for stem, entry in doc["images"].items():
        where = f"images[{stem!r}]"
        if not isinstance(entry, dict):
            raise DataError(path, f"{where} must be an object")
        width, height = entry.get("width"), entry.get("height")
        if not all(_is_pixel_index(v) and v >= 1 for v in (width, height)):
            raise DataError(path, f"{where} needs positive integer 'width' and 'height'")
        width, height = int(width), int(height)
        pairs = entry.get("pairs", [])
        if not isinstance(pairs, list):
            raise DataError(path, f"{where}.pairs must be a list")
        for i, pair in enumerate(pairs):
            pwhere = f"{where}.pairs[{i}]"
            try:
                rel = pair["relation"]
                pts = [pair["a"], pair["b"]]
            except (KeyError, TypeError) as err:
                raise DataError(path, f"{pwhere} needs 'a', 'b' and 'relation'") from err
            if rel not in RELATIONS:
                raise DataError(path, f"{pwhere}: relation must be one of {RELATIONS}, got {rel!r}")
            for name, pt in zip("ab", pts):
                if (
                    not isinstance(pt, (list, tuple))
                    or len(pt) != 2
                    or not all(_is_pixel_index(v) for v in pt)
                ):
                    raise DataError(
                        path, f"{pwhere}.{name} must be [x, y] in integer pixels, got {pt!r}"
                    )
                x, y = pt
                if not (0 <= x < width and 0 <= y < height):
                    raise DataError(
                        path,
                        f"{pwhere}.{name} = [x={x}, y={y}] lies outside the {width}x{height} "
                        f"image {stem!r}",
                    )
        out[str(stem)] = {"width": width, "height": height, "pairs": pairs}
    return out


def _is_pixel_index(v: Any) -> bool:
    """An integer (or a float with an integer value); not a bool (JSON true is not 1)."""
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    return isinstance(v, float) and math.isfinite(v) and v.is_integer()


def save_pairs(path: str | Path, images: dict[str, dict[str, Any]], **meta: Any) -> None:
    """Write a pairs JSON ({stem: {"width", "height", "pairs"}}), atomically."""
    path = Path(path)
    doc = {"version": PAIRS_VERSION, "coordinates": "xy", **meta, "images": images}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


# ---------------------------------------------------------------- dataset


@dataclass
class Sample:
    stem: str
    image: Path
    instances: Path | None
    pairs: dict[str, Any] | None
    size: tuple[int, int]  # (H, W) of the original image
    depth: Path | None = None  # ground truth, read only when the dataset is given depth_dir


def _resize_labels(arr: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    t = torch.from_numpy(arr.astype(np.float64))[None]
    if tuple(t.shape[-2:]) != tuple(size):
        t = F.interpolate(t, size=size, mode="nearest-exact")
    return t[0].to(torch.int32)


def _scale_point(x: float, y: float, src: tuple[int, int], dst: tuple[int, int]) -> tuple[int, int]:
    """Pixel (x, y) of an image of size src=(H, W) -> (y, x) at size dst: the destination
    pixel whose area holds the source pixel's centre."""
    yy = min(int((y + 0.5) * dst[0] / src[0]), dst[0] - 1)
    xx = min(int((x + 0.5) * dst[1] / src[1]), dst[1] - 1)
    return yy, xx


def resize_keep_aspect(
    src: tuple[int, int], out: tuple[int, int], multiple: int
) -> tuple[int, int]:
    """(H, W) to resize an image of size `src` to before cropping `out` = (H, W) from it.

    Depth Anything's training resize ("lower bound", keep aspect ratio): one scale for both
    sides, the smallest that makes both sides >= `out`; each side is then rounded up to a
    multiple of `multiple` (the patch size), so the result is never smaller than `out`.
    """
    h, w = src
    scale = max(out[0] / h, out[1] / w)

    def side(v: int, target: int) -> int:
        n = math.ceil(round(v * scale, 6) / multiple) * multiple
        return max(n, target)

    return side(h, out[0]), side(w, out[1])


def crop_offset(
    resized: tuple[int, int], out: tuple[int, int], seed: int | None
) -> tuple[int, int]:
    """(top, left) of the `out` crop in an image of size `resized`: uniform random from
    `seed` (reproducible), or centred when `seed` is None."""
    room_y, room_x = resized[0] - out[0], resized[1] - out[1]
    if seed is None:
        return room_y // 2, room_x // 2
    rng = np.random.default_rng(seed)
    return int(rng.integers(room_y + 1)), int(rng.integers(room_x + 1))


class AdaptationDataset(torch.utils.data.Dataset):
    """Images (+ instance maps, + ordinal pairs) as training crops of one shape.

    Geometry, as Depth Anything trains: each image is resized keeping its aspect ratio so
    that both sides are at least ``image_size`` = (H, W) and multiples of ``patch_size``
    (`resize_keep_aspect`), then an (H, W) window is cut from it, at random (``crop=
    "random"``, reproducible from a seed) or centred (``crop="center"``). The instance
    maps go through the same resize (nearest) and window; a pair point moves to the
    resized pixel that holds its centre, and a pair with a point outside the window is
    dropped.

    Items are dicts: ``image`` float32 (3, H, W) in [0, 1]; ``instances`` int32 (L, H, W)
    (L = 0 when none are used); ``pairs`` int64 (P, 2, 2) of (y, x); ``labels`` int64 (P,)
    in the model's output space; ``stem``; ``index``; ``crop`` int64 (4,) = (top, left) of
    the window and (H, W) the image was resized to; with ``depth_dir``, ``depth`` float32
    (H, W) meters (0 = invalid; nearest resize, same window). ``dataset[i]`` crops with a
    seed made from (seed, i); ``dataset[(i, crop_seed)]`` with the given one (the trainer's
    sampler passes one per step, so crops are a function of (seed, step, rank)). Every file
    is decoded once when the dataset is built (in parallel threads, with a progress bar): a
    bad sample raises a DataError naming the file, or is dropped with a warning when
    ``skip_bad`` is set. ``pairs``, when given, is `load_pairs`'s mapping to use instead of
    reading ``pairs_file`` (e.g. without held-out pairs; ``pairs_file`` still names it).
    """

    def __init__(
        self,
        images_dir: str | Path,
        image_size: tuple[int, int],
        instances_dir: str | Path | None = None,
        pairs_file: str | Path | None = None,
        output_space: str = "disparity",
        skip_bad: bool = False,
        *,
        depth_dir: str | Path | None = None,
        patch_size: int = 14,
        crop: str = "random",
        seed: int = 0,
        pairs: dict[str, dict[str, Any]] | None = None,
    ):
        if crop not in ("random", "center"):
            raise ValueError(f"crop must be 'random' or 'center', got {crop!r}")
        self.image_size = tuple(image_size)
        self.patch_size = int(patch_size)
        self.crop = crop
        self.seed = int(seed)
        self.output_space = output_space
        self.skip_bad = skip_bad
        files = list_images(images_dir)
        if pairs is None:  # given: already loaded (and checked) from pairs_file
            pairs = load_pairs(pairs_file) if pairs_file is not None else {}
        stems = {p.stem for p in files}
        unknown = sorted(set(pairs) - stems)
        if unknown:
            warnings.warn(
                f"{pairs_file}: {len(unknown)} annotated images not in {images_dir} "
                f"(e.g. {unknown[0]!r}); their pairs are unused",
                stacklevel=2,
            )
        self.samples: list[Sample] = []
        self.skipped: list[str] = []

        def check(path: Path) -> Sample | DataError:
            try:
                sample = self._check(path, instances_dir, pairs.get(path.stem), pairs_file)
                if depth_dir is not None:
                    sample.depth = self._check_depth(path, sample.size, depth_dir)
                return sample
            except DataError as err:
                return err

        for path, result in zip(files, _map_with_progress(check, files, "checking dataset")):
            if isinstance(result, DataError):
                if not skip_bad:
                    raise result
                warnings.warn(f"skipping sample {path.stem!r}: {result}", stacklevel=2)
                self.skipped.append(str(result))
                continue
            self.samples.append(result)
        if not self.samples:
            raise DataError(images_dir, "no usable samples")

    @staticmethod
    def _check(path, instances_dir, pair_entry, pairs_file) -> Sample:
        size = read_image(path).shape[:2]  # a full decode: truncated files fail here
        inst_path = None
        if instances_dir is not None:
            for ext in INSTANCE_EXTENSIONS:
                cand = Path(instances_dir) / f"{path.stem}{ext}"
                if cand.is_file():
                    inst_path = cand
                    break
            if inst_path is None:
                raise DataError(
                    Path(instances_dir) / f"{path.stem}.png",
                    f"instance map for image {path.name} not found (.png or .npy); "
                    "make them with `westar masks` or train with --hdn grid",
                )
            inst_size = read_instances(inst_path).shape[-2:]  # ids, dtype and mode checked
            if inst_size != size:
                raise DataError(
                    inst_path,
                    f"instance map is {inst_size[1]}x{inst_size[0]} (WxH) but image "
                    f"{path.name} is {size[1]}x{size[0]}",
                )
        if pair_entry is not None and (pair_entry["height"], pair_entry["width"]) != size:
            raise DataError(
                pairs_file,
                f"image {path.stem!r} is annotated as {pair_entry['width']}x"
                f"{pair_entry['height']} but {path.name} is {size[1]}x{size[0]}",
            )
        return Sample(path.stem, path, inst_path, pair_entry, size)

    @staticmethod
    def _check_depth(path: Path, size: tuple[int, int], depth_dir: str | Path) -> Path:
        depth_file = find_depth_file(depth_dir, path.stem)
        if depth_file is None:
            raise DataError(Path(depth_dir) / f"{path.stem}.npy", "ground-truth depth not found")
        depth_size = read_depth(depth_file).shape
        if depth_size != size:
            raise DataError(
                depth_file,
                f"depth is {depth_size[1]}x{depth_size[0]} (WxH) but image {path.name} is "
                f"{size[1]}x{size[0]}",
            )
        return depth_file

    def __len__(self) -> int:
        return len(self.samples)

    def geometry(self, index: int, crop_seed: int | None = None) -> tuple[tuple, tuple]:
        """((rh, rw), (top, left)): the resize and the window of sample `index`."""
        resized = resize_keep_aspect(self.samples[index].size, self.image_size, self.patch_size)
        if self.crop == "center":
            seed = None
        else:
            seed = [self.seed, index] if crop_seed is None else [int(crop_seed)]
        return resized, crop_offset(resized, self.image_size, seed)

    def load(self, index: int, crop_seed: int | None = None) -> dict[str, Any]:
        s = self.samples[index]
        h, w = self.image_size
        (rh, rw), (top, left) = self.geometry(index, crop_seed)
        rgb = read_image(s.image)
        if rgb.shape[:2] != s.size:
            raise DataError(s.image, "image size changed since the dataset was checked")
        im = Image.fromarray(rgb)
        if (rw, rh) != im.size:
            im = im.resize((rw, rh), Image.BICUBIC)
        im = im.crop((left, top, left + w, top + h))
        image = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        if s.instances is not None:
            arr = read_instances(s.instances)
            if arr.shape[-2:] != s.size:
                raise DataError(s.instances, f"instance map shape {arr.shape} != image {s.size}")
            instances = _resize_labels(arr, (rh, rw))[:, top : top + h, left : left + w]
        else:
            instances = torch.zeros((0, h, w), dtype=torch.int32)
        coords, labels = [], []
        for pair in (s.pairs or {}).get("pairs", []):
            points = [_scale_point(x, y, s.size, (rh, rw)) for x, y in (pair["a"], pair["b"])]
            points = [(y - top, x - left) for y, x in points]
            if all(0 <= y < h and 0 <= x < w for y, x in points):
                coords.append(points)
                labels.append(relation_to_label(pair["relation"], self.output_space))
        pairs = torch.tensor(coords, dtype=torch.int64).reshape(-1, 2, 2)
        extra = {}
        if s.depth is not None:  # nearest resize (no depth mixed across edges), same window
            depth = torch.from_numpy(read_depth(s.depth))[None, None]
            if (rh, rw) != tuple(depth.shape[-2:]):
                depth = F.interpolate(depth, size=(rh, rw), mode="nearest-exact")
            extra["depth"] = depth[0, 0, top : top + h, left : left + w].contiguous()
        return {
            "image": image.contiguous(),
            "instances": instances.contiguous(),
            "pairs": pairs,
            "labels": torch.tensor(labels, dtype=torch.int64),
            "stem": s.stem,
            "index": index,
            "crop": torch.tensor([top, left, rh, rw], dtype=torch.int64),
            **extra,
        }

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        index, crop_seed = key if isinstance(key, tuple) else (key, None)
        try:
            return self.load(index, crop_seed)
        except DataError as err:
            if not self.skip_bad:
                raise
            warnings.warn(f"skipping sample {self.samples[index].stem!r}: {err}", stacklevel=2)
            return None


def _map_with_progress(fn, items: list, desc: str) -> list:
    """[fn(x) for x in items] in threads (image decoding releases the GIL), with a bar."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    workers = max(1, min(8, os.cpu_count() or 1, len(items)))
    with ThreadPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, disable=None))


def collate(items: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Stack a batch; pad instance levels with 0 and pairs with label IGNORE_LABEL."""
    items = [it for it in items if it is not None]
    if not items:
        return None
    batch = len(items)
    h, w = items[0]["image"].shape[-2:]
    levels = max(it["instances"].shape[0] for it in items)
    npairs = max(it["pairs"].shape[0] for it in items)
    instances = torch.zeros((batch, levels, h, w), dtype=torch.int32)
    pairs = torch.zeros((batch, npairs, 2, 2), dtype=torch.int64)
    labels = torch.full((batch, npairs), IGNORE_LABEL, dtype=torch.int64)
    for i, it in enumerate(items):
        instances[i, : it["instances"].shape[0]] = it["instances"]
        n = it["pairs"].shape[0]
        pairs[i, :n] = it["pairs"]
        labels[i, :n] = it["labels"]
    out = {
        "image": torch.stack([it["image"] for it in items]),
        "instances": instances,
        "pairs": pairs,
        "labels": labels,
        "stem": [it["stem"] for it in items],
        "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
    }
    for key in ("crop", "depth"):
        if all(key in it for it in items):
            out[key] = torch.stack([it[key] for it in items])
    return out
