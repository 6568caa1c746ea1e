"""Stage 1: bind the teachers through their text encoders (M3Bind Eqs. 1-6).

Each teacher gets LoRA adapters (peft) on its text encoder (and, optionally, its image trunk).
One step computes, for every modality m, the CLIP loss on a batch of m's report pairs and the
text embeddings of a batch of *shared* texts by every teacher's text encoder; the loss is
``Σ_m w_m·L_clip,m + λ·Σ_{m1<m2} w_m1·w_m2·L_align`` (Eq. 6). Adaptive modality balancing
(Eqs. 3-5) draws the shared texts by p_m, gives each modality's parameters their own learning
rate η_m (one optimizer parameter group per modality) and weights the losses by w_m.

With a frozen image trunk (the default) the trunk features of the training items are computed
once; only the projection heads and the text side are trained.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn.functional as F

from m3bind.model import ModalityCLIP
from train.balancing import loss_weights, lr_scales, sampling_probs
from train.config import BindConfig, TrainConfig
from train.data import ModalityData, SharedTextSampler, StepBatcher, take
from train.losses import OBJECTIVES, emcl_loss
from train.stages.common import MetricsLog, PrefixFeatureCache, Runtime, train_loop
from train.stages.pretrain import encode_images, is_tiled, prompt_captions

log = logging.getLogger(__name__)


def _lora_config(targets: list[str], bcfg: BindConfig):
    from peft import LoraConfig

    return LoraConfig(r=bcfg.lora_r, lora_alpha=bcfg.lora_alpha, lora_dropout=bcfg.lora_dropout,
                      target_modules=list(targets), bias="none")


def add_lora(teacher: ModalityCLIP, bcfg: BindConfig) -> None:
    """Wrap the teacher's text backbone (and optionally its image trunk) with LoRA; freeze the rest.

    Trainable afterwards: the LoRA matrices, the projection heads (``train_heads``) and the
    logit scale (``train_logit_scale``).
    """
    from peft import get_peft_model

    for p in teacher.parameters():
        p.requires_grad_(False)
    te = teacher.text_encoder
    if bcfg.lora_text_targets:
        te.backbone = get_peft_model(te.backbone, _lora_config(bcfg.lora_text_targets, bcfg))
    if bcfg.lora_image_targets:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(_lora_config(bcfg.lora_image_targets, bcfg), teacher.image_encoder.trunk)
    for n, p in teacher.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
    if bcfg.train_heads:
        for p in list(te.head.parameters()) + list(teacher.image_encoder.head.parameters()):
            p.requires_grad_(True)
    teacher.logit_scale.requires_grad_(bcfg.train_logit_scale)


def merge_lora(teacher: ModalityCLIP) -> ModalityCLIP:
    """Fold the LoRA adapters into the weights; the teacher becomes a plain module again."""
    from peft import PeftModel

    te = teacher.text_encoder
    if isinstance(te.backbone, PeftModel):
        te.backbone = te.backbone.merge_and_unload()
    trunk = teacher.image_encoder.trunk
    if any("lora_" in n for n, _ in trunk.named_parameters()):
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name, module in list(trunk.named_modules()):
            if isinstance(module, BaseTunerLayer):
                module.merge()
                parent = trunk.get_submodule(name.rsplit(".", 1)[0]) if "." in name else trunk
                setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def trunk_features(teacher: ModalityCLIP, modality: str, x: torch.Tensor, rt: Runtime,
                   batch_size: int = 64) -> torch.Tensor:
    """Frozen trunk features of every item (``[N, F]``, or ``[N, T, F]`` for tiles)."""
    trunk = teacher.image_encoder.trunk.to(rt.device).eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(rt.device)
        with rt.autocast():
            if is_tiled(modality, xb):
                b, t = xb.shape[:2]
                out.append(trunk(xb.flatten(0, 1)).float().view(b, t, -1).cpu())
            else:
                out.append(trunk(xb).float().cpu())
    return torch.cat(out)


def head_embeddings(teacher: ModalityCLIP, feats: torch.Tensor) -> torch.Tensor:
    """Normalised image embeddings from cached trunk features (tiles: normalise, mean, normalise)."""
    z = F.normalize(teacher.image_encoder.head(feats).float(), dim=-1)
    if z.dim() == 3:
        z = F.normalize(z.mean(1), dim=-1)
    return z


def balancing_terms(sizes: dict[str, int], bcfg: BindConfig) -> dict[str, Any]:
    """p_m, η_m and w_m of Eqs. 3-5 (or uniform sampling, η_0 and w = 1 when balancing is off)."""
    if not bcfg.balancing:
        return {"probs": None, "lrs": {m: bcfg.lr for m in sizes}, "weights": None,
                "variant": "off"}
    return {"probs": sampling_probs(sizes, bcfg.beta),
            "lrs": lr_scales(sizes, bcfg.lr, normalize=bcfg.balancing_normalize),
            "weights": loss_weights(sizes, normalize=bcfg.balancing_normalize),
            "variant": "normalized (mean 1)" if bcfg.balancing_normalize else "raw (Eqs. 3-5 as printed)"}


def _paired_rows(train: dict[str, ModalityData]) -> list[tuple[int, int]]:
    if "cxr" not in train or "ecg" not in train:
        return []
    ecg = {p: i for i, p in enumerate(train["ecg"].pair_ids) if p}
    return [(i, ecg[p]) for i, p in enumerate(train["cxr"].pair_ids) if p and p in ecg]


def run_bind(cfg: TrainConfig, zoo: dict[str, ModalityCLIP], train: dict[str, ModalityData],
             pools: dict[str, list[str]], rt: Runtime, metrics: MetricsLog) -> tuple[dict[str, ModalityCLIP], dict]:
    """Stage 1. Returns the bound teachers (LoRA merged; the zoo teachers are left untouched)
    and a summary (balancing terms, loop summary)."""
    bcfg = cfg.bind
    mods = list(cfg.data.modalities)
    from train.options import withhold_reports  # no-op unless data.image_only_fraction > 0

    withhold_reports(train, cfg)  # (idempotent) when stage 0 was loaded rather than run
    sizes = {m: len(train[m]) for m in mods}
    bal = balancing_terms(sizes, bcfg)
    log.info("bind: balancing %s; p=%s w=%s lr=%s", bal["variant"],
             _fmt(bal["probs"]), _fmt(bal["weights"]), _fmt(bal["lrs"]))
    teachers = {m: copy.deepcopy(zoo[m]).to(rt.device) for m in mods}
    frozen_trunk = not bcfg.lora_image_targets
    feats = {}
    for i, m in enumerate(mods):
        if frozen_trunk:
            feats[m] = trunk_features(teachers[m], m, train[m].x, rt)
        # LoRA's random init from a seed of its own, not from whatever the global RNG holds after
        # stage 0 (a run resumed after stage 0 must build the same adapters as an uninterrupted one)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rt.seed("bind_lora_init", i))
            add_lora(teachers[m], bcfg)
    groups = [{"params": [p for p in teachers[m].parameters() if p.requires_grad], "lr": bal["lrs"][m],
               "name": m} for m in mods]
    n_trainable = sum(p.numel() for g in groups for p in g["params"])
    log.info("bind: %d trainable parameters (LoRA r=%d on %s%s)", n_trainable, bcfg.lora_r,
             bcfg.lora_text_targets, f" + image {bcfg.lora_image_targets}" if bcfg.lora_image_targets else "")
    optimizer = torch.optim.AdamW(groups, weight_decay=bcfg.weight_decay)
    batchers = {m: StepBatcher(train[m].reports, bcfg.batch_size, rt.cfg.seed, f"bind_{m}") for m in mods}
    sampler = SharedTextSampler(pools, bal["probs"], rt.cfg.seed, "bind_shared")
    objective = OBJECTIVES.get("m3bind")
    pairs = _paired_rows(train) if bcfg.emcl_weight > 0 else []
    rank, world = rt.dist.rank, rt.dist.world_size
    # frozen lower text blocks: their hidden states are computed once per text (shared by teachers
    # whose frozen prefixes are identical); each step runs the LoRA blocks, pooling and head only
    prefix_tables: dict = {}
    encode_text = {m: PrefixFeatureCache(teachers[m].text_encoder, shared=prefix_tables) for m in mods}

    def image_emb(m: str, idx: list[int]) -> torch.Tensor:
        if frozen_trunk:
            return head_embeddings(teachers[m], take(feats[m], idx).to(rt.device))
        return encode_images(teachers[m].image_encoder, m, take(train[m].x, idx), rt)

    def captions(m: str, idx: list[int], step: int) -> list[str]:
        reports = [train[m].reports[i] for i in idx]
        if not bcfg.prompt_captions:
            return reports
        return prompt_captions(reports, [train[m].labels[i] for i in idx], m,
                               cfg.teacher(m).prompt_caption_prob, rt.seed(f"bind_captions_{m}", step))

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        images, texts = {}, {}
        for m in mods:
            idx = batchers[m].batch(step)[rank::world]
            images[m] = image_emb(m, idx)
            texts[m] = encode_text[m](captions(m, idx, step))
        shared = sampler.sample(step, bcfg.shared_batch_size)[rank::world]
        shared_emb = {m: encode_text[m](shared) for m in mods}
        terms = objective(images=images, texts=texts, shared_texts=shared_emb,
                          logit_scale={m: teachers[m].scale() for m in mods},
                          weights=bal["weights"], lambda_align=bcfg.lambda_align)
        if pairs:
            g = torch.Generator().manual_seed(rt.seed("bind_pairs", step))
            sel = torch.randperm(len(pairs), generator=g)[: bcfg.batch_size].tolist()[rank::world]
            c = image_emb("cxr", [pairs[i][0] for i in sel])
            e = image_emb("ecg", [pairs[i][1] for i in sel])
            n_batch = sum(len(batchers[m].batch(step)[rank::world]) for m in ("cxr", "ecg"))
            s = 0.5 * (teachers["cxr"].scale() + teachers["ecg"].scale())
            terms["emcl_loss"] = bcfg.emcl_weight * emcl_loss(c, e, n_batch, s)
        return terms

    modules = {f"teacher_{m}": teachers[m] for m in mods}
    summary = train_loop("bind", rt, modules, optimizer, bcfg.steps, bcfg.warmup_steps, step_fn, metrics)
    for m in mods:
        merge_lora(teachers[m]).cpu()
    summary.update(balancing={k: v for k, v in bal.items()}, trainable_parameters=n_trainable,
                   emcl_pairs=len(pairs))
    return teachers, summary


def _fmt(d: dict[str, float] | None) -> str:
    return "uniform" if d is None else "{" + ", ".join(f"{k}: {v:.3g}" for k, v in d.items()) + "}"

