"""Zero-shot classification: prompts per label, prompt ensembles, softmax over labels.

Modes (how each label becomes text):

* ``ensemble`` — every prompt template of the modality filled with the label; the label's
  embedding is the mean of the L2-normalised template embeddings, renormalised (CLIP's
  prompt ensembling);
* ``expert`` — the label's expert-knowledge descriptions (FLAIR's domain-knowledge prompts),
  ensembled the same way; labels without a description fall back to the templates;
* ``naive`` — the label text alone.

A user prompt file (YAML or JSON ``{label: [prompt, ...]}``) gives the prompts of its labels
directly, in any mode. Scores are ``softmax(s * cos(image, label))`` with the model's logit scale s.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import yaml

from m3bind.errors import ConfigError, M3BindError
from m3bind.modalities import get_spec

log = logging.getLogger(__name__)

MODES = ("ensemble", "naive", "expert")
MAX_PROMPT_FILE_BYTES = 1024**2


def parse_labels(labels: str | Sequence[str] | None) -> list[str] | None:
    """``"a, b,c"`` or a list -> a list of distinct, stripped, non-empty labels (order kept)."""
    if labels is None:
        return None
    items = labels.split(",") if isinstance(labels, str) else list(labels)
    out: list[str] = []
    for s in (str(x).strip() for x in items):
        if s and s not in out:
            out.append(s)
    if not out:
        raise ConfigError("no labels given")
    return out


def load_prompt_file(path: str | Path) -> dict[str, list[str]]:
    """Read a YAML/JSON prompt file ``{label: [prompt, ...]}`` (a single string is one prompt).

    Raises:
        ConfigError: Unreadable, too large, or not a mapping of labels to strings.
    """
    p = Path(path)
    try:
        if p.stat().st_size > MAX_PROMPT_FILE_BYTES:
            raise ConfigError("prompt file too large", str(p))
        text = p.read_text(encoding="utf-8")
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read prompt file: {type(e).__name__}", str(p)) from None
    if not isinstance(data, dict) or not data:
        raise ConfigError("prompt file must map labels to lists of prompts", str(p))
    out = {}
    for label, prompts in data.items():
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, list) or not prompts or not all(isinstance(x, str) and x.strip() for x in prompts):
            raise ConfigError(f"prompts of label {label!r} must be a non-empty list of strings", str(p))
        out[str(label)] = [x.strip() for x in prompts]
    return out


def label_prompts(modality: str, labels: Sequence[str], templates: Sequence[str] | None = None,
                  descriptions: Mapping[str, Sequence[str]] | None = None, mode: str = "ensemble",
                  prompts: Mapping[str, Sequence[str]] | None = None) -> dict[str, list[str]]:
    """The prompt texts of every label.

    Args:
        modality: Gives the default templates and descriptions.
        labels: Class labels.
        templates: Templates with ``{}`` for the label (default: the modality's).
        descriptions: label -> expert descriptions (default: the modality's).
        mode: ``ensemble``, ``expert`` or ``naive``.
        prompts: label -> explicit prompts (a user prompt file); these win over ``mode``.
    """
    if mode not in MODES:
        raise ConfigError(f"zero-shot mode must be one of {', '.join(MODES)}, got {mode!r}")
    spec = get_spec(modality)
    templates = list(templates or spec.templates)
    if any("{}" not in t for t in templates):
        raise ConfigError("every prompt template needs a {} placeholder for the label")
    descriptions = spec.descriptions if descriptions is None else descriptions
    out = {}
    for label in labels:
        if prompts and label in prompts:
            out[label] = list(prompts[label])
        elif mode == "naive":
            out[label] = [label]
        elif mode == "expert" and descriptions.get(label):
            out[label] = list(descriptions[label])
        else:
            if mode == "expert":
                log.info("no expert description for %r; using templates", label)
            out[label] = [t.format(label) for t in templates]
    return out


def ensemble(prompt_embeddings: np.ndarray) -> np.ndarray:
    """CLIP prompt ensembling: mean of L2-normalised embeddings ``[P, D]``, renormalised -> ``[D]``."""
    e = prompt_embeddings / np.linalg.norm(prompt_embeddings, axis=-1, keepdims=True)
    mean = e.mean(axis=0)
    return (mean / np.linalg.norm(mean)).astype(np.float32)


def label_embeddings(model: Any, modality: str, labels: Sequence[str] | None = None,
                     templates: Sequence[str] | None = None, mode: str = "ensemble",
                     descriptions: Mapping[str, Sequence[str]] | None = None,
                     prompts: Mapping[str, Sequence[str]] | None = None) -> np.ndarray:
    """One ensembled text embedding per label: ``[L, D]`` float32, L2-normalised.

    Args:
        model: A :class:`~m3bind.model.BoundModel` (anything with ``embed_text(texts, modality)``).
        modality: The image modality (picks the text encoder before distillation, and defaults).
        labels: Labels (default: the modality's default labels).
        templates, mode, descriptions, prompts: See :func:`label_prompts`.
    """
    labels = parse_labels(labels) or list(get_spec(modality).labels)
    per_label = label_prompts(modality, labels, templates, descriptions, mode, prompts)
    flat = [t for label in labels for t in per_label[label]]
    emb = np.asarray(model.embed_text(flat, modality=modality), dtype=np.float32)
    out, i = [], 0
    for label in labels:
        n = len(per_label[label])
        out.append(ensemble(emb[i:i + n]))
        i += n
    return np.stack(out)


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max())
    return z / z.sum()


def classify(model: Any, sample_or_embedding: Any, labels: Sequence[str] | str | None = None,
             modality: str | None = None, templates: Sequence[str] | None = None,
             descriptions: Mapping[str, Sequence[str]] | None = None, mode: str = "ensemble",
             prompts: Mapping[str, Sequence[str]] | None = None,
             label_vectors: np.ndarray | None = None) -> list[tuple[str, float]]:
    """Zero-shot labels of one item, best first, with softmax scores summing to 1.

    Args:
        model: A :class:`~m3bind.model.BoundModel`.
        sample_or_embedding: A :class:`~m3bind.io.sample.Sample` (embedded with ``model.embed``)
            or an embedding ``[D]``.
        labels: Labels (list or comma-separated string); default: the modality's labels, or the
            labels of ``prompts`` when given.
        modality: Overrides ``sample.modality``; required with a bare embedding.
        templates, descriptions, mode, prompts: See :func:`label_prompts`.
        label_vectors: The labels' embeddings ``[L, D]`` from :func:`label_embeddings` when the
            caller keeps them (then ``templates``, ``descriptions``, ``mode`` and ``prompts``
            are not used).

    Raises:
        M3BindError: Unknown modality, or a modality the model does not embed.
    """
    if hasattr(sample_or_embedding, "array"):
        sample = sample_or_embedding
        modality = modality or sample.modality
        if modality is None:
            raise M3BindError("modality unknown; pass --modality", getattr(sample, "path", None))
        if sample.modality != modality:
            sample = dataclasses.replace(sample, modality=modality)
        image = np.asarray(model.embed([sample]))[0]
    else:
        if modality is None:
            raise M3BindError("modality unknown; pass --modality")
        image = np.asarray(sample_or_embedding, dtype=np.float32).reshape(-1)
    get_spec(modality)
    labels = parse_labels(labels) or (list(prompts) if prompts else list(get_spec(modality).labels))
    if label_vectors is None:
        text = label_embeddings(model, modality, labels, templates, mode, descriptions, prompts)
    else:
        text = np.asarray(label_vectors, np.float32)
        if text.shape[0] != len(labels):
            raise M3BindError(f"{text.shape[0]} label vectors for {len(labels)} labels")
    image = image / np.linalg.norm(image)
    scale = model.logit_scale_for(modality) if hasattr(model, "logit_scale_for") else model.logit_scale
    scores = _softmax(scale * (text @ image))
    order = np.argsort(-scores, kind="stable")
    return [(labels[i], float(scores[i])) for i in order]
