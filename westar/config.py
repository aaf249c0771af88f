"""Training configuration: every weight and switch of WeSTAR, and the ablation presets.

`TrainConfig` is a plain dataclass; the CLI builds its flags from the fields (see
`westar.cli`), so a new field is a new flag. Ablations are presets that override a few
fields (`ABLATIONS`, applied by `westar.cli.config_from_args` before the explicit flags),
e.g. ``--ablation no_weak`` sets ``lambda_w = 0``; the paper's ablation ladder (`LADDER`)
is one table shared by the trainer, the demo and the sweep.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["TrainConfig", "LADDER", "ABLATIONS", "HDN_MODES", "PSEUDO_LABELS", "ORDINAL_NORMS"]

HDN_MODES = ("instances", "grid", "global")
PSEUDO_LABELS = ("teacher", "depth")
ORDINAL_NORMS = ("global", "raw")

# The paper's ablation ladder, one rung per row, each adding one piece to the previous:
# name -> (label, fields it overrides). The one definition of these names: `westar train
# --ablation NAME`, `westar demo --methods` and the benchmark sweep (westar.sweep) all
# read it. The zeros are part of a rung (a recipe's lambda_w does not turn weak labels on
# for plain self-training); "westar" overrides nothing: the paper's method is the default.
# The rungs below WeSTAR set lambda_st = 1: they are self-training (alone, the term's
# weight only scales the gradient, which AdamW undoes), and a recipe's lambda_st (its
# balance against the weak term, possibly 0) must not switch them off.
SELF_TRAINING_ONLY = {"lambda_st": 1.0, "lambda_w": 0.0, "lambda_r": 0.0}
LADDER: dict[str, tuple[str, dict[str, Any]]] = {
    "self_training": (  # plain self-training: global median/MAD context only
        "plain self-training",
        {"hdn": "global", **SELF_TRAINING_ONLY},
    ),
    "grid_hdn": (  # classic HDN: fixed grid contexts (+ the global one)
        "grid HDN",
        {"hdn": "grid", **SELF_TRAINING_ONLY},
    ),
    "sa_hdn": (  # SA-HDN: instance contexts (+ the global one)
        "SA-HDN",
        {"hdn": "instances", **SELF_TRAINING_ONLY},
    ),
    "sa_hdn_weak": ("+ weak labels", {"hdn": "instances", "lambda_st": 1.0, "lambda_r": 0.0}),
    "westar": ("+ regularization (WeSTAR)", {}),
}

# `--ablation` presets: name -> fields it overrides. The ladder's rungs, plus the
# leave-one-out variants of the full method under names of their own ("full" is
# "westar"; "no_reg" is "sa_hdn_weak" when the recipe's lambda_st is 1).
ABLATIONS: dict[str, dict[str, Any]] = {
    **{name: dict(fields) for name, (_, fields) in LADDER.items()},
    "full": {},
    "no_weak": {"lambda_w": 0.0},  # self-training + regularization, no ordinal labels
    "weak_only": {"lambda_st": 0.0, "lambda_r": 0.0},  # the weak labels and nothing else
    "no_reg": {"lambda_r": 0.0},  # self-training + weak labels, no LoRA regularizer
    "no_sa": {"hdn": "grid"},  # WeSTAR with grid contexts instead of instance contexts
}


@dataclass
class TrainConfig:
    """Everything `westar train` needs. Defaults follow the paper where it says."""

    # --- model and data
    model: str = "depth-anything/Depth-Anything-V2-Small-hf"  # hub id or local directory
    data: str = ""  # dataset root: images/, instances/, pairs.json (docs/formats.md)
    output_dir: str = "runs/westar"
    images_dir: str | None = None  # override <data>/images
    instances_dir: str | None = None  # override <data>/instances
    pairs_file: str | None = None  # override <data>/pairs.json
    # Fraction of each image's pairs kept out of training; the student's accuracy on them
    # (heldout_acc in metrics.csv, every holdout_every steps and at the end) tells whether
    # training helps without ground-truth depth (westar.holdout). 0: train on every pair.
    holdout_pairs: float = 0.0
    holdout_every: int = 100
    # (H, W) training resolution in multiples of the model's patch size (14 for Depth
    # Anything V2, 16 for DPT); None: the model's native size (518 / 384).
    image_size: tuple[int, int] | None = None
    output_space: str = "disparity"  # what the model predicts: "disparity" or "depth"
    skip_bad: bool = False  # skip unreadable/inconsistent samples with a warning

    # --- LoRA student and EMA teacher
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] | None = None  # None: discover q/k/v projections
    ema_decay: float = 0.996

    # --- loss
    lambda_st: float = 1.0
    # lambda_w weighs the ordinal term. With ordinal_norm="global" (the default) that term
    # is scale-free, so lambda_w means the same for every model (and every output scale);
    # with "raw" its size follows the model's output units. The default is the paper's;
    # a value tuned on one of the two forms does not carry over to the other.
    lambda_w: float = 0.001
    lambda_r: float = 1.0
    hdn: str = "instances"  # "instances" (SA-HDN), "grid" (classic HDN) or "global"
    grid: tuple[int, ...] = (4, 2)  # grid levels for hdn="grid"
    include_global: bool = True  # the global context in SA-HDN
    stats_grad: str = "full"  # "full" | "scale" | "none" (westar_ops.sa_hdn_loss)
    min_pixels: int = 1
    ordinal_kind: str = "margin"  # "margin" | "logistic"
    # "global": the ordinal loss of the student's output normalized per image by its global
    # median / mean absolute deviation (westar_ops.normalized_ordinal_ranking_loss, the
    # SA-HDN global context, same stats_grad); "raw": on the raw output (the old term).
    ordinal_norm: str = "global"
    # hinge margin: in normalized units (deviations of the image) with ordinal_norm
    # "global", in the model's output units with "raw"
    margin: float = 0.0
    equal_weight: float = 1.0
    # What the self-training term fits the student to: "teacher" (the EMA teacher's
    # prediction on the weak view: WeSTAR) or "depth" (the ground truth of <data>/depth,
    # as disparity 1/depth for output_space="disparity", invalid pixels unused, no teacher
    # pass): a supervised fine-tune with the same loss and LoRA budget, the oracle of the
    # benchmark sweep (docs/sweep.md). Not a WeSTAR setting.
    pseudo_label: str = "teacher"
    depth_dir: str | None = None  # override <data>/depth (pseudo_label="depth")

    # --- augmentation (strong = student, weak = teacher)
    augment: bool = True
    weak_jitter: float = 0.0  # brightness/contrast jitter of the teacher's view
    jitter: float = 0.4  # brightness / contrast / saturation of the strong view
    hue: float = 0.1
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    noise_prob: float = 0.5
    noise_std: float = 0.05
    gray_prob: float = 0.2

    # --- optimization
    steps: int = 1000
    batch_size: int = 4  # per process
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # <= 0 disables clipping
    seed: int = 0
    mixed_precision: str = "auto"  # "auto" (bf16/fp16 on GPU, no on CPU), "no", "fp16", "bf16"
    cpu: bool = False  # force CPU even when a GPU is visible
    num_workers: int = -1  # DataLoader processes that decode and resize; -1: min(4, cores - 1)
    grad_accum: int = 1  # micro-batches of batch_size per optimizer step
    gradient_checkpointing: bool = False  # recompute encoder layers in the backward (memory)

    # --- logging and checkpoints
    log_every: int = 10  # read the loss back (a device sync) every N steps and at the end
    save_every: int = 100
    keep_checkpoints: int = 2
    tensorboard: bool = True  # used when the tensorboard package is installed
    progress: bool = True
    resume: str | None = None  # "auto" (latest in output_dir) or a checkpoint directory

    ablation: str = "full"

    def __post_init__(self) -> None:
        self._check_types()
        if isinstance(self.image_size, int):
            self.image_size = (self.image_size, self.image_size)
        if self.image_size is not None:
            self.image_size = tuple(int(v) for v in self.image_size)
        self.grid = tuple(int(v) for v in self.grid)
        self.blur_sigma = tuple(float(v) for v in self.blur_sigma)
        if self.lora_targets is not None:
            self.lora_targets = tuple(self.lora_targets)
        self.validate()

    def _check_types(self) -> None:
        """Every field of the type its annotation says (a --config or --recipe JSON can hold
        anything): a ValueError naming the field and its flag."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            if f.name == "image_size" and _matches(value, int):
                continue  # one side for both
            if not _matches(value, hint):
                flag = "--" + f.name.replace("_", "-")
                raise ValueError(
                    f"{f.name} ({flag}) must be {_describe(hint)}, got {json.dumps(value)}"
                )

    def validate(self) -> None:
        # multiples of the model's patch size: checked by the Trainer once the model is loaded
        if self.image_size is not None and (
            len(self.image_size) != 2 or any(v <= 0 for v in self.image_size)
        ):
            raise ValueError(
                f"image_size must be (H, W) with positive sides, got {self.image_size}"
            )
        if not self.grid or any(v < 1 for v in self.grid):
            raise ValueError(f"grid levels must be >= 1 cells per side, got {self.grid}")
        if self.hdn not in HDN_MODES:
            raise ValueError(f"hdn must be one of {HDN_MODES}, got {self.hdn!r}")
        if self.ordinal_norm not in ORDINAL_NORMS:
            raise ValueError(
                f"ordinal_norm must be one of {ORDINAL_NORMS}, got {self.ordinal_norm!r}"
            )
        if self.output_space not in ("disparity", "depth"):
            raise ValueError(
                f"output_space must be 'disparity' or 'depth', got {self.output_space!r}"
            )
        if self.pseudo_label not in PSEUDO_LABELS:
            raise ValueError(
                f"pseudo_label must be one of {PSEUDO_LABELS}, got {self.pseudo_label!r}"
            )
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay}")
        if self.ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {tuple(ABLATIONS)}, got {self.ablation!r}")
        for name in ("lambda_st", "lambda_w", "lambda_r", "lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lambda_st == 0 and self.lambda_w == 0:
            raise ValueError(
                "lambda_st and lambda_w are both 0: nothing to train (the regularizer alone "
                "keeps the adapters at zero); set --lambda-st or --lambda-w above 0"
            )
        if self.seed < 0:
            raise ValueError(f"seed (--seed) must be >= 0, got {self.seed}")
        if self.steps < 1 or self.batch_size < 1 or self.lora_rank < 1 or self.grad_accum < 1:
            raise ValueError("steps, batch_size, grad_accum and lora_rank must be >= 1")
        if not 0.0 <= self.holdout_pairs < 1.0:
            raise ValueError(f"holdout_pairs must be in [0, 1), got {self.holdout_pairs}")
        if self.holdout_every < 1:
            raise ValueError(f"holdout_every must be >= 1, got {self.holdout_every}")
        if self.num_workers < -1:
            raise ValueError(f"num_workers must be >= 0 or -1 (auto), got {self.num_workers}")
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise ValueError(
                f"mixed_precision must be auto|no|fp16|bf16, got {self.mixed_precision!r}"
            )

    # paths -------------------------------------------------------------------------
    def resolved_images_dir(self) -> Path:
        return Path(self.images_dir) if self.images_dir else Path(self.data) / "images"

    def resolved_instances_dir(self) -> Path:
        return Path(self.instances_dir) if self.instances_dir else Path(self.data) / "instances"

    def resolved_depth_dir(self) -> Path:
        return Path(self.depth_dir) if self.depth_dir else Path(self.data) / "depth"

    def resolved_pairs_file(self) -> Path:
        return Path(self.pairs_file) if self.pairs_file else Path(self.data) / "pairs.json"

    # serialization -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k != "extra"}  # removed field, old runs
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {unknown}")
        return cls(**values)


def _matches(value: Any, hint: Any) -> bool:
    """`value` (from JSON or flags) fits the annotation: bool is not an int, an int is a
    float, floats are finite, a list is a tuple."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
    return True


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "null"
    if origin is tuple:
        plural = {int: "integers", float: "finite numbers", str: "strings"}.get(args[0], "values")
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {plural}"
        return f"a list of {len(args)} {plural}"
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    return names.get(hint, str(hint))
