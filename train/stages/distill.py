"""Stage 2: SESKD — one student text encoder distilled from the bound teachers (M3Bind Eqs. 7-9).

Phase 1 trains the student (default MiniLM + a projection to the shared dimension) with
``L_KD = Σ_m mean_i ||T_m,i − T_student,i||²`` on shared texts (``distill.kd_texts``: every
teacher on every text, or teacher m on modality m's own texts only); phase 2 adds
``L_contrastive = Σ_m CE(s·T_student·I_mᵀ, diag)`` on each modality's report–image pairs.
Each phase has its own step count, optimizer and warm-up/cosine schedule. The teachers are
frozen, so their text embeddings of every shared text and their image embeddings of every
training item are computed once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from m3bind.encoders.text import build_text_encoder
from m3bind.model import ModalityCLIP
from train.config import TrainConfig
from train.data import ModalityData, SharedTextSampler, StepBatcher, take
from train.losses import OBJECTIVES
from train.stages.bind import balancing_terms, head_embeddings, trunk_features
from train.stages.common import (
    MetricsLog,
    PrefixFeatureCache,
    Runtime,
    TextFeatureCache,
    freeze_text_layers,
    shared_prefix_blocks,
    train_loop,
)

log = logging.getLogger(__name__)


@torch.no_grad()
def _text_table(teachers: dict[str, ModalityCLIP], texts: list[str], rt: Runtime,
                pools: Mapping[str, Iterable[str]] | None = None, batch_size: int = 128
                ) -> dict[str, torch.Tensor]:
    """Each frozen teacher's embeddings of the shared ``texts``: modality -> ``[len(texts), D]``.

    With ``pools`` (``distill.kd_texts: own``) teacher m runs only on modality m's own texts, the
    only rows the KD loss reads from it (about 1/M of the forwards); its other rows are zeros, not
    NaN, since the loss computes every row before selecting and NaN·0 would poison the gradient.
    Teachers whose lower text blocks are identical and frozen (one pretrained backbone with LoRA on
    the top blocks) share the hidden states of those blocks: computed once, not per teacher.
    """
    row = {t: i for i, t in enumerate(texts)}
    blocks = shared_prefix_blocks([t.text_encoder for t in teachers.values()])
    tables: dict = {}
    got: dict[str, tuple[list[str], torch.Tensor | None]] = {}
    for m, t in teachers.items():
        t.to(rt.device).eval()
        encode = PrefixFeatureCache(t.text_encoder, batch_size=batch_size, shared=tables, blocks=blocks)
        # own texts by length, so that a chunk pads little
        mine = texts if pools is None else sorted(set(pools.get(m, ())), key=lambda s: (len(s), s))
        parts = []
        for i in range(0, len(mine), batch_size):
            with rt.autocast():
                parts.append(encode(mine[i:i + batch_size]).float().cpu())
        got[m] = (mine, torch.cat(parts) if parts else None)
    dim = next(e.shape[-1] for _, e in got.values() if e is not None)
    out = {}
    for m, (mine, emb) in got.items():
        out[m] = torch.zeros(len(texts), dim)
        if emb is not None:
            out[m][[row[t] for t in mine]] = emb
    return out


def build_student(cfg: TrainConfig, seed: int) -> torch.nn.Module:
    """The student text encoder with a freshly initialised projection head."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_text_encoder(cfg.distill.student, cfg.dim, cfg.distill.head)


def _optimizer(student: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    dc = cfg.distill
    head = list(student.head.parameters())
    head_ids = {id(p) for p in head}
    body = [p for p in student.parameters() if id(p) not in head_ids and p.requires_grad]
    return torch.optim.AdamW([{"params": body, "lr": dc.lr}, {"params": head, "lr": dc.head_lr}],
                             weight_decay=dc.weight_decay)


def run_distill(cfg: TrainConfig, bound: dict[str, ModalityCLIP], train: dict[str, ModalityData],
                pools: dict[str, list[str]], rt: Runtime, metrics: MetricsLog) -> tuple[torch.nn.Module, dict]:
    """Stage 2. Returns the trained student text encoder and a summary of both phases."""
    dc = cfg.distill
    mods = list(cfg.data.modalities)
    for t in bound.values():
        for p in t.parameters():
            p.requires_grad_(False)
    student = build_student(cfg, rt.seed("init", 100)).to(rt.device)
    for p in student.parameters():
        p.requires_grad_(True)
    if dc.freeze_embeddings and hasattr(student, "backbone") and hasattr(student.backbone, "get_input_embeddings"):
        student.backbone.get_input_embeddings().weight.requires_grad_(False)
    if dc.freeze_layers is not None:
        log.info("distill: %d student backbone parameters frozen", freeze_text_layers(student, dc.freeze_layers))
    embed_cache = TextFeatureCache(student)
    texts = sorted({t for pool in pools.values() for t in pool})
    row = {t: i for i, t in enumerate(texts)}
    table = _text_table(bound, texts, rt, pools if dc.kd_texts == "own" else None)
    embed_cache.warm(texts)
    bal = balancing_terms({m: len(train[m]) for m in mods}, cfg.bind)
    sampler = SharedTextSampler(pools, bal["probs"], rt.cfg.seed, "distill_shared")
    rank, world = rt.dist.rank, rt.dist.world_size
    kd = OBJECTIVES.get("seskd_kd")
    joint = OBJECTIVES.get("seskd")

    members = {m: set(pools.get(m, ())) for m in mods}

    def own(batch: list[str]) -> dict[str, torch.Tensor] | None:
        if dc.kd_texts == "shared":
            return None
        return {m: torch.tensor([t in members[m] for t in batch], dtype=torch.bool) for m in mods}

    def kd_step(step: int) -> dict[str, torch.Tensor]:
        batch = sampler.sample(step, dc.batch_size)[rank::world]
        idx = torch.tensor([row[t] for t in batch])
        return kd(embed_cache(batch), {m: table[m][idx].to(rt.device) for m in mods}, own(batch))

    summary: dict[str, Any] = {"shared_texts": len(texts), "kd_texts": dc.kd_texts}
    opt = _optimizer(student, cfg)
    summary["kd"] = train_loop("distill_kd", rt, {"student": student}, opt, dc.kd_steps, dc.warmup_steps,
                               kd_step, metrics)
    if dc.joint_steps > 0:
        images = {}
        for m in mods:
            feats = trunk_features(bound[m], m, train[m].x, rt)
            with torch.no_grad():
                images[m] = head_embeddings(bound[m].to(rt.device), feats.to(rt.device)).cpu()
        scales = {m: float(bound[m].scale()) for m in mods}
        batchers = {m: StepBatcher(train[m].reports, dc.contrastive_batch_size, rt.cfg.seed, f"distill_{m}")
                    for m in mods}

        def joint_step(step: int) -> dict[str, torch.Tensor]:
            batch = sampler.sample(step + 10**7, dc.batch_size)[rank::world]
            idx = torch.tensor([row[t] for t in batch])
            students, imgs = {}, {}
            for m in mods:
                rows = batchers[m].batch(step)[rank::world]
                students[m] = embed_cache([train[m].reports[i] for i in rows])
                imgs[m] = take(images[m], rows).to(rt.device)
            terms = joint(embed_cache(batch), {m: table[m][idx].to(rt.device) for m in mods},
                          students, imgs, scales, own(batch))
            terms["contrastive_loss"] = dc.contrastive_weight * terms["contrastive_loss"]
            return terms

        opt = _optimizer(student, cfg)
        summary["joint"] = train_loop("distill_joint", rt, {"student": student}, opt, dc.joint_steps,
                                      dc.warmup_steps, joint_step, metrics)
    student.eval().cpu()
    for p in student.parameters():
        p.requires_grad_(False)
    return student, summary
