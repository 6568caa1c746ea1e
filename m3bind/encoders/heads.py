"""Projection heads from an encoder's feature width to the shared embedding dimension."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from m3bind.encoders import HeadConfig


def build_head(cfg: HeadConfig, in_dim: int, out_dim: int) -> nn.Module:
    """A projection head ``[B, in_dim] -> [B, out_dim]`` (not normalised; see :func:`l2_normalize`).

    Args:
        cfg: ``linear`` (CLIP's projection), ``mlp`` (Linear-GELU-Linear) or ``identity``
            (only when ``in_dim == out_dim``, e.g. open_clip towers that already project).
        in_dim: Encoder feature width.
        out_dim: Shared embedding dimension.
    """
    drop = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
    if cfg.kind == "identity":
        if in_dim != out_dim:
            raise ValueError(f"identity head needs in_dim == out_dim, got {in_dim} != {out_dim}")
        return nn.Identity()
    if cfg.kind == "linear":
        return nn.Sequential(drop, nn.Linear(in_dim, out_dim, bias=cfg.bias))
    hidden = cfg.hidden or in_dim
    return nn.Sequential(nn.Linear(in_dim, hidden, bias=cfg.bias), nn.GELU(), drop,
                         nn.Linear(hidden, out_dim, bias=cfg.bias))


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Unit L2 norm along the last dimension (computed in float32 for stability)."""
    return F.normalize(x.float(), dim=-1, eps=eps)


class ImageEncoder(nn.Module):
    """Trunk + projection head; ``forward`` returns unnormalised ``[B, dim]``."""

    def __init__(self, trunk: nn.Module, head: nn.Module):
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))
