"""The WeSTAR training loop (Hugging Face Accelerate).

One code path for CPU, one GPU and several GPUs (`accelerate launch` / `torchrun`):
`batch_size` is per process. Each step: the EMA teacher predicts pseudo-labels on a weak
view (no grad), the LoRA student predicts on a strong photometric view of the same
pixels, and the WeSTAR loss (westar.losses) is minimized with AdamW and a cosine
schedule; then the teacher's adapter weights follow the student's by EMA.

Reproducibility: the data order and the augmentations are functions of (seed, step,
rank) only, and checkpoints hold the adapters, the teacher, the optimizer, the scheduler,
the step and the RNG states, so `resume` reproduces an uninterrupted run exactly (CPU).

Output directory:

    <output_dir>/config.json            the TrainConfig of the run
    <output_dir>/metrics.csv            step, lr, loss, st, weak, reg, heldout_acc, seconds
    <output_dir>/tensorboard/           when tensorboard is installed
    <output_dir>/checkpoints/step_N/    adapter/ (student, peft format), teacher.safetensors,
                                        optimizer.bin, scheduler.bin (accelerate),
                                        rng_rank{R}.safetensors, state.json
    <output_dir>/.westar.lock           while a run trains into the folder
    <output_dir>/adapter/               final student adapter (PeftModel.from_pretrained)
    <output_dir>/teacher/               final EMA teacher adapter (same format)
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from westar.augment import step_generator, strong_augment, weak_augment
from westar.checkpoint import (
    CHECKPOINT_PREFIX,
    STATE_FILE,
    CheckpointError,
    RunLock,
    UnsafeCheckpointError,
    find_checkpoints,
    find_latest_checkpoint,
    refuse_existing_run,
    rng_tensors,
    set_rng_from_tensors,
    verify_checkpoint,
)
from westar.config import TrainConfig
from westar.data import AdaptationDataset, DataError, collate, list_images, load_pairs
from westar.ema import EMATeacher
from westar.holdout import HeldOutPairs, split_pairs
from westar.losses import westar_loss
from westar.model import (
    add_lora,
    enable_gradient_checkpointing,
    eval_mode,
    load_depth_model,
    lora_layers,
    predict,
    set_train_mode,
)
from westar.outputs import replace_dir

__all__ = ["Trainer", "train", "find_latest_checkpoint", "StepBatchSampler"]

CSV_FIELDS = ("step", "lr", "loss", "st", "weak", "reg", "heldout_acc", "seconds")
ADAPTER_DIR = "adapter"  # the student adapter inside a checkpoint (peft format)
# config fields holding paths: compared as absolute paths when resuming
PATH_FIELDS = ("model", "data", "images_dir", "instances_dir", "pairs_file", "depth_dir")


def _resolve_mixed_precision(cfg: TrainConfig) -> str:
    """auto: what `accelerate launch --mixed_precision` / `accelerate config` chose, else
    bf16 (fp16 without bf16 support) on a GPU and none on CPU."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    if cfg.cpu or not torch.cuda.is_available():
        return "no"
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched in ("no", "fp16", "bf16"):
        return launched
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _has_accelerator() -> bool:
    """A GPU-like device is visible. Without one, Accelerate must be told cpu=True, or
    under torchrun it sets up no process group (each process would train alone)."""
    if torch.cuda.is_available():
        return True
    for name in ("mps", "xpu"):
        backend = getattr(torch.backends, name, None) or getattr(torch, name, None)
        if backend is not None and getattr(backend, "is_available", lambda: False)():
            return True
    return False


class StepBatchSampler:
    """Batches of (dataset index, crop seed) as a function of (seed, step, rank) only.

    The global batch of micro-step m is positions [m*G, (m+1)*G) of an endless stream of
    epochs, each a permutation seeded by (seed, epoch); G = batch_size * world_size and
    rank r takes its slice. With gradient accumulation, optimizer step t is micro-steps
    t*accum ... t*accum + accum - 1. Starting at any step needs no saved iterator state.
    The crop seed of each item is derived from (seed, micro-step, rank, slot).
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, start: int, end: int, rank=0, world=1, accum=1
    ):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.end, self.rank, self.world = start, end, rank, world
        self.accum = max(1, int(accum))
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=gen).tolist()}
        return self._perms[epoch]

    def indices(self, micro_step: int) -> list[int]:
        g = self.batch_size * self.world
        first = micro_step * g + self.rank * self.batch_size
        return [self._perm(p // self.n)[p % self.n] for p in range(first, first + self.batch_size)]

    def crop_seeds(self, micro_step: int) -> list[int]:
        seq = np.random.SeedSequence([self.seed, micro_step, self.rank, 0x63726F70])
        return [int(v) for v in seq.generate_state(self.batch_size, np.uint32)]

    def __iter__(self):
        for micro in range(self.start * self.accum, self.end * self.accum):
            yield list(zip(self.indices(micro), self.crop_seeds(micro)))

    def __len__(self) -> int:
        return max(0, self.end - self.start) * self.accum


def depth_target(depth: torch.Tensor, output_space: str = "disparity") -> torch.Tensor:
    """Ground-truth depth (B, H, W) in meters as the self-training target of
    pseudo_label="depth": disparity 1/depth (or depth itself for a depth-output model),
    NaN where the depth is invalid (0 or non-finite), which the loss leaves unused."""
    depth = depth.float()
    ok = torch.isfinite(depth) & (depth > 0)
    value = 1.0 / torch.where(ok, depth, torch.ones_like(depth))
    if output_space == "depth":
        value = depth
    return torch.where(ok, value, torch.full_like(depth, float("nan")))


def resolve_num_workers(requested: int) -> int:
    """-1 (auto): decode and resize in min(4, cores - 1) worker processes (0 on one core)."""
    if requested >= 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(4, (cores or 1) - 1))


class Trainer:
    """Builds model, student, teacher, data and optimizer from a TrainConfig."""

    def __init__(self, cfg: TrainConfig, accelerator=None):
        from accelerate import Accelerator
        from transformers import get_cosine_schedule_with_warmup

        self.cfg = cfg
        self.accelerator = accelerator or Accelerator(
            mixed_precision=_resolve_mixed_precision(cfg), cpu=cfg.cpu or not _has_accelerator()
        )
        acc = self.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.world != launched:
            raise RuntimeError(
                f"launched as {launched} processes but Accelerate set up {self.world}: each "
                "process would train alone (on CPU, pass --device cpu)"
            )
        self.output_dir = Path(cfg.output_dir)
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise FileExistsError(
                f"{self.output_dir}: --out is an existing file, not a folder"
            )
        if not cfg.resume:  # before the model is loaded (minutes for a large one)
            refuse_existing_run(self.output_dir)
        images_dir = cfg.resolved_images_dir()
        if not images_dir.is_dir():  # before anything else: the likeliest user error
            raise DataError(images_dir, "image folder not found (--data ROOT needs ROOT/images)")

        self.heldout: HeldOutPairs | None = None
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.depth = load_depth_model(cfg.model)
        if cfg.image_size is None:  # the model's native size, recorded in the run's config
            cfg = self.cfg = dataclasses.replace(cfg, image_size=(self.depth.input_size,) * 2)
        self.depth.check_size(cfg.image_size)
        self.dataset = self._build_dataset()
        if cfg.gradient_checkpointing:  # recompute each encoder layer in the backward
            enable_gradient_checkpointing(self.depth.model)
        model = add_lora(
            self.depth.model,
            rank=cfg.lora_rank,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            targets=cfg.lora_targets,
        )
        self.teacher = EMATeacher(model, cfg.ema_decay)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        # The scheduler is stepped by hand once per optimizer step (not prepared by
        # Accelerate, which would step it once per process).
        self.scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.teacher.to(acc.device)
        self._register_checkpointing()
        self.step = 0
        self.nonfinite_step: torch.Tensor | None = None
        self.initial_heldout_acc: float | None = None
        self._lora_layers: list | None = None

    # ------------------------------------------------------------------ setup
    def _build_dataset(self) -> AdaptationDataset:
        cfg = self.cfg
        instances_dir = None
        if cfg.hdn == "instances" and cfg.lambda_st > 0:
            instances_dir = cfg.resolved_instances_dir()
            if not instances_dir.is_dir():
                raise DataError(
                    instances_dir,
                    "instance folder not found: make instance maps with `westar masks`, or "
                    "train with --hdn grid (classic HDN) / --hdn global",
                )
        pairs_file = pairs = None
        if cfg.lambda_w > 0 or cfg.holdout_pairs > 0:
            pairs_file = cfg.resolved_pairs_file()
            if not pairs_file.is_file():
                raise DataError(
                    pairs_file,
                    "ordinal pairs file not found: make one with `westar pairs`, or train "
                    "without weak labels (--ablation no_weak or --lambda-w 0)",
                )
        if cfg.holdout_pairs > 0:
            pairs, held = split_pairs(load_pairs(pairs_file), cfg.holdout_pairs, cfg.seed)
            images = {p.stem: p for p in list_images(cfg.resolved_images_dir())}
            self.heldout = HeldOutPairs(images, held, cfg.output_space)
            if self.heldout.num_pairs == 0:
                raise DataError(
                    pairs_file,
                    f"--holdout-pairs {cfg.holdout_pairs:g} holds out no ordered pair "
                    "(too few pairs per image): raise it or use 0",
                )
            if cfg.lambda_w == 0:  # held-out pairs measured, none trained on
                pairs_file = pairs = None
        depth_dir = None
        if cfg.pseudo_label == "depth":
            depth_dir = cfg.resolved_depth_dir()
            if not depth_dir.is_dir():
                raise DataError(
                    depth_dir, "depth folder not found (--pseudo-label depth trains on it)"
                )
        return AdaptationDataset(
            cfg.resolved_images_dir(),
            cfg.image_size,
            instances_dir=instances_dir,
            pairs_file=pairs_file,
            depth_dir=depth_dir,
            output_space=cfg.output_space,
            skip_bad=cfg.skip_bad,
            patch_size=self.depth.patch_size,
            crop="random",
            seed=cfg.seed,
            pairs=pairs,
        )

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def loader(self, start: int, end: int):
        """Micro-batches of steps [start, end): cfg.grad_accum per step."""
        cfg = self.cfg
        sampler = StepBatchSampler(
            len(self.dataset), cfg.batch_size, cfg.seed, start, end, self.rank, self.world,
            accum=cfg.grad_accum,
        )  # fmt: skip
        workers = resolve_num_workers(cfg.num_workers)
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=workers,
            pin_memory=self.accelerator.device.type == "cuda",
            prefetch_factor=4 if workers > 0 else None,
        )

    # ------------------------------------------------------------------ one step
    def predictions(self, batch: dict, step: int, augment: bool | None = None, micro: int = 0):
        """(student output, teacher output) for a batch, with the step's augmentations.

        The teacher runs with every dropout off (its pseudo-label is a fixed target), the
        student in training mode for LoRA dropout only (`set_train_mode`). With
        pseudo_label="depth" the target is the batch's ground truth (`depth_target`) and
        the teacher does not run; the weak view is still drawn, so the augmentations of
        the student stay the same function of (seed, step).
        """
        cfg, acc = self.cfg, self.accelerator
        augment = cfg.augment if augment is None else augment
        gen = step_generator(cfg.seed, step, self.rank, stream=micro)
        images = batch["image"].to(acc.device, non_blocking=True)
        unwrapped = self.unwrapped
        weak = weak_augment(images, gen, cfg.weak_jitter) if augment else images
        if cfg.pseudo_label == "depth":
            teacher_out = depth_target(batch["depth"], cfg.output_space).to(acc.device)
        else:
            with (
                torch.no_grad(),
                self.teacher.swapped_in(unwrapped),
                eval_mode(unwrapped),
                acc.autocast(),
            ):
                teacher_out = predict(unwrapped, self.depth, weak)
        strong = images
        if augment:
            strong = strong_augment(
                images,
                gen,
                jitter=cfg.jitter,
                hue=cfg.hue,
                blur_prob=cfg.blur_prob,
                blur_sigma=cfg.blur_sigma,
                noise_prob=cfg.noise_prob,
                noise_std=cfg.noise_std,
                gray_prob=cfg.gray_prob,
            )
        with acc.autocast():
            student_out = predict(self.model, self.depth, strong)
        return student_out, teacher_out

    def loss(self, batch: dict, step: int, augment: bool | None = None, micro: int = 0):
        """(total loss, parts): parts are detached 0-dim tensors (no device sync)."""
        student_out, teacher_out = self.predictions(batch, step, augment, micro)
        if self._lora_layers is None:  # the module walk, once (not per step)
            self._lora_layers = lora_layers(self.unwrapped)
        return westar_loss(
            student_out, teacher_out, batch, self.unwrapped, self.cfg, layers=self._lora_layers
        )

    def train_step(self, batch: dict | list[dict], step: int | None = None) -> dict:
        """One optimizer step over one batch (or a list of cfg.grad_accum micro-batches)
        and one teacher update.

        Returns the loss parts as detached 0-dim tensors on the device (averaged over the
        micro-batches) and "lr" as a float. Nothing here waits for the device: a
        non-finite loss is recorded in `self.nonfinite_step` (a device tensor) and
        reported by `check_finite`, which the loop calls when it logs or saves.
        """
        cfg, acc = self.cfg, self.accelerator
        step = self.step if step is None else step
        micro_batches = batch if isinstance(batch, list) else [batch]
        set_train_mode(self.model)
        n = len(micro_batches)
        parts: dict[str, torch.Tensor] = {}
        for m, mb in enumerate(micro_batches):
            last = m == n - 1
            ctx = contextlib.nullcontext() if last or self.world == 1 else acc.no_sync(self.model)
            with ctx:
                loss, mparts = self.loss(mb, step, micro=m)
                acc.backward(loss / n if n > 1 else loss)
            for k, v in mparts.items():
                parts[k] = v / n if k not in parts else parts[k] + v / n
        self._record_finite(parts["loss"], step)
        if cfg.max_grad_norm > 0:
            acc.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], cfg.max_grad_norm
            )
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.teacher.update(self.unwrapped)
        return dict(parts, lr=lr)

    def _record_finite(self, loss: torch.Tensor, step: int) -> None:
        """nonfinite_step <- step if loss is not finite and no earlier step was (no sync)."""
        bad = ~torch.isfinite(loss)
        if self.nonfinite_step is None:
            self.nonfinite_step = torch.full((), -1, dtype=torch.int64, device=loss.device)
        first = bad & (self.nonfinite_step < 0)
        self.nonfinite_step = torch.where(first, step, self.nonfinite_step)

    def check_finite(self) -> None:
        """Raise FloatingPointError if any step so far had a non-finite loss (one sync)."""
        if self.nonfinite_step is None:
            return
        bad = int(self.nonfinite_step)
        if bad >= 0:
            raise FloatingPointError(
                f"non-finite loss at step {bad} (found at step {self.step}); the last "
                f"checkpoint before it is intact: resume from it with a lower --lr"
            )

    # ------------------------------------------------------------------ checkpoints
    def _register_checkpointing(self) -> None:
        """Route accelerate's save_state/load_state through the pieces we keep small.

        The model's entry (accelerate would write the whole base model) is replaced by the
        student adapter in peft format (`adapter/`, peft's adapter state dict); the
        scheduler joins accelerate's list so it is saved with the optimizer. The EMA
        teacher and the RNG states are written here as safetensors, because accelerate's
        `register_for_checkpointing` objects are reloaded with `torch.load(weights_only=
        False)` and its RNG file is a pickle (see westar.checkpoint).
        """
        acc = self.accelerator
        # prepare_scheduler only adds it to accelerate's checkpointed list; the trainer
        # keeps stepping the plain scheduler once per optimizer step.
        acc.prepare_scheduler(self.scheduler)

        def save_student(models, weights, output_dir):
            for i, model in enumerate(models):
                if acc.unwrap_model(model) is self.unwrapped:
                    weights.pop(i)
                    if acc.is_main_process:
                        self.unwrapped.save_pretrained(str(Path(output_dir) / ADAPTER_DIR))
                    break

        def load_student(models, input_dir):
            from peft import set_peft_model_state_dict

            for i, model in enumerate(models):
                if acc.unwrap_model(model) is self.unwrapped:
                    models.pop(i)
                    path = Path(input_dir) / ADAPTER_DIR / "adapter_model.safetensors"
                    state = load_file(str(path))
                    expected = {n for n, _ in self.unwrapped.named_parameters() if "lora_" in n}
                    result = set_peft_model_state_dict(self.unwrapped, state)
                    missing = sorted(n for n in result.missing_keys if n in expected)
                    if missing or result.unexpected_keys:
                        raise CheckpointError(
                            f"{path}: adapter tensors do not match the model: "
                            f"{(missing or result.unexpected_keys)[:3]}"
                        )
                    break

        acc.register_save_state_pre_hook(save_student)
        acc.register_load_state_pre_hook(load_student)

    def save_checkpoint(self) -> Path | None:
        """checkpoints/step_N via accelerate's save_state into a temp folder, then one rename."""
        acc = self.accelerator
        root = self.output_dir / "checkpoints"
        final = root / f"{CHECKPOINT_PREFIX}{self.step:08d}"
        tmp = root / f".tmp-{final.name}"
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        # accelerate's own RNG file is a pickle: replaced by a safetensors one per rank
        (tmp / f"random_states_{self.rank}.pkl").unlink(missing_ok=True)
        save_file(rng_tensors(), str(tmp / f"rng_rank{self.rank}.safetensors"))
        if acc.is_main_process:
            save_file(
                {n: t.cpu() for n, t in self.teacher.state_dict().items()},
                str(tmp / "teacher.safetensors"),
            )
            state = {"step": self.step, "world_size": self.world, "config": self.cfg.to_dict()}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        acc.wait_for_everyone()
        if acc.is_main_process:
            replace_dir(tmp, final)
            self._prune()
        acc.wait_for_everyone()
        return final

    def _prune(self) -> None:
        keep = self.cfg.keep_checkpoints
        if keep > 0:
            for p in find_checkpoints(self.output_dir)[keep:]:
                shutil.rmtree(p, ignore_errors=True)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore everything from a checkpoint; CheckpointError (naming the file) if broken.

        Every file is read and checked before anything is restored (a pickle holding
        more than tensors raises UnsafeCheckpointError and is never unpickled).
        """
        path = Path(path)
        if not (path / STATE_FILE).is_file():
            raise CheckpointError(f"{path}: not a westar checkpoint (no {STATE_FILE})")
        try:
            state = json.loads((path / STATE_FILE).read_text())
            step = int(state["step"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path / STATE_FILE}: unreadable ({err})") from err
        rng_file = path / f"rng_rank{self.rank}.safetensors"
        required = (
            f"{ADAPTER_DIR}/adapter_model.safetensors",
            "teacher.safetensors",
            "optimizer.bin",
            "scheduler.bin",
        )
        verify_checkpoint(path, required)
        self._warn_if_config_differs(path, state.get("config", {}))
        # weights_only=True is accelerate's default; passed to make the rule explicit
        self.accelerator.load_state(str(path), load_kwargs={"weights_only": True})
        self.teacher.load_state_dict(load_file(str(path / "teacher.safetensors")))
        if rng_file.is_file():
            set_rng_from_tensors(load_file(str(rng_file)))
        self.step = step

    def _warn_if_config_differs(self, path: Path, saved: dict) -> None:
        # where the run lives and how it reports do not change its results
        ignore = {"resume", "progress", "steps", "save_every", "log_every", "keep_checkpoints"}
        ignore |= {"output_dir", "tensorboard", "num_workers"}
        current = self.cfg.to_dict()
        # checkpoints from before the field existed trained the raw ordinal term
        if saved and "ordinal_norm" not in saved:
            saved = {**saved, "ordinal_norm": "raw"}
        differs = sorted(
            k
            for k, v in current.items()
            if k not in ignore and k in saved and _comparable(k, v) != _comparable(k, saved[k])
        )
        if differs:
            warnings.warn(
                f"resuming {path} with a different configuration for {differs}; the run "
                "will not match an uninterrupted one",
                stacklevel=3,
            )

    def resume(self) -> None:
        """Apply cfg.resume: "auto" = the latest complete checkpoint that loads (falling
        back to older ones with a warning), or an explicit checkpoint folder."""
        cfg, main = self.cfg, self.accelerator.is_main_process
        if cfg.resume != "auto":
            self.load_checkpoint(cfg.resume)
            if main:
                print(f"westar: resumed from {cfg.resume} at step {self.step}")
            return
        candidates = find_checkpoints(self.output_dir)
        for ckpt in candidates:
            try:
                self.load_checkpoint(ckpt)
            except UnsafeCheckpointError:
                raise
            except CheckpointError as err:
                warnings.warn(
                    f"skipping broken checkpoint: {err}; trying the previous one", stacklevel=2
                )
                continue
            if main:
                print(f"westar: resumed from {ckpt} at step {self.step}")
            return
        if candidates:
            raise CheckpointError(
                f"{self.output_dir}: no checkpoint could be resumed from (all "
                f"{len(candidates)} broken, see the warnings)"
            )
        if main:
            print(f"westar: no checkpoint in {self.output_dir}, starting from step 0")

    # ------------------------------------------------------------------ loop
    def fit(self, stop_after: int | None = None) -> dict:
        """Train to cfg.steps (or stop after step `stop_after`, for interrupted runs)."""
        main = self.accelerator.is_main_process
        lock = RunLock(self.output_dir)
        if main:  # one run per output folder: taken before anything in it is read or written
            self.output_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        try:
            return self._fit(stop_after)
        finally:
            lock.release()

    def _fit(self, stop_after: int | None) -> dict:
        cfg, acc = self.cfg, self.accelerator
        main = acc.is_main_process
        if cfg.resume:
            self.resume()
        else:  # again under the lock: another run may have written meanwhile
            refuse_existing_run(self.output_dir)
        end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
        if main:
            (self.output_dir / "config.json").write_text(cfg.to_json())
        logger = _MetricsLogger(self.output_dir, self.step, cfg.tensorboard) if main else None
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.steps, initial=self.step, disable=not (main and cfg.progress), desc="westar"
        )
        last: dict = {}
        if self.heldout is not None and self.step == 0 and logger is not None:
            self.initial_heldout_acc = self.heldout_accuracy()  # the source's, before training
            logger.log({"step": 0, "heldout_acc": self.initial_heldout_acc})
        t0 = time.perf_counter()
        log_every = max(cfg.log_every, 1)
        pending: list[dict] = []  # micro-batches of the current step
        try:
            for micro_batch in self.loader(self.step, end):
                pending.append(micro_batch)
                if len(pending) < cfg.grad_accum:
                    continue
                batches, pending = [b for b in pending if b is not None], []
                if self.world > 1 and cfg.skip_bad:  # ranks must agree, or one would wait
                    have = torch.tensor([1.0 if batches else 0.0], device=acc.device)
                    if float(acc.reduce(have, reduction="sum")) < self.world:
                        batches = []
                if not batches:  # every sample of this step (on some rank) was skipped
                    self.scheduler.step()  # the schedule stays a function of the step
                    self.step += 1
                    bar.update(1)
                else:
                    parts = self.train_step(batches, self.step)
                    self.step += 1
                    bar.update(1)
                    held_due = self.heldout is not None and (
                        self.step % cfg.holdout_every == 0 or self.step == end
                    )
                    if self.step % log_every == 0 or self.step == end or held_due:
                        if held_due:
                            parts = dict(parts, heldout_acc=self.heldout_accuracy())
                        last = self._log(parts, bar, logger, time.perf_counter() - t0)
                if self.step % max(cfg.save_every, 1) == 0 or self.step == cfg.steps:
                    self.check_finite()  # never checkpoint weights a NaN step has touched
                    self.save_checkpoint()
            self.check_finite()
        finally:
            bar.close()
            if logger is not None:
                logger.close()
        if self.step >= cfg.steps:
            self.save_final()
        return last

    def heldout_accuracy(self) -> float | None:
        """The student's accuracy on the held-out pairs (westar.holdout; every rank
        computes it, with no collective)."""
        size = min(self.cfg.image_size)
        with self.accelerator.autocast():
            return self.heldout.accuracy(self.unwrapped, self.depth, size, self.accelerator.device)

    def _log(self, parts: dict, bar, logger, seconds: float) -> dict:
        """Read the step's loss parts (the one device sync of a logged step) and log them."""
        keys = ("loss", "st", "weak", "reg")
        vals = torch.stack([parts[k].float() for k in keys])
        if self.world > 1:
            vals = self.accelerator.reduce(vals, reduction="mean")
        row = dict(zip(keys, vals.tolist()))
        self.check_finite()
        row.update(lr=parts["lr"], step=self.step, seconds=seconds)
        if parts.get("heldout_acc") is not None:
            row["heldout_acc"] = parts["heldout_acc"]
        bar.set_postfix({k: f"{row[k]:.4g}" for k in keys}, refresh=False)
        if logger is not None:
            logger.log(row)
        return row

    def save_final(self) -> None:
        """The final student and teacher adapters in <output_dir>/{adapter,teacher}."""
        acc = self.accelerator
        if acc.is_main_process:
            tmp = self.output_dir / ".tmp-final"
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            model = self.unwrapped
            model.save_pretrained(str(tmp / "adapter"))
            with self.teacher.swapped_in(model):
                model.save_pretrained(str(tmp / "teacher"))
            for name in ("adapter", "teacher"):
                replace_dir(tmp / name, self.output_dir / name)
            shutil.rmtree(tmp)
        acc.wait_for_everyone()


class _MetricsLogger:
    """metrics.csv (rows after a resumed step are dropped) and TensorBoard if installed."""

    def __init__(self, output_dir: Path, start_step: int, tensorboard: bool):
        self.path = output_dir / "metrics.csv"
        rows, broken = [], 0
        if self.path.is_file():
            with self.path.open(newline="") as f:
                for row in csv.DictReader(f):
                    try:
                        step = int(row["step"])
                    except (KeyError, TypeError, ValueError):
                        broken += 1
                        continue
                    if step <= start_step and None not in row and None not in row.values():
                        rows.append(row)
                    elif step <= start_step:
                        broken += 1
        if broken:
            warnings.warn(f"{self.path}: dropped {broken} unreadable rows", stacklevel=3)
        self.file = self.path.open("w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=CSV_FIELDS, extrasaction="ignore")
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.file.flush()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                self.tb = None

    def log(self, row: dict) -> None:
        self.writer.writerow(row)
        self.file.flush()
        if self.tb is not None:
            for k in ("loss", "st", "weak", "reg", "lr", "heldout_acc"):
                if row.get(k) is not None:
                    self.tb.add_scalar(f"train/{k}", row[k], row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _comparable(key: str, value):
    """A config value as compared on resume: JSON form, paths made absolute."""
    if key in PATH_FIELDS and isinstance(value, str) and value:
        if key != "model" or Path(value).expanduser().exists():
            return str(Path(value).expanduser().resolve())
    return json.loads(json.dumps(value))


def train(cfg: TrainConfig, stop_after: int | None = None) -> dict:
    """Run (or resume) a training run; returns the last step's metrics."""
    return Trainer(cfg).fit(stop_after=stop_after)
