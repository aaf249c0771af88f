"""westar: WeSTAR adaptation of monocular depth foundation models (trainer).

Weakly-supervised Self-Training Adaptation with Regularization (AAAI 2026): a LoRA
student and an EMA teacher on a Hugging Face depth model (Depth Anything V2, DPT/MiDaS),
trained with SA-HDN self-training, ordinal weak labels and LoRA weight regularization
from the `westar_ops` kernels. Command line: `westar {train, eval, predict, masks, pairs,
merge, corrupt, demo, annotate, bench, sweep}` (`westar COMMAND --help`).

Heavy dependencies (transformers, peft, accelerate) are imported on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "TrainConfig": "westar.config",
    "ABLATIONS": "westar.config",
    "LADDER": "westar.config",
    "AdaptationDataset": "westar.data",
    "DataError": "westar.data",
    "collate": "westar.data",
    "relation_to_label": "westar.data",
    "load_pairs": "westar.data",
    "read_depth": "westar.data",
    "strong_augment": "westar.augment",
    "weak_augment": "westar.augment",
    "load_depth_model": "westar.model",
    "find_attention_projections": "westar.model",
    "add_lora": "westar.model",
    "predict": "westar.model",
    "EMATeacher": "westar.ema",
    "westar_loss": "westar.losses",
    "lora_regularizer": "westar.losses",
    "Trainer": "westar.train",
    "train": "westar.train",
    "find_latest_checkpoint": "westar.train",
    "evaluate": "westar.evaluate",
    "image_metrics": "westar.evaluate",
    "make_instance_maps": "westar.masks",
    "make_pairs_file": "westar.pairs",
    "sample_pairs": "westar.pairs",
    "merge_adapter": "westar.merge",
    "predict_folder": "westar.predict",
    "resize_keep_aspect": "westar.data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'westar' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
