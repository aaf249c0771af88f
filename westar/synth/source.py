"""The small source depth model shipped with the package (westar/assets/source_model).

A Depth Anything V2 architecture scaled down to train and adapt on a CPU, pretrained on
clean procedural scenes by scripts/pretrain_source.py (which regenerates it). Loading is
offline: the weights and config are package data.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["SOURCE_MODEL_DIR", "source_model_path", "load_source_model"]

SOURCE_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "source_model"


def source_model_path() -> Path:
    """Directory holding config.json and model.safetensors of the shipped source model."""
    if not (SOURCE_MODEL_DIR / "config.json").exists():
        raise FileNotFoundError(
            f"source model not found in {SOURCE_MODEL_DIR}; "
            "run scripts/pretrain_source.py to regenerate it"
        )
    return SOURCE_MODEL_DIR


def load_source_model(**kwargs):
    """Return (model, path): DepthAnythingForDepthEstimation in float32 eval mode, offline.

    Extra keyword arguments go to `from_pretrained`.
    """
    from transformers import DepthAnythingForDepthEstimation

    path = source_model_path()
    kwargs.setdefault("local_files_only", True)
    model = DepthAnythingForDepthEstimation.from_pretrained(str(path), **kwargs)
    return model.float().eval(), path
