"""EMA teacher that holds only the adapter tensors.

The teacher is base model + EMA of the student's LoRA weights. The frozen base weights
are shared: for a teacher forward, `EMATeacher.swapped_in(model)` swaps the EMA tensors
into the student's LoRA parameters (under no_grad) and swaps them back afterwards, so no
second copy of the base model exists. Update rule, per adapter tensor:

    teacher <- decay * teacher + (1 - decay) * student
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["EMATeacher"]


class EMATeacher:
    def __init__(self, model: nn.Module, decay: float = 0.996):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().clone() for name, p in self._adapter_params(model)
        }
        if not self.shadow:
            raise ValueError("the model has no LoRA parameters to average")

    @staticmethod
    def _adapter_params(model: nn.Module):
        return [(n, p) for n, p in model.named_parameters() if "lora_" in n]

    def _matched(self, model: nn.Module):
        params = dict(self._adapter_params(model))
        if params.keys() != self.shadow.keys():
            missing = sorted(set(self.shadow) ^ set(params))[:3]
            raise ValueError(f"model's LoRA parameters do not match the teacher's: {missing}")
        return [(params[n], self.shadow[n]) for n in self.shadow]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """teacher <- decay * teacher + (1 - decay) * student."""
        for p, t in self._matched(model):
            t.mul_(self.decay).add_(p.detach().to(t.dtype), alpha=1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run `model` as the teacher inside the block (LoRA weights = EMA weights)."""
        pairs = self._matched(model)
        saved = []
        with torch.no_grad():
            for p, t in pairs:
                saved.append(p.detach().clone())
                p.copy_(t)
        try:
            yield model
        finally:
            with torch.no_grad():
                for (p, _), s in zip(pairs, saved):
                    p.copy_(s)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().clone().contiguous() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.shadow.keys():
            raise ValueError("teacher state does not match the model's LoRA parameters")
        for n, t in state.items():
            self.shadow[n].copy_(t)

    def to(self, device: torch.device | str) -> EMATeacher:
        self.shadow = {n: t.to(device) for n, t in self.shadow.items()}
        return self
