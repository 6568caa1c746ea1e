"""Stage 0: a CLIP-like teacher per modality (trained here unless a checkpoint is given).

Each teacher has its own text encoder (by default a random-init tiny BERT with MiniLM's
tokenizer), so the text spaces genuinely differ before binding — the situation M3Bind starts
from. Training is the symmetric CLIP loss (M3Bind Eq. 1) on the modality's report pairs, with
batches of distinct reports (identical reports in one batch would be false negatives).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from m3bind.config import to_dict
from m3bind.encoders import ImageEncoderConfig
from m3bind.modalities import get_spec
from m3bind.model import ModalityCLIP
from m3bind.model import TeacherConfig as ModelTeacherConfig
from m3bind.teachers import load_teacher
from train.config import TeacherConfig, TrainConfig
from train.data import ModalityData, StepBatcher, take
from train.losses import OBJECTIVES
from train.stages.common import (
    MetricsLog,
    Runtime,
    TextFeatureCache,
    freeze_text_layers,
    train_loop,
)

log = logging.getLogger(__name__)


def default_image_encoder(modality: str) -> ImageEncoderConfig:
    """A reasonable trunk for the modality's kind when the config names none."""
    spec = get_spec(modality)
    if spec.kind == "image2d":
        return ImageEncoderConfig(arch="timm", name="resnet18", in_chans=spec.channels)
    if spec.kind == "volume":
        params = {"sequence_mode": "set"} if spec.channels > 1 else {}
        return ImageEncoderConfig(arch="volume_cnn", name="cnn3d", in_chans=spec.channels, params=params)
    return ImageEncoderConfig(arch="ecg_cnn", name="ecg_cnn", in_chans=spec.channels)


def is_tiled(modality: str, x: torch.Tensor) -> bool:
    """Pathology batches carry a tile axis: ``[B, T, 3, S, S]``."""
    return get_spec(modality).kind == "image2d" and x.dim() == 5


def encode_images(image_encoder: nn.Module, modality: str, x: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Normalised image embeddings of a preprocessed batch; tiles embedded and averaged
    (normalise, mean, normalise — as ``BoundModel.embed`` does)."""
    x = x.to(rt.device, non_blocking=True)
    if is_tiled(modality, x):
        b, t = x.shape[:2]
        x = x.flatten(0, 1)
        if rt.on_gpu and rt.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        z = F.normalize(image_encoder(x).float(), dim=-1).view(b, t, -1).mean(1)
        return F.normalize(z, dim=-1)
    if x.dim() == 4 and rt.on_gpu and rt.cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return F.normalize(image_encoder(x).float(), dim=-1)


SPATIAL_AXES = {"image2d": 2, "volume": 3, "signal": 1}


def augment_batch(x: torch.Tensor, modality: str, shift: float, noise: float, seed: int) -> torch.Tensor:
    """Random circular shifts (up to ``shift`` of each spatial/time axis, per item) and Gaussian
    noise of std ``noise`` on a preprocessed batch; deterministic in ``seed``."""
    if shift <= 0 and noise <= 0:
        return x
    g = torch.Generator().manual_seed(seed)
    n_axes = SPATIAL_AXES.get(get_spec(modality).kind, 0)
    dims = tuple(range(x.dim() - n_axes, x.dim()))
    out = x.clone()
    if shift > 0 and dims:
        for i in range(len(out)):
            offsets = [int(torch.randint(-int(shift * x.shape[d]), int(shift * x.shape[d]) + 1, (1,),
                                         generator=g)) for d in dims]
            out[i] = torch.roll(out[i], shifts=offsets, dims=[d - 1 for d in dims])
    if noise > 0:
        out = out + noise * torch.randn(out.shape, generator=g, dtype=out.dtype)
    return out


def prompt_captions(texts: list[str], labels: list[str], modality: str, prob: float, seed: int) -> list[str]:
    """Captions of one batch: each item's report, or with probability ``prob`` a disease prompt built
    from its annotated label with one of the modality's zero-shot templates (MMCLIP's prompts for
    image-only data). At most one prompt per label per batch, so that the batch's texts stay
    distinct (no false negatives in the CLIP loss). Deterministic in ``seed``."""
    if prob <= 0:
        return list(texts)
    spec = get_spec(modality)
    g = torch.Generator().manual_seed(seed)
    out, used = list(texts), set()
    for i, label in enumerate(labels):
        draw = float(torch.rand(1, generator=g))
        j = int(torch.randint(len(spec.templates), (1,), generator=g))
        if label in spec.labels and label not in used and draw < prob:
            out[i] = spec.templates[j].format(label)
            used.add(label)
    return out


def build_teacher(modality: str, tcfg: TeacherConfig, dim: int, preprocess: dict[str, Any], seed: int) -> ModalityCLIP:
    """A fresh teacher for ``modality`` (random init, deterministic in ``seed``)."""
    mcfg = ModelTeacherConfig(modality=modality, image=tcfg.image or default_image_encoder(modality),
                              text=tcfg.text, image_head=tcfg.image_head, text_head=tcfg.text_head,
                              dim=dim, preprocess=dict(preprocess))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ModalityCLIP.from_config(mcfg)


def pretrain_setup(modality: str, teacher: ModalityCLIP, data: ModalityData, tcfg: TeacherConfig,
                   rt: Runtime) -> tuple[str, torch.optim.Optimizer, Callable[[int], dict[str, torch.Tensor]]]:
    """Prepare one teacher's CLIP pre-training: the teacher on the device (channels-last 2D trunk
    on GPU), frozen text layers, the optimizer and the step function :func:`train_loop` runs.

    Returns:
        ``(loop name, optimizer, step_fn)``.
    """
    teacher.to(rt.device)
    if rt.on_gpu and rt.cfg.channels_last and get_spec(modality).kind == "image2d":
        teacher.image_encoder.to(memory_format=torch.channels_last)
    n_frozen = freeze_text_layers(teacher.text_encoder, tcfg.freeze_text_layers)
    if n_frozen:
        log.info("pretrain %s: %d text-backbone parameters frozen", modality, n_frozen)
    text_params = [p for p in teacher.text_encoder.parameters() if p.requires_grad]
    text_ids = {id(p) for p in teacher.text_encoder.parameters()}
    other = [p for p in teacher.parameters() if id(p) not in text_ids and p.requires_grad]
    encode_text = TextFeatureCache(teacher.text_encoder) if n_frozen else teacher.encode_text
    optimizer = torch.optim.AdamW([
        {"params": other, "lr": tcfg.lr},
        {"params": text_params, "lr": tcfg.text_lr or tcfg.lr},
    ], weight_decay=tcfg.weight_decay)
    name = f"pretrain_{modality}"
    batcher = StepBatcher(data.reports, tcfg.batch_size, rt.cfg.seed, name)
    clip = OBJECTIVES.get("clip")

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        idx = batcher.batch(step)[rt.dist.rank::rt.dist.world_size]
        x = augment_batch(take(data.x, idx), modality, tcfg.augment_shift, tcfg.augment_noise,
                          rt.seed(f"augment_{name}", step))
        img = encode_images(teacher.image_encoder, modality, x, rt)
        txt = encode_text(prompt_captions([data.reports[i] for i in idx], [data.labels[i] for i in idx],
                                          modality, tcfg.prompt_caption_prob, rt.seed(f"captions_{name}", step)))
        return clip(img, txt, teacher.scale())

    return name, optimizer, step_fn


def pretrain_teacher(modality: str, teacher: ModalityCLIP, data: ModalityData, tcfg: TeacherConfig,
                     rt: Runtime, metrics: MetricsLog) -> dict:
    """Train one teacher with the CLIP loss on its report pairs; returns the loop summary."""
    name, optimizer, step_fn = pretrain_setup(modality, teacher, data, tcfg, rt)
    return train_loop(name, rt, {"teacher": teacher}, optimizer, tcfg.steps, tcfg.warmup_steps,
                      step_fn, metrics)


def run_pretrain(cfg: TrainConfig, train: dict[str, ModalityData], params: dict[str, dict], rt: Runtime,
                 metrics: MetricsLog, sourced: dict[str, ModalityCLIP] | None = None
                 ) -> tuple[dict[str, ModalityCLIP], dict[str, Any]]:
    """Stage 0 for every modality: load the teachers that have checkpoints, train the others.

    Args:
        sourced: Teachers already loaded from their ``source`` (loaded here when missing).

    Returns:
        ``(teachers, summary)`` — summary per modality (``source``, steps, last losses).
    """
    from train import options  # MEDBind / SeLIP / MMCLIP options (off unless the config sets them)

    image_only = options.withhold_reports(train, cfg)
    teachers, summary = {}, {}
    for i, m in enumerate(cfg.data.modalities):
        tcfg = cfg.teacher(m)
        if tcfg.source is not None:
            teachers[m] = (sourced or {}).get(m) or load_teacher(tcfg.source)
            summary[m] = {"source": to_dict(tcfg.source)}
            log.info("teacher %s: loaded (%s)", m, tcfg.source.format)
            continue
        teacher = build_teacher(m, tcfg, cfg.dim, params[m], rt.seed("init", i))
        if cfg.stage0_objective(m) != "clip" or cfg.uses_mmclip(m):
            s0 = options.pretrain_teacher_with_options(cfg, m, teacher, train[m], image_only.get(m),
                                                       params[m], rt, metrics)
        else:
            s0 = pretrain_teacher(m, teacher, train[m], tcfg, rt, metrics)
        summary[m] = {"source": "pretrained in stage 0", **s0,
                      "prompt_caption_prob": tcfg.prompt_caption_prob}
        teachers[m] = teacher.cpu()
    return teachers, summary
