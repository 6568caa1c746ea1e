"""2D image encoders: any timm architecture, Hugging Face vision towers, open_clip visual towers.

Weights are read without pickle: ``*.safetensors`` with safetensors, anything else with
``torch.load(weights_only=True)`` (which refuses arbitrary objects).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from m3bind.encoders import ENCODERS, ImageEncoderConfig
from m3bind.errors import ModelDirError

log = logging.getLogger(__name__)

#: Largest weights file read (bytes).
MAX_WEIGHTS_BYTES = 8 * 1024**3


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict without unpickling arbitrary objects.

    Args:
        path: A ``.safetensors`` file, or a torch file loadable with ``weights_only=True``
            (a plain state dict, or a dict holding one under ``state_dict``/``model``).

    Returns:
        Tensor name -> tensor, with a leading ``module.`` (DataParallel) stripped.

    Raises:
        ModelDirError: The file is missing, too large or not a tensor mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelDirError("weights file not found", str(p))
    if p.stat().st_size > MAX_WEIGHTS_BYTES:
        raise ModelDirError("weights file too large", str(p))
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decoding failure is a bad weights file
        raise ModelDirError(f"cannot read weights: {type(e).__name__}: {e}", str(p)) from None
    if isinstance(sd, dict):
        for key in ("state_dict", "model", "module"):
            if key in sd and isinstance(sd[key], dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelDirError("weights file holds no tensor state dict", str(p))
    return {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}


def load_weights_file(module: nn.Module, path: str | Path) -> None:
    """Load a weights file into ``module``; classifier keys absent from the module are ignored.

    Raises:
        ModelDirError: The file cannot be read, or it leaves trunk parameters missing.
    """
    sd = read_state_dict(path)
    if hasattr(module, "load_pretrained_state"):
        sd = module.load_pretrained_state(sd)
    result = module.load_state_dict(sd, strict=False)
    if result.missing_keys:
        raise ModelDirError(
            f"weights file lacks {len(result.missing_keys)} parameters (e.g. {result.missing_keys[0]})", str(path))
    if result.unexpected_keys:
        log.info("ignored %d unexpected keys from %s (e.g. %s)", len(result.unexpected_keys), path,
                 result.unexpected_keys[0])


class TimmTrunk(nn.Module):
    """A timm model without classifier: ``[B, C, H, W] -> [B, num_features]``.

    Args:
        name: Any timm architecture name (``resnet50``, ``vit_base_patch16_224``, ``swin_tiny_...``).
        in_chans: Input channels.
        params: Extra ``timm.create_model`` keyword arguments (``img_size``, ``depth``, ...).
    """

    def __init__(self, name: str, in_chans: int, params: dict[str, Any]):
        super().__init__()
        import timm

        try:
            self.model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **params)
        except RuntimeError as e:  # timm's "Unknown model"
            raise ValueError(f"timm cannot build {name!r}: {e}") from None
        self.embed_dim = int(self.model.num_features)

    def load_pretrained_state(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a bare timm checkpoint onto ``self.model.*`` keys."""
        if any(k.startswith("model.") for k in sd):
            return sd
        return {f"model.{k}": v for k, v in sd.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@ENCODERS.register("timm")
def build_timm(cfg: ImageEncoderConfig) -> nn.Module:
    """Any timm architecture (random init; ``cfg.weights`` loaded by the caller)."""
    return TimmTrunk(cfg.name, cfg.in_chans, cfg.params)


class HFVisionTrunk(nn.Module):
    """A Hugging Face vision model (CLIP vision tower, ViT, ...) giving its pooled output.

    Args:
        config: The vision model's config as a dict (``model_type`` included); builds a random model.
        model: An existing vision model (instead of ``config``).
    """

    def __init__(self, config: dict[str, Any] | None = None, model: nn.Module | None = None):
        super().__init__()
        if model is None:
            from transformers import AutoConfig, AutoModel

            conf = dict(config or {})
            model_type = conf.pop("model_type")
            model = AutoModel.from_config(AutoConfig.for_model(model_type, **conf))
        self.model = model
        self.embed_dim = int(self.model.config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]


@ENCODERS.register("hf_vision")
def build_hf_vision(cfg: ImageEncoderConfig) -> nn.Module:
    """A Hugging Face vision tower from ``cfg.params["config"]`` (weights restored by the caller)."""
    if "config" not in cfg.params:
        raise ValueError("arch hf_vision needs params.config (the vision config dict)")
    return HFVisionTrunk(cfg.params["config"])


class OpenClipVisualTrunk(nn.Module):
    """The visual tower of an open_clip model (its output is already projected)."""

    def __init__(self, visual: nn.Module, embed_dim: int):
        super().__init__()
        self.visual, self.embed_dim = visual, int(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


def build_open_clip_model(model_cfg: dict[str, Any]) -> nn.Module:
    """An open_clip ``CLIP``/``CustomTextCLIP`` from its model config dict (random init).

    Raises:
        ModelDirError: ``open_clip_torch`` is not installed.
    """
    try:
        import open_clip
    except ImportError as e:
        raise ModelDirError(
            f"open_clip models need the optional package open_clip_torch ({e}); "
            "pip install --no-deps open_clip_torch ftfy") from None
    cfg = dict(model_cfg)
    custom = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    cls = open_clip.CustomTextCLIP if custom else open_clip.CLIP
    if "hf_model_name" in cfg.get("text_cfg", {}):
        cfg["text_cfg"] = dict(cfg["text_cfg"], hf_model_pretrained=False)
    return cls(**cfg)


@ENCODERS.register("open_clip")
def build_open_clip_visual(cfg: ImageEncoderConfig) -> nn.Module:
    """The visual tower of an open_clip model from ``cfg.params["model_cfg"]``."""
    if "model_cfg" not in cfg.params:
        raise ValueError("arch open_clip needs params.model_cfg (the open_clip model config)")
    model_cfg = cfg.params["model_cfg"]
    return OpenClipVisualTrunk(build_open_clip_model(model_cfg).visual, int(model_cfg["embed_dim"]))
