"""Teacher loaders: turn an existing checkpoint into a :class:`~m3bind.model.ModalityCLIP`, offline.

Formats (registered in :data:`TEACHER_FORMATS`, chosen by ``TeacherSource.format``):

* ``m3bind``   — this project's model directory (``path``); ``modality`` picks the tower.
* ``hf_clip``  — a Hugging Face ``CLIPModel`` or ``VisionTextDualEncoderModel`` directory (``path``).
* ``open_clip`` — an open_clip model name plus a checkpoint file (``model_name``, ``checkpoint``,
  optional ``model_config`` JSON for architectures open_clip does not ship); QuiltNet, BiomedCLIP
  and UniMed-CLIP are open_clip models. Needs the optional ``open_clip_torch``.
* ``factory``  — ``module:function`` returning a ModalityCLIP, for anything else (FLAIR, MGCA,
  CT-CLIP); ``params`` are passed as keyword arguments.

Every loader reads local files only and never unpickles arbitrary objects.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from m3bind.encoders import HeadConfig, ImageEncoderConfig, TextEncoderConfig
from m3bind.encoders.heads import ImageEncoder, build_head
from m3bind.encoders.image2d import HFVisionTrunk, OpenClipVisualTrunk, read_state_dict
from m3bind.encoders.text import OpenClipTextEncoder, TextEncoder
from m3bind.errors import ModelDirError
from m3bind.model import SHARED_TEXT, BoundModel, ModalityCLIP, TeacherConfig, load_model
from m3bind.modalities import get_spec
from m3bind.registry import Registry

log = logging.getLogger(__name__)

#: Teacher formats: ``fn(src: TeacherSource) -> ModalityCLIP``.
TEACHER_FORMATS: Registry[Callable[["TeacherSource"], ModalityCLIP]] = Registry("teacher format")


@dataclass
class TeacherSource:
    """Where a pretrained modality CLIP comes from."""

    format: str = field(default="m3bind", metadata={"help": "m3bind, hf_clip, open_clip or factory"})
    modality: str = field(default="cxr", metadata={"help": "the teacher's modality"})
    path: str | None = field(default=None, metadata={"help": "model directory (m3bind, hf_clip)"})
    model_name: str | None = field(default=None, metadata={"help": "open_clip model name"})
    checkpoint: str | None = field(default=None, metadata={
        "help": "open_clip weights file (safetensors, or torch file read with weights_only=True)"})
    model_config: str | None = field(default=None, metadata={
        "help": "open_clip model config JSON for architectures open_clip does not ship"})
    tokenizer_path: str | None = field(default=None, metadata={
        "help": "local tokenizer directory for open_clip models with a Hugging Face text tower"})
    factory: str | None = field(default=None, metadata={"help": "module:function returning a ModalityCLIP"})
    params: dict[str, Any] = field(default_factory=dict, metadata={"help": "keyword arguments of the factory"})
    preprocess: dict[str, Any] | None = field(default=None, metadata={
        "help": "preprocessing overrides (default: modality defaults, image size from the checkpoint)"})

    def __post_init__(self):
        get_spec(self.modality)
        need = {"m3bind": ("path",), "hf_clip": ("path",), "open_clip": ("model_name", "checkpoint"),
                "factory": ("factory",)}
        if self.format not in need:
            raise ValueError(f"teacher format must be one of {sorted(need)}, got {self.format!r}")
        missing = [k for k in need[self.format] if not getattr(self, k)]
        if missing:
            raise ValueError(f"teacher format {self.format} needs {', '.join(missing)}")
        if self.format == "factory" and ":" not in self.factory:
            raise ValueError(f"factory must be 'module:function', got {self.factory!r}")


def load_teacher(src: TeacherSource) -> ModalityCLIP:
    """Load one teacher from ``src`` (see module docstring)."""
    teacher = TEACHER_FORMATS.get(src.format)(src)
    if not isinstance(teacher, ModalityCLIP):
        raise ModelDirError(f"teacher loader {src.format} returned {type(teacher).__name__}, not ModalityCLIP")
    return teacher.eval()


def _preprocess(src: TeacherSource, image_size: int | None) -> dict[str, Any]:
    from m3bind.model import default_preprocess

    pre = default_preprocess(src.modality)
    if image_size and "size" in pre:
        pre["size"] = int(image_size)
    pre.update(src.preprocess or {})
    return pre


# ------------------------------------------------------------------------- m3bind
def teachers_from_model(model: BoundModel, root: str | Path | None = None) -> dict[str, ModalityCLIP]:
    """Split a bound model into per-modality teachers (modules shared, not copied)."""
    out = {}
    for m in model.modalities:
        key = model.text_key(m) if not model.shared_text else SHARED_TEXT
        tcfg = model.config.text[key]
        if root is not None and tcfg.path and not Path(tcfg.path).is_absolute():
            tcfg = TextEncoderConfig(arch=tcfg.arch, path=str(Path(root) / tcfg.path), pooling=tcfg.pooling,
                                     max_length=tcfg.max_length, params=dict(tcfg.params))
        cfg = TeacherConfig(modality=m, image=model.config.image[m], text=tcfg,
                            image_head=model.config.image_heads[m], text_head=model.config.text_heads[key],
                            dim=model.dim, preprocess=model.config.preprocess[m])
        t = ModalityCLIP(model.image_encoders[m], model.text_encoders[key], cfg)
        with torch.no_grad():
            t.logit_scale.copy_(model.logit_scales[m].detach())
        out[m] = t
    return out


@TEACHER_FORMATS.register("m3bind")
def load_m3bind(src: TeacherSource) -> ModalityCLIP:
    """The ``src.modality`` tower of an m3bind model directory."""
    model = load_model(src.path)
    if src.modality not in model.modalities:
        raise ModelDirError(f"model has no {src.modality} encoder (it has: {', '.join(model.modalities)})", src.path)
    return teachers_from_model(model, root=src.path)[src.modality]


# ------------------------------------------------------------------------- hf_clip
def _linear_head(proj: nn.Linear) -> nn.Module:
    """A :func:`~m3bind.encoders.heads.build_head` linear head holding ``proj``'s weights."""
    head = build_head(HeadConfig(kind="linear", bias=proj.bias is not None), proj.in_features, proj.out_features)
    head[-1].load_state_dict(proj.state_dict())
    return head


@TEACHER_FORMATS.register("hf_clip")
def load_hf_clip(src: TeacherSource) -> ModalityCLIP:
    """A Hugging Face ``CLIPModel`` or ``VisionTextDualEncoderModel`` directory (safetensors weights)."""
    from transformers import (AutoTokenizer, CLIPModel, CLIPTextModel, CLIPVisionModel, PreTrainedModel,
                              VisionTextDualEncoderModel)

    root = Path(src.path)
    cfg_file = root / "config.json"
    if not cfg_file.is_file():
        raise ModelDirError("not a Hugging Face model directory: config.json missing", str(root))
    if any(root.glob("*.bin")) and not any(root.glob("*.safetensors")):
        raise ModelDirError("refusing pickle weights (*.bin); convert the checkpoint to safetensors", str(root))
    model_type = json.loads(cfg_file.read_text()).get("model_type")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
        if model_type == "clip":
            clip = CLIPModel.from_pretrained(str(root), local_files_only=True, use_safetensors=True)
            vision, text = clip.vision_model, clip.text_model
            if not isinstance(vision, PreTrainedModel):  # transformers < 5 nests bare transformers
                vision, text = CLIPVisionModel(clip.config.vision_config), CLIPTextModel(clip.config.text_config)
                vision.vision_model, text.text_model = clip.vision_model, clip.text_model
            pooling, max_len = "pooler", clip.config.text_config.max_position_embeddings
        elif model_type == "vision-text-dual-encoder":
            clip = VisionTextDualEncoderModel.from_pretrained(str(root), local_files_only=True, use_safetensors=True)
            vision, text = clip.vision_model, clip.text_model
            pooling, max_len = "pooler", getattr(text.config, "max_position_embeddings", 512)
        else:
            raise ModelDirError(f"hf_clip expects model_type clip or vision-text-dual-encoder, got {model_type!r}",
                                str(root))
    except OSError as e:
        raise ModelDirError(f"cannot load Hugging Face CLIP: {' '.join(str(e).split())[:300]}", str(root)) from None
    vconf = vision.config.to_dict()
    image_cfg = ImageEncoderConfig(arch="hf_vision", name=vconf["model_type"], in_chans=3,
                                   embed_dim=int(vision.config.hidden_size), params={"config": vconf})
    text_cfg = TextEncoderConfig(arch="hf", path=str(root), pooling=pooling, max_length=int(max_len))
    dim = int(clip.config.projection_dim)
    image_size = getattr(vision.config, "image_size", None)
    cfg = TeacherConfig(modality=src.modality, image=image_cfg, text=text_cfg, dim=dim,
                        image_head=HeadConfig(kind="linear", bias=False),
                        text_head=HeadConfig(kind="linear", bias=False),
                        init_logit_scale=min(math.exp(float(clip.logit_scale.detach())), 100.0),
                        preprocess=_preprocess(src, image_size))
    image = ImageEncoder(HFVisionTrunk(model=vision), _linear_head(clip.visual_projection))
    text_enc = TextEncoder(text, tokenizer, _linear_head(clip.text_projection), pooling, int(max_len))
    teacher = ModalityCLIP(image, text_enc, cfg)
    with torch.no_grad():
        teacher.logit_scale.copy_(clip.logit_scale.detach().float())
    return teacher


# ------------------------------------------------------------------------- open_clip
@TEACHER_FORMATS.register("open_clip")
def load_open_clip(src: TeacherSource) -> ModalityCLIP:
    """An open_clip model name + checkpoint (optionally a model config JSON for custom architectures)."""
    from m3bind.encoders.image2d import build_open_clip_model
    from m3bind.encoders.text import _open_clip_tokenizer

    try:
        import open_clip
    except ImportError as e:
        raise ModelDirError(f"open_clip teachers need the optional package open_clip_torch ({e})") from None
    if src.model_config:
        open_clip.add_model_config(src.model_config)
    model_cfg = open_clip.get_model_config(src.model_name)
    if model_cfg is None:
        raise ModelDirError(f"unknown open_clip model {src.model_name!r}; pass model_config (a JSON file)")
    model = build_open_clip_model(model_cfg)
    state = read_state_dict(src.checkpoint)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelDirError(f"checkpoint does not fit {src.model_name}: {' '.join(str(e).split())[:300]}",
                            src.checkpoint) from None
    width = int(model_cfg["embed_dim"])
    ctx = int(model_cfg.get("text_cfg", {}).get("context_length", 77))
    image_cfg = ImageEncoderConfig(arch="open_clip", name=src.model_name, in_chans=3, embed_dim=width,
                                   params={"model_cfg": model_cfg})
    text_cfg = TextEncoderConfig(arch="open_clip", path=src.tokenizer_path, pooling="eos", max_length=ctx,
                                 params={"model_cfg": model_cfg})
    image_size = model_cfg.get("vision_cfg", {}).get("image_size")
    cfg = TeacherConfig(modality=src.modality, image=image_cfg, text=text_cfg, dim=width,
                        image_head=HeadConfig(kind="identity"), text_head=HeadConfig(kind="identity"),
                        init_logit_scale=min(math.exp(float(model.logit_scale.detach())), 100.0),
                        preprocess=_preprocess(src, image_size if isinstance(image_size, int) else None))
    image = ImageEncoder(OpenClipVisualTrunk(model.visual, width), nn.Identity())
    logit_scale = model.logit_scale.detach().float().clone()
    text = OpenClipTextEncoder(model, _open_clip_tokenizer(model_cfg, src.tokenizer_path, ctx), nn.Identity(), ctx,
                               width)
    teacher = ModalityCLIP(image, text, cfg)
    with torch.no_grad():
        teacher.logit_scale.copy_(logit_scale)
    return teacher


# ------------------------------------------------------------------------- factory
@TEACHER_FORMATS.register("factory")
def load_factory(src: TeacherSource) -> ModalityCLIP:
    """Call ``module:function(**params)``; it must return a ModalityCLIP."""
    module_name, func_name = src.factory.split(":", 1)
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as e:
        raise ModelDirError(f"cannot import teacher factory {src.factory}: {e}") from None
    return func(**src.params)
