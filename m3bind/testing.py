"""Test helpers: a tiny random-init model directory that loads and embeds every modality fast.

The text encoder is a 2-layer BERT (hidden 64) with MiniLM's tokenizer files — built offline,
nothing downloaded. Weights are random but deterministic per seed, so CLI and app tests need
no training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from m3bind.encoders import HeadConfig, ImageEncoderConfig, TextEncoderConfig
from m3bind.modalities import MODALITIES, get_spec

#: Small preprocessing grids of the tiny model, per modality.
TINY_PREPROCESS = {
    "cxr": {"size": 32},
    "retina": {"size": 32},
    "pathology": {"size": 32, "magnification": 20.0, "max_tiles": 4},
    "ct": {"grid": [8, 32, 32], "spacing": [5.0, 2.5, 2.5], "hu_window": [-1000.0, 400.0]},
    "mri": {"grid": [8, 32, 32], "sequences": ["t1", "t2", "flair", "dwi"]},
    "ecg": {"fs": 50.0, "seconds": 10.0, "band": [0.5, 20.0]},
}


def tiny_image_config(modality: str) -> ImageEncoderConfig:
    """A small encoder of the right family for ``modality``."""
    spec = get_spec(modality)
    if spec.kind == "image2d":
        # timm's own tiny test architecture (~0.2 M parameters)
        return ImageEncoderConfig(arch="timm", name="test_convnext", in_chans=spec.channels)
    if spec.kind == "volume":
        params = {"widths": [8, 16], "blocks": 1}
        if modality == "mri":
            params["sequence_mode"] = "set"
        return ImageEncoderConfig(arch="volume_cnn", name="cnn3d", in_chans=spec.channels, params=params)
    p = TINY_PREPROCESS["ecg"]
    return ImageEncoderConfig(arch="ecg_transformer", name="medbind_ecg", in_chans=spec.channels,
                              params={"seq_len": int(p["fs"] * p["seconds"]), "patch_size": 10, "width": 32,
                                      "depth": 1, "heads": 2})


def tiny_text_config(max_length: int = 32) -> TextEncoderConfig:
    """A random 2-layer BERT with MiniLM's tokenizer (``path=None`` resolves to MiniLM's folder)."""
    from m3bind.encoders.text import default_text_path

    return TextEncoderConfig(arch="hf_random", path=default_text_path(), pooling="mean", max_length=max_length,
                             params={"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2,
                                     "intermediate_size": 128, "max_position_embeddings": 64})


def build_tiny_bound_model(modalities: Iterable[str] = MODALITIES, dim: int = 32, seed: int = 0,
                           shared_text: bool = True, name: str = "tiny"):
    """An in-memory tiny :class:`~m3bind.model.BoundModel` (random init, deterministic per seed)."""
    from m3bind.model import SHARED_TEXT, BoundModel, BoundModelConfig

    mods = [m for m in MODALITIES if m in set(modalities)]
    image = {m: tiny_image_config(m) for m in mods}
    text_keys = [SHARED_TEXT] if shared_text else mods
    cfg = BoundModelConfig(name=name, dim=dim, image=image,
                           image_heads={m: HeadConfig() for m in mods},
                           text={k: tiny_text_config() for k in text_keys},
                           preprocess={m: dict(TINY_PREPROCESS[m]) for m in mods})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BoundModel.from_config(cfg)


def build_tiny_model(out_dir: str | Path, modalities: Iterable[str] = MODALITIES, dim: int = 32,
                     seed: int = 0) -> Path:
    """Write a tiny random-init model directory and return its path.

    Args:
        out_dir: Target directory (created).
        modalities: Modalities to include.
        dim: Shared embedding dimension.
        seed: Random seed; the same seed gives the same weights.
    """
    model = build_tiny_bound_model(modalities, dim=dim, seed=seed)
    return model.save(out_dir, provenance={"stage": "tiny-random", "seed": seed,
                                           "note": "random weights for tests; not trained"})
