"""MMCLIP components: attention-masked image modelling (AttMIM) and entity-masked language modelling (EntMLM).

MMCLIP adds two masked objectives to CLIP training:

* **AttMIM** — three patch-score maps are computed for an image: image–report cross-attention
  (:func:`cross_attention_scores`), prompt-driven attention between the patches and the disease
  prompts of the modality (:func:`prompt_attention_scores`) and the image's own self-attention
  (:func:`self_attention_scores`). The union of each map's top-λ1 patches is the set of
  clinically salient patches; a random λ2 subset of that union is masked (:func:`attmim_mask`),
  a light MAE-style decoder (:class:`MAEDecoder`) reconstructs the patches and the loss is the
  MSE on the masked patches (:func:`masked_patch_mse`).
* **EntMLM** — medical-entity tokens of the report are found with a clinical lexicon
  (:func:`build_clinical_lexicon`, :func:`entity_token_mask`); a λ3 subset of the entity tokens
  that are also in the causal mask (the positions the text decoder may predict) is masked
  (:func:`entmlm_mask`) and a small text decoder with cross-attention to the image tokens
  (:class:`TextDecoder`) predicts them.

Image-only items (no report) contribute the MIM loss alone; their prompt-driven attention uses
the disease prompts of their modality (:func:`disease_prompts`) and their cross-attention map
is absent (a row of NaN). The masked objectives are warmed up before the joint phase
(:func:`training_phase`).

Every random choice draws from an explicit ``torch.Generator``.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from m3bind.modalities import MODALITIES, get_spec

log = logging.getLogger(__name__)

Tensor = torch.Tensor

#: Defaults of the paper: top-λ1 patches per map, a random λ2 subset of their union, λ3 of the entities.
LAMBDA1, LAMBDA2, LAMBDA3 = 0.7, 0.75, 0.2


@dataclass
class MMCLIPConfig:
    """MMCLIP's masked objectives as an option of a training stage."""

    lambda1: float = field(default=LAMBDA1, metadata={"help": "fraction of patches taken from each score map (top-λ1)"})
    lambda2: float = field(default=LAMBDA2, metadata={"help": "fraction of the top-λ1 union that is masked"})
    lambda3: float = field(default=LAMBDA3, metadata={"help": "fraction of the entity tokens masked for EntMLM"})
    patch_size: int = field(default=16, metadata={"help": "pixel patch size of the MIM targets"})
    norm_pix: bool = field(default=False, metadata={"help": "normalise each target patch (MAE norm_pix_loss)"})
    decoder_dim: int = field(default=128, metadata={"help": "width of the MAE-style image decoder"})
    decoder_depth: int = field(default=2, metadata={"help": "transformer blocks of the image decoder"})
    text_decoder_dim: int = field(default=128, metadata={"help": "width of the EntMLM text decoder"})
    text_decoder_depth: int = field(default=2, metadata={"help": "blocks of the EntMLM text decoder"})
    mim_weight: float = field(default=1.0, metadata={"help": "weight of the AttMIM reconstruction loss"})
    mlm_weight: float = field(default=1.0, metadata={"help": "weight of the EntMLM loss"})
    warmup_steps: int = field(default=100, metadata={
        "help": "steps of the masked objectives alone before the joint (contrastive + masked) phase"})
    image_only: bool = field(default=True, metadata={
        "help": "use image-only items (no report): MIM loss alone, prompt-driven attention from disease prompts"})

    def __post_init__(self):
        for name in ("lambda1", "lambda3"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"mmclip.{name} must be in (0, 1]")
        if not 0.0 <= self.lambda2 <= 1.0:
            raise ValueError("mmclip.lambda2 must be in [0, 1]")
        if self.patch_size < 1 or self.decoder_dim < 1 or self.decoder_depth < 1:
            raise ValueError("mmclip: patch_size, decoder_dim and decoder_depth must be >= 1")
        if self.text_decoder_dim < 1 or self.text_decoder_depth < 1:
            raise ValueError("mmclip: text_decoder_dim and text_decoder_depth must be >= 1")
        if self.mim_weight < 0 or self.mlm_weight < 0 or self.warmup_steps < 0:
            raise ValueError("mmclip: weights and warmup_steps must be >= 0")


# =========================================================================== AttMIM: patch scores


def cross_attention_scores(attn: Tensor, text_mask: Tensor | None = None) -> Tensor:
    """Patch scores from image–report cross-attention.

    Args:
        attn: Attention of report tokens (queries) over image patches (keys),
            ``[B, heads, T, P]`` or ``[B, T, P]``.
        text_mask: ``[B, T]`` valid report tokens (1) and padding (0); all valid when ``None``.

    Returns:
        ``[B, P]``: the attention each patch receives, averaged over heads and valid tokens.
    """
    if attn.dim() == 4:
        attn = attn.mean(dim=1)
    if text_mask is None:
        return attn.mean(dim=1)
    w = text_mask.to(attn.dtype).unsqueeze(-1)
    return (attn * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


def self_attention_scores(attn: Tensor, has_cls: bool = True) -> Tensor:
    """Patch scores from the image encoder's self-attention (its last block, say).

    Args:
        attn: ``[B, heads, N, N]`` or ``[B, N, N]`` self-attention; with ``has_cls`` token 0 is
            the class token and ``N = 1 + P``.
        has_cls: Score = the class token's attention to each patch; otherwise the mean
            attention each patch receives from all tokens.

    Returns:
        ``[B, P]``.
    """
    if attn.dim() == 4:
        attn = attn.mean(dim=1)
    if has_cls:
        return attn[:, 0, 1:]
    return attn.mean(dim=1)


def prompt_attention_scores(patch_tokens: Tensor, prompt_embeddings: Tensor) -> Tensor:
    """Prompt-driven attention: how strongly the disease prompts attend to each patch.

    Each prompt attends over the patches with ``softmax_p(<q_k, x_p> / sqrt(D))`` (queries =
    L2-normalised prompt embeddings, keys = L2-normalised patch tokens, both in the shared
    space); the score of a patch is its attention averaged over the prompts.

    Args:
        patch_tokens: ``[B, P, D]`` patch tokens projected into the shared space.
        prompt_embeddings: ``[K, D]`` text embeddings of the modality's disease prompts.

    Returns:
        ``[B, P]``, each row summing to 1.
    """
    d = patch_tokens.shape[-1]
    logits = torch.einsum("bpd,kd->bkp", F.normalize(patch_tokens, dim=-1),
                          F.normalize(prompt_embeddings, dim=-1)) * math.sqrt(d) / d
    return logits.softmax(dim=-1).mean(dim=1)


def topk_patches(scores: Tensor, ratio: float) -> Tensor:
    """Boolean ``[B, P]`` mask of each row's ``max(1, round(ratio·P))`` highest-scoring patches.

    A row of NaN (the map does not exist for that item, e.g. cross-attention of an image-only
    item) selects nothing.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"top-k ratio must be in (0, 1], got {ratio}")
    b, p = scores.shape
    k = max(1, round(ratio * p))
    absent = torch.isnan(scores).all(dim=1)
    idx = torch.nan_to_num(scores, nan=-math.inf).topk(k, dim=1).indices
    out = torch.zeros(b, p, dtype=torch.bool, device=scores.device)
    out.scatter_(1, idx, True)
    out[absent] = False
    return out


def attmim_mask(score_maps: Sequence[Tensor], lambda1: float = LAMBDA1, lambda2: float = LAMBDA2,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """AttMIM mask: a random λ2 subset of the union of every map's top-λ1 patches.

    For each item, ``U = ∪_maps topk(map, λ1)`` and ``round(λ2·|U|)`` patches of ``U`` are drawn
    uniformly without replacement.

    Args:
        score_maps: ``[B, P]`` score maps (cross-attention, prompt attention, self-attention);
            a NaN row means the map is absent for that item.
        lambda1: Fraction of patches taken from each map.
        lambda2: Fraction of the union that is masked.
        generator: Source of randomness (CPU generator).

    Returns:
        ``(mask, union)``, both boolean ``[B, P]``; ``mask ⊆ union``.
    """
    if not score_maps:
        raise ValueError("attmim_mask needs at least one score map")
    if not 0.0 <= lambda2 <= 1.0:
        raise ValueError(f"lambda2 must be in [0, 1], got {lambda2}")
    union = torch.zeros_like(score_maps[0], dtype=torch.bool)
    for s in score_maps:
        if s.shape != union.shape:
            raise ValueError(f"score maps differ in shape: {tuple(s.shape)} vs {tuple(union.shape)}")
        union |= topk_patches(s, lambda1)
    mask = torch.zeros_like(union)
    for b in range(union.shape[0]):
        cand = union[b].nonzero().flatten().cpu()
        k = round(lambda2 * cand.numel())
        if k:
            pick = cand[torch.randperm(cand.numel(), generator=generator)[:k]]
            mask[b, pick.to(mask.device)] = True
    return mask, union


# =========================================================================== AttMIM: patches, decoder, MSE


def _patch_tuple(patch: int | Sequence[int], nd: int) -> tuple[int, ...]:
    return (int(patch),) * nd if isinstance(patch, int) else tuple(int(p) for p in patch)


def patchify(x: Tensor, patch: int | Sequence[int]) -> Tensor:
    """Cut images ``[B, C, H, W]`` (or volumes ``[B, C, D, H, W]``) into flattened patches.

    Returns:
        ``[B, P, prod(patch)·C]``, patches in row-major grid order, each flattened as
        (within-patch position, channel) — MAE's order.
    """
    b, c, *spatial = x.shape
    ps = _patch_tuple(patch, len(spatial))
    if len(ps) != len(spatial) or any(s % p for s, p in zip(spatial, ps)):
        raise ValueError(f"input {tuple(spatial)} is not divisible into patches {ps}")
    grid = [s // p for s, p in zip(spatial, ps)]
    shape = [b, c]
    for g, p in zip(grid, ps):
        shape += [g, p]
    x = x.reshape(shape)
    nd = len(spatial)
    grid_axes = [2 + 2 * i for i in range(nd)]
    inner_axes = [3 + 2 * i for i in range(nd)]
    x = x.permute(0, *grid_axes, *inner_axes, 1)
    return x.reshape(b, math.prod(grid), math.prod(ps) * c)


def unpatchify(patches: Tensor, patch: int | Sequence[int], channels: int, spatial: Sequence[int]) -> Tensor:
    """Inverse of :func:`patchify`: ``[B, P, prod(patch)·C]`` back to ``[B, C, *spatial]``."""
    nd = len(spatial)
    ps = _patch_tuple(patch, nd)
    grid = [s // p for s, p in zip(spatial, ps)]
    b = patches.shape[0]
    x = patches.reshape(b, *grid, *ps, channels)
    perm = [0, 1 + 2 * nd]
    for i in range(nd):
        perm += [1 + i, 1 + nd + i]
    return x.permute(*perm).reshape(b, channels, *spatial)


def apply_patch_mask(x: Tensor, mask: Tensor, patch: int | Sequence[int], fill: float = 0.0) -> Tensor:
    """The input with its masked patches set to ``fill`` (for encoders that see every position)."""
    p = patchify(x, patch)
    p = torch.where(mask.unsqueeze(-1), torch.full_like(p, fill), p)
    return unpatchify(p, patch, x.shape[1], x.shape[2:])


def masked_patch_mse(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool = False) -> Tensor:
    """MSE on the masked patches only (MAE's reconstruction term).

    ``Σ_{b,p} mask·mean_f (pred − target)² / Σ mask``; with ``norm_pix`` the target is
    normalised per patch (mean 0, variance 1) first, as MAE's ``norm_pix_loss``.

    Args:
        pred: ``[B, P, F]`` predicted patches.
        target: ``[B, P, F]`` true patches (:func:`patchify`).
        mask: ``[B, P]`` boolean, True = masked.

    Returns:
        The scalar loss (0 when nothing is masked).
    """
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True, unbiased=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (pred - target).pow(2).mean(dim=-1)
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum().clamp_min(1.0)


class MAEDecoder(nn.Module):
    """A light MAE-style decoder: encoder tokens in, pixel patches out.

    Masked positions are replaced by a learned mask token, a learned position embedding is
    added and a few transformer blocks predict every patch (the loss reads only the masked
    ones). Items of a batch may mask different numbers of patches (AttMIM's union varies).

    Args:
        num_patches: P.
        encoder_dim: Width of the encoder's patch tokens.
        patch_dim: Values per patch (``prod(patch)·C``).
        dim: Decoder width.
        depth: Transformer blocks.
        heads: Attention heads.
    """

    def __init__(self, num_patches: int, encoder_dim: int, patch_dim: int, dim: int = 128,
                 depth: int = 2, heads: int = 4):
        super().__init__()
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, num_patches, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0,
                                           batch_first=True, norm_first=True, activation="gelu")
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, patch_dim)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """``tokens [B, P, encoder_dim]``, ``mask [B, P]`` -> predicted patches ``[B, P, patch_dim]``."""
        x = self.embed(tokens)
        x = torch.where(mask.unsqueeze(-1), self.mask_token.expand_as(x), x) + self.pos
        return self.head(self.norm(self.blocks(x)))


# =========================================================================== EntMLM: lexicon


#: Public clinical terms in the style of RadLex / SNOMED CT common findings (written for m3bind).
CLINICAL_TERMS: Mapping[str, tuple[str, ...]] = {
    "anatomy": (
        "lung", "lobe", "upper lobe", "lower lobe", "middle lobe", "lingula", "hilum", "mediastinum",
        "pleura", "pleural space", "costophrenic angle", "diaphragm", "heart", "cardiac silhouette",
        "aorta", "aortic knob", "pulmonary artery", "trachea", "bronchus", "rib", "thoracic spine",
        "left ventricle", "right ventricle", "atrium", "septum", "myocardium", "retina", "macula",
        "fovea", "optic disc", "cup-to-disc ratio", "arteriole", "venule", "posterior pole", "brain",
        "cortex", "white matter", "grey matter", "gray matter", "basal ganglia", "thalamus",
        "cerebellum", "brainstem", "ventricle", "periventricular", "frontal lobe", "parietal lobe",
        "temporal lobe", "occipital lobe", "gland", "stroma", "nucleus", "nuclei",
    ),
    "finding": (
        "opacity", "consolidation", "effusion", "pneumothorax", "atelectasis", "nodule", "mass",
        "lesion", "edema", "oedema", "cardiomegaly", "air bronchogram", "meniscus", "granuloma",
        "calcification", "fracture", "hyperinflation", "emphysema", "fibrosis", "pneumonia",
        "infiltrate", "microaneurysm", "haemorrhage", "hemorrhage", "hard exudate", "exudate",
        "cotton wool spot", "venous beading", "neovascularisation", "arteriovenous nicking",
        "av nipping", "infarct", "infarction", "ischemia", "ischaemia", "hypertrophy", "fibrillation",
        "flutter", "tachycardia", "bradycardia", "bundle branch block", "st elevation",
        "st depression", "t wave inversion", "q wave", "qrs", "p wave", "hyperintensity",
        "hypointense", "hyperintense", "restricted diffusion", "mass effect", "midline shift",
        "metastasis", "tumor", "tumour", "carcinoma", "adenocarcinoma", "atypia", "mitoses",
        "pleomorphism", "necrosis", "malignancy", "stroke", "retinopathy", "infiltration",
    ),
    "descriptor": (
        "enlarged", "spiculated", "lobulated", "focal", "diffuse", "bilateral", "patchy",
        "confluent", "punctate", "acute", "chronic", "subacute", "benign", "malignant", "high grade",
        "low grade", "well differentiated", "poorly differentiated", "vasogenic", "non-proliferative",
        "proliferative",
    ),
}

_STOP = frozenset(
    "a an the of in on at to with without and or but by for from as is are be been this that these "
    "those its it than above below per one two many few small large mild only any some no not only "
    "above over under into onto within between beats minute".split()
)


def _description_chunks(text: str) -> list[str]:
    """Runs of content words between stop words and punctuation ("tall qrs voltages")."""
    chunks: list[list[str]] = [[]]
    for w in re.findall(r"[a-z0-9&'\-]+|[,.;:()]", text.lower()):
        if w in _STOP or not re.match(r"[a-z]", w):
            chunks.append([])
        else:
            chunks[-1].append(w)
    return [" ".join(c) for c in chunks if c and len(" ".join(c)) >= 4]


class ClinicalLexicon:
    """A set of clinical terms matched in text at word boundaries, longest first.

    Args:
        terms: Terms (case-insensitive; a final plural ``s``/``es`` also matches).
    """

    def __init__(self, terms: Iterable[str]):
        norm = {" ".join(t.lower().split()) for t in terms if t and t.strip()}
        self.terms: tuple[str, ...] = tuple(sorted(norm, key=lambda t: (-len(t), t)))
        if not self.terms:
            raise ValueError("a clinical lexicon needs at least one term")
        alts = "|".join(re.escape(t) for t in self.terms)
        self._re = re.compile(r"(?<![a-z0-9])(?:" + alts + r")(?:e?s)?(?![a-z0-9])")

    def __contains__(self, term: str) -> bool:
        return " ".join(term.lower().split()) in self.terms

    def __len__(self) -> int:
        return len(self.terms)

    def find_spans(self, text: str) -> list[tuple[int, int]]:
        """Character spans ``(start, end)`` of non-overlapping term matches in ``text``."""
        return [m.span() for m in self._re.finditer(text.lower())]


def build_clinical_lexicon(modalities: Sequence[str] = MODALITIES, extra: Iterable[str] = ()) -> ClinicalLexicon:
    """The project's clinical lexicon.

    Terms: every label of the modalities' specs, the content-word runs of their expert
    descriptions, the public term lists of :data:`CLINICAL_TERMS` and ``extra``.
    """
    terms: set[str] = set(extra)
    for m in modalities:
        spec = get_spec(m)
        terms.update(lab for lab in spec.labels if lab not in ("normal", "no finding"))
        for descs in spec.descriptions.values():
            for d in descs:
                terms.update(_description_chunks(d))
    for group in CLINICAL_TERMS.values():
        terms.update(group)
    return ClinicalLexicon(terms)


def entity_token_mask(offsets: Tensor, texts: Sequence[str], lexicon: ClinicalLexicon) -> Tensor:
    """Which tokens belong to a lexicon entity.

    Args:
        offsets: ``[B, T, 2]`` character offsets of every token (a fast HF tokenizer's
            ``offset_mapping``); special and padding tokens have ``(0, 0)``.
        texts: The B texts that were tokenised.
        lexicon: The clinical lexicon.

    Returns:
        Boolean ``[B, T]``: True where a token overlaps a matched term.
    """
    b, t, _ = offsets.shape
    out = torch.zeros(b, t, dtype=torch.bool)
    for i, text in enumerate(texts):
        spans = lexicon.find_spans(text)
        if not spans:
            continue
        s = offsets[i, :, 0].tolist()
        e = offsets[i, :, 1].tolist()
        for j in range(t):
            if e[j] <= s[j]:
                continue
            out[i, j] = any(s[j] < se and e[j] > ss for ss, se in spans)
    return out


def tokenize_with_entities(tokenizer, texts: Sequence[str], lexicon: ClinicalLexicon,
                           max_length: int = 128) -> tuple[dict[str, Tensor], Tensor]:
    """Tokenise ``texts`` with a fast HF tokenizer and mark the entity tokens.

    Returns:
        ``(encoding, entity_mask [B, T])``; the encoding holds ``input_ids``, ``attention_mask``
        and ``special_tokens_mask`` (no offsets).
    """
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                    return_offsets_mapping=True, return_special_tokens_mask=True, return_tensors="pt")
    offsets = enc.pop("offset_mapping")
    return dict(enc), entity_token_mask(offsets, texts, lexicon)


def causal_positions(attention_mask: Tensor, special_tokens_mask: Tensor | None = None) -> Tensor:
    """Positions the text decoder may be asked to predict: real tokens that are not special."""
    ok = attention_mask.bool()
    if special_tokens_mask is not None:
        ok &= ~special_tokens_mask.bool()
    return ok


def entmlm_mask(entity_mask: Tensor, causal_mask: Tensor, lambda3: float = LAMBDA3,
                generator: torch.Generator | None = None) -> Tensor:
    """EntMLM mask: a random λ3 subset of the entity tokens that are in the causal mask.

    For each text, ``E = entity ∩ causal`` and ``max(1, round(λ3·|E|))`` positions of ``E`` are
    drawn without replacement (none when ``E`` is empty).

    Returns:
        Boolean ``[B, T]``, a subset of ``entity_mask & causal_mask``.
    """
    if not 0.0 < lambda3 <= 1.0:
        raise ValueError(f"lambda3 must be in (0, 1], got {lambda3}")
    cand_all = entity_mask.bool() & causal_mask.bool()
    out = torch.zeros_like(cand_all)
    for b in range(cand_all.shape[0]):
        cand = cand_all[b].nonzero().flatten().cpu()
        if cand.numel() == 0:
            continue
        k = max(1, round(lambda3 * cand.numel()))
        out[b, cand[torch.randperm(cand.numel(), generator=generator)[:k]].to(out.device)] = True
    return out


def apply_token_mask(input_ids: Tensor, mask: Tensor, mask_token_id: int,
                     ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Replace masked tokens by ``mask_token_id``; labels hold the original ids there, ``ignore_index`` elsewhere."""
    masked = input_ids.masked_fill(mask, mask_token_id)
    labels = input_ids.masked_fill(~mask, ignore_index)
    return masked, labels


class TextDecoder(nn.Module):
    """A small text decoder for EntMLM: self-attention over the (masked) report, cross-attention to the image.

    Args:
        vocab_size: Output vocabulary (the text encoder's tokenizer).
        text_dim: Width of the text encoder's token states.
        image_dim: Width of the image encoder's patch tokens.
        dim: Decoder width.
        depth: Decoder blocks.
        heads: Attention heads.
    """

    def __init__(self, vocab_size: int, text_dim: int, image_dim: int, dim: int = 128, depth: int = 2,
                 heads: int = 4):
        super().__init__()
        self.text_in = nn.Linear(text_dim, dim)
        self.image_in = nn.Linear(image_dim, dim)
        layer = nn.TransformerDecoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0,
                                           batch_first=True, norm_first=True, activation="gelu")
        self.blocks = nn.TransformerDecoder(layer, depth)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, text_tokens: Tensor, image_tokens: Tensor, text_padding_mask: Tensor | None = None) -> Tensor:
        """Token logits ``[B, T, vocab]``.

        Args:
            text_tokens: ``[B, T, text_dim]`` token states of the masked report.
            image_tokens: ``[B, P, image_dim]`` patch tokens.
            text_padding_mask: ``[B, T]`` True at padding positions.
        """
        x = self.blocks(self.text_in(text_tokens), self.image_in(image_tokens),
                        tgt_key_padding_mask=text_padding_mask)
        return self.head(self.norm(x))


def masked_token_ce(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Cross-entropy on the masked tokens (labels ``ignore_index`` elsewhere); 0 when none is masked."""
    valid = labels != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[valid].float(), labels[valid])


# =========================================================================== prompts and schedule


def disease_prompts(modality: str, labels: Sequence[str] | None = None,
                    templates: Sequence[str] | None = None) -> list[str]:
    """Disease prompts of a modality: every template filled with every label.

    Used for the prompt-driven attention of every item and as the only text signal of
    image-only items.

    Returns:
        ``len(labels)·len(templates)`` prompts, label-major.
    """
    spec = get_spec(modality)
    labels = spec.labels if labels is None else labels
    templates = spec.templates if templates is None else templates
    return [tpl.format(lab) for lab in labels for tpl in templates]


def training_phase(step: int, warmup_steps: int) -> str:
    """``"masked"`` (AttMIM + EntMLM only) for the first ``warmup_steps`` steps, ``"joint"`` after."""
    if warmup_steps < 0:
        raise ValueError("warmup_steps must be >= 0")
    return "masked" if step < warmup_steps else "joint"

