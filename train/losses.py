"""Every training objective of the four papers, one small function per equation.

Names and signatures follow ``DESIGN.md`` ("Training objectives — reference equations").
Tensors are ``[N, D]`` embeddings (L2-normalised here again, which is a no-op for normalised
input), dicts are keyed by modality name, ``logit_scale`` is the exponentiated scale
``s = 1/τ`` (a float or a 0-d tensor, so that a learnable scale receives its gradient).

Distributed training: every contrastive loss gathers the embeddings of all ranks *with
gradients* (:func:`gather_features`, as open_clip's ``gather_with_grad``) and computes the loss of
the local rows against the global batch. Per-row losses are reduced by :func:`_global_mean`,
which divides the local sum by the global row count and multiplies by the world size; the mean
over ranks that DDP takes of the gradients (and a logger takes of the values) is then exactly the
single-process loss on the concatenated batch. In one process both helpers are the identity.

Objectives (:data:`OBJECTIVES`) combine the equations into named ``*_loss`` terms (a dict) that
the trainer sums; every argument is explicit.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F

from m3bind.registry import Registry

Tensor = torch.Tensor
Scale = float | Tensor

#: Objectives: name -> callable returning ``{"<name>_loss": tensor, ...}``.
OBJECTIVES: Registry[Callable[..., dict[str, Tensor]]] = Registry("objective")


# --------------------------------------------------------------------------- distributed helpers


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_with_offset(x: Tensor) -> tuple[Tensor, int]:
    """All rows of ``x`` from every rank (with gradients) and the offset of this rank's rows."""
    if not _is_distributed():
        return x, 0
    import torch.distributed.nn.functional as dist_fn

    world, rank = dist.get_world_size(), dist.get_rank()
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes_i = [int(s.item()) for s in sizes]
    n_max = max(sizes_i)
    # all_gather needs equal shapes: pad to the largest shard, strip afterwards.
    pad = [0, 0] * (x.dim() - 1) + [0, n_max - x.shape[0]]
    padded = F.pad(x, pad)
    if x.requires_grad:
        parts = dist_fn.all_gather(padded)
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
    gathered = torch.cat([p[:s] for p, s in zip(parts, sizes_i)], dim=0)
    return gathered, sum(sizes_i[:rank])


def gather_features(x: Tensor) -> Tensor:
    """Concatenate ``x`` over all ranks along dim 0, keeping gradients (identity in one process).

    Shards may differ in size. The backward pass sums the gradients of every rank's loss into
    the local shard, as ``torch.distributed.nn.functional.all_gather`` does.
    """
    return _gather_with_offset(x)[0]


def _global_mean(per_row: Tensor) -> Tensor:
    """Mean over the rows of all ranks, arranged so that averaging over ranks gives it exactly."""
    if not _is_distributed():
        return per_row.mean()
    count = torch.tensor([float(per_row.shape[0])], device=per_row.device)
    dist.all_reduce(count)
    return per_row.sum() * dist.get_world_size() / count.squeeze()


def _global_sum_int(n: int, device: torch.device) -> int:
    if not _is_distributed():
        return int(n)
    t = torch.tensor([float(n)], device=device)
    dist.all_reduce(t)
    return int(t.item())


def _upcast(x: Tensor) -> Tensor:
    """Half/bfloat16 logits to float32 for a stable softmax; float64 stays float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _norm(x: Tensor) -> Tensor:
    return F.normalize(x, dim=-1)


def _contrastive_rows(query: Tensor, keys: Tensor, logit_scale: Scale) -> Tensor:
    """Per-row CE of local ``query`` rows against the global ``keys``; positive = same index."""
    keys_all, offset = _gather_with_offset(_norm(keys))
    logits = logit_scale * _norm(query) @ keys_all.t()
    target = torch.arange(query.shape[0], device=query.device) + offset
    return F.cross_entropy(_upcast(logits), target, reduction="none")


# --------------------------------------------------------------------------- equations


def clip_loss(image: Tensor, text: Tensor, logit_scale: Scale) -> Tensor:
    """Symmetric CLIP loss (M3Bind Eq. 1).

    ``0.5 * (CE(s·I·Tᵀ, diag) + CE(s·T·Iᵀ, diag))``, a mean over the batch.

    Args:
        image: Image embeddings ``[N, D]``; row ``i`` pairs with ``text[i]``.
        text: Text embeddings ``[N, D]``.
        logit_scale: ``s = 1/τ``.

    Returns:
        The scalar loss.
    """
    i2t = _contrastive_rows(image, text, logit_scale)
    t2i = _contrastive_rows(text, image, logit_scale)
    return 0.5 * (_global_mean(i2t) + _global_mean(t2i))


def text_alignment_loss(texts: Mapping[str, Tensor], weights: Mapping[str, float] | None = None) -> Tensor:
    """Pairwise text-embedding alignment on the same texts (M3Bind Eq. 2, second term of Eq. 6).

    ``Σ_{m1<m2} w_m1·w_m2 · mean_i ||T_m1,i − T_m2,i||²`` (squared L2 over the embedding
    dimension). The caller multiplies by λ.

    Args:
        texts: Modality -> ``[N, D]`` embeddings of the *same* N texts by that modality's text encoder.
        weights: Modality -> loss weight ``w_m`` (Eq. 5); 1 for all when ``None``.

    Returns:
        The scalar loss (0 with fewer than two modalities).
    """
    names = list(texts)
    total = None
    for m1, m2 in itertools.combinations(names, 2):
        w = 1.0 if weights is None else float(weights[m1]) * float(weights[m2])
        d2 = (_norm(texts[m1]) - _norm(texts[m2])).pow(2).sum(dim=-1)
        term = w * _global_mean(d2)
        total = term if total is None else total + term
    if total is None:
        ref = next(iter(texts.values()), torch.zeros(1))
        return ref.sum() * 0.0
    return total


def seskd_kd_loss(student: Tensor, teachers: Mapping[str, Tensor],
                  own: Mapping[str, Tensor] | None = None) -> Tensor:
    """SESKD knowledge-distillation loss (M3Bind Eq. 7).

    ``Σ_m mean_i ||T_m,i − T_student,i||²``: with ``own`` None, ``i`` runs over every text of the
    batch for every teacher; with ``own``, over the texts of modality m only (its reports and
    label prompts), so that each teacher supervises the texts of its own data set. A modality with
    none of its texts in the (global) batch adds nothing.

    Args:
        student: Student text embeddings ``[N, D]``.
        teachers: Modality -> ``[N, D]`` teacher (bound) text embeddings of the same texts.
        own: Optional modality -> ``[N]`` boolean, True where the text belongs to the modality.
    """
    s = _norm(student)
    total = student.sum() * 0.0
    for m, emb in teachers.items():
        per_row = (_norm(emb) - s).pow(2).sum(dim=-1)
        if own is None:
            total = total + _global_mean(per_row)
            continue
        rows = per_row[own[m].to(per_row.device)]
        if _global_sum_int(rows.shape[0], rows.device) > 0:
            total = total + _global_mean(rows)
    return total


def seskd_contrastive_loss(students: Mapping[str, Tensor], images: Mapping[str, Tensor],
                           logit_scale: Scale | Mapping[str, Scale]) -> Tensor:
    """SESKD contrastive loss, text to image (M3Bind Eq. 8).

    ``Σ_m CE(s·T_student·I_mᵀ, diag)``: student embeddings of modality m's reports against that
    modality's (frozen) image embeddings.

    Args:
        students: Modality -> student embeddings ``[N_m, D]`` of the reports of modality m.
        images: Modality -> image embeddings ``[N_m, D]``, row-paired with ``students[m]``.
        logit_scale: One ``s`` or a modality -> ``s`` mapping.
    """
    total = None
    for m, st in students.items():
        s = logit_scale[m] if isinstance(logit_scale, Mapping) else logit_scale
        term = _global_mean(_contrastive_rows(st, images[m], s))
        total = term if total is None else total + term
    if total is None:
        raise ValueError("seskd_contrastive_loss needs at least one modality")
    return total


def _multi_positive_rows(query: Tensor, keys: Tensor, q_ids: Tensor, k_ids: Tensor,
                         logit_scale: Scale) -> Tensor:
    logp = F.log_softmax(_upcast(logit_scale * _norm(query) @ _norm(keys).t()), dim=1)
    pos = (q_ids[:, None] == k_ids[None, :]).to(logp.dtype)
    return -(logp * pos).sum(dim=1) / pos.sum(dim=1).clamp_min(1.0)


def tmcl_loss(modality: Tensor, text: Tensor, text_ids: Tensor, logit_scale: Scale) -> Tensor:
    """MEDBind text-modality contrastive loss with multiple positives (MEDBind Eq. 1).

    Positives of row i are all items whose text is identical to text i (equal ``text_ids``):
    ``−mean_i (1/|P(i)|) Σ_{p∈P(i)} log softmax_row_i(s·t·zᵀ)[p]``, summed over both
    directions (text->modality and modality->text).

    Args:
        modality: Modality embeddings ``z`` ``[N, D]``.
        text: Text embeddings ``t`` ``[N, D]``, row-paired with ``modality``.
        text_ids: ``[N]`` integer id per row; identical texts share an id.
        logit_scale: ``s``.
    """
    z_all, off = _gather_with_offset(_norm(modality))
    t_all, _ = _gather_with_offset(_norm(text))
    ids_all, _ = _gather_with_offset(text_ids)
    t2z = _multi_positive_rows(text, z_all, text_ids, ids_all, logit_scale)
    z2t = _multi_positive_rows(modality, t_all, text_ids, ids_all, logit_scale)
    del off
    return _global_mean(t2z) + _global_mean(z2t)


def emcl_loss(cxr: Tensor, ecg: Tensor, n: int, logit_scale: Scale) -> Tensor:
    """MEDBind edge-modality contrastive loss on paired CXR–ECG items (MEDBind Eq. 2).

    Over the m paired items of a batch of n:
    ``−mean_u log( exp(s·c_u·e_u) / ((n/m)·Σ_q exp(s·c_u·e_q)) )``, summed over both directions.

    Args:
        cxr: CXR embeddings of the paired items ``[m, D]``.
        ecg: ECG embeddings ``[m, D]``, row-paired with ``cxr``.
        n: Items in this process's whole batch (summed over ranks under DDP).
        logit_scale: ``s``.
    """
    m_global = _global_sum_int(cxr.shape[0], cxr.device)
    n_global = _global_sum_int(n, cxr.device)
    if m_global == 0:
        return cxr.sum() * 0.0
    log_nm = math.log(n_global / m_global)
    c2e = _contrastive_rows(cxr, ecg, logit_scale) + log_nm
    e2c = _contrastive_rows(ecg, cxr, logit_scale) + log_nm
    return _global_mean(c2e) + _global_mean(e2c)


def selip_loss(image: Tensor, text: Tensor, similarity: Tensor, logit_scale: Scale) -> Tensor:
    """SeLIP soft-target loss (SeLIP Eqs. 8-13), the ``L_se`` term.

    ``F(S)`` normalises each row of the report similarity ``S`` to sum to 1; the loss is
    ``½(KL_v2t + KL_t2v)``, each ``mean_i KL(F(S)_i ‖ P_i)`` as
    ``F.kl_div(log P, F(S), reduction="batchmean")`` computes it (P = softmax of the scaled
    similarities; the t2v term uses ``Sᵀ``).

    Args:
        image: Image embeddings ``[N, D]`` (local rows under DDP).
        text: Text embeddings ``[N, D]``.
        similarity: Report similarity ``S`` ``[N_global, N_global]``, non-negative, positive
            diagonal, indexed like the concatenated global batch.
        logit_scale: ``s``.
    """
    img_all, off = _gather_with_offset(_norm(image))
    txt_all, _ = _gather_with_offset(_norm(text))
    n = image.shape[0]
    sim = similarity.to(img_all.dtype)
    rows = slice(off, off + n)
    target_v2t = sim[rows] / sim[rows].sum(dim=1, keepdim=True)
    target_t2v = sim.t()[rows] / sim.t()[rows].sum(dim=1, keepdim=True)
    logp_v2t = F.log_softmax(_upcast(logit_scale * _norm(image) @ txt_all.t()), dim=1)
    logp_t2v = F.log_softmax(_upcast(logit_scale * _norm(text) @ img_all.t()), dim=1)
    kl_v2t = F.kl_div(logp_v2t, target_v2t.to(logp_v2t.dtype), reduction="none").sum(dim=1)
    kl_t2v = F.kl_div(logp_t2v, target_t2v.to(logp_t2v.dtype), reduction="none").sum(dim=1)
    return 0.5 * (_global_mean(kl_v2t) + _global_mean(kl_t2v))


# --------------------------------------------------------------------------- objectives


def _scale_of(logit_scale: Scale | Mapping[str, Scale], m: str) -> Scale:
    return logit_scale[m] if isinstance(logit_scale, Mapping) else logit_scale


@OBJECTIVES.register("clip")
def clip_objective(image: Tensor, text: Tensor, logit_scale: Scale) -> dict[str, Tensor]:
    """One modality's CLIP pre-training (stage 0): ``{"clip_loss"}``."""
    return {"clip_loss": clip_loss(image, text, logit_scale)}


@OBJECTIVES.register("m3bind")
def m3bind_objective(images: Mapping[str, Tensor], texts: Mapping[str, Tensor],
                     shared_texts: Mapping[str, Tensor], logit_scale: Scale | Mapping[str, Scale],
                     weights: Mapping[str, float] | None, lambda_align: float) -> dict[str, Tensor]:
    """M3Bind binding (Eq. 6): ``Σ_m w_m·L_clip,m`` and ``λ·Σ_{m1<m2} w_m1·w_m2·L_align``.

    Args:
        images / texts: Modality -> row-paired image and report embeddings of its own batch.
        shared_texts: Modality -> embeddings of the same shared texts by each text encoder.
        logit_scale: One ``s`` or one per modality.
        weights: Modality -> ``w_m`` (None = all 1).
        lambda_align: λ (10 in the paper).
    """
    clip = None
    for m in images:
        w = 1.0 if weights is None else float(weights[m])
        term = w * clip_loss(images[m], texts[m], _scale_of(logit_scale, m))
        clip = term if clip is None else clip + term
    out = {"clip_loss": clip}
    if len(shared_texts) >= 2 and lambda_align:
        out["align_loss"] = lambda_align * text_alignment_loss(shared_texts, weights)
    return out


@OBJECTIVES.register("seskd_kd")
def seskd_kd_objective(student: Tensor, teachers: Mapping[str, Tensor],
                       own: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """SESKD phase 1 (Eq. 7 alone): ``{"kd_loss"}``."""
    return {"kd_loss": seskd_kd_loss(student, teachers, own)}


@OBJECTIVES.register("seskd")
def seskd_objective(student: Tensor, teachers: Mapping[str, Tensor], students: Mapping[str, Tensor],
                    images: Mapping[str, Tensor], logit_scale: Scale | Mapping[str, Scale],
                    own: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """SESKD phase 2 (Eq. 9): ``{"kd_loss", "contrastive_loss"}``."""
    return {"kd_loss": seskd_kd_loss(student, teachers, own),
            "contrastive_loss": seskd_contrastive_loss(students, images, logit_scale)}


@OBJECTIVES.register("medbind")
def medbind_objective(modality: Tensor, text: Tensor, text_ids: Tensor, logit_scale: Scale,
                      cxr: Tensor | None = None, ecg: Tensor | None = None, n: int = 0,
                      emcl_weight: float = 1.0) -> dict[str, Tensor]:
    """MEDBind: TMCL on modality–text pairs, plus EMCL when a paired CXR–ECG subset is given."""
    out = {"tmcl_loss": tmcl_loss(modality, text, text_ids, logit_scale)}
    if cxr is not None and ecg is not None:
        out["emcl_loss"] = emcl_weight * emcl_loss(cxr, ecg, n, logit_scale)
    return out


@OBJECTIVES.register("selip")
def selip_objective(image: Tensor, text: Tensor, similarity: Tensor, logit_scale: Scale,
                    alpha: float = 1.0, beta: float = 1.0) -> dict[str, Tensor]:
    """SeLIP total ``α·L_clip + β·L_se`` as two terms ``{"clip_loss", "se_loss"}``."""
    return {"clip_loss": alpha * clip_loss(image, text, logit_scale),
            "se_loss": beta * selip_loss(image, text, similarity, logit_scale)}


def total_loss(terms: Mapping[str, Tensor]) -> Tensor:
    """Sum of an objective's named ``*_loss`` terms."""
    return sum(terms.values(), start=torch.zeros((), device=next(iter(terms.values())).device))
