"""The WeSTAR objective, from the westar_ops kernels.

L = lambda_st * sa_hdn_loss(student, teacher, instances, valid)
  + lambda_w  * normalized_ordinal_ranking_loss(student, pairs, labels)
  + lambda_r  * sum over LoRA modules of ||scaling * B @ A||_F^2

The ordinal term acts on the student's output normalized per image by its median and mean
absolute deviation (cfg.ordinal_norm="global", so that it is scale-free as the SA-HDN term
is), or on the raw output (ordinal_norm="raw").
"""

from __future__ import annotations

import torch
from torch import nn

import westar_ops
from westar.config import TrainConfig
from westar.model import lora_layers

__all__ = ["lora_regularizer", "context_maps", "westar_loss"]


def lora_regularizer(model: nn.Module, layers: list | None = None) -> torch.Tensor:
    """Sum over the active adapters of every LoRA layer of ||scaling * B @ A||_F^2.

    The `westar_ops.lora_delta_sq_norm` formula (through the r x r Gram matrices:
    s^2 * sum((A A^T) * (B^T B))), evaluated for all layers of one shape at once: a
    model's q/k/v adapters share (r, d_in, d_out), so this is a handful of batched
    products instead of one op call per layer (72 for Depth Anything V2 Large), whose
    dispatch overhead dominated the regularizer on small models. `layers`: the result of
    `westar.model.lora_layers(model)`, to skip walking the module tree on every step.
    """
    groups: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for _, layer in lora_layers(model) if layers is None else layers:
        for name in layer.active_adapters:
            if name not in layer.lora_A:
                continue
            a = layer.lora_A[name].weight
            b = layer.lora_B[name].weight
            key = (tuple(a.shape), tuple(b.shape), float(layer.scaling[name]), a.device)
            groups.setdefault(key, []).append((a, b))
    if not groups:
        raise ValueError("the model has no LoRA layers")
    total = None
    for (_, _, scaling, _), pairs in groups.items():
        if len(pairs) == 1:
            a, b = pairs[0]
            term = westar_ops.lora_delta_sq_norm(a.float(), b.float(), scaling)
        else:
            a = torch.stack([a for a, _ in pairs]).float()  # (L, r, d_in)
            b = torch.stack([b for _, b in pairs]).float()  # (L, d_out, r)
            gram_a = a @ a.transpose(1, 2)  # (L, r, r)
            gram_b = b.transpose(1, 2) @ b  # (L, r, r)
            term = (scaling * scaling) * (gram_a * gram_b).sum()
        total = term if total is None else total + term
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
    *,
    layers: list | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its parts (unweighted) for logging.

    student, teacher: (B, H, W) model outputs; teacher is a constant (pseudo-label).
    The losses are computed in float32 whatever the autocast dtype. The parts ("loss",
    "st", "weak", "reg") are detached 0-dim float32 tensors on the loss's device: reading
    them (float(), .item()) waits for the device, so the trainer reads them only on the
    steps it logs. A disabled term is a zero tensor. `layers`: see `lora_regularizer`.
    """
    student = student.float()
    teacher = teacher.detach().float()
    device = student.device
    zero = student.new_zeros(())
    parts = {"st": zero, "weak": zero, "reg": zero}
    total = zero
    valid = torch.isfinite(teacher)
    weak_on = cfg.lambda_w > 0 and batch["labels"].numel() > 0
    normalized = weak_on and cfg.ordinal_norm == "global"
    stats = None  # the SA-HDN forward's global contexts, reused by the ordinal term
    if cfg.lambda_st > 0:
        include_global = cfg.include_global or cfg.hdn == "global"
        st = westar_ops.sa_hdn_loss(
            student,
            teacher,
            context_maps(cfg, batch, tuple(student.shape), device),
            valid,
            include_global=include_global,
            min_pixels=cfg.min_pixels,
            stats_grad=cfg.stats_grad,
            return_stats=normalized and include_global,
        )
        if normalized and include_global:
            st, stats = st
        total = total + cfg.lambda_st * st
        parts["st"] = st.detach()
    if weak_on:
        pairs = batch["pairs"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        kw = dict(margin=cfg.margin, kind=cfg.ordinal_kind, equal_weight=cfg.equal_weight)
        if normalized:
            # without the SA-HDN global context (lambda_st = 0 or no include_global) the
            # same median / MAD over the same pixels is computed here (one more pass)
            weak = westar_ops.normalized_ordinal_ranking_loss(
                student,
                pairs,
                labels,
                stats=stats,
                valid=valid if stats is None else None,
                stats_grad=cfg.stats_grad,
                **kw,
            )
        else:
            weak = westar_ops.ordinal_ranking_loss(student, pairs, labels, **kw)
        total = total + cfg.lambda_w * weak
        parts["weak"] = weak.detach()
    if cfg.lambda_r > 0:
        reg = lora_regularizer(model, layers)
        total = total + cfg.lambda_r * reg
        parts["reg"] = reg.detach()
    parts["loss"] = total.detach()
    return total, parts
