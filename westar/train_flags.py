"""`westar train`'s flags: one per TrainConfig field, named by the CLI vocabulary
(westar.cli_flags), each with a one-line help and its default.

A field's flag is `--field-name` unless FLAG_NAMES renames it to the shared spelling
(output_dir -> --out, images_dir -> --images ...); the field names stay as they are, so
config.json files of earlier runs load unchanged. A new TrainConfig field needs a line in
HELP (tests/trainer/test_cli_vocabulary.py fails otherwise).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from westar.cli_flags import DEVICE_HELP, MODEL_HELP, deprecated_alias

__all__ = ["FLAG_NAMES", "HELP", "add_config_flags", "flag_of"]

# field -> flag, where the shared vocabulary spells it otherwise than the field
FLAG_NAMES = dict(
    output_dir="--out", images_dir="--images", instances_dir="--instances", pairs_file="--pairs",
    depth_dir="--depth",
)  # fmt: skip
# field -> its earlier flag, kept as a hidden alias for one release
OLD_FLAGS = {f: "--" + f.replace("_", "-") for f in FLAG_NAMES}

HELP: dict[str, str] = {
    "model": MODEL_HELP,
    "data": "dataset root holding images/, instances/, pairs.json (default: none; docs/formats.md)",
    "output_dir": "run folder: adapter/, teacher/, checkpoints/, metrics.csv",
    "images_dir": "image folder (default: <data>/images)",
    "instances_dir": "instance map folder (default: <data>/instances)",
    "pairs_file": "ordinal pairs JSON (default: <data>/pairs.json)",
    "holdout_pairs": "fraction of each image's pairs kept out of training to measure "
    "heldout_acc (0: none)",
    "holdout_every": "measure heldout_acc every N steps (and at the end)",
    "image_size": "training crop H [W] in pixels, multiples of the patch (default: the model's)",
    "output_space": "what the model predicts",
    "skip_bad": "skip unreadable or inconsistent samples with a warning",
    "lora_rank": "LoRA rank r",
    "lora_alpha": "LoRA alpha (scaling = alpha / r)",
    "lora_dropout": "dropout on the LoRA input",
    "lora_targets": "module names to adapt (default: the encoder's q/k/v projections)",
    "ema_decay": "EMA teacher decay per step",
    "lambda_st": "weight of the SA-HDN self-training loss",
    "lambda_w": "weight of the ordinal weak-label loss",
    "lambda_r": "weight of the LoRA weight regularizer",
    "hdn": "normalization contexts: instance maps (SA-HDN), a grid, or the global one",
    "grid": "grid levels in cells per side (--hdn grid)",
    "include_global": "add the global context to the instance contexts",
    "stats_grad": "gradient through the median/MAD statistics",
    "min_pixels": "contexts with fewer valid pixels are ignored",
    "ordinal_kind": "ordinal loss: hinge (margin) or logistic",
    "ordinal_norm": "ordinal loss on the output normalized per image (global) or raw",
    "margin": "hinge margin (normalized units with --ordinal-norm global)",
    "equal_weight": "weight of 'equal' pairs in the ordinal loss",
    "pseudo_label": "fit the student to the EMA teacher or to <data>/depth (an oracle)",
    "depth_dir": "ground-truth depth folder for --pseudo-label depth (default: <data>/depth)",
    "augment": "strong augmentation of the student's view",
    "weak_jitter": "brightness/contrast jitter of the teacher's view",
    "jitter": "brightness/contrast/saturation jitter of the student's view",
    "hue": "hue jitter of the student's view",
    "blur_prob": "probability of Gaussian blur on the student's view",
    "blur_sigma": "range of the blur sigma in pixels (MIN MAX)",
    "noise_prob": "probability of Gaussian noise on the student's view",
    "noise_std": "standard deviation of that noise (images in 0..1)",
    "gray_prob": "probability of grayscale on the student's view",
    "steps": "optimizer steps",
    "batch_size": "images per micro-batch and process",
    "lr": "AdamW learning rate (cosine annealed)",
    "weight_decay": "AdamW weight decay",
    "warmup_steps": "linear warm-up steps",
    "max_grad_norm": "gradient clipping norm; <= 0 disables clipping",
    "seed": "seed of data order, crops, augmentation and LoRA init",
    "mixed_precision": "autocast: auto = bf16/fp16 on GPU, no on CPU",
    "cpu": "",  # replaced by --device (see add_config_flags)
    "num_workers": "DataLoader processes; -1: min(4, cores - 1)",
    "grad_accum": "micro-batches per optimizer step",
    "gradient_checkpointing": "recompute encoder layers in the backward (saves memory)",
    "log_every": "read the losses back (a device sync) every N steps",
    "save_every": "write a checkpoint every N steps",
    "keep_checkpoints": "checkpoints kept (older ones are deleted)",
    "tensorboard": "log to <out>/tensorboard when tensorboard is installed",
    "progress": "progress bar",
    "resume": "",  # its own flag in westar.cli
    "ablation": "preset of the paper's ablation (westar.config.ABLATIONS); flags override it",
}


def flag_of(field: str) -> str:
    """The command-line flag of a TrainConfig field."""
    return FLAG_NAMES.get(field, "--" + field.replace("_", "-"))


def _kind(hint) -> dict:
    """argparse keywords (type / nargs / action) for a TrainConfig annotation."""
    base = hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None -> X
        base = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(base) is tuple:
        targs = typing.get_args(base)
        nargs = "+" if (len(targs) == 2 and targs[1] is Ellipsis) else len(targs)
        return {"type": targs[0], "nargs": nargs}
    return {"type": base}


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (defaults suppressed: only given flags override).

    Not transformers.HfArgumentParser: it hands a tuple field's annotation to argparse as
    the type of one string (`--grid 4 2`, `--image-size H W`, `--blur-sigma 0.1 2`,
    `--lora-targets` fail or split characters), and it fills every default, while
    --config and --ablation need to know which flags were given.
    """
    from westar.config import ABLATIONS, HDN_MODES, ORDINAL_NORMS, PSEUDO_LABELS, TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    choices = {
        "hdn": HDN_MODES,
        "pseudo_label": PSEUDO_LABELS,
        "ablation": tuple(ABLATIONS),
        "output_space": ("disparity", "depth"),
        "stats_grad": ("full", "scale", "none"),
        "ordinal_kind": ("margin", "logistic"),
        "ordinal_norm": ORDINAL_NORMS,
        "mixed_precision": ("auto", "no", "fp16", "bf16"),
    }
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("resume", "cpu"):
            continue
        default = getattr(defaults, f.name)
        text = HELP.get(f.name) or ""
        if f.name == "model":
            text += " (required unless --config names it)"
        elif "default" not in text:
            shown = "on" if default is True else "off" if default is False else default
            text += (
                f" (default: {' '.join(map(str, shown)) if isinstance(shown, tuple) else shown})"
            )
        kw = {"default": argparse.SUPPRESS, "help": text, **_kind(hints[f.name])}
        if f.name == "image_size":
            kw.update(nargs="+", metavar=("H", "W"))
        if f.name in choices:
            kw["choices"] = choices[f.name]
        if f.name in FLAG_NAMES:
            kw["metavar"] = FLAG_NAMES[f.name][2:].upper()
        p.add_argument(flag_of(f.name), dest=f.name, **kw)
        if f.name in OLD_FLAGS:
            deprecated_alias(p, OLD_FLAGS[f.name], flag_of(f.name), f.name, type=kw["type"])
    p.add_argument("--device", default=argparse.SUPPRESS, help=DEVICE_HELP.replace(
        "cuda:1 ...", "cuda (several GPUs: accelerate launch)"))  # fmt: skip
    deprecated_alias(p, "--cpu", "--device cpu", "device", nargs=0, const="cpu")
