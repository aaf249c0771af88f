"""Fold a LoRA adapter into its base model and save a plain Hugging Face model."""

from __future__ import annotations

import shutil
from pathlib import Path

from westar.model import load_depth_model

__all__ = ["merge_adapter"]


def merge_adapter(model: str, adapter: str | Path, output: str | Path) -> Path:
    """Base `model` (hub id or directory) + peft `adapter` -> a plain model in `output`.

    The result loads with `AutoModelForDepthEstimation.from_pretrained(output)` without
    peft; the base model's preprocessor_config.json is copied along when it exists.
    """
    from peft import PeftModel

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter}: not a peft adapter (no adapter_config.json)")
    depth_model = load_depth_model(model)
    merged = PeftModel.from_pretrained(depth_model.model, str(adapter)).merge_and_unload()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(output))
    processor = Path(model) / "preprocessor_config.json"
    if processor.is_file():
        shutil.copy(processor, output / "preprocessor_config.json")
    elif not Path(model).exists():
        try:
            from transformers import AutoImageProcessor

            AutoImageProcessor.from_pretrained(model).save_pretrained(str(output))
        except Exception:  # no processor published: the model's ImageNet default applies
            pass
    return output
