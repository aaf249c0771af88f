"""Hugging Face depth models with LoRA students.

- `load_depth_model`: any `AutoModelForDepthEstimation` checkpoint (Depth Anything V2,
  DPT/MiDaS, ...) by hub id or local directory, plus its input normalization, patch size
  (inputs must be multiples of it: 14 for Dinov2, 16 for DPT's ViT) and native input size.
- `find_attention_projections`: the encoder's attention projections, discovered from the
  loaded modules (transformers 5 Dinov2: q_proj/k_proj/v_proj; DPT ViT: query/key/value).
- `add_lora`: peft LoRA on those projections, everything else frozen.
- `enable_gradient_checkpointing`: transformers' switch on the encoder layers.
- `predict`: the model's output (disparity for these models) as (B, H, W) at input size.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DepthModel",
    "load_depth_model",
    "resolve_model_name",
    "model_patch_size",
    "model_input_size",
    "find_attention_projections",
    "add_lora",
    "lora_layers",
    "adapter_delta_sq_norm",
    "check_adapter",
    "load_adapter",
    "predict",
    "set_train_mode",
    "eval_mode",
    "enable_gradient_checkpointing",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Leaf names of query/key/value projections across transformers versions and ViT flavours.
PROJECTION_NAMES = {
    "q": ("q_proj", "query", "q"),
    "k": ("k_proj", "key", "k"),
    "v": ("v_proj", "value", "v"),
}
FUSED_PROJECTION_NAMES = ("qkv",)
_ATTENTION_PATH = re.compile(r"(^|\.)(attention|attn|self_attn|self_attention)(\.|$)")


class DepthModel:
    """A loaded depth model and what is needed to feed it."""

    def __init__(self, model: nn.Module, mean, std, source: str):
        self.model = model
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.source = source
        self.patch_size = model_patch_size(model)
        self.input_size = model_input_size(model)
        self._norm: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def check_size(self, size: tuple[int, int], what: str = "image_size") -> None:
        """A clear error unless (H, W) are positive multiples of the patch size (a ViT
        drops the remainder silently, which would misalign outputs and labels)."""
        p = self.patch_size
        if len(size) != 2 or any(v <= 0 or v % p for v in size):
            hint = self.input_size
            raise ValueError(
                f"{what} {tuple(size)} must be (H, W) in positive multiples of {p}, the patch "
                f"size of {type(self.model).__name__} ({self.source}); e.g. {hint} {hint}"
            )

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB (B, 3, H, W) -> model input.

        mean and std are made once per (device, dtype): on a GPU a tensor built from
        Python numbers is a blocking copy, which would make every step wait for the device.
        """
        key = (images.device, images.dtype)
        if key not in self._norm:
            self._norm[key] = tuple(
                torch.tensor(v, dtype=images.dtype).view(1, 3, 1, 1).to(images.device)
                for v in (self.mean, self.std)
            )
        mean, std = self._norm[key]
        return (images - mean) / std


def _read_normalization(name_or_path: str, local_only: bool) -> tuple[tuple, tuple]:
    path = Path(name_or_path)
    cfg_file = path / "preprocessor_config.json"
    if path.is_dir():
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise ValueError(
                    f"{cfg_file}: cannot read the preprocessor config ({err})"
                ) from err
            mean = cfg.get("image_mean", IMAGENET_MEAN)
            std = cfg.get("image_std", IMAGENET_STD)
        else:
            return IMAGENET_MEAN, IMAGENET_STD
    else:
        from transformers import AutoImageProcessor

        try:
            proc = AutoImageProcessor.from_pretrained(name_or_path, local_files_only=local_only)
        except OSError:  # no preprocessor_config.json published: the ViT default
            return IMAGENET_MEAN, IMAGENET_STD
        mean, std = getattr(proc, "image_mean", None), getattr(proc, "image_std", None)
        if mean is None or std is None:
            return IMAGENET_MEAN, IMAGENET_STD
    mean, std = tuple(mean), tuple(std)
    if len(mean) != 3 or len(std) != 3 or not all(float(v) > 0 for v in std):
        raise ValueError(
            f"{name_or_path}: image_mean / image_std must be 3 numbers (std > 0), "
            f"got {mean} / {std}"
        )
    return mean, std


def _looks_like_path(name: str) -> bool:
    """A local path rather than a hub id ("namespace/name" or "name")."""
    return (
        name.startswith(("/", "./", "../", "~"))
        or name.count("/") > 1
        or "\\" in name
        or name in (".", "..")
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub endpoint accepts a TCP connection (False when offline).

    Checked before loading a hub id so that a typo offline fails at once instead of after
    the hub client's retries (about 50 s); nothing is downloaded here.
    """
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:  # in a thread: name resolution ignores socket timeouts
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(ok)


SOURCE_MODEL_NAME = "source"  # --model source: the small model shipped with the package


def resolve_model_name(name_or_path: str) -> str:
    """The name "source" -> the shipped model's folder (westar/assets/source_model); any other hub
    id or path unchanged."""
    if str(name_or_path) == SOURCE_MODEL_NAME:
        from westar.synth.source import source_model_path

        return str(source_model_path())
    return str(name_or_path)


@contextlib.contextmanager
def _no_loading_bar(local: bool) -> Iterator[None]:
    """Without transformers' "Loading weights" bar for a local model (a fraction of a
    second of noise on every command); a download from the hub keeps its bars."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if local and was:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if local and was:
            hf_logging.enable_progress_bar()


def load_depth_model(
    name_or_path: str, *, local_files_only: bool = False, dtype: torch.dtype | None = None
) -> DepthModel:
    """Load a depth-estimation checkpoint by hub id, local directory or "source" (the
    shipped model, `resolve_model_name`); no peft yet.

    A missing directory, a directory without config.json, or a hub id that cannot be
    loaded (offline and not cached, or not a depth model) raise FileNotFoundError /
    ValueError naming it.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForDepthEstimation

    name_or_path = resolve_model_name(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a Hugging Face model directory (no config.json)")
        name_or_path = str(path)
    elif _looks_like_path(name_or_path):
        raise FileNotFoundError(f"{name_or_path}: model directory not found")
    local = local_files_only or path.exists() or not hub_reachable()
    kwargs = {"local_files_only": local}
    if local:  # transformers 5 does not pass local_files_only on to its adapter lookup
        kwargs["adapter_kwargs"] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        with _no_loading_bar(local):
            model = AutoModelForDepthEstimation.from_pretrained(name_or_path, **kwargs)
    except OSError as err:  # not on the hub / offline and not cached / unreadable weights
        if path.exists():
            what = ""
        elif local:
            what = " (not a local directory, and not in the hub cache; the hub is not reachable)"
        else:
            what = " (not a local directory; as a hub id"
        detail = " ".join(str(err).split())
        raise FileNotFoundError(
            f"{name_or_path}: cannot load the model{what}: {detail}{')' if what.endswith('id') else ''}"
        ) from err
    except SafetensorError as err:  # truncated or corrupt weights file
        raise ValueError(f"{name_or_path}: unreadable model weights ({err})") from err
    except ValueError as err:  # e.g. a config that is not a depth-estimation model
        raise ValueError(f"{name_or_path}: not a depth-estimation model ({err})") from err
    mean, std = _read_normalization(str(name_or_path), local)
    return DepthModel(model, mean, std, str(name_or_path))


def _config_int(value) -> int | None:
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    return (
        int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
    )


def model_patch_size(model: nn.Module) -> int:
    """The ViT patch size from the model's config (or its backbone's); 14 if none says."""
    cfg = getattr(model, "config", None)
    for c in (cfg, getattr(cfg, "backbone_config", None)):
        p = _config_int(getattr(c, "patch_size", None))
        if p is not None:
            return p
    return 14


def model_input_size(model: nn.Module) -> int:
    """The model's native square input side (Depth Anything V2: 518, DPT: 384), rounded
    to a multiple of the patch size; 518 if the config does not say."""
    cfg = getattr(model, "config", None)
    patch = model_patch_size(model)
    size = None
    for c in (cfg, getattr(cfg, "backbone_config", None)):
        size = _config_int(getattr(c, "image_size", None))
        if size is not None:
            break
    size = size or 518
    return max(patch, int(round(size / patch)) * patch)


def find_attention_projections(model: nn.Module) -> list[str]:
    """Full names of the Linear query/key/value projections inside attention blocks.

    Works from the module tree, so it follows whatever naming the installed transformers
    uses. Raises if none are found (the model is not a ViT-style encoder).
    """
    wanted = {n for names in PROJECTION_NAMES.values() for n in names} | set(FUSED_PROJECTION_NAMES)
    found = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        linear = isinstance(module, nn.Linear) or isinstance(
            getattr(module, "base_layer", None), nn.Linear
        )  # a plain Linear, or one already wrapped by peft
        if leaf in wanted and linear and _ATTENTION_PATH.search(name):
            found.append(name)
    if not found:
        raise ValueError(
            f"{type(model).__name__}: found no attention projections "
            f"({sorted(wanted)}) inside attention blocks; pass lora_targets explicitly"
        )
    return found


def add_lora(
    model: nn.Module,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: list[str] | tuple[str, ...] | None = None,
):
    """Wrap `model` in a peft LoRA model; only the adapters are trainable.

    targets: module names (full or leaf names) for peft's target_modules; None discovers
    the attention projections. Returns the PeftModel.
    """
    from peft import LoraConfig, get_peft_model

    if targets is None:
        targets = find_attention_projections(model)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets),
        bias="none",
    )
    for p in model.parameters():
        p.requires_grad_(False)
    with _peft_reads_deprecated_property():
        peft_model = get_peft_model(model, config)
    set_train_mode(peft_model)
    return peft_model


def check_adapter(adapter: str | Path) -> dict:
    """The adapter_config.json of a peft adapter folder, checked before any model loads:
    FileNotFoundError without it, a DataError naming it when it is not a LoRA config."""
    from westar.data import DataError, read_json_file

    adapter = Path(adapter)
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{adapter}: not a peft adapter (no adapter_config.json)")
    config = read_json_file(config_file, "adapter config")
    if not isinstance(config, dict):
        raise DataError(config_file, "adapter config must be a JSON object")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise DataError(
            config_file, f"'r' (the LoRA rank) must be a positive integer, got {rank!r}"
        )
    if not (adapter / "adapter_model.safetensors").is_file():  # never a pickle (.bin)
        raise FileNotFoundError(f"{adapter}: no adapter_model.safetensors in the adapter folder")
    return config


@contextlib.contextmanager
def _peft_reads_deprecated_property() -> Iterator[None]:
    """peft (0.21) builds a PeftModel by reading `model.is_gradient_checkpointing`, which
    transformers 5 deprecated for `is_activation_checkpointing` with a FutureWarning on
    every read: the warning users saw on every train, eval and merge. Only that warning
    is silenced, only while peft wraps a model; the property's value is still used."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield


def load_adapter(net: nn.Module, adapter: str | Path, peft_model=None, **kwargs):
    """PeftModel.from_pretrained(net, adapter) (or peft_model.load_adapter(adapter)), with
    an adapter that does not fit `net` (another rank, another base model, unreadable
    weights) as one ValueError naming the adapter folder; peft's FutureWarning about
    `is_gradient_checkpointing` is silenced while it wraps the model."""
    from peft import PeftModel
    from safetensors import SafetensorError

    check_adapter(adapter)
    try:
        with _peft_reads_deprecated_property():
            if peft_model is not None:
                peft_model.load_adapter(str(adapter), **kwargs)
                return peft_model
            return PeftModel.from_pretrained(net, str(adapter), **kwargs)
    except SafetensorError as err:
        raise ValueError(f"{adapter}: unreadable adapter weights ({err})") from err
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{adapter}: the adapter does not fit this model (trained on another base model "
            f"or with another LoRA rank?): {first[:300]}"
        ) from err


def lora_layers(model: nn.Module):
    """(name, module) of every peft LoRA layer in `model`."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def adapter_delta_sq_norm(adapter_dir: str | Path) -> float:
    """sum over the LoRA layers of a saved peft adapter of ||scaling * B @ A||_F^2: how far
    the adapter moves the base weights (0 for a fresh adapter, whose B is zero; the
    quantity the LoRA regularizer penalizes). scaling = lora_alpha / r of
    adapter_config.json (its alpha pattern honoured)."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    total = 0.0
    for name, a in tensors.items():
        if ".lora_A." not in name:
            continue
        b = tensors[name.replace(".lora_A.", ".lora_B.")]
        r = a.shape[0]
        alpha = config.get("lora_alpha", r)
        for pattern, value in (config.get("alpha_pattern") or {}).items():
            if pattern in name:
                alpha = value
        scaling = alpha / r
        total += float(((b.double() @ a.double()) * scaling).square().sum())
    return total


def set_train_mode(model: nn.Module) -> None:
    """Eval mode for the frozen model (no BatchNorm statistics drift, no dropout), train
    mode only for LoRA dropout layers, and the training flag (alone, not their children's)
    on layers with gradient checkpointing on, which transformers checkpoints only then."""
    model.eval()
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1].startswith("lora_dropout"):
            module.train()
        elif getattr(module, "gradient_checkpointing", False) is True:
            module.training = True


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Every module of `model` in eval mode inside the block (dropout off, e.g. for the
    teacher's pseudo-labels whatever --lora-dropout is); the modes are restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """transformers' gradient checkpointing on every layer that supports it (the ViT
    encoder's layers for Depth Anything / DPT), non-reentrant so that it works with a
    frozen input and LoRA weights inside. Raises ValueError if the model has none."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        raise ValueError(f"{type(model).__name__}: no layer took gradient checkpointing")


def predict(model: nn.Module, depth_model: DepthModel, images: torch.Tensor) -> torch.Tensor:
    """Model output (B, H, W) for [0, 1] images (B, 3, H, W), resized to the input size."""
    h, w = images.shape[-2:]
    out = model(pixel_values=depth_model.normalize(images)).predicted_depth
    if out.dim() == 4:
        out = out[:, 0]
    if tuple(out.shape[-2:]) != (h, w):
        out = F.interpolate(out[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    return out
