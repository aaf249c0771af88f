"""One training step of the Trainer: the teacher's and the student's views and outputs,
the WeSTAR loss, the optimizer and EMA updates, and the non-finite check without a sync.

`StepMixin` is part of `westar.train.Trainer` (it uses the Trainer's cfg, accelerator,
model, teacher, depth, optimizer, scheduler, rank and world)."""

from __future__ import annotations

import contextlib

import torch

from westar.augment import step_generator, strong_augment, weak_augment
from westar.config import TrainConfig
from westar.losses import westar_loss
from westar.model import eval_mode, lora_layers, predict, set_train_mode
from westar.training.data import depth_target

__all__ = ["StepMixin", "augment_options"]

# the strong (student) view's photometric augmentation: TrainConfig fields, by name
AUGMENT_FIELDS = ("jitter", "hue", "blur_prob", "blur_sigma",
                  "noise_prob", "noise_std", "gray_prob")  # fmt: skip


def augment_options(cfg: TrainConfig) -> dict:
    """Keyword arguments of `westar.augment.strong_augment` from the config."""
    return {name: getattr(cfg, name) for name in AUGMENT_FIELDS}


class StepMixin:
    """predictions -> loss -> train_step; check_finite reports a non-finite step."""

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
            # on the device: a CPU result would leave pageable memory (a host sync)
            depth = batch["depth"].to(acc.device, non_blocking=True)
            teacher_out = depth_target(depth, cfg.output_space)
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
            strong = strong_augment(images, gen, **augment_options(cfg))
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
