"""MEDBind, SeLIP and MMCLIP as options of stage 0 (and image-only items for every stage).

``run_pretrain`` hands a modality to :func:`pretrain_teacher_with_options` when the config's
``medbind``, ``selip`` or ``mmclip`` block names it (``TrainConfig.stage0_objective`` /
``uses_mmclip``); the plain CLIP teacher is trained by ``train.stages.pretrain`` as before.
The options path keeps the plain path's optimizer groups, text-feature cache and augmentation
and changes only what the option changes:

- ``medbind``: the modality-text loss is TMCL (MEDBind Eq. 1; identical reports are extra
  positives, ``train.medbind.text_ids``) on random batches (``medbind.distinct_texts`` false),
  so that identical reports actually meet in a batch.
- ``selip``: ``α·L_clip + β·L_se`` with the soft targets of ``train.selip.ReportSimilarity`` on
  batches of distinct reports.
- ``mmclip``: ``train.mmclip.MMCLIPHeads`` (AttMIM + EntMLM) alone for ``mmclip.warmup_steps``
  steps, then joint with the modality-text loss; image-only items (``data.image_only_fraction``)
  add the MIM loss alone; afterwards the MIM loss on held-out test images is measured under
  fixed random patch masks that depend only on the run seed and the image's position
  (:meth:`MaskedObjectives.heldout_mim`), so that runs are scored on the same masked patches.

:func:`withhold_reports` turns ``data.image_only_fraction`` of the training items of
``data.image_only_modalities`` into image-only items (chosen by a hash of the item id, so every
stage and every rerun agrees) and leaves the remaining pairs in the training data of stages 0
and 1 (the shared-text pools, built before, still hold the withheld reports as text).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import torch

from m3bind.modalities import get_spec
from m3bind.model import ModalityCLIP
from train.config import TrainConfig
from train.data import ModalityData, StepBatcher, crc, generator, stream_seed, take
from train.losses import OBJECTIVES
from train.medbind import text_ids
from train.stages.common import (
    MetricsLog,
    Runtime,
    TextFeatureCache,
    freeze_text_layers,
    train_loop,
)
from train.stages.pretrain import augment_batch, encode_images

log = logging.getLogger(__name__)

Terms = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- image-only items


def subset(data: ModalityData, rows: list[int]) -> ModalityData:
    """The rows ``rows`` of ``data`` as a new :class:`ModalityData`."""
    pick = lambda seq: [seq[i] for i in rows]
    return ModalityData(modality=data.modality, x=take(data.x, rows), reports=pick(data.reports),
                        labels=pick(data.labels), item_ids=pick(data.item_ids),
                        pair_ids=pick(data.pair_ids) if data.pair_ids else [])


def is_withheld(item_id: str, fraction: float) -> bool:
    """Whether the report of ``item_id`` is withheld (a stable hash of the id below ``fraction``)."""
    return fraction > 0 and crc(f"image-only:{item_id}") / 2**32 < fraction


def withhold_reports(train: MutableMapping[str, ModalityData], cfg: TrainConfig) -> dict[str, ModalityData]:
    """Split ``data.image_only_fraction`` of each of ``data.image_only_modalities`` off as image-only items.

    ``train`` is updated in place to hold the remaining pairs (so every later stage sees only
    them); idempotent. Returns modality -> image-only items (empty when nothing is withheld or
    ``train`` was already split).
    """
    frac = cfg.data.image_only_fraction
    out: dict[str, ModalityData] = {}
    if frac <= 0:
        return out
    for m in cfg.data.image_only_modalities:
        if m not in train:
            continue
        data = train[m]
        held = [i for i, k in enumerate(data.item_ids) if is_withheld(k, frac)]
        if not held:
            continue
        keep = [i for i in range(len(data)) if i not in set(held)]
        out[m] = subset(data, held)
        train[m] = subset(data, keep)
        log.info("%s: %d of %d training items become image-only (data.image_only_fraction=%.2f)",
                 m, len(held), len(data), frac)
    return out


# --------------------------------------------------------------------------- batches


class RandomBatcher:
    """Random batches indexed by step (identical reports may share a batch, as MEDBind samples)."""

    def __init__(self, n: int, batch_size: int, seed: int, stream: str):
        self.n, self.batch_size, self.seed, self.stream = n, min(batch_size, n), seed, stream

    def batch(self, step: int) -> list[int]:
        """Row indices of the batch of ``step``."""
        return torch.randperm(self.n, generator=generator(self.seed, self.stream, step))[: self.batch_size].tolist()


# --------------------------------------------------------------------------- modality-text losses


def text_objective(cfg: TrainConfig, modality: str) -> Callable[[torch.Tensor, torch.Tensor, list[str], Any], Terms]:
    """``f(image_emb, text_emb, texts, logit_scale) -> terms`` of the modality's stage-0 objective."""
    name = cfg.stage0_objective(modality)
    if name == "medbind" and cfg.medbind.text_loss == "tmcl":
        mb = cfg.medbind
        medbind = OBJECTIVES.get("medbind")
        return lambda img, txt, texts, s: medbind(img, txt, text_ids(texts, mb.normalize_text_ids).to(img.device), s)
    if name == "selip":
        from train.selip import ReportSimilarity, build_extractor

        se = cfg.selip
        sim = ReportSimilarity(build_extractor(se.extractor))
        selip = OBJECTIVES.get("selip")
        return lambda img, txt, texts, s: selip(img, txt, sim(texts).to(img.device), s, se.alpha, se.beta)
    clip = OBJECTIVES.get("clip")
    return lambda img, txt, texts, s: clip(img, txt, s)


# --------------------------------------------------------------------------- MMCLIP


class MaskedObjectives:
    """MMCLIP's AttMIM + EntMLM around one ViT teacher (wraps :class:`train.mmclip.MMCLIPHeads`).

    Args:
        cfg: The run config (``cfg.mmclip`` set).
        modality: A 2D modality.
        teacher: The teacher (timm ViT trunk, Hugging Face text backbone with a fast tokenizer).
        sample: One preprocessed item ``[C, H, W]`` (sizes the decoder).
    """

    def __init__(self, cfg: TrainConfig, modality: str, teacher: ModalityCLIP, sample: torch.Tensor):
        from train.mmclip import MMCLIPHeads, build_clinical_lexicon, disease_prompts

        self.cfg, self.modality, self.teacher = cfg.mmclip, modality, teacher
        self.vit = teacher.image_encoder.trunk
        model = getattr(self.vit, "model", self.vit)
        p = self.cfg.patch_size
        c, h, w = sample.shape
        num_patches = int(model.patch_embed.num_patches)
        if (h // p) * (w // p) != num_patches or h % p or w % p:
            raise ValueError(f"mmclip.patch_size {p} does not tile the ViT's {num_patches} patches of a "
                             f"{h}x{w} input")
        te = teacher.text_encoder
        self.tokenizer = te.tokenizer
        with torch.random.fork_rng(devices=[]):  # the decoders' init: a function of the run seed
            torch.manual_seed(stream_seed(cfg.runtime.seed, f"mmclip_heads_{modality}", 0))
            self.heads = MMCLIPHeads(self.cfg, num_patches, int(model.embed_dim), p * p * c,
                                     int(self.tokenizer.vocab_size), int(te.embed_dim))
        self.lexicon = build_clinical_lexicon()
        self.prompts = disease_prompts(modality)

    def prompt_embeddings(self) -> torch.Tensor:
        """The modality's disease prompts in the shared space (no gradient)."""
        with torch.no_grad():
            return self.teacher.encode_text(self.prompts).float()

    def _text_states(self, texts: list[str], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from train.mmclip import (
            apply_token_mask,
            causal_positions,
            entmlm_mask,
            tokenize_with_entities,
        )

        te = self.teacher.text_encoder
        enc, entities = tokenize_with_entities(self.tokenizer, texts, self.lexicon, te.max_length)
        mask = entmlm_mask(entities, causal_positions(enc["attention_mask"], enc["special_tokens_mask"]),
                           self.cfg.lambda3, g)
        ids, labels = apply_token_mask(enc["input_ids"], mask, int(self.tokenizer.mask_token_id))
        pad = ~enc["attention_mask"].bool()
        dev = next(te.parameters()).device
        states = te.backbone(input_ids=ids.to(dev), attention_mask=enc["attention_mask"].to(dev)).last_hidden_state
        return states.float(), labels.to(dev), pad.to(dev)

    def terms(self, x: torch.Tensor, texts: list[str], x_image_only: torch.Tensor | None,
              g: torch.Generator) -> Terms:
        """``{"mim_loss", "mlm_loss"}`` of one batch: report items ``x``/``texts`` plus image-only items.

        The report items run AttMIM (with their cross-attention map) and EntMLM; the image-only
        items run AttMIM alone (self- and prompt-driven attention, no text decoder). The MIM loss
        is the mean of the two groups' masked-patch MSEs weighted by their item counts (every
        item weighs the same); ``mlm_loss`` only with report items.
        """
        dev = next(self.heads.parameters()).device
        prompts = self.prompt_embeddings()
        head = self.teacher.image_encoder.head
        n_io = 0 if x_image_only is None else len(x_image_only)
        io = (self.heads.losses(self.vit, x_image_only.to(dev), prompts, head, generator=g)["mim_loss"]
              if n_io else None)
        if not texts:  # image-only items alone: the MIM loss only
            if io is None:
                raise ValueError("a batch needs report items or image-only items")
            return {"mim_loss": io}
        states, labels, pad = self._text_states(texts, g)
        out = self.heads.losses(self.vit, x.to(dev), prompts, head, states, labels, pad, generator=g)
        if io is not None:
            out["mim_loss"] = (len(texts) * out["mim_loss"] + n_io * io) / (len(texts) + n_io)
        return out

    @torch.no_grad()
    def heldout_mim(self, x: torch.Tensor, seed: int, batch_size: int = 32) -> dict[str, float]:
        """The MIM loss on held-out images ``x`` under fixed, model-independent random masks.

        Image ``i`` masks the :func:`heldout_mask_count` patches of :func:`heldout_masks` (drawn
        from ``seed`` and ``i`` only), so every run that is given the same images and seed is
        scored on the same masked patches. Each image weighs the same (every image masks equally
        many patches).

        Returns:
            ``{"loss", "baseline", "mask_ratio"}``: the decoder's masked-patch MSE, the MSE of
            predicting each masked patch by the mean of the image's visible pixels (per channel;
            0 with ``norm_pix``) — a model-free reference — and the masked fraction of patches.
        """
        from train.mmclip import apply_patch_mask, masked_patch_mse, patchify

        was_training = self.heads.training, self.vit.training
        self.heads.eval()
        self.vit.eval()
        model = getattr(self.vit, "model", self.vit)
        npre = int(getattr(model, "num_prefix_tokens", 1))
        p = self.cfg.patch_size
        num_patches = self.heads.image_decoder.pos.shape[1]
        mask_all = heldout_masks(len(x), num_patches, heldout_mask_count(num_patches, self.cfg), seed)
        dev = next(self.heads.parameters()).device
        total = base = 0.0
        for i in range(0, len(x), batch_size):
            xb, mask = x[i:i + batch_size].to(dev), mask_all[i:i + batch_size].to(dev)
            pred = self.heads.image_decoder(model.forward_features(apply_patch_mask(xb, mask, p))[:, npre:], mask)
            target = patchify(xb, p)
            total += float(masked_patch_mse(pred, target, mask, self.cfg.norm_pix)) * len(xb)
            base += float(masked_patch_mse(visible_mean_prediction(xb, mask, p, self.cfg.norm_pix), target, mask,
                                           self.cfg.norm_pix)) * len(xb)
        self.heads.train(was_training[0])
        self.vit.train(was_training[1])
        n = max(len(x), 1)
        return {"loss": total / n, "baseline": base / n, "mask_ratio": heldout_mask_count(num_patches, self.cfg)
                / num_patches}


def heldout_mask_count(num_patches: int, cfg: Any) -> int:
    """Patches masked per held-out image: ``round(λ2·round(λ1·P))`` (at least 1).

    That is the size of a training AttMIM mask when the score maps agree on their top-λ1
    patches (their union is then smallest; training masks are at least this large).
    """
    return max(1, round(cfg.lambda2 * max(1, round(cfg.lambda1 * num_patches))))


def heldout_masks(n: int, num_patches: int, k: int, seed: int) -> torch.Tensor:
    """Boolean ``[n, P]``: image ``i`` masks ``k`` patches drawn uniformly from ``(seed, i)`` alone."""
    mask = torch.zeros(n, num_patches, dtype=torch.bool)
    for i in range(n):
        mask[i, torch.randperm(num_patches, generator=generator(seed, "heldout_mim", i))[:k]] = True
    return mask


def visible_mean_prediction(x: torch.Tensor, mask: torch.Tensor, patch: int, norm_pix: bool) -> torch.Tensor:
    """A model-free MIM prediction: every patch is the per-channel mean of the image's visible
    pixels (zeros with ``norm_pix``, whose targets have mean 0); ``[B, P, patch²·C]`` like
    :func:`train.mmclip.patchify`."""
    from train.mmclip import patchify

    patches = patchify(x, patch)
    if norm_pix:
        return torch.zeros_like(patches)
    b, num_patches, f = patches.shape
    c = x.shape[1]
    per_channel = patches.view(b, num_patches, f // c, c)
    vis = (~mask).to(x.dtype).view(b, num_patches, 1, 1)
    mean = (per_channel * vis).sum(dim=(1, 2)) / (vis.sum(dim=(1, 2)) * (f // c)).clamp_min(1.0)
    return mean.view(b, 1, 1, c).expand(b, num_patches, f // c, c).reshape(b, num_patches, f)


def heldout_images(cfg: TrainConfig, modality: str, params: dict[str, Any], rt: Runtime, n: int) -> torch.Tensor:
    """Up to ``n`` preprocessed test-split items of ``modality`` (the cohort's linked test patients)."""
    from train.data import ensure_cohort, load_modality_data, read_items

    root = ensure_cohort(cfg.data)
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else rt.out / "cache"
    data = load_modality_data(read_items(cfg.data, root), root, modality, "test", params, cache, n,
                              progress=False)
    return data.x


# --------------------------------------------------------------------------- stage 0 with options


def pretrain_teacher_with_options(cfg: TrainConfig, modality: str, teacher: ModalityCLIP, data: ModalityData,
                                  image_only: ModalityData | None, params: dict[str, Any], rt: Runtime,
                                  metrics: MetricsLog) -> dict:
    """Stage 0 of one teacher with the MEDBind / SeLIP / MMCLIP options the config selects.

    Returns:
        The loop summary plus ``objective`` and, with mmclip, ``mmclip`` {``image_only_items``,
        ``heldout_items``, ``heldout_mim_loss``, ``heldout_mim_baseline``, ``heldout_mask_ratio``}
        (:meth:`MaskedObjectives.heldout_mim`).
    """
    tcfg = cfg.teacher(modality)
    objective = cfg.stage0_objective(modality)
    masked_needed = cfg.uses_mmclip(modality)
    teacher.to(rt.device)
    if rt.on_gpu and rt.cfg.channels_last and not masked_needed and get_spec(modality).kind == "image2d":
        teacher.image_encoder.to(memory_format=torch.channels_last)
    n_frozen = freeze_text_layers(teacher.text_encoder, tcfg.freeze_text_layers)
    text_params = [p for p in teacher.text_encoder.parameters() if p.requires_grad]
    text_ids_ = {id(p) for p in teacher.text_encoder.parameters()}
    other = [p for p in teacher.parameters() if id(p) not in text_ids_ and p.requires_grad]
    encode_text = TextFeatureCache(teacher.text_encoder) if n_frozen else teacher.encode_text
    masked = MaskedObjectives(cfg, modality, teacher, data.x[0]) if masked_needed else None
    groups = [{"params": other, "lr": tcfg.lr}, {"params": text_params, "lr": tcfg.text_lr or tcfg.lr}]
    modules: dict[str, torch.nn.Module] = {"teacher": teacher}
    if masked is not None:
        masked.heads.to(rt.device)
        groups.append({"params": list(masked.heads.parameters()), "lr": tcfg.lr})
        modules["mmclip_heads"] = masked.heads
    optimizer = torch.optim.AdamW(groups, weight_decay=tcfg.weight_decay)
    name = f"pretrain_{modality}"
    opt = {"medbind": cfg.medbind, "selip": cfg.selip}.get(objective)
    if opt is not None and not opt.distinct_texts:
        batcher = RandomBatcher(len(data), tcfg.batch_size, rt.cfg.seed, name)
    else:
        batcher = StepBatcher(data.reports, tcfg.batch_size, rt.cfg.seed, name)
    use_io = masked is not None and image_only is not None and len(image_only) > 0 and cfg.mmclip.image_only
    io_batch = max(1, round(tcfg.batch_size * len(image_only) / len(data))) if use_io else 0
    text_loss = text_objective(cfg, modality)
    rank, world = rt.dist.rank, rt.dist.world_size
    log.info("pretrain %s: objective %s%s%s", modality, objective, " + mmclip" if masked else "",
             f" + {len(image_only)} image-only items ({io_batch} per step)" if use_io else "")

    def step_fn(step: int) -> Terms:
        idx = batcher.batch(step)[rank::world]
        texts = [data.reports[i] for i in idx]
        terms: Terms = {}
        if masked is not None:
            from train.mmclip import training_phase

            g = generator(rt.cfg.seed, f"mmclip_{name}", step)
            x_io = None
            if use_io:
                io_idx = torch.randperm(len(image_only), generator=g)[:io_batch].tolist()[rank::world]
                x_io = take(image_only.x, io_idx)
            terms.update(masked.terms(take(data.x, idx), texts, x_io, g))
            if training_phase(step, cfg.mmclip.warmup_steps) == "masked":
                return terms
        x = augment_batch(take(data.x, idx), modality, tcfg.augment_shift, tcfg.augment_noise,
                          rt.seed(f"augment_{name}", step))
        img = encode_images(teacher.image_encoder, modality, x, rt)
        terms.update(text_loss(img, encode_text(texts), texts, teacher.scale()))
        return terms

    x_heldout = (heldout_images(cfg, modality, params, rt, cfg.mmclip.heldout_items)
                 if masked is not None and cfg.mmclip.heldout_items else None)
    every = cfg.mmclip.heldout_every if x_heldout is not None else 0

    def heldout_curve(step: int) -> dict[str, float]:
        if not every or step % every or step == tcfg.steps:  # the last step is scored below
            return {}
        return {"heldout_mim_loss": masked.heldout_mim(x_heldout, rt.seed("heldout_mim"))["loss"]}

    summary = train_loop(name, rt, modules, optimizer, tcfg.steps, tcfg.warmup_steps, step_fn, metrics,
                         after_step=heldout_curve)
    summary["objective"] = objective + (" + mmclip" if masked is not None else "")
    if masked is not None:
        info: dict[str, Any] = {"image_only_items": len(image_only) if use_io else 0}
        if x_heldout is not None:
            mim = masked.heldout_mim(x_heldout, rt.seed("heldout_mim"))
            info.update(heldout_items=len(x_heldout), heldout_mim_loss=round(mim["loss"], 6),
                        heldout_mim_baseline=round(mim["baseline"], 6), heldout_mask_ratio=mim["mask_ratio"])
            metrics.write(name, tcfg.steps, {"heldout_mim_loss": mim["loss"]})
            log.info("pretrain %s: held-out MIM loss %.5f on %d test images (fixed random masks, ratio %.3f; "
                     "visible-mean baseline %.5f)", modality, mim["loss"], len(x_heldout), mim["mask_ratio"],
                     mim["baseline"])
        summary["mmclip"] = info
    teacher.eval()
    return summary


__all__ = [
    "MaskedObjectives",
    "RandomBatcher",
    "heldout_images",
    "heldout_mask_count",
    "heldout_masks",
    "is_withheld",
    "pretrain_teacher_with_options",
    "subset",
    "text_objective",
    "visible_mean_prediction",
    "withhold_reports",
]
