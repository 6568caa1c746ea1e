"""MMCLIP components: attention-masked image modelling (AttMIM) and entity-masked language modelling (EntMLM).

MMCLIP adds two masked objectives to CLIP training:

* **AttMIM** — three patch-score maps are computed for an image: image–report cross-attention
  (:func:`cross_attention_scores`, read from the EntMLM text decoder), prompt-driven attention
  between the patches and the disease prompts of the modality (:func:`prompt_attention_scores`)
  and the image's own self-attention (:func:`self_attention_scores`;
  :func:`vit_tokens_and_attention` reads both of a timm ViT). The union of each map's top-λ1
  patches is the set of clinically salient patches; a random λ2 subset of that union is masked (:func:`attmim_mask`),
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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

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
    """MMCLIP's masked objectives as an option of stage 0 (the top-level ``mmclip:`` block)."""

    modalities: list[str] = field(
        default_factory=lambda: ["cxr"],
        metadata={"help": "2D modalities whose stage-0 teachers (timm ViT trunks) add AttMIM + EntMLM"},
    )
    lambda1: float = field(
        default=LAMBDA1, metadata={"help": "fraction of patches taken from each score map (top-λ1)"}
    )
    lambda2: float = field(
        default=LAMBDA2, metadata={"help": "fraction of the top-λ1 union that is masked"}
    )
    lambda3: float = field(
        default=LAMBDA3, metadata={"help": "fraction of the entity tokens masked for EntMLM"}
    )
    patch_size: int = field(default=16, metadata={"help": "pixel patch size of the MIM targets"})
    norm_pix: bool = field(
        default=False, metadata={"help": "normalise each target patch (MAE norm_pix_loss)"}
    )
    decoder_dim: int = field(default=128, metadata={"help": "width of the MAE-style image decoder"})
    decoder_depth: int = field(
        default=2, metadata={"help": "transformer blocks of the image decoder"}
    )
    text_decoder_dim: int = field(
        default=128, metadata={"help": "width of the EntMLM text decoder"}
    )
    text_decoder_depth: int = field(
        default=2, metadata={"help": "blocks of the EntMLM text decoder"}
    )
    mim_weight: float = field(
        default=1.0, metadata={"help": "weight of the AttMIM reconstruction loss"}
    )
    mlm_weight: float = field(default=1.0, metadata={"help": "weight of the EntMLM loss"})
    warmup_steps: int = field(
        default=100,
        metadata={
            "help": "steps of the masked objectives alone before the joint (contrastive + masked) phase"
        },
    )
    image_only: bool = field(
        default=True,
        metadata={
            "help": "use image-only items (no report): MIM loss alone, prompt-driven attention from disease prompts"
        },
    )
    heldout_items: int = field(
        default=64,
        metadata={"help": "test-split images on which the MIM loss is measured after stage 0 (0 = skip)"},
    )
    heldout_every: int = field(
        default=0,
        metadata={"help": "also measure the held-out MIM loss every this many steps (a learning curve "
                          "in metrics.csv as heldout_mim_loss; 0 = only after stage 0)"},
    )

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
        if not self.modalities or self.heldout_items < 0 or self.heldout_every < 0:
            raise ValueError("mmclip: modalities must not be empty, heldout_items and heldout_every >= 0")
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


def self_attention_scores(attn: Tensor, num_prefix: int = 1) -> Tensor:
    """Patch scores from the image encoder's self-attention (its last block, say).

    Args:
        attn: ``[B, heads, N, N]`` or ``[B, N, N]`` self-attention over ``N = num_prefix + P``
            tokens (class token first, then register tokens, then patches).
        num_prefix: Prefix tokens; with at least one, the score is the class token's attention
            to each patch, otherwise the mean attention each patch receives from all tokens.

    Returns:
        ``[B, P]``.
    """
    if attn.dim() == 4:
        attn = attn.mean(dim=1)
    if num_prefix:
        return attn[:, 0, num_prefix:]
    return attn.mean(dim=1)


def vit_tokens_and_attention(vit: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, int]:
    """Patch tokens and last-block self-attention of a timm VisionTransformer.

    The attention is recomputed from the input of the last block's attention module (captured
    with a forward pre-hook), so it works with timm's fused attention too.

    Args:
        vit: A timm ``VisionTransformer`` or a wrapper exposing it as ``.model`` (``TimmTrunk``).
        x: Images ``[B, C, H, W]``.

    Returns:
        ``(patch_tokens [B, P, D], attention [B, heads, N, N], num_prefix_tokens)``; the tokens
        are those of ``forward_features`` (after the final norm) without the prefix tokens.
    """
    model = getattr(vit, "model", vit)
    if not hasattr(model, "blocks") or not hasattr(model, "forward_features"):
        raise TypeError(f"{type(model).__name__} is not a timm VisionTransformer")
    attn_mod = model.blocks[-1].attn
    captured: list[Tensor] = []
    handle = attn_mod.register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
    try:
        feats = model.forward_features(x)
    finally:
        handle.remove()
    h = captured[-1]
    b, n, _ = h.shape
    qkv = (
        attn_mod.qkv(h)
        .reshape(b, n, 3, attn_mod.num_heads, attn_mod.head_dim)
        .permute(2, 0, 3, 1, 4)
    )
    q, k = attn_mod.q_norm(qkv[0]), attn_mod.k_norm(qkv[1])
    attn = ((q * attn_mod.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    npre = int(getattr(model, "num_prefix_tokens", 1))
    return feats[:, npre:], attn, npre


def prompt_attention_scores(
    patch_tokens: Tensor, prompt_embeddings: Tensor, temperature: float = 0.07
) -> Tensor:
    """Prompt-driven attention: how strongly the disease prompts attend to each patch.

    Each prompt attends over the patches with ``softmax_p(cos(q_k, x_p) / temperature)``
    (queries = prompt embeddings, keys = patch tokens, both in the shared space); the score of
    a patch is its attention averaged over the prompts.

    Args:
        patch_tokens: ``[B, P, D]`` patch tokens projected into the shared space (the image
            projection head applied token-wise).
        prompt_embeddings: ``[K, D]`` text embeddings of the modality's disease prompts.
        temperature: Softmax temperature (CLIP's τ by default).

    Returns:
        ``[B, P]``, each row summing to 1.
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    cos = torch.einsum(
        "bpd,kd->bkp", F.normalize(patch_tokens, dim=-1), F.normalize(prompt_embeddings, dim=-1)
    )
    return (cos / temperature).softmax(dim=-1).mean(dim=1)


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


def attmim_mask(
    score_maps: Sequence[Tensor],
    lambda1: float = LAMBDA1,
    lambda2: float = LAMBDA2,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
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
            raise ValueError(
                f"score maps differ in shape: {tuple(s.shape)} vs {tuple(union.shape)}"
            )
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


def unpatchify(
    patches: Tensor, patch: int | Sequence[int], channels: int, spatial: Sequence[int]
) -> Tensor:
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


def apply_patch_mask(
    x: Tensor, mask: Tensor, patch: int | Sequence[int], fill: float = 0.0
) -> Tensor:
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

    def __init__(
        self,
        num_patches: int,
        encoder_dim: int,
        patch_dim: int,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
    ):
        super().__init__()
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, num_patches, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        layer = nn.TransformerEncoderLayer(
            dim,
            heads,
            dim_feedforward=4 * dim,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
            activation="gelu",
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, patch_dim)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """``tokens [B, P, encoder_dim]``, ``mask [B, P]`` -> predicted patches ``[B, P, patch_dim]``."""
        x = self.embed(tokens)
        x = torch.where(mask.unsqueeze(-1), self.mask_token.expand_as(x), x) + self.pos
        return self.head(self.norm(self.blocks(x)))


# =========================================================================== EntMLM: lexicon


def _terms(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


#: Public clinical terms in the style of RadLex / SNOMED CT common findings (written for m3bind).
CLINICAL_TERMS: Mapping[str, tuple[str, ...]] = {
    "anatomy": _terms(
        "lung, lobe, upper lobe, lower lobe, middle lobe, lingula, hilum, mediastinum, pleura, "
        "pleural space, costophrenic angle, diaphragm, heart, cardiac silhouette, aorta, aortic "
        "knob, pulmonary artery, trachea, bronchus, rib, thoracic spine, left ventricle, right "
        "ventricle, atrium, septum, myocardium, retina, macula, fovea, optic disc, cup-to-disc "
        "ratio, arteriole, venule, posterior pole, brain, cortex, white matter, grey matter, gray "
        "matter, basal ganglia, thalamus, cerebellum, brainstem, ventricle, periventricular, "
        "frontal lobe, parietal lobe, temporal lobe, occipital lobe, gland, stroma, nucleus, "
        "nuclei"
    ),
    "finding": _terms(
        "opacity, consolidation, effusion, pneumothorax, atelectasis, nodule, mass, lesion, "
        "edema, oedema, cardiomegaly, air bronchogram, meniscus, granuloma, calcification, "
        "fracture, hyperinflation, emphysema, fibrosis, pneumonia, infiltrate, microaneurysm, "
        "haemorrhage, hemorrhage, hard exudate, exudate, cotton wool spot, venous beading, "
        "neovascularisation, arteriovenous nicking, av nipping, infarct, infarction, ischemia, "
        "ischaemia, hypertrophy, fibrillation, flutter, tachycardia, bradycardia, bundle branch "
        "block, st elevation, st depression, t wave inversion, q wave, qrs, p wave, "
        "hyperintensity, hypointense, hyperintense, restricted diffusion, mass effect, midline "
        "shift, metastasis, tumor, tumour, carcinoma, adenocarcinoma, atypia, mitoses, "
        "pleomorphism, necrosis, malignancy, stroke, retinopathy, infiltration"
    ),
    "descriptor": _terms(
        "enlarged, spiculated, lobulated, focal, diffuse, bilateral, patchy, confluent, punctate, "
        "acute, chronic, subacute, benign, malignant, high grade, low grade, well differentiated, "
        "poorly differentiated, vasogenic, non-proliferative, proliferative"
    ),
}


_STOP = frozenset(
    "a an the of in on at to with without and or but by for from as is are be been this that these "
    "those its it than above below per one two many few small large mild only any some no not only "
    "above over under into onto within between beats minute consistent faster suspicious".split()
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


def build_clinical_lexicon(
    modalities: Sequence[str] = MODALITIES, extra: Iterable[str] = ()
) -> ClinicalLexicon:
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


def tokenize_with_entities(
    tokenizer, texts: Sequence[str], lexicon: ClinicalLexicon, max_length: int = 128
) -> tuple[dict[str, Tensor], Tensor]:
    """Tokenise ``texts`` with a fast HF tokenizer and mark the entity tokens.

    Returns:
        ``(encoding, entity_mask [B, T])``; the encoding holds ``input_ids``, ``attention_mask``
        and ``special_tokens_mask`` (no offsets).
    """
    enc = tokenizer(
        list(texts),
        padding=True,
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        return_tensors="pt",
    )
    offsets = enc.pop("offset_mapping")
    return dict(enc), entity_token_mask(offsets, texts, lexicon)


def causal_positions(attention_mask: Tensor, special_tokens_mask: Tensor | None = None) -> Tensor:
    """Positions the text decoder may be asked to predict: real tokens that are not special."""
    ok = attention_mask.bool()
    if special_tokens_mask is not None:
        ok &= ~special_tokens_mask.bool()
    return ok


def entmlm_mask(
    entity_mask: Tensor,
    causal_mask: Tensor,
    lambda3: float = LAMBDA3,
    generator: torch.Generator | None = None,
) -> Tensor:
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


def apply_token_mask(
    input_ids: Tensor, mask: Tensor, mask_token_id: int, ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    """Replace masked tokens by ``mask_token_id``; labels hold the original ids there, ``ignore_index`` elsewhere."""
    masked = input_ids.masked_fill(mask, mask_token_id)
    labels = input_ids.masked_fill(~mask, ignore_index)
    return masked, labels


class _DecoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, img: Tensor, pad: Tensor | None) -> tuple[Tensor, Tensor]:
        h = self.norm1(x)
        x = x + self.self_attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        h = self.norm2(x)
        out, w = self.cross_attn(h, img, img, need_weights=True, average_attn_weights=False)
        x = x + out
        return x + self.mlp(self.norm3(x)), w


class TextDecoder(nn.Module):
    """A small text decoder for EntMLM: self-attention over the (masked) report, cross-attention to the image.

    Its last block's cross-attention weights (report tokens over image patches) are the
    image–report cross-attention map of AttMIM (:func:`cross_attention_scores`).

    Args:
        vocab_size: Output vocabulary (the text encoder's tokenizer).
        text_dim: Width of the text encoder's token states.
        image_dim: Width of the image encoder's patch tokens.
        dim: Decoder width.
        depth: Decoder blocks.
        heads: Attention heads.
    """

    def __init__(
        self,
        vocab_size: int,
        text_dim: int,
        image_dim: int,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError("TextDecoder needs depth >= 1")
        self.text_in = nn.Linear(text_dim, dim)
        self.image_in = nn.Linear(image_dim, dim)
        self.blocks = nn.ModuleList(_DecoderBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)

    def forward(
        self,
        text_tokens: Tensor,
        image_tokens: Tensor,
        text_padding_mask: Tensor | None = None,
        return_attention: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Token logits ``[B, T, vocab]`` (and the last cross-attention ``[B, heads, T, P]``).

        Args:
            text_tokens: ``[B, T, text_dim]`` token states of the masked report.
            image_tokens: ``[B, P, image_dim]`` patch tokens.
            text_padding_mask: ``[B, T]`` True at padding positions.
            return_attention: Also return the last block's cross-attention weights.
        """
        x, img = self.text_in(text_tokens), self.image_in(image_tokens)
        w = None
        for blk in self.blocks:
            x, w = blk(x, img, text_padding_mask)
        logits = self.head(self.norm(x))
        return (logits, w) if return_attention else logits


def masked_token_ce(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Cross-entropy on the masked tokens (labels ``ignore_index`` elsewhere); 0 when none is masked."""
    valid = labels != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[valid].float(), labels[valid])


# =========================================================================== prompts and schedule


def disease_prompts(
    modality: str, labels: Sequence[str] | None = None, templates: Sequence[str] | None = None
) -> list[str]:
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


# =========================================================================== the masked objectives together


class MMCLIPHeads(nn.Module):
    """What MMCLIP adds to a ViT CLIP model: the MAE-style image decoder and the EntMLM text decoder.

    :meth:`losses` runs one AttMIM + EntMLM step: score maps from the unmasked image (self-
    attention, prompt-driven attention and — for items with a report — the text decoder's
    cross-attention), the AttMIM mask, the masked image through the same ViT, reconstruction.

    Args:
        cfg: The MMCLIP options (λ1, λ2, patch size, decoder sizes, loss weights).
        num_patches: Patches per image of the ViT.
        encoder_dim: Width of the ViT tokens.
        patch_dim: Values per pixel patch (``patch_size²·C``).
        vocab_size: Text tokenizer vocabulary.
        text_dim: Width of the text encoder's token states.
    """

    def __init__(
        self,
        cfg: MMCLIPConfig,
        num_patches: int,
        encoder_dim: int,
        patch_dim: int,
        vocab_size: int,
        text_dim: int,
    ):
        super().__init__()
        self.cfg = cfg
        self.image_decoder = MAEDecoder(
            num_patches, encoder_dim, patch_dim, cfg.decoder_dim, cfg.decoder_depth
        )
        self.text_decoder = TextDecoder(
            vocab_size, text_dim, encoder_dim, cfg.text_decoder_dim, cfg.text_decoder_depth
        )

    def losses(
        self,
        vit: nn.Module,
        images: Tensor,
        prompt_embeddings: Tensor,
        project,
        text_states: Tensor | None = None,
        mlm_labels: Tensor | None = None,
        text_padding_mask: Tensor | None = None,
        has_text: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """``{"mim_loss"}`` and, when some item has a report, ``"mlm_loss"`` (weighted).

        Args:
            vit: The image trunk (timm ViT, see :func:`vit_tokens_and_attention`).
            images: ``[B, C, H, W]`` preprocessed images.
            prompt_embeddings: ``[K, D]`` disease-prompt embeddings in the shared space.
            project: Maps ViT tokens ``[B, P, encoder_dim]`` into the shared space (the image
                projection head applied token-wise).
            text_states: ``[B, T, text_dim]`` token states of the entity-masked reports
                (any values for image-only rows).
            mlm_labels: ``[B, T]`` original ids at masked positions, -100 elsewhere.
            text_padding_mask: ``[B, T]`` True at padding.
            has_text: ``[B]`` True for items with a report (all True when ``None``).
            generator: Randomness of the AttMIM subset.
        """
        cfg = self.cfg
        tokens, attn, npre = vit_tokens_and_attention(vit, images)
        with torch.no_grad():
            maps = [
                self_attention_scores(attn, npre),
                prompt_attention_scores(project(tokens), prompt_embeddings),
            ]
        out: dict[str, Tensor] = {}
        if text_states is not None:
            has = (
                torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
                if has_text is None
                else has_text.bool()
            )
            logits, cross = self.text_decoder(
                text_states, tokens, text_padding_mask, return_attention=True
            )
            valid = None if text_padding_mask is None else ~text_padding_mask
            cmap = cross_attention_scores(cross.detach(), valid)
            maps.append(cmap.masked_fill(~has.unsqueeze(1), float("nan")))
            if bool(has.any()) and mlm_labels is not None:
                out["mlm_loss"] = cfg.mlm_weight * masked_token_ce(logits[has], mlm_labels[has])
        mask, _ = attmim_mask(maps, cfg.lambda1, cfg.lambda2, generator)
        masked = apply_patch_mask(images, mask, cfg.patch_size)
        model = getattr(vit, "model", vit)
        masked_tokens = model.forward_features(masked)[:, npre:]
        pred = self.image_decoder(masked_tokens, mask)
        target = patchify(images, cfg.patch_size)
        out["mim_loss"] = cfg.mim_weight * masked_patch_mse(pred, target, mask, cfg.norm_pix)
        return out
