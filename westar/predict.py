"""`westar predict`: depth maps for a folder of images (or one image) at their own resolution.

Each image is resized keeping its aspect ratio (shorter side to `image_size`, the longer
side at most 4 times that, both sides rounded to the patch size, as `westar eval` does), images of the same inference size are
batched, and the output is resized back (bilinear) to the original H x W. Per image:

    <out>/<stem>.npy         float32 (H, W): the model's raw output (relative disparity for
                             Depth Anything V2; depth for a depth model)
    <out>/<stem>_16bit.png   uint16 (H, W): that output min-max scaled to 0..65535 per image
    <out>/<stem>_color.png   RGB: colour-mapped (2nd-98th percentile, bright = large)

The model is a hub id or local directory, with `--adapter` (peft, merged into the weights
before inference) or a model already merged by `westar merge`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from westar.data import IMAGE_EXTENSIONS, DataError, list_images, read_image

__all__ = ["FORMATS", "list_inputs", "load_for_inference", "predict_arrays", "predict_folder"]

FORMATS = {"npy": "{stem}.npy", "png16": "{stem}_16bit.png", "color": "{stem}_color.png"}

CLI_HELP = "depth maps for a folder of images (or one image) at their original resolution"


def list_inputs(source: str | Path) -> list[Path]:
    """One image file, or the images of a folder (sorted); a DataError names the path."""
    source = Path(source)
    if source.is_file():
        if source.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataError(source, f"not an image ({', '.join(IMAGE_EXTENSIONS)})")
        return [source]
    if not source.exists():
        raise DataError(source, "input image or folder not found")
    return list_images(source)


def load_for_inference(model: str, adapter: str | None = None, device: str | None = None):
    """(network in eval mode on `device`, DepthModel): the base model, or base + adapter
    merged into its weights (peft's merge_and_unload)."""
    from westar.model import check_adapter, load_adapter, load_depth_model

    if adapter is not None:
        check_adapter(adapter)
    depth_model = load_depth_model(model)
    net = depth_model.model
    if adapter is not None:
        net = load_adapter(net, adapter).merge_and_unload()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return net.to(dev).eval(), depth_model


@torch.no_grad()
def predict_arrays(
    net, depth_model, images: list[np.ndarray], size: int, device=None
) -> list[np.ndarray]:
    """float32 (H, W) outputs for uint8 (H, W, 3) images of one inference size (a batch)."""
    from westar.evaluate import inference_size
    from westar.model import predict

    device = device or next(net.parameters()).device
    sizes = {inference_size(*im.shape[:2], size, depth_model.patch_size) for im in images}
    if len(sizes) != 1:
        raise ValueError(f"one batch needs one inference size, got {sorted(sizes)}")
    ih, iw = sizes.pop()
    x = torch.stack(
        [
            F.interpolate(
                torch.from_numpy(im).float().div(255).permute(2, 0, 1)[None],
                size=(ih, iw), mode="bicubic", align_corners=False,
            )[0].clamp(0, 1)
            for im in images
        ]
    )  # fmt: skip
    out = predict(net, depth_model, x.to(device)).float()
    results = []
    for i, im in enumerate(images):
        o = F.interpolate(out[i][None, None], size=im.shape[:2], mode="bilinear")
        results.append(o[0, 0].cpu().numpy().astype(np.float32))
    return results


def _to_16bit(values: np.ndarray) -> np.ndarray:
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, np.uint16)
    lo, hi = float(values[finite].min()), float(values[finite].max())
    scaled = (np.where(finite, values, lo) - lo) / max(hi - lo, 1e-12)
    return np.round(scaled * 65535).astype(np.uint16)


def _colour(values: np.ndarray) -> np.ndarray:
    from westar.evaluate import colorize

    finite = np.isfinite(values)
    lo, hi = np.percentile(values[finite], [2, 98]) if finite.any() else (0.0, 1.0)
    return colorize(np.where(finite, values, lo), float(lo), float(hi), finite)


def _write_atomic(path: Path, write) -> None:
    """write(temporary path), then rename; a failure (disk full) names `path` and leaves
    neither the temporary file nor a partial output."""
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        write(tmp)
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, f"cannot write ({err.strerror or err})", str(path)) from err


def save_outputs(values: np.ndarray, out_dir: Path, stem: str, formats: list[str]) -> None:
    """Write the chosen FORMATS of one (H, W) output, each through a temporary file."""
    if "npy" in formats:
        _write_atomic(out_dir / FORMATS["npy"].format(stem=stem), lambda p: np.save(p, values))
    if "png16" in formats:
        im = Image.fromarray(_to_16bit(values))
        _write_atomic(out_dir / FORMATS["png16"].format(stem=stem), im.save)
    if "color" in formats:
        im = Image.fromarray(_colour(values))
        _write_atomic(out_dir / FORMATS["color"].format(stem=stem), im.save)


def _check_targets(paths: list[Path], out_dir: Path, formats: list[str], overwrite: bool):
    """No output may be an input image (even with --overwrite) or, without --overwrite,
    an existing file."""
    inputs = {p.resolve() for p in paths}
    for p in paths:
        for f in formats:
            target = out_dir / FORMATS[f].format(stem=p.stem)
            if target.resolve() in inputs:
                raise FileExistsError(
                    17, f"output for {p.name} would replace an input image; choose another --out",
                    str(target),
                )  # fmt: skip
            if target.exists() and not overwrite:
                raise FileExistsError(f"{target}: exists; pass --overwrite to replace it")


def predict_folder(
    source: str | Path,
    out_dir: str | Path,
    model: str,
    *,
    adapter: str | None = None,
    image_size: int | None = None,
    batch_size: int = 4,
    formats: list[str] | tuple[str, ...] = tuple(FORMATS),
    device: str | None = None,
    overwrite: bool = False,
    skip_bad: bool = False,
    progress: bool = True,
    max_pixels: int | None = None,
) -> dict[str, object]:
    """Predict every image of `source` into `out_dir`; returns {"written", "skipped", "size"}.

    Checks the inputs, the adapter and that no output exists (unless `overwrite`) before
    loading the model; every image is decoded once up front (a bad one is an error, or
    skipped with `skip_bad`). `image_size`: inference shorter side (default: the model's
    own; the longer side at most MAX_ASPECT times it). `max_pixels`: the largest image
    (default westar.data.MAX_PIXELS). An input is never replaced, even with `overwrite`.
    """
    import warnings

    from tqdm.auto import tqdm

    from westar.data import MAX_PIXELS, _map_with_progress
    from westar.evaluate import check_inference_size, inference_size

    formats = list(formats)
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ValueError(f"--formats must be among {sorted(FORMATS)}, got {formats}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    check_inference_size(image_size)
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"--max-pixels must be >= 1, got {max_pixels}")
    if max_pixels is not None and max_pixels > MAX_PIXELS:
        Image.MAX_IMAGE_PIXELS = max(max_pixels, Image.MAX_IMAGE_PIXELS or 0)  # PIL's own check
    paths = list_inputs(source)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(out_dir, "output exists and is not a folder")
    _check_targets(paths, out_dir, formats, overwrite)

    def check(p: Path) -> tuple[int, int] | DataError:
        try:
            h, w, _ = read_image(p, max_pixels).shape  # a full decode: truncated files too
            return h, w
        except DataError as err:
            return err

    sizes, skipped = {}, []
    for p, result in zip(paths, _map_with_progress(check, paths, "checking images")):
        if isinstance(result, DataError):
            if not skip_bad:
                raise result
            warnings.warn(f"skipping {p.name}: {result}", stacklevel=2)
            skipped.append(p.name)
        else:
            sizes[p] = result
    if not sizes:
        raise DataError(source, "no readable image (all skipped)")
    net, depth_model = load_for_inference(model, adapter, device)
    side = image_size or depth_model.input_size
    groups: dict[tuple[int, int], list[Path]] = {}
    for p, (h, w) in sizes.items():
        groups.setdefault(inference_size(h, w, side, depth_model.patch_size), []).append(p)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    with tqdm(total=len(sizes), desc="predict", unit="img", disable=not progress) as bar:
        for group in groups.values():
            for i in range(0, len(group), batch_size):
                chunk, images = [], []
                for p in group[i : i + batch_size]:
                    try:
                        images.append(read_image(p, max_pixels))
                        chunk.append(p)
                    except DataError as err:  # changed since it was checked
                        if not skip_bad:
                            raise
                        warnings.warn(f"skipping {p.name}: {err}", stacklevel=2)
                        skipped.append(p.name)
                if not chunk:
                    continue
                for p, values in zip(chunk, predict_arrays(net, depth_model, images, side)):
                    save_outputs(values, out_dir, p.stem, formats)
                    written += 1
                bar.update(len(chunk))
    return {"written": written, "skipped": skipped, "size": side}


# --------------------------------------------------------------------------- CLI plugin


def cli_arguments(p: argparse.ArgumentParser) -> None:
    from westar.cli_flags import DEVICE_HELP, MODEL_HELP, model_name

    p.add_argument("--images", help="an image file or a folder of images (required)")
    p.add_argument("input", nargs="?", help=argparse.SUPPRESS)  # deprecated positional
    p.add_argument("--model", required=True, type=model_name, help="base or merged " + MODEL_HELP)
    p.add_argument("--adapter", help="peft adapter folder, e.g. runs/x/adapter (default: none)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--image-size",
        type=int,
        help="inference shorter side, rounded to the patch size (default: the model's own, "
        "518 for Depth Anything V2)",
    )
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    p.add_argument(
        "--formats",
        nargs="+",
        choices=tuple(FORMATS),
        default=list(FORMATS),
        help="what to write (default: all three)",
    )
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images with a warning")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--max-pixels",
        type=int,
        help="largest image read, width x height (default: PIL's bomb limit, about 89 M)",
    )


def cli_run(args: argparse.Namespace) -> int:
    from westar.cli_flags import counted, legacy_positional, pick

    legacy_positional(args, "input", "images", "--images")
    if not args.images:
        raise ValueError("predict needs --images (an image file or a folder of images)")
    names = ("adapter", "image_size", "batch_size", "formats", "device", "overwrite", "skip_bad")
    result = predict_folder(
        args.images,
        args.out,
        args.model,
        progress=not args.no_progress,
        max_pixels=args.max_pixels,
        **pick(args, *names),
    )
    maps = counted(result["written"], "depth map")
    print(f"wrote {maps} to {args.out} (inference side {result['size']})")
    return 0
