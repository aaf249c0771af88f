"""Checkpoints of the Trainer: save, load, resume (falling back past broken ones), prune,
and the final adapters. The file-level checks, the RNG files and the run lock are
westar.checkpoint's.

`CheckpointMixin` is part of `westar.train.Trainer` (it uses the Trainer's cfg,
accelerator, unwrapped model, teacher, output_dir, step and rank)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

from safetensors.torch import load_file, save_file

from westar.checkpoint import (
    CHECKPOINT_PREFIX,
    STATE_FILE,
    CheckpointError,
    RunLock,
    UnsafeCheckpointError,
    find_checkpoints,
    find_latest_checkpoint,
    rng_tensors,
    set_rng_from_tensors,
    verify_checkpoint,
)
from westar.outputs import replace_dir

__all__ = [
    "CheckpointMixin",
    "ADAPTER_DIR",
    "PATH_FIELDS",
    "RUN_FILES",
    "FINAL_DIRS",
    "check_run_folder",
    "refuse_finished_run",
    "write_text_atomic",
]

ADAPTER_DIR = "adapter"  # the student adapter inside a checkpoint (peft format)
# what a run writes in its folder besides checkpoints/ (never through a symbolic link)
RUN_FILES = ("config.json", "metrics.csv", "adapter", "teacher")
# the final adapters: a folder holding them and no checkpoint is a finished run whose
# checkpoints were pruned or deleted, never trained over
FINAL_DIRS = ("adapter", "teacher")
# config fields holding paths: compared as absolute paths when resuming
PATH_FIELDS = ("model", "data", "images_dir", "instances_dir", "pairs_file", "depth_dir")


class CheckpointMixin:
    """save_checkpoint / load_checkpoint / resume / save_final of a Trainer."""

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
                    try:
                        result = set_peft_model_state_dict(self.unwrapped, state)
                    except RuntimeError as err:  # a size mismatch: another rank or model
                        raise ValueError(
                            f"{path}: the checkpoint's adapter does not fit this model (another "
                            "--lora-rank, --lora-targets or --model?): "
                            f"{str(err).strip().splitlines()[-1][:200]}"
                        ) from err
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
        try:
            self._write_checkpoint(tmp)
            acc.wait_for_everyone()
            if acc.is_main_process:
                replace_dir(tmp, final)
        except Exception as err:  # disk full: no temporary folder left, the file named
            shutil.rmtree(tmp, ignore_errors=True)
            failed = _write_failed(err, final)
            if failed is None:
                raise
            raise failed from err
        if acc.is_main_process:
            self._prune()
        acc.wait_for_everyone()
        return final

    def _write_checkpoint(self, tmp: Path) -> None:
        acc = self.accelerator
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
        self._check_adapter_shape(path, state.get("config", {}))
        self._warn_if_config_differs(path, state.get("config", {}))
        # weights_only=True is accelerate's default; passed to make the rule explicit
        self.accelerator.load_state(str(path), load_kwargs={"weights_only": True})
        self.teacher.load_state_dict(load_file(str(path / "teacher.safetensors")))
        if rng_file.is_file():
            set_rng_from_tensors(load_file(str(rng_file)))
        self.step = step

    def _check_adapter_shape(self, path: Path, saved: dict) -> None:
        """The LoRA settings that shape the adapter's tensors must match (not a warning: the
        weights could not be loaded); ValueError naming the checkpoint and the flag."""
        if not isinstance(saved, dict):
            return
        for key in ("lora_rank", "lora_targets"):
            if key in saved and _comparable(key, saved[key]) != _comparable(
                key, getattr(self.cfg, key)
            ):
                flag = "--" + key.replace("_", "-")
                raise ValueError(
                    f"{path}: trained with {flag} {saved[key]}, this run has "
                    f"{getattr(self.cfg, key)}: resume with the same {flag}"
                )

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

    def save_final(self) -> None:
        """The final student and teacher adapters in <output_dir>/{adapter,teacher}."""
        acc = self.accelerator
        if acc.is_main_process:
            tmp = self.output_dir / ".tmp-final"
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            model = self.unwrapped
            try:
                model.save_pretrained(str(tmp / "adapter"))
                with self.teacher.swapped_in(model):
                    model.save_pretrained(str(tmp / "teacher"))
                for name in FINAL_DIRS:
                    replace_dir(tmp / name, self.output_dir / name)
            except Exception as err:
                failed = _write_failed(err, self.output_dir / "adapter")
                if failed is None:
                    raise
                raise failed from err
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()


def _comparable(key: str, value):
    """A config value as compared on resume: JSON form, paths made absolute."""
    if key in PATH_FIELDS and isinstance(value, str) and value:
        if key != "model" or Path(value).expanduser().exists():
            return str(Path(value).expanduser().resolve())
    return json.loads(json.dumps(value))


def check_run_folder(output_dir: Path) -> None:
    """Refuse symbolic links among the files a run writes (they would be written through)."""
    for name in (*RUN_FILES, "checkpoints", "tensorboard", RunLock.NAME):
        if (output_dir / name).is_symlink():
            raise FileExistsError(
                f"{output_dir / name}: is a symbolic link; westar never writes through links "
                "(remove it or choose another --out)"
            )


def refuse_finished_run(output_dir: Path) -> None:
    """A folder with the final adapters and no checkpoint is a finished run (checkpoints
    pruned or deleted): refused with or without --resume, its outputs would be lost."""
    if find_latest_checkpoint(output_dir) is None and (
        found := [n for n in FINAL_DIRS if (output_dir / n).exists()]
    ):
        raise FileExistsError(
            f"{output_dir} holds an earlier run ({', '.join(found)}) and no checkpoint "
            "to resume from: choose another --out (or delete that one)"
        )


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _write_failed(err: BaseException, target: Path) -> OSError | None:
    """A write error (disk full) as an OSError naming `target`; None for other errors.
    torch.save reports a full disk as a RuntimeError ("file write failed"), safetensors
    as its own error."""
    from safetensors import SafetensorError

    if isinstance(err, OSError):
        reason = err.strerror or str(err)
        return OSError(err.errno, f"cannot write ({reason})", str(target))
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, SafetensorError) or (isinstance(err, RuntimeError) and "write" in text):
        return OSError(None, f"cannot write ({text})", str(target))
    return None
