"""The WeSTAR objective, from the westar_ops kernels.

L = lambda_st * sa_hdn_loss(student, teacher, instances, valid)
  + lambda_w  * ordinal_ranking_loss(student, pairs, labels)
  + lambda_r  * sum over LoRA modules of ||scaling * B @ A||_F^2
"""

from __future__ import annotations

import torch
from torch import nn

import westar_ops
from westar.config import TrainConfig
from westar.model import lora_layers

__all__ = ["lora_regularizer", "context_maps", "westar_loss"]


def lora_regularizer(model: nn.Module) -> torch.Tensor:
    """Sum of lora_delta_sq_norm over the active adapters of every LoRA layer."""
    total = None
    for _, layer in lora_layers(model):
        for name in layer.active_adapters:
            if name not in layer.lora_A:
                continue
            a = layer.lora_A[name].weight
            b = layer.lora_B[name].weight
            term = westar_ops.lora_delta_sq_norm(a.float(), b.float(), float(layer.scaling[name]))
            total = term if total is None else total + term
    if total is None:
        raise ValueError("the model has no LoRA layers")
    return total


def context_maps(cfg: TrainConfig, batch: dict, shape: tuple[int, int, int], device):
    """The instance levels for sa_hdn_loss under cfg.hdn (None = global context only)."""
    b, h, w = shape
    if cfg.hdn == "grid":
        return westar_ops.grid_instances(b, h, w, cfg.grid, device=device)
    if cfg.hdn == "instances":
        inst = batch["instances"]
        if inst.shape[1] == 0:
            raise ValueError(
                "hdn='instances' needs instance maps; make them with `westar masks` "
                "or train with --hdn grid"
            )
        return inst.to(device, non_blocking=True)
    return None


def westar_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    batch: dict,
    model: nn.Module,
    cfg: TrainConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its parts (unweighted) for logging.

    student, teacher: (B, H, W) model outputs; teacher is a constant (pseudo-label).
    The losses are computed in float32 whatever the autocast dtype. The parts ("loss",
    "st", "weak", "reg") are detached 0-dim float32 tensors on the loss's device: reading
    them (float(), .item()) waits for the device, so the trainer reads them only on the
    steps it logs. A disabled term is a zero tensor.
    """
    student = student.float()
    teacher = teacher.detach().float()
    device = student.device
    zero = student.new_zeros(())
    parts = {"st": zero, "weak": zero, "reg": zero}
    total = zero
    if cfg.lambda_st > 0:
        valid = torch.isfinite(teacher)
        st = westar_ops.sa_hdn_loss(
            student,
            teacher,
            context_maps(cfg, batch, tuple(student.shape), device),
            valid,
            include_global=cfg.include_global or cfg.hdn == "global",
            min_pixels=cfg.min_pixels,
            stats_grad=cfg.stats_grad,
        )
        total = total + cfg.lambda_st * st
        parts["st"] = st.detach()
    if cfg.lambda_w > 0 and batch["labels"].numel() > 0:
        weak = westar_ops.ordinal_ranking_loss(
            student,
            batch["pairs"].to(device, non_blocking=True),
            batch["labels"].to(device, non_blocking=True),
            margin=cfg.margin,
            kind=cfg.ordinal_kind,
            equal_weight=cfg.equal_weight,
        )
        total = total + cfg.lambda_w * weak
        parts["weak"] = weak.detach()
    if cfg.lambda_r > 0:
        reg = lora_regularizer(model)
        total = total + cfg.lambda_r * reg
        parts["reg"] = reg.detach()
    parts["loss"] = total.detach()
    return total, parts
