"""3D volume encoders for CT and MRI: a residual 3D CNN and a 3D ViT.

Input ``[B, C, D, H, W]``. Multi-sequence MRI (C sequences) is handled in one of two ways
(``params.sequence_mode``):

* ``channels`` — the sequences are input channels of one trunk (early fusion);
* ``set`` — each sequence goes through a shared single-channel trunk, gets a learned
  sequence embedding, and the per-sequence features are pooled by attention (a learned query)
  or a mean. Sequences that are entirely zero (missing from the study, as
  :func:`m3bind.preprocess.preprocess` fills them) are masked out of the pooling.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from m3bind.encoders import ENCODERS, ImageEncoderConfig
from m3bind.encoders.tokens import ClassTokenTransformer


class _ResBlock3d(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(min(8, cout), cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(min(8, cout), cout)
        self.skip = (nn.Identity() if cin == cout and stride == 1
                     else nn.Conv3d(cin, cout, 1, stride=stride, bias=False))
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act(y + self.skip(x))


class CNN3d(nn.Module):
    """Residual 3D CNN with GroupNorm (batch-size independent) and global average pooling.

    Args:
        in_chans: Input channels.
        widths: Channels per stage; every stage after the first halves the resolution.
        blocks: Residual blocks per stage.
    """

    def __init__(self, in_chans: int, widths: tuple[int, ...] = (16, 32, 64, 128), blocks: int = 1):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(in_chans, widths[0], 3, stride=(1, 2, 2), padding=1, bias=False),
            nn.GroupNorm(min(8, widths[0]), widths[0]), nn.GELU())
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(_ResBlock3d(cin, w, stride=2 if (i > 0 and j == 0) else 1))
                cin = w
        self.stages = nn.Sequential(*layers)
        self.embed_dim = int(widths[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x)).mean(dim=(2, 3, 4))


class ViT3d(nn.Module):
    """3D Vision Transformer: cubic-patch embedding, class token, learned position embedding.

    Args:
        in_chans: Input channels.
        img_size: Input grid ``(D, H, W)``; must be divisible by ``patch_size``.
        patch_size: Patch extent ``(d, h, w)``.
        width, depth, heads, mlp_ratio: Transformer size.
    """

    def __init__(self, in_chans: int, img_size: tuple[int, int, int] = (64, 128, 128),
                 patch_size: tuple[int, int, int] = (8, 16, 16), width: int = 256, depth: int = 6,
                 heads: int = 8, mlp_ratio: float = 4.0):
        super().__init__()
        self.img_size, self.patch_size = tuple(img_size), tuple(patch_size)
        if any(s % p for s, p in zip(self.img_size, self.patch_size, strict=True)):
            raise ValueError(f"img_size {self.img_size} not divisible by patch_size {self.patch_size}")
        n = math.prod(s // p for s, p in zip(self.img_size, self.patch_size, strict=True))
        self.patch_embed = nn.Conv3d(in_chans, width, self.patch_size, stride=self.patch_size)
        self.encoder = ClassTokenTransformer(n, width, depth, heads, mlp_ratio)
        self.embed_dim = int(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"volume ViT expects grid {self.img_size}, got {tuple(x.shape[2:])}")
        return self.encoder(self.patch_embed(x).flatten(2).transpose(1, 2))


class SequenceSetEncoder(nn.Module):
    """Multi-sequence MRI as a set: shared 1-channel trunk per sequence, then masked pooling.

    Args:
        trunk: Single-channel volume trunk with ``embed_dim``.
        num_sequences: Maximum number of sequences (channels).
        pooling: ``attention`` (learned query, one head) or ``mean``.
    """

    def __init__(self, trunk: nn.Module, num_sequences: int, pooling: str = "attention"):
        super().__init__()
        if pooling not in ("attention", "mean"):
            raise ValueError(f"set pooling must be attention or mean, got {pooling!r}")
        self.trunk, self.pooling = trunk, pooling
        self.embed_dim = trunk.embed_dim
        self.sequence_embed = nn.Parameter(torch.zeros(num_sequences, self.embed_dim))
        self.query = nn.Parameter(torch.randn(self.embed_dim) * self.embed_dim**-0.5)
        self.key = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        feats = self.trunk(x.reshape(b * c, 1, *x.shape[2:])).reshape(b, c, -1)
        feats = feats + self.sequence_embed[:c]
        present = x.flatten(2).abs().amax(dim=2) > 0  # [B, C]
        present = present | ~present.any(dim=1, keepdim=True)  # all missing: use all
        if self.pooling == "mean":
            w = present.to(feats.dtype)
            return (feats * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True)
        scores = (self.key(feats) @ self.query) / math.sqrt(self.embed_dim)
        scores = scores.masked_fill(~present, float("-inf"))
        return (scores.softmax(dim=1).unsqueeze(-1) * feats).sum(1)


def _volume(cfg: ImageEncoderConfig, make_trunk) -> nn.Module:
    params: dict[str, Any] = dict(cfg.params)
    mode = params.pop("sequence_mode", "channels")
    pooling = params.pop("set_pooling", "attention")
    if mode == "channels":
        return make_trunk(cfg.in_chans, params)
    if mode == "set":
        return SequenceSetEncoder(make_trunk(1, params), cfg.in_chans, pooling)
    raise ValueError(f"sequence_mode must be channels or set, got {mode!r}")


@ENCODERS.register("volume_cnn")
def build_volume_cnn(cfg: ImageEncoderConfig) -> nn.Module:
    """Residual 3D CNN; params: ``widths``, ``blocks``, ``sequence_mode``, ``set_pooling``."""
    def make(cin, p):
        return CNN3d(cin, tuple(p.get("widths", (16, 32, 64, 128))), int(p.get("blocks", 1)))
    return _volume(cfg, make)


@ENCODERS.register("volume_vit")
def build_volume_vit(cfg: ImageEncoderConfig) -> nn.Module:
    """3D ViT; params: ``img_size``, ``patch_size``, ``width``, ``depth``, ``heads``, ``sequence_mode``."""
    def make(cin, p):
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in p.items()}
        return ViT3d(cin, **kw)
    return _volume(cfg, make)
