"""Fold a LoRA adapter into its base model and save a plain Hugging Face model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from westar.checkpoint import replace_dir
from westar.model import load_depth_model

__all__ = ["merge_adapter", "check_output_folder"]


def check_output_folder(output: Path, overwrite: bool, protected: dict[str, Path]) -> None:
    """Refuse an output folder that would destroy data, before any work.

    `protected`: {what: folder} that must neither be `output` nor lie inside it, nor
    contain it (e.g. the base model). A non-empty existing `output` needs `overwrite`; an
    existing file or a symbolic link is always refused.
    """
    if output.is_symlink():
        raise FileExistsError(f"{output}: output is a symbolic link; give a real folder")
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"{output}: output exists and is not a folder")
    target = output.resolve()
    for what, folder in protected.items():
        folder = folder.resolve()
        if target == folder or folder in target.parents or target in folder.parents:
            raise ValueError(f"{output}: output would overwrite the {what} ({folder})")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{output}: output folder exists and is not empty; pass --overwrite to replace it"
        )


def merge_adapter(
    model: str, adapter: str | Path, output: str | Path, *, overwrite: bool = False
) -> Path:
    """Base `model` (hub id or directory) + peft `adapter` -> a plain model in `output`.

    The result loads with `AutoModelForDepthEstimation.from_pretrained(output)` without
    peft; the base model's preprocessor_config.json is copied along when it exists. It is
    written to a temporary folder next to `output` and renamed into place, so `output`
    is either the old folder or the complete new one. An existing non-empty `output` is
    only replaced with `overwrite`; the base model's and the adapter's folders never.
    """
    from peft import PeftModel
    from safetensors import SafetensorError

    adapter, output = Path(adapter), Path(output)
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter}: not a peft adapter (no adapter_config.json)")
    protected = {"adapter": adapter}
    if Path(model).expanduser().exists():
        protected["base model"] = Path(model).expanduser()
    check_output_folder(output, overwrite, protected)
    depth_model = load_depth_model(model)
    try:
        merged = PeftModel.from_pretrained(depth_model.model, str(adapter)).merge_and_unload()
    except SafetensorError as err:
        raise ValueError(f"{adapter}: unreadable adapter weights ({err})") from err
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".tmp-{output.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        merged.save_pretrained(str(tmp))
        processor = Path(model) / "preprocessor_config.json"
        if processor.is_file():
            shutil.copy(processor, tmp / "preprocessor_config.json")
        elif not Path(model).exists():
            try:
                from transformers import AutoImageProcessor

                AutoImageProcessor.from_pretrained(model).save_pretrained(str(tmp))
            except Exception:  # no processor published: the model's ImageNet default applies
                pass
        replace_dir(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return output
