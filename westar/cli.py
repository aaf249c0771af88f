"""`westar` command line: one function per subcommand, registered in COMMANDS.

Adding a subcommand
-------------------
Either, inside this file::

    def _foo_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--bar", type=int, default=1)

    @command("foo", "one-line help", _foo_arguments)
    def _foo(args: argparse.Namespace) -> int | None:
        ...                      # import heavy modules here, not at the top

or, without touching this file, in a module of the package listed in PLUGIN_COMMANDS
(e.g. westar/corrupt.py for `westar corrupt`): define

    CLI_HELP = "one-line help"
    def cli_arguments(parser): ...       # add the flags
    def cli_run(args): ...               # do the work; return an exit code or None

A plugin module that does not exist (yet) is simply not offered. Errors about the user's
input (DataError, missing, unreadable or unwritable files, truncated weights, bad values, a
missing optional package) are printed as one line naming the file or argument and exit
with 2; warnings print as one line each. Set WESTAR_DEBUG=1 to see the traceback (and
Python's own warning format).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from westar.cli_flags import (
    DEVICE_HELP,
    MODEL_HELP,
    HelpFormatter,
    counted,
    deprecated_alias,
    model_name,
    pick,
)
from westar.train_flags import add_config_flags

__all__ = ["COMMANDS", "PLUGIN_COMMANDS", "Command", "command", "build_parser", "main"]


@dataclass
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


COMMANDS: dict[str, Command] = {}

# Subcommands defined by other modules of the package (see the module docstring).
PLUGIN_COMMANDS: dict[str, str] = {
    "demo": "westar.demo",
    "corrupt": "westar.corrupt",
    "predict": "westar.predict",
    "annotate": "westar.annotate",
    "bench": "westar.bench",
    "sweep": "westar.sweep",
}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register the decorated function as `westar <name>`."""

    def register(run):
        COMMANDS[name] = Command(name, help, add_arguments, run)
        return run

    return register


def _plugin(name: str, module_name: str) -> Command | None:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            return None
        raise
    if not (hasattr(module, "cli_arguments") and hasattr(module, "cli_run")):
        return None
    return Command(name, getattr(module, "CLI_HELP", ""), module.cli_arguments, module.cli_run)


# --------------------------------------------------------------------------- train


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        help="TrainConfig JSON, e.g. a run's config.json; flags override it (default: none)",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=argparse.SUPPRESS,
        help="continue from the latest checkpoint in --out, or from the given one "
        "(default: start from step 0; a folder with checkpoints is refused)",
    )
    add_config_flags(p)


def config_from_args(args: argparse.Namespace):
    """TrainConfig from --config, then --ablation's preset, then the explicit flags."""
    from westar.config import ABLATIONS, TrainConfig

    values: dict = {}
    if getattr(args, "config", None):
        from westar.data import read_json_file

        if not os.path.isfile(args.config):
            raise FileNotFoundError(2, "--config file not found", args.config)
        loaded = read_json_file(args.config, "--config")
        if not isinstance(loaded, dict):
            raise ValueError(
                f"{args.config}: --config must hold a JSON object of TrainConfig fields"
            )
        values.update(loaded)
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if hasattr(args, f.name)
    }
    device = getattr(args, "device", None)
    if device is not None:  # --device: TrainConfig keeps its `cpu` switch (Accelerate's)
        if device not in ("cpu", "cuda", "auto"):
            raise ValueError(
                f"--device {device}: train takes cpu, cuda or auto "
                "(choose GPUs with CUDA_VISIBLE_DEVICES or accelerate launch)"
            )
        given["cpu"] = device == "cpu"
    ablation = given.get("ablation", values.get("ablation", "full"))
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}")
    values.update(ABLATIONS[ablation])
    values.update(given)
    if values.get("image_size") is not None and len(values["image_size"]) == 1:
        values["image_size"] = (values["image_size"][0],) * 2
    try:
        return TrainConfig.from_dict(values)
    except (TypeError, ValueError) as err:  # e.g. a JSON null or string where a number belongs
        source = f"{args.config}: " if getattr(args, "config", None) else ""
        raise ValueError(f"{source}bad TrainConfig value ({err})") from err


def _config_names_model(args: argparse.Namespace) -> bool:
    """Whether --config's JSON (already checked by config_from_args) sets "model"."""
    if not getattr(args, "config", None):
        return False
    with open(args.config) as f:
        return "model" in json.load(f)


@command("train", "adapt a depth model to a folder of images (WeSTAR)", _train_arguments)
def _train(args: argparse.Namespace) -> int:
    from westar.train import train

    cfg = config_from_args(args)
    if not cfg.data and not cfg.images_dir:
        raise ValueError("train needs --data (dataset root) or --images")
    if not hasattr(args, "model") and not _config_names_model(args):
        raise ValueError(
            "train needs --model: a Depth Anything V2 checkpoint (hub id or folder), or "
            "'source' for the small shipped model (synthetic rooms only)"
        )
    last = train(cfg)
    print(train_summary(cfg, last))
    return 0


def train_summary(cfg, last: dict) -> str:
    """What `westar train` prints at the end: steps, final losses, where the adapter is,
    and the command that evaluates it (`last`: the metrics of the last logged step)."""
    import shlex
    from pathlib import Path

    out = Path(cfg.output_dir)
    lines = []
    if last:
        lines.append(
            f"trained to step {last['step']} of {cfg.steps} in {last['seconds']:.0f} s: "
            f"loss {last['loss']:.4g} (self-training {last['st']:.4g}, ordinal "
            f"{last['weak']:.4g}, LoRA regularizer {last['reg']:.4g})"
        )
    if last.get("heldout_acc") is not None:
        start = last.get("heldout_acc_start")
        before = f" (before training: {start:.1%})" if start is not None else ""
        lines.append(f"held-out pair accuracy: {last['heldout_acc']:.1%}{before}")
    if not (out / "adapter").is_dir():  # stopped early: resumable
        lines.append(f"no final adapter yet; continue with --resume --out {out}")
        return "\n".join(lines)
    lines.append(f"adapter (student): {out / 'adapter'}; EMA teacher: {out / 'teacher'}")
    words = ["westar", "eval", "--model", cfg.model, "--adapter", str(out / "adapter")]
    words += ["--data", cfg.data] if cfg.data else ["--images", str(cfg.resolved_images_dir())]
    if not cfg.data:
        words += ["--depth", "DEPTH_DIR"]
    lines.append("next: " + shlex.join(words + ["--out", str(out / "eval.json")]))
    return "\n".join(lines)


# --------------------------------------------------------------------------- eval


def _data_arguments(p: argparse.ArgumentParser, depth: bool = True) -> None:
    p.add_argument("--data", help="dataset root holding images/ (and depth/) (default: none)")
    p.add_argument("--images", help="image folder (default: <data>/images)")
    if depth:
        p.add_argument("--depth", help="ground-truth depth folder (default: <data>/depth)")
        p.add_argument(
            "--depth-scale",
            type=float,
            default=1000.0,
            help="16-bit PNG / integer depth: meters = value / scale (1000 = mm, 256 = KITTI)",
        )
    p.add_argument("--skip-bad", action="store_true", help="skip bad files with a warning")


def _folder(args, explicit: str | None, sub: str) -> str:
    if explicit:
        return explicit
    if not args.data:
        raise ValueError(f"give --data (dataset root) or --{sub}")
    return os.path.join(args.data, sub)


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=model_name, help="base " + MODEL_HELP)
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        help="peft adapter folder (repeatable; default: none)",
    )
    p.add_argument(
        "--which",
        choices=("base", "adapter", "both"),
        help="what to evaluate (default: both with --adapter, else base)",
    )
    _data_arguments(p)
    p.add_argument("--max-depth", type=float, default=80.0, help="depth cap in meters")
    p.add_argument("--min-depth", type=float, default=1e-3, help="depth floor in meters")
    p.add_argument(
        "--image-size",
        dest="size",
        type=positive_int,
        help="inference shorter side, rounded to the patch size (default: the model's own, "
        "518 for Depth Anything V2)",
    )
    deprecated_alias(p, "--size", "--image-size", "size", type=positive_int)
    p.add_argument(
        "--output-space",
        choices=("disparity", "depth"),
        default="disparity",
        help="what the model predicts",
    )
    p.add_argument("--out", default="eval.json", help="metrics JSON path")
    deprecated_alias(p, "--output", "--out", "out")
    p.add_argument("--pictures", help="folder for labelled before/after pictures (default: none)")
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument("--limit", type=int, help="evaluate the first N images only (default: all)")


@command("eval", "AbsRel / delta1 of the base model and/or adapters", _eval_arguments)
def _eval(args: argparse.Namespace) -> int:
    from westar.evaluate import evaluate

    which = args.which or ("both" if args.adapter else "base")
    if which != "base" and not args.adapter:
        raise ValueError(f"--which {which} needs --adapter")
    same = ("max_depth", "min_depth", "depth_scale", "size", "output_space", "device")
    report = evaluate(
        args.model,
        _folder(args, args.images, "images"),
        _folder(args, args.depth, "depth"),
        adapters=args.adapter if which != "base" else [],
        include_base=which != "adapter",
        output=args.out,
        pictures_dir=args.pictures,
        **pick(args, *same, "skip_bad", "limit"),
    )
    _say_skipped(report["without_depth"])
    for name, r in report["results"].items():
        if r["abs_rel"] is None:
            print(f"{name}: no image scored")
            continue
        print(
            f"{name}: AbsRel {r['abs_rel']:.4f} delta1 {r['delta1']:.4f} "
            f"({counted(r['images'], 'image')})"
        )
    print(f"metrics written to {args.out}")
    if not any(r["images"] for r in report["results"].values()):
        raise ValueError(
            f"no image has valid depth in (--min-depth {args.min_depth}, "
            f"--max-depth {args.max_depth}]: nothing was scored"
        )
    return 0


# --------------------------------------------------------------------------- masks


def _masks_arguments(p: argparse.ArgumentParser) -> None:
    _data_arguments(p, depth=False)
    p.add_argument("--out", help="output folder (default: <data>/instances)")
    p.add_argument(
        "--method",
        choices=("auto", "sam2", "felzenszwalb", "slic"),
        default="auto",
        help="auto: SAM2 with --model, else felzenszwalb",
    )
    p.add_argument(
        "--model",
        help="SAM2 through transformers: hub id (e.g. facebook/sam2.1-hiera-tiny) or local "
        "folder; writes two levels (coarse, fine) as <stem>.npy (default: none, scikit-image)",
    )
    p.add_argument("--points-per-side", type=int, default=16, help="SAM2: prompt grid side")
    p.add_argument("--points-per-batch", type=int, default=64, help="SAM2: prompts per pass")
    p.add_argument("--pred-iou-thresh", type=float, default=0.7, help="SAM2: keep IoU >= this")
    p.add_argument(
        "--stability-thresh",
        type=float,
        default=0.85,
        help="SAM2: keep masks whose stability score is >= this",
    )
    p.add_argument("--device", help="SAM2: " + DEVICE_HELP)
    p.add_argument(
        "--sam2-checkpoint", help="local SAM2 checkpoint (.pt) for the sam2 package (default: none)"
    )
    p.add_argument(
        "--sam2-config",
        help="SAM2 model config name, e.g. configs/sam2.1/sam2.1_hiera_s.yaml (default: none)",
    )
    p.add_argument("--overwrite", action="store_true", help="rewrite existing maps")
    p.add_argument("--scale", type=float, default=200.0, help="felzenszwalb: scale")
    p.add_argument("--sigma", type=float, default=0.8, help="felzenszwalb: smoothing")
    p.add_argument(
        "--min-size",
        type=int,
        help="felzenszwalb: minimum segment size in pixels (default: from the image size)",
    )
    p.add_argument("--n-segments", type=int, default=64, help="slic: number of segments")


@command("masks", "make instance label maps (SAM2, or scikit-image offline)", _masks_arguments)
def _masks(args: argparse.Namespace) -> int:
    from westar.masks import make_instance_maps

    method = args.method
    fallback = {}
    if method in ("felzenszwalb", "auto"):
        fallback = {"scale": args.scale, "sigma": args.sigma, "min_size": args.min_size}
    elif method == "slic":
        fallback = {"n_segments": args.n_segments}
    result = make_instance_maps(
        _folder(args, args.images, "images"),
        _folder(args, args.out, "instances"),
        method=method,
        **pick(args, "model", "sam2_checkpoint", "sam2_config", "overwrite", "skip_bad", "device"),
        sam2_options=pick(
            args, "points_per_side", "points_per_batch", "pred_iou_thresh", "stability_thresh"
        ),
        **fallback,
    )
    print(f"{result['method']}: wrote {counted(result['written'], 'instance map')}")
    return 0


# --------------------------------------------------------------------------- pairs


def _pairs_arguments(p: argparse.ArgumentParser) -> None:
    _data_arguments(p)
    p.add_argument("--out", help="pairs JSON (default: <data>/pairs.json)")
    p.add_argument("--samples", type=int, default=5, help="anchor samples per image")
    p.add_argument("--equal-ratio", type=float, default=1.03, help='"equal" below this ratio')
    p.add_argument(
        "--max-depth", type=float, help="ignore ground truth beyond this depth (default: none)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled points")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


@command("pairs", "make ordinal annotations from ground-truth depth", _pairs_arguments)
def _pairs(args: argparse.Namespace) -> int:
    from westar.pairs import make_pairs_file

    out = _folder(args, args.out, "pairs.json")
    names = ("samples", "equal_ratio", "depth_scale", "max_depth", "seed", "skip_bad", "overwrite")
    images, depth = _folder(args, args.images, "images"), _folder(args, args.depth, "depth")
    result = make_pairs_file(images, depth, out, **pick(args, *names))
    print(
        f"wrote {counted(result['pairs'], 'pair')} for {counted(result['images'], 'image')} to {out}"
    )
    _say_skipped(result["without_depth"])
    if result["without_pairs"]:
        print(f"{counted(len(result['without_pairs']), 'image')} without valid depth got no pairs")
    return 0


def _say_skipped(names: list[str]) -> None:
    """One line naming (the first 3 of) the images skipped for want of a depth map."""
    if names:
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        print(
            f"skipped {counted(len(names), 'image')} without a depth map "
            f"({', '.join(names[:3])}{more})"
        )


# --------------------------------------------------------------------------- merge


def _merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=model_name, help="base " + MODEL_HELP)
    p.add_argument("--adapter", required=True, help="peft adapter folder")
    p.add_argument("--out", required=True, help="output directory for the merged model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")


@command("merge", "fold an adapter into the base model, save a plain HF model", _merge_arguments)
def _merge(args: argparse.Namespace) -> int:
    from westar.merge import merge_adapter

    out = merge_adapter(args.model, args.adapter, args.out, overwrite=args.overwrite)
    print(f"merged model written to {out}")
    return 0


# --------------------------------------------------------------------------- main


def all_commands() -> dict[str, Command]:
    commands = dict(COMMANDS)
    for name, module_name in PLUGIN_COMMANDS.items():
        if name not in commands:
            cmd = _plugin(name, module_name)
            if cmd is not None:
                commands[name] = cmd
    return commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="westar",
        description="WeSTAR: adapt monocular depth foundation models to a new domain",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in all_commands().values():
        p = sub.add_parser(
            cmd.name, help=cmd.help, description=cmd.help, formatter_class=HelpFormatter
        )
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def error_line(err: BaseException) -> str:
    """One line for a user-facing error; an OSError names its path first."""
    if isinstance(err, OSError) and err.filename and err.strerror:
        text = f"{err.filename}: {err.strerror}"
        if err.filename2:
            text += f" ({err.filename2})"
        return text
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    from safetensors import SafetensorError

    from westar.data import DataError

    parser = build_parser()
    args = parser.parse_args(argv)
    formatwarning = warnings.formatwarning
    if not os.environ.get("WESTAR_DEBUG"):  # "westar eval: warning: skipping x.png: ..."
        warnings.formatwarning = lambda message, *_, **__: (
            f"westar {args.command}: warning: {' '.join(str(message).split())}\n"
        )
    try:
        code = args._run(args)
    except (
        DataError,
        OSError,
        ValueError,
        ImportError,
        SafetensorError,
        FloatingPointError,
    ) as err:
        # OSError covers FileNotFoundError, FileExistsError, PermissionError,
        # IsADirectoryError, NotADirectoryError and disk-full errors; FloatingPointError a
        # non-finite training loss (its message names --lr).
        if os.environ.get("WESTAR_DEBUG"):
            raise
        print(f"westar {args.command}: error: {error_line(err)}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = formatwarning
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
