"""Teachers (:class:`ModalityCLIP`) and the bound model (:class:`BoundModel`) with its model directory.

A model directory (see DESIGN.md) holds ``config.json`` (format version, architecture configs,
per-modality preprocessing parameters, logit scales, provenance and a sha256 manifest of every
other file), one ``*.safetensors`` file per component and, per text encoder, a subfolder with the
Hugging Face config and tokenizer files (plus ``adapter/`` when LoRA adapters are kept).
:func:`load_model` refuses pickles and files that do not match the manifest.
"""

from __future__ import annotations

import hashlib
import logging
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from m3bind.encoders import HeadConfig, ImageEncoderConfig, TextEncoderConfig, build_image_encoder
from m3bind.encoders.heads import ImageEncoder, build_head, l2_normalize
from m3bind.encoders.text import build_text_encoder
from m3bind.errors import M3BindError
from m3bind.modalities import MODALITIES, PATHOLOGY, get_spec
from m3bind.model_dir import FORMAT_VERSION, check_model_dir

log = logging.getLogger(__name__)

#: CLIP's cap on the exp'ed logit scale.
MAX_LOGIT_SCALE = 100.0
#: Key of the one student text encoder after distillation.
SHARED_TEXT = "shared"


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict) or hasattr(v, "items"):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


def default_preprocess(modality: str) -> dict[str, Any]:
    """The modality's default preprocessing parameters as plain JSON data."""
    return _jsonable(dict(get_spec(modality).preprocess_defaults))


@dataclass
class TeacherConfig:
    """One modality CLIP: image encoder + text encoder + heads + logit scale."""

    modality: str = field(default="cxr", metadata={"help": "modality name (m3bind.modalities)"})
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig, metadata={"help": "image encoder"})
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig, metadata={"help": "text encoder"})
    image_head: HeadConfig = field(default_factory=HeadConfig, metadata={"help": "image projection head"})
    text_head: HeadConfig = field(default_factory=HeadConfig, metadata={"help": "text projection head"})
    dim: int = field(default=512, metadata={"help": "shared embedding dimension"})
    init_logit_scale: float = field(default=1 / 0.07, metadata={"help": "initial logit scale s = 1/tau"})
    preprocess: dict[str, Any] | None = field(default=None, metadata={
        "help": "preprocessing parameters; None = the modality's defaults"})

    def __post_init__(self):
        get_spec(self.modality)
        if int(self.dim) < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if not 0 < float(self.init_logit_scale) <= MAX_LOGIT_SCALE:
            raise ValueError(f"init_logit_scale must be in (0, {MAX_LOGIT_SCALE}], got {self.init_logit_scale}")
        self.preprocess = _jsonable(self.preprocess) if self.preprocess is not None \
            else default_preprocess(self.modality)


@dataclass
class BoundModelConfig:
    """A bound model: image encoders for some modalities, one or several text encoders."""

    name: str = field(default="m3bind", metadata={"help": "model name (the model id adds a content hash)"})
    dim: int = field(default=512, metadata={"help": "shared embedding dimension"})
    image: dict[str, ImageEncoderConfig] = field(default_factory=dict, metadata={"help": "per modality"})
    image_heads: dict[str, HeadConfig] = field(default_factory=dict, metadata={"help": "per modality"})
    text: dict[str, TextEncoderConfig] = field(default_factory=dict, metadata={
        "help": "'shared' (one student) or one per modality (before distillation)"})
    text_heads: dict[str, HeadConfig] = field(default_factory=dict, metadata={"help": "keyed as text"})
    preprocess: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={"help": "per modality"})
    init_logit_scale: float = field(default=1 / 0.07, metadata={"help": "initial logit scale s = 1/tau"})

    def __post_init__(self):
        for m in self.image:
            get_spec(m)
        if not self.image:
            raise ValueError("a bound model needs at least one image encoder")
        if not self.text:
            raise ValueError("a bound model needs a text encoder")
        if SHARED_TEXT in self.text and len(self.text) > 1:
            raise ValueError("text holds either 'shared' or per-modality encoders, not both")
        if SHARED_TEXT not in self.text and set(self.text) != set(self.image):
            raise ValueError(f"per-modality text encoders {sorted(self.text)} must match image {sorted(self.image)}")
        for m in self.image:
            self.image_heads.setdefault(m, HeadConfig())
            self.preprocess[m] = _jsonable(self.preprocess.get(m) or default_preprocess(m))
        for k in self.text:
            self.text_heads.setdefault(k, HeadConfig())


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextmanager
def _eval_mode(module: nn.Module):
    """Run in eval mode, then restore every submodule's own train/eval flag (teachers may be training)."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _tokens_to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


class ModalityCLIP(nn.Module):
    """One teacher: an image encoder, its own text encoder and tokenizer, and a logit scale.

    Args:
        image_encoder: Trunk + projection head (``forward -> [B, D]`` unnormalised).
        text_encoder: Text encoder (``.backbone`` HF model, ``.head``, ``.tokenize``).
        config: The config it was built from (kept for saving).
        init_logit_scale: Initial s = 1/tau; stored as ``log s`` in :attr:`logit_scale`.
    """

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, config: TeacherConfig,
                 init_logit_scale: float | None = None):
        super().__init__()
        self.image_encoder, self.text_encoder, self.config = image_encoder, text_encoder, config
        s = config.init_logit_scale if init_logit_scale is None else init_logit_scale
        self.logit_scale = nn.Parameter(torch.tensor(math.log(s), dtype=torch.float32))

    @classmethod
    def from_config(cls, cfg: TeacherConfig) -> "ModalityCLIP":
        """Build a teacher from its config (image weights from ``cfg.image.weights``, text from ``cfg.text.path``)."""
        trunk = build_image_encoder(cfg.image)
        image = ImageEncoder(trunk, build_head(cfg.image_head, trunk.embed_dim, cfg.dim))
        text = build_text_encoder(cfg.text, cfg.dim, cfg.text_head)
        return cls(image, text, cfg)

    @property
    def modality(self) -> str:
        """The teacher's modality."""
        return self.config.modality

    @property
    def tokenizer(self):
        """The text encoder's tokenizer."""
        return self.text_encoder.tokenizer

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped at 100 as CLIP does."""
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``[B, D]`` of a preprocessed batch."""
        return l2_normalize(self.image_encoder(x))

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``[B, D]``; tokenises with the teacher's own tokenizer."""
        batch = _tokens_to(self.text_encoder.tokenize(texts), _device_of(self))
        return l2_normalize(self.text_encoder(**batch))

    def forward(self, images: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(image_emb, text_emb, scale)`` for a CLIP loss."""
        return self.encode_image(images), self.encode_text(texts), self.scale()


class BoundModel(nn.Module):
    """Image encoders of several modalities and text encoder(s) in one shared space.

    Build with :meth:`from_config` or :meth:`from_teachers`; load with :func:`load_model`.

    Attributes:
        image_encoders: ``nn.ModuleDict`` modality -> :class:`ImageEncoder`.
        text_encoders: ``nn.ModuleDict`` ``"shared"`` -> student, or modality -> teacher text encoder.
        logit_scales: ``nn.ParameterDict`` modality -> log s.
        preprocess_params: modality -> keyword arguments of ``m3bind.preprocess.preprocess``.
    """

    def __init__(self, config: BoundModelConfig, image_encoders: dict[str, nn.Module],
                 text_encoders: dict[str, nn.Module], logit_scales: dict[str, float] | None = None):
        super().__init__()
        self.config = config
        self.image_encoders = nn.ModuleDict({m: image_encoders[m] for m in MODALITIES if m in image_encoders})
        self.text_encoders = nn.ModuleDict(text_encoders)
        scales = logit_scales or {}
        self.logit_scales = nn.ParameterDict({
            m: nn.Parameter(torch.tensor(math.log(scales.get(m, config.init_logit_scale)), dtype=torch.float32))
            for m in self.image_encoders})
        #: Compute dtype of embedding (autocast); None = float32.
        self.compute_dtype: torch.dtype | None = None
        self._model_id: str | None = None

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, cfg: BoundModelConfig, load_weights: bool = True,
                    root: str | Path | None = None) -> "BoundModel":
        """Build every component from ``cfg`` (``load_weights=False``: architecture only)."""
        images = {}
        for m, icfg in cfg.image.items():
            trunk = build_image_encoder(icfg, load_weights=load_weights)
            images[m] = ImageEncoder(trunk, build_head(cfg.image_heads[m], trunk.embed_dim, cfg.dim))
        texts = {k: build_text_encoder(tcfg, cfg.dim, cfg.text_heads[k], load_weights=load_weights, root=root)
                 for k, tcfg in cfg.text.items()}
        return cls(cfg, images, texts).eval()

    @classmethod
    def from_teachers(cls, teachers: dict[str, ModalityCLIP], student_text: nn.Module | TextEncoderConfig | None = None,
                      name: str = "m3bind", student_head: HeadConfig | None = None) -> "BoundModel":
        """Bind teachers: their image encoders (shared modules, not copies) and text encoder(s).

        Args:
            teachers: modality -> teacher; all must share one embedding dimension.
            student_text: One text encoder for every modality (a built text encoder module or a
                config to build); None keeps each teacher's own text encoder.
            name: Model name.
            student_head: Head config of a student built from a config.
        """
        if not teachers:
            raise ValueError("from_teachers needs at least one teacher")
        dims = {t.config.dim for t in teachers.values()}
        if len(dims) != 1:
            raise ValueError(f"teachers disagree on the embedding dimension: {sorted(dims)}")
        dim = dims.pop()
        cfg_text: dict[str, TextEncoderConfig]
        if student_text is None:
            texts = {m: t.text_encoder for m, t in teachers.items()}
            cfg_text = {m: t.config.text for m, t in teachers.items()}
            heads = {m: t.config.text_head for m, t in teachers.items()}
        else:
            if isinstance(student_text, TextEncoderConfig):
                student_head = student_head or HeadConfig()
                cfg_text = {SHARED_TEXT: student_text}
                student_text = build_text_encoder(student_text, dim, student_head)
            else:
                cfg_text = {SHARED_TEXT: getattr(student_text, "config", None) or TextEncoderConfig(
                    arch="hf", pooling=getattr(student_text, "pooling", "mean"),
                    max_length=getattr(student_text, "max_length", 128))}
            texts = {SHARED_TEXT: student_text}
            heads = {SHARED_TEXT: student_head or HeadConfig()}
        cfg = BoundModelConfig(
            name=name, dim=dim, image={m: t.config.image for m, t in teachers.items()},
            image_heads={m: t.config.image_head for m, t in teachers.items()}, text=cfg_text, text_heads=heads,
            preprocess={m: t.config.preprocess for m, t in teachers.items()})
        scales = {m: float(t.logit_scale.detach().exp()) for m, t in teachers.items()}
        model = cls(cfg, {m: t.image_encoder for m, t in teachers.items()}, texts, scales)
        with torch.no_grad():  # exact log values, no exp/log round trip
            for m, t in teachers.items():
                model.logit_scales[m].copy_(t.logit_scale.detach())
        return model

    # ----------------------------------------------------------------- properties
    @property
    def modalities(self) -> list[str]:
        """Modalities this model embeds, in canonical order."""
        return list(self.image_encoders.keys())

    @property
    def dim(self) -> int:
        """Shared embedding dimension."""
        return int(self.config.dim)

    @property
    def shared_text(self) -> bool:
        """True when one (student) text encoder serves every modality."""
        return SHARED_TEXT in self.text_encoders

    @property
    def preprocess_params(self) -> dict[str, dict[str, Any]]:
        """modality -> preprocessing keyword arguments."""
        return {m: dict(self.config.preprocess[m]) for m in self.modalities}

    @property
    def logit_scale(self) -> float:
        """The exp'ed logit scale s = 1/tau (mean over modalities of log s, clamped at 100)."""
        logs = torch.stack([p.detach().float() for p in self.logit_scales.values()])
        return float(min(math.exp(float(logs.mean())), MAX_LOGIT_SCALE))

    def logit_scale_for(self, modality: str | None) -> float:
        """The exp'ed logit scale of one modality (the mean one for None)."""
        if modality is None or modality not in self.logit_scales:
            return self.logit_scale
        return float(min(math.exp(float(self.logit_scales[modality].detach())), MAX_LOGIT_SCALE))

    @property
    def model_id(self) -> str:
        """``name-<12 hex>``: the name plus a content hash of the weights (stable across save/load)."""
        if self._model_id is None:
            h = hashlib.sha256()
            for k, v in sorted(self.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            self._model_id = f"{self.config.name}-{h.hexdigest()[:12]}"
        return self._model_id

    # ----------------------------------------------------------------- embedding
    def _check_modality(self, modality: str | None, path: str | None = None) -> str:
        if modality is None:
            raise M3BindError("modality unknown; pass --modality", path)
        if modality not in self.image_encoders:
            raise M3BindError(f"this model has no {modality} encoder (it embeds: {', '.join(self.modalities)})",
                              path)
        return modality

    def embed_tensors(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 embeddings ``[B, D]`` of an already-preprocessed batch."""
        enc = self.image_encoders[self._check_modality(modality)]
        device = _device_of(enc)
        with _autocast(device, self.compute_dtype), _eval_mode(self):
            return l2_normalize(enc(x.to(device, torch.float32)))

    def encode_text_tokens(self, key: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised text embeddings from a tokenised batch of text encoder ``key``."""
        enc = self.text_encoders[key]
        with _autocast(_device_of(enc), self.compute_dtype), _eval_mode(self):
            return l2_normalize(enc(**_tokens_to(batch, _device_of(enc))))

    def text_key(self, modality: str | None) -> str:
        """Which text encoder serves ``modality`` (``"shared"`` after distillation)."""
        if self.shared_text:
            return SHARED_TEXT
        if modality is None:
            raise M3BindError("this model has one text encoder per modality; name one of "
                              f"{', '.join(self.text_encoders)}")
        if modality not in self.text_encoders:
            raise M3BindError(f"this model has no {modality} text encoder")
        return modality

    def embed_text(self, texts: list[str] | str, modality: str | None = None, batch_size: int = 64) -> np.ndarray:
        """Embed texts: ``[N, D]`` float32, L2-normalised.

        Args:
            texts: Strings to embed.
            modality: Which teacher's text encoder (required before distillation, ignored after).
            batch_size: Texts per forward pass.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        key = self.text_key(modality)
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                chunk = texts[i:i + batch_size]
                out.append(self.encode_text_tokens(key, self.text_encoders[key].tokenize(chunk)).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)

    def embed(self, samples: Any, batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Embed Samples: ``[N, D]`` float32, L2-normalised, in input order.

        Each sample is routed by ``sample.modality`` and preprocessed with
        ``m3bind.preprocess.preprocess(sample, **preprocess_params[modality])``. Pathology samples
        give ``[T, 3, S, S]`` tiles: every tile is embedded and the tile embeddings averaged,
        then renormalised.

        Raises:
            M3BindError: A sample's modality is unknown or not embedded by this model.
        """
        from m3bind.preprocess import preprocess

        samples = [samples] if not isinstance(samples, (list, tuple)) else list(samples)
        params = self.preprocess_params
        out = np.zeros((len(samples), self.dim), np.float32)
        by_modality: dict[str, list[int]] = {}
        for i, s in enumerate(samples):
            by_modality.setdefault(self._check_modality(s.modality, getattr(s, "path", None)), []).append(i)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(samples), desc="embed", unit="item")
        with torch.inference_mode():
            for m, idx in by_modality.items():
                kw = {k: tuple(v) if isinstance(v, list) else v for k, v in params[m].items()}
                tiled = m == PATHOLOGY
                for j in range(0, len(idx), batch_size):
                    chunk = idx[j:j + batch_size]
                    arrays = [np.asarray(preprocess(samples[i], **kw), dtype=np.float32) for i in chunk]
                    if tiled:
                        counts = [len(a) for a in arrays]
                        emb = self._embed_batched(m, np.concatenate(arrays), batch_size)
                        parts = torch.split(emb, counts)
                        emb = l2_normalize(torch.stack([p.mean(0) for p in parts]))
                    else:
                        emb = self._embed_batched(m, np.stack(arrays), batch_size)
                    out[chunk] = emb.cpu().numpy()
                    if bar is not None:
                        bar.update(len(chunk))
        if bar is not None:
            bar.close()
        return out

    def _embed_batched(self, modality: str, x: np.ndarray, batch_size: int) -> torch.Tensor:
        parts = [self.embed_tensors(modality, torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size])))
                 for i in range(0, len(x), batch_size)]
        return torch.cat(parts)

    # ----------------------------------------------------------------- saving
    def save(self, path: str | Path, provenance: dict | None = None, merge_lora: bool = True) -> Path:
        """Write the model directory (see module docstring); returns its path.

        Args:
            path: Target directory (created; an existing m3bind model directory is replaced).
            provenance: Training config, data, stage, metrics — stored verbatim in config.json.
            merge_lora: Merge LoRA adapters of peft-wrapped text backbones into the weights
                (default); False keeps them as peft adapter files (``text_<key>/adapter/``).
        """
        from m3bind.model_dir import save_bound_model

        self._model_id = save_bound_model(self, Path(path), provenance or {}, merge_lora)
        return Path(path)


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
               verify: bool = True) -> BoundModel:
    """Load a model directory written by :meth:`BoundModel.save`.

    Args:
        path: The model directory.
        device: Where to put the weights.
        dtype: Compute dtype for embedding (e.g. ``torch.bfloat16`` runs under autocast);
            weights stay float32.
        verify: Check every file against the sha256 manifest (pickles are refused regardless).

    Raises:
        ModelDirError: Missing directory or config, unknown format version, a pickle in the
            directory, a file that does not match its recorded hash, or unreadable weights.
    """
    from m3bind.model_dir import load_bound_model

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = load_bound_model(Path(path), verify=verify)
    model.to(torch.device(device))
    model.compute_dtype = dtype
    return model.eval()


__all__ = ["BoundModel", "BoundModelConfig", "FORMAT_VERSION", "ModalityCLIP", "TeacherConfig",
           "check_model_dir", "load_model"]
