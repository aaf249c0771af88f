"""Fold a LoRA adapter into its base model and save a plain Hugging Face model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from westar.model import check_adapter, load_adapter, load_depth_model, resolve_model_name
from westar.outputs import check_output_folder, replace_dir

__all__ = ["merge_adapter"]


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
    model = resolve_model_name(model)
    adapter, output = Path(adapter), Path(output)
    check_adapter(adapter)
    protected = {"adapter": adapter}
    if Path(model).expanduser().exists():
        protected["base model"] = Path(model).expanduser()
    check_output_folder(output, overwrite, protected)
    depth_model = load_depth_model(model)
    merged = load_adapter(depth_model.model, adapter).merge_and_unload()
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
    except OSError as err:  # disk full: the old output stays, the folder is named
        reason = err.strerror or str(err)
        raise OSError(err.errno, f"cannot write the merged model ({reason})", str(output)) from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return output
