"""ECG encoders: MEDBind's time-point transformer and a 1D CNN. Input ``[B, leads, T]``.

MEDBind's ECG encoder treats every time point of the 12-lead signal (12 x 1000 at 100 Hz for
10 s) as a token: the 12 lead values of a time point are embedded linearly, a learned class
token and a learned position (time) embedding are added, a transformer encoder runs over the
sequence and the class token's output is the feature. ``patch_size > 1`` groups consecutive
time points into one token (a linear patch embedding) for speed.
"""

from __future__ import annotations

import torch
from torch import nn

from m3bind.encoders import ENCODERS, ImageEncoderConfig
from m3bind.encoders.tokens import ClassTokenTransformer


class ECGTransformer(nn.Module):
    """Transformer over time-point tokens of a ``[B, leads, seq_len]`` ECG.

    Args:
        leads: Number of leads (channels).
        seq_len: Samples per lead (1000 = 10 s at 100 Hz).
        patch_size: Time points per token (1 = MEDBind's time-point tokens).
        width, depth, heads, mlp_ratio: Transformer size.
    """

    def __init__(self, leads: int = 12, seq_len: int = 1000, patch_size: int = 1, width: int = 128,
                 depth: int = 4, heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        if seq_len % patch_size:
            raise ValueError(f"seq_len {seq_len} not divisible by patch_size {patch_size}")
        self.leads, self.seq_len, self.patch_size = leads, seq_len, patch_size
        self.token_embed = nn.Linear(leads * patch_size, width)
        self.encoder = ClassTokenTransformer(seq_len // patch_size, width, depth, heads, mlp_ratio)
        self.embed_dim = int(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, leads, t = x.shape
        if leads != self.leads or t != self.seq_len:
            raise ValueError(f"ECG transformer expects [B, {self.leads}, {self.seq_len}], got {list(x.shape)}")
        # [B, L, T] -> [B, T/p, p*L]: each token holds p consecutive time points of all leads.
        tokens = x.transpose(1, 2).reshape(b, t // self.patch_size, self.patch_size * leads)
        return self.encoder(self.token_embed(tokens))


class ECGCNN(nn.Module):
    """1D residual-free CNN: Conv-BN-GELU stages with stride 2, then global average pooling.

    Args:
        leads: Input channels.
        widths: Channels per stage.
        kernel_size: Temporal kernel size.
    """

    def __init__(self, leads: int = 12, widths: tuple[int, ...] = (32, 64, 128, 256), kernel_size: int = 7):
        super().__init__()
        layers, cin = [], leads
        for w in widths:
            layers += [nn.Conv1d(cin, w, kernel_size, stride=2, padding=kernel_size // 2, bias=False),
                       nn.GroupNorm(min(8, w), w), nn.GELU()]
            cin = w
        self.net = nn.Sequential(*layers)
        self.embed_dim = int(widths[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(dim=2)


@ENCODERS.register("ecg_transformer")
def build_ecg_transformer(cfg: ImageEncoderConfig) -> nn.Module:
    """MEDBind ECG transformer; params: ``seq_len``, ``patch_size``, ``width``, ``depth``, ``heads``."""
    return ECGTransformer(leads=cfg.in_chans, **cfg.params)


@ENCODERS.register("ecg_cnn")
def build_ecg_cnn(cfg: ImageEncoderConfig) -> nn.Module:
    """1D CNN; params: ``widths``, ``kernel_size``."""
    p = dict(cfg.params)
    if "widths" in p:
        p["widths"] = tuple(p["widths"])
    return ECGCNN(leads=cfg.in_chans, **p)
