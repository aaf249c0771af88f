"""Before the model is loaded: the Accelerator a run needs, and the checks of its output
folder and images that must fail in a second, not after minutes of loading."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from westar.checkpoint import refuse_existing_run
from westar.config import TrainConfig
from westar.data import DataError
from westar.training.checkpoints import check_run_folder, refuse_finished_run

__all__ = ["make_accelerator", "check_before_loading"]


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


def make_accelerator(cfg: TrainConfig):
    """Accelerate's Accelerator for the run (mixed precision and CPU as configured);
    RuntimeError when launched as N processes that Accelerate does not see as N."""
    from accelerate import Accelerator

    acc = Accelerator(
        mixed_precision=_resolve_mixed_precision(cfg), cpu=cfg.cpu or not _has_accelerator()
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and acc.num_processes != launched:
        raise RuntimeError(
            f"launched as {launched} processes but Accelerate set up {acc.num_processes}: "
            "each process would train alone (on CPU, pass --device cpu)"
        )
    return acc


def check_before_loading(cfg: TrainConfig) -> None:
    """--out is a folder without a run in it (unless resuming), the image folder exists."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: --out is an existing file, not a folder")
    if out.is_dir():
        check_run_folder(out)
        refuse_finished_run(out)  # with or without --resume
    if not cfg.resume:
        refuse_existing_run(out)
    images_dir = cfg.resolved_images_dir()
    if not images_dir.is_dir():
        raise DataError(images_dir, "image folder not found (--data ROOT needs ROOT/images)")
