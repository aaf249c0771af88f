"""nn.Module wrappers of the losses, holding their settings."""

from __future__ import annotations

import torch
from torch import nn

from westar_ops import ops


class SAHDNLoss(nn.Module):
    """Module form of :func:`westar_ops.sa_hdn_loss`; settings fixed at construction."""

    def __init__(
        self,
        *,
        include_global: bool = True,
        eps: float = 1e-6,
        min_pixels: int = 1,
        stats_grad: str = "full",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.include_global = include_global
        self.eps = eps
        self.min_pixels = min_pixels
        self.stats_grad = stats_grad
        self.backend = backend

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        instances: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return ops.sa_hdn_loss(
            pred,
            target,
            instances,
            valid,
            include_global=self.include_global,
            eps=self.eps,
            min_pixels=self.min_pixels,
            stats_grad=self.stats_grad,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"include_global={self.include_global}, eps={self.eps}, "
            f"min_pixels={self.min_pixels}, stats_grad={self.stats_grad!r}, backend={self.backend!r}"
        )


class OrdinalRankingLoss(nn.Module):
    """Module form of :func:`westar_ops.ordinal_ranking_loss`."""

    def __init__(
        self,
        *,
        margin: float = 0.0,
        kind: str = "margin",
        equal_weight: float = 1.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.margin = margin
        self.kind = kind
        self.equal_weight = equal_weight
        self.backend = backend

    def forward(
        self, pred: torch.Tensor, pairs: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        return ops.ordinal_ranking_loss(
            pred,
            pairs,
            labels,
            margin=self.margin,
            kind=self.kind,
            equal_weight=self.equal_weight,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, kind={self.kind!r}, equal_weight={self.equal_weight}, "
            f"backend={self.backend!r}"
        )
