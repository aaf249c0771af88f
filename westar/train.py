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

The pieces live in westar.training: `data` (dataset, batch order, loader), `step` (one
optimizer step: `StepMixin`), `checkpoints` (save, load, resume, final adapters:
`CheckpointMixin`) and `metrics` (metrics.csv, TensorBoard). This module builds the
Trainer from a TrainConfig and runs the loop.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

import numpy as np
import torch

from westar.checkpoint import RunLock, find_latest_checkpoint, refuse_existing_run
from westar.config import TrainConfig
from westar.ema import EMATeacher
from westar.model import add_lora, enable_gradient_checkpointing, load_depth_model
from westar.training.checkpoints import (
    CheckpointMixin,
    check_run_folder,
    refuse_finished_run,
    write_text_atomic,
)
from westar.training.data import (
    StepBatchSampler,
    build_dataset,
    depth_target,
    make_loader,
    resolve_num_workers,
)
from westar.training.metrics import MetricsLogger
from westar.training.setup import check_before_loading, make_accelerator
from westar.training.step import StepMixin

__all__ = ["Trainer", "train", "find_latest_checkpoint", "StepBatchSampler"]
# also importable from here, as before the split: depth_target, resolve_num_workers
_COMPAT = (depth_target, resolve_num_workers)


class Trainer(StepMixin, CheckpointMixin):
    """Builds model, student, teacher, data and optimizer from a TrainConfig; `fit` trains."""

    def __init__(self, cfg: TrainConfig, accelerator=None):
        from transformers import get_cosine_schedule_with_warmup

        self.cfg = cfg
        self.accelerator = acc = accelerator or make_accelerator(cfg)
        self.rank, self.world = acc.process_index, acc.num_processes
        self.output_dir = Path(cfg.output_dir)
        check_before_loading(cfg)  # the likeliest user errors, before minutes of loading
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.depth = load_depth_model(cfg.model)
        if cfg.image_size is None:  # the model's native size, recorded in the run's config
            cfg = self.cfg = dataclasses.replace(cfg, image_size=(self.depth.input_size,) * 2)
        self.depth.check_size(cfg.image_size)
        self.dataset, self.heldout = build_dataset(cfg, self.depth.patch_size)
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

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def loader(self, start: int, end: int):
        """Micro-batches of steps [start, end): cfg.grad_accum per step."""
        pin = self.accelerator.device.type == "cuda"
        return make_loader(self.dataset, self.cfg, start, end, self.rank, self.world, pin)

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
        check_run_folder(self.output_dir)
        refuse_finished_run(self.output_dir)  # again under the lock
        if cfg.resume:
            self.resume()
        else:  # again under the lock: another run may have written meanwhile
            refuse_existing_run(self.output_dir)
        end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
        if main:
            write_text_atomic(self.output_dir / "config.json", cfg.to_json())
        logger = MetricsLogger(self.output_dir, self.step, cfg.tensorboard) if main else None
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.steps, initial=self.step, disable=not (main and cfg.progress), desc="westar"
        )
        last: dict = {}
        if self.heldout is not None and self.step == 0 and logger is not None:
            self.initial_heldout_acc = self.heldout_accuracy()  # the source's, before training
            logger.log({"step": 0, "heldout_acc": self.initial_heldout_acc})
        t0 = time.perf_counter()
        try:
            for batches in self._step_batches(self.loader(self.step, end)):
                last = self._one_step(batches, end, bar, logger, t0) or last
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

    def _step_batches(self, loader):
        """The micro-batches of each optimizer step: cfg.grad_accum of them, skipped
        samples (None) dropped; [] when some rank has none left (every rank then skips)."""
        acc, pending = self.accelerator, []
        for micro_batch in loader:
            pending.append(micro_batch)
            if len(pending) < self.cfg.grad_accum:
                continue
            batches, pending = [b for b in pending if b is not None], []
            if self.world > 1 and self.cfg.skip_bad:  # ranks must agree, or one would wait
                have = torch.tensor([1.0 if batches else 0.0], device=acc.device)
                if float(acc.reduce(have, reduction="sum")) < self.world:
                    batches = []
            yield batches

    def _one_step(self, batches: list[dict], end: int, bar, logger, t0: float) -> dict | None:
        """Train one step (a step without batches only advances the schedule, which stays
        a function of the step); returns the logged row when one is due."""
        cfg = self.cfg
        if not batches:
            self.scheduler.step()
            self.step += 1
            bar.update(1)
            return None
        parts = self.train_step(batches, self.step)
        self.step += 1
        bar.update(1)
        held_due = self.heldout is not None and (
            self.step % cfg.holdout_every == 0 or self.step == end
        )
        if not (self.step % max(cfg.log_every, 1) == 0 or self.step == end or held_due):
            return None
        if held_due:
            parts = dict(parts, heldout_acc=self.heldout_accuracy())
        return self._log(parts, bar, logger, time.perf_counter() - t0)

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


def train(cfg: TrainConfig, stop_after: int | None = None) -> dict:
    """Run (or resume) a training run; returns the last logged step's metrics (and
    "heldout_acc_start", the accuracy before training, when pairs were held out)."""
    trainer = Trainer(cfg)
    last = trainer.fit(stop_after=stop_after)
    if trainer.initial_heldout_acc is not None:
        last = dict(last, heldout_acc_start=trainer.initial_heldout_acc)
    return last
