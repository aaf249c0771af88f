"""westar_ops: fused losses for adapting monocular depth foundation models.

    sa_hdn_loss            per-context median/MAD normalized L1 (SA-HDN)
    ordinal_ranking_loss   batched pairwise ordinal loss
    normalized_ordinal_ranking_loss
                           the same on pred normalized by its per-image median / MAD
    lora_delta_sq_norm     ||scaling * B @ A||_F^2 via Gram matrices

Each runs on CPU (C++) and CUDA (CUDA C++ or Triton) as a torch custom op with
autograd, fake kernels and torch.compile support. The contracts are in docs/ops.md;
``westar_ops.reference`` holds plain-PyTorch definitions of the same functions.
"""

from __future__ import annotations

from westar_ops import ops
from westar_ops._loader import build_info
from westar_ops.modules import OrdinalRankingLoss, SAHDNLoss
from westar_ops.ops import (
    NormalizationStats,
    available_backends,
    lora_delta_sq_norm,
    normalized_ordinal_ranking_loss,
    ordinal_ranking_loss,
    resolve_backend,
    sa_hdn_loss,
)
from westar_ops.reference import grid_instances

__version__ = "0.1.0"

ops.preload_triton()

__all__ = [
    "sa_hdn_loss",
    "ordinal_ranking_loss",
    "normalized_ordinal_ranking_loss",
    "NormalizationStats",
    "lora_delta_sq_norm",
    "SAHDNLoss",
    "OrdinalRankingLoss",
    "grid_instances",
    "available_backends",
    "resolve_backend",
    "build_info",
]
