"""The class-token transformer shared by the token-based trunks (ECG transformer, volume ViT)."""

from __future__ import annotations

import torch
from torch import nn


class ClassTokenTransformer(nn.Module):
    """Prepend a learned class token, add learned positions, run pre-norm blocks, return the class token.

    Args:
        num_tokens: Tokens per item (without the class token).
        width: Token width.
        depth: Transformer blocks.
        heads: Attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``width``.
    """

    def __init__(self, num_tokens: int, width: int, depth: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, num_tokens + 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, int(width * mlp_ratio), dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N, W]`` tokens -> ``[B, W]`` class-token output."""
        cls = self.cls_token.expand(len(tokens), -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        return self.norm(self.blocks(tokens))[:, 0]
