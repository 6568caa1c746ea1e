"""One evaluation harness for every stage, modality and model directory.

``evaluate(models, cohort_root, out_dir, cfg)`` runs the papers' protocols on a cohort
described by a ``manifest.csv`` (the simulated cohort of ``data_registry.synthetic`` or any
adapter writing the same columns) and writes ``report.json``, ``report.md`` and ``plots/``:

* zero-shot classification (M3Bind Table 1; FLAIR's naive / expert-knowledge prompts and
  prompt ensembles), multi-label findings scored per label (CheXpert style);
* few-shot linear probes on frozen embeddings (M3Bind Table 2, Fig. 3);
* item<->text retrieval against distinct texts (SeLIP), RSUM;
* cross-modal retrieval between the linked test patients' modalities (patient-level
  Recall@K, class-level precision@K) and MEDBind's cross-modality zero-shot;
* real clinical text: OpenI reports ranked against label prompts, AUC per MeSH finding,
  for every stage's text encoder and for the student's initialisation (MiniLM).

Every item is read once per run and embedded once per model; text embeddings are cached.
The report layout is ``metrics[<stage>][<modality or a->b>][<task>][<metric>]``.

CLI: ``python -m train.stages.evaluate --model DIR [--model DIR ...] --data COHORT --out DIR``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from m3bind.config import ConfigError, apply_overrides, from_dict, to_dict
from m3bind.errors import M3BindError
from m3bind.modalities import MODALITIES, SPECS
from train import metrics as M
from train.eval_data import (Item, detect_simulated, items_from_dataset, primary_condition,
                             read_items, relevance_matrix)

log = logging.getLogger(__name__)

#: Few-shot K per modality, as M3Bind Table 2 (MRI, absent there, follows the other volume, CT).
FEWSHOT_DEFAULTS: dict[str, tuple[int, ...]] = {
    "retina": (1, 5, 10), "ct": (1, 5, 10), "mri": (1, 5, 10),
    "ecg": (1, 4, 8), "cxr": (1, 10, 100), "pathology": (1, 10, 100),
}

ZEROSHOT_MODES = ("ensemble", "naive", "expert")
STAGE_ORDER = ("zoo", "bound", "distilled")
#: Training-stage names recorded in model provenance -> report stage names.
PROVENANCE_STAGES = {"pretrain": "zoo", "bind": "bound", "distill": "distilled"}


@dataclass
class EvalConfig:
    """What the evaluation runs and how much of it (every field has a CPU-friendly default)."""

    modalities: list[str] | None = field(default=None, metadata={
        "help": "modalities to evaluate (default: every modality in both the cohort and a model)"})
    test_split: str = field(default="test", metadata={
        "help": "manifest split of the evaluation items (linked patients in the simulated cohort)"})
    support_splits: list[str] = field(default_factory=lambda: ["train", "val"], metadata={
        "help": "manifest splits the few-shot support sets are drawn from"})
    max_test_items: int | None = field(default=None, metadata={
        "help": "cap on test items per modality, applied by keeping a seeded subset of test "
                "patients (the same for every modality, so linked patients stay linked); None = all"})
    zeroshot_modes: list[str] = field(default_factory=lambda: list(ZEROSHOT_MODES), metadata={
        "help": "prompt settings: ensemble (template ensemble, the headline), naive (FLAIR: the "
                "label alone), expert (FLAIR: expert-knowledge descriptions)"})
    chance: str = field(default="majority", metadata={
        "help": "chance level of accuracy: majority (most frequent test class) or uniform (1/K)"})
    fewshot_shots: dict[str, list[int]] = field(default_factory=dict, metadata={
        "help": "K shots per class per modality; missing modalities use M3Bind Table 2's"})
    fewshot_sets: int = field(default=20, metadata={
        "help": "support sets drawn per K (mean +/- std reported); MEDBind uses 300 for final numbers"})
    fewshot_pool_per_class: int = field(default=200, metadata={
        "help": "at most this many support-split items per class are embedded for few-shot"})
    probe_c: float = field(default=1.0, metadata={
        "help": "inverse L2 strength of the logistic-regression probe"})
    retrieval_ks: list[int] = field(default_factory=lambda: [1, 5, 10], metadata={
        "help": "K of Recall@K (text and cross-modal retrieval)"})
    precision_ks: list[int] = field(default_factory=lambda: [1, 5, 10], metadata={
        "help": "K of class-level cross-modal precision@K (10 is the headline)"})
    relevance: str = field(default="overlap", metadata={
        "help": "cross-modal relevance: overlap (patients share a condition, the synthetic "
                "cohort's documented rule) or primary (same primary condition)"})
    bootstrap: int = field(default=1000, metadata={
        "help": "bootstrap resamples for the 95% intervals (0 disables them)"})
    ci_level: float = field(default=0.95, metadata={"help": "confidence level of the intervals"})
    seed: int = field(default=0, metadata={"help": "seed of every random draw of the evaluation"})
    batch_size: int = field(default=16, metadata={"help": "items per embedding batch"})
    openi_reports: int = field(default=500, metadata={
        "help": "OpenI reports scored in the clinical-text check (0 skips it)"})
    text_baseline: bool = field(default=True, metadata={
        "help": "also score the student's initialisation (MiniLM, mean pooling) on OpenI"})
    plots: bool = field(default=True, metadata={"help": "write plots/ (matplotlib, Agg)"})
    tsne_max_points: int = field(default=600, metadata={
        "help": "at most this many linked test items in each t-SNE plot"})
    simulated: bool | None = field(default=None, metadata={
        "help": "whether the cohort is simulated (None: detect from the manifest's patient ids "
                "and the cohort's own description)"})

    def __post_init__(self):
        if self.modalities is not None:
            bad = [m for m in self.modalities if m not in MODALITIES]
            if bad:
                raise ConfigError(f"unknown modalities {bad} (known: {', '.join(MODALITIES)})")
        bad = [m for m in self.zeroshot_modes if m not in ZEROSHOT_MODES]
        if bad or not self.zeroshot_modes:
            raise ConfigError(f"zeroshot_modes must be a non-empty subset of {ZEROSHOT_MODES}")
        if self.chance not in ("majority", "uniform"):
            raise ConfigError("chance must be 'majority' or 'uniform'")
        if self.relevance not in ("overlap", "primary"):
            raise ConfigError("relevance must be 'overlap' or 'primary'")
        for m, ks in self.fewshot_shots.items():
            if m not in MODALITIES or not ks or any(int(k) < 1 for k in ks):
                raise ConfigError(f"fewshot_shots[{m!r}] must name a modality and list K >= 1")
        for name in ("fewshot_sets", "fewshot_pool_per_class", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        for name in ("bootstrap", "openi_reports", "tsne_max_points"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        if self.max_test_items is not None and self.max_test_items < 2:
            raise ConfigError("max_test_items must be >= 2 or None")
        if not 0.5 < self.ci_level < 1:
            raise ConfigError("ci_level must be in (0.5, 1)")
        if not self.retrieval_ks or not self.precision_ks or min(
                self.retrieval_ks + self.precision_ks) < 1:
            raise ConfigError("retrieval_ks and precision_ks must list K >= 1")
        if self.probe_c <= 0:
            raise ConfigError("probe_c must be > 0")

    def shots(self, modality: str) -> list[int]:
        """K values of the few-shot evaluation of ``modality``."""
        return sorted(int(k) for k in self.fewshot_shots.get(modality, FEWSHOT_DEFAULTS[modality]))


# --------------------------------------------------------------------------- cohort

def _test_patients(items: list[Item], cfg: EvalConfig, rng: np.random.Generator) -> set[str]:
    """Test patients to evaluate: all, or a seeded subset that keeps every modality within
    ``cfg.max_test_items`` items."""
    per_patient: dict[str, dict[str, int]] = {}
    for it in items:
        if it.split == cfg.test_split:
            counts = per_patient.setdefault(it.patient, {})
            counts[it.modality] = counts.get(it.modality, 0) + 1
    if not cfg.max_test_items:
        return set(per_patient)
    names = sorted(per_patient)
    used: dict[str, int] = {}
    keep = set()
    for i in rng.permutation(len(names)):
        counts = per_patient[names[i]]
        if all(used.get(m, 0) + c <= cfg.max_test_items for m, c in counts.items()):
            keep.add(names[i])
            for m, c in counts.items():
                used[m] = used.get(m, 0) + c
    return keep


# --------------------------------------------------------------------------- embeddings

def load_sample(root: Path, item: Item):
    """Read one manifest item through ``m3bind.io`` (the one path every consumer uses)."""
    from m3bind.io import load

    return load(root / item.path, item.modality)


class EmbeddingCache:
    """Embeddings of items and texts, computed once per model and key within a run.

    Each item file is read once and embedded by every model that covers its modality.
    """

    def __init__(self, models: dict[str, Any], root: Path, batch_size: int,
                 loader: Callable[[Path, Item], Any] | None = None):
        self.models, self.root, self.batch_size = models, root, batch_size
        self.loader = loader or load_sample
        self.items: dict[str, dict[str, np.ndarray]] = {s: {} for s in models}
        self.texts: dict[tuple[str, str, str], np.ndarray] = {}
        self.failed: dict[str, str] = {}

    def ensure(self, items: list[Item], desc: str = "embedding") -> list[Item]:
        """Embed ``items`` not embedded yet with every model covering their modality; returns
        the items that could be read (failures are logged and remembered)."""
        todo = [it for it in items if it.item_id not in self.failed and any(
            it.item_id not in self.items[s] for s, m in self.models.items()
            if it.modality in m.modalities)]
        for start in tqdm(range(0, len(todo), self.batch_size), desc=desc, leave=False,
                          disable=len(todo) <= self.batch_size):
            batch, samples = [], []
            for it in todo[start:start + self.batch_size]:
                try:
                    samples.append(self.loader(self.root, it))
                    batch.append(it)
                except M3BindError as e:
                    log.warning("cannot read %s: %s", it.path, e)
                    self.failed[it.item_id] = e.line()
            if not batch:
                continue
            for stage, model in self.models.items():
                # a batch may mix modalities; embed each modality of it separately
                for mod in sorted({it.modality for it in batch}):
                    idx = [i for i, it in enumerate(batch) if it.modality == mod]
                    if mod not in model.modalities:
                        continue
                    emb = np.asarray(model.embed([samples[i] for i in idx],
                                                 batch_size=self.batch_size), dtype=np.float32)
                    for i, e in zip(idx, emb):
                        self.items[stage][batch[i].item_id] = e
        return [it for it in items if it.item_id not in self.failed]

    def get(self, stage: str, items: list[Item]) -> np.ndarray:
        """``[N, D]`` embeddings of ``items`` under ``stage`` (they must have been ensured)."""
        return np.stack([self.items[stage][it.item_id] for it in items])

    def text(self, stage: str, modality: str, texts: list[str]) -> np.ndarray:
        """``[N, D]`` normalised text embeddings from ``stage``'s text encoder for ``modality``."""
        missing = list(dict.fromkeys(t for t in texts if (stage, modality, t) not in self.texts))
        model = self.models[stage]
        for start in range(0, len(missing), 64):
            chunk = missing[start:start + 64]
            emb = _normalise(np.asarray(model.embed_text(chunk, modality=modality), np.float32))
            for t, e in zip(chunk, emb):
                self.texts[(stage, modality, t)] = e
        return np.stack([self.texts[(stage, modality, t)] for t in texts])


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def logit_scale(model, modality: str) -> float:
    """The model's logit scale for ``modality`` (per-teacher scales before distillation)."""
    per = getattr(model, "logit_scale_for", None)
    return float(per(modality) if callable(per) else model.logit_scale)


def label_embeddings(model, modality: str, labels: list[str], mode: str) -> np.ndarray:
    """Class embeddings of ``labels`` in prompt setting ``mode`` (``m3bind.zeroshot``)."""
    from m3bind import zeroshot

    return _normalise(np.asarray(zeroshot.label_embeddings(model, modality, list(labels), mode=mode),
                                 dtype=np.float32))


# --------------------------------------------------------------------------- tasks

def _ci(values: np.ndarray, cfg: EvalConfig, salt: int = 0) -> list[float]:
    return list(M.bootstrap_mean_ci(values, cfg.bootstrap, cfg.ci_level, cfg.seed + salt))


def zeroshot_task(model, emb: np.ndarray, items: list[Item], modality: str, mode: str,
                  cfg: EvalConfig) -> tuple[dict, np.ndarray]:
    """Zero-shot classification over the modality's labels; returns (metrics, confusion)."""
    labels = list(SPECS[modality].labels)
    y = np.array([labels.index(it.label) for it in items])
    lab = label_embeddings(model, modality, labels, mode)
    probs = _softmax(logit_scale(model, modality) * emb @ lab.T)
    out = M.classification_metrics(y, probs, cfg.chance)
    out["n"] = len(items)
    if cfg.bootstrap:
        cis = M.classification_cis(y, probs, cfg.bootstrap, cfg.ci_level, cfg.seed)
        out["ci95"] = cis["accuracy"]
        out["ci95_by_metric"] = cis
    cm = M.confusion_matrix(y, probs.argmax(1), len(labels))
    return out, cm


def multilabel_task(model, emb: np.ndarray, items: list[Item], modality: str,
                    cfg: EvalConfig) -> dict | None:
    """CheXpert-style findings: each finding scored by its prompt-ensemble similarity, AUC per
    finding (findings all-positive or all-negative in the test set are left out)."""
    names = sorted({k for it in items for k in it.findings})
    if not names:
        return None
    y = np.array([[it.findings.get(n, -1) for n in names] for it in items])
    scores = emb @ label_embeddings(model, modality, names, "ensemble").T
    known = y >= 0  # adapters leave unknown findings out; they are not scored
    aucs = np.array([M.binary_auc(y[known[:, j], j], scores[known[:, j], j])
                     for j in range(len(names))])
    out: dict[str, Any] = {f"auc[{n}]": float(a) for n, a in zip(names, aucs) if not np.isnan(a)}
    if out:
        out["mean_auc"] = float(np.nanmean(aucs))
        if cfg.bootstrap and known.all():
            keep = ~np.isnan(aucs)
            out["ci95"] = M.label_auc_ci(y[:, keep], scores[:, keep], cfg.bootstrap,
                                         cfg.ci_level, cfg.seed)
    out["prevalence"] = {n: float(y[known[:, j], j].mean()) if known[:, j].any() else None
                         for j, n in enumerate(names)}
    return out


def retrieval_task(cache: EmbeddingCache, stage: str, emb: np.ndarray, items: list[Item],
                   modality: str, cfg: EvalConfig) -> dict:
    """Item->text (``R@K``) and text->item (``t2i_R@K``) Recall@K against distinct reports."""
    uniq, inv = M.dedupe_texts([it.report for it in items])
    temb = cache.text(stage, modality, uniq)
    hits = M.text_retrieval(emb, temb, inv, cfg.retrieval_ks)
    out: dict[str, Any] = {"n_items": len(items), "n_texts": len(uniq)}
    means = {d: {k: float(v.mean()) for k, v in h.items()} for d, h in hits.items()}
    ci: dict[str, list[float]] = {}
    for k in cfg.retrieval_ks:
        out[f"R@{k}"] = means["i2t"][k]
        out[f"t2i_R@{k}"] = means["t2i"][k]
        if cfg.bootstrap:
            ci[f"R@{k}"] = _ci(hits["i2t"][k], cfg, k)
            ci[f"t2i_R@{k}"] = _ci(hits["t2i"][k], cfg, 100 + k)
    out["rsum"] = M.rsum(means)
    out["chance_R@1"] = 1.0 / len(uniq)
    if ci:
        out["ci95"] = ci[f"R@{cfg.retrieval_ks[0]}"]
        out["ci95_by_metric"] = ci
    return out


def fewshot_task(pool_x: np.ndarray, pool_items: list[Item], test_x: np.ndarray,
                 test_items: list[Item], modality: str, cfg: EvalConfig, notes: list[str],
                 stage: str) -> dict:
    """Linear probes for each K: ``{"<K>-shot": {accuracy_mean, accuracy_std, ...}}``."""
    labels = list(SPECS[modality].labels)
    py = np.array([labels.index(it.label) for it in pool_items])
    ty = np.array([labels.index(it.label) for it in test_items])
    out: dict[str, Any] = {}
    for k in cfg.shots(modality):
        res = M.linear_probe_few_shot(pool_x, py, test_x, ty, k, cfg.fewshot_sets,
                                      cfg.seed, cfg.probe_c) if len(py) else None
        if res is None:
            counts = np.bincount(py, minlength=len(labels)) if len(py) else np.zeros(len(labels))
            present = counts[counts > 0]
            note = (f"{modality} {k}-shot not run: " + (
                f"{len(present)} class(es) in the support pool" if len(present) < 2 else
                f"fewest support items per class {int(present.min())}"))
            if note not in notes:
                notes.append(note)
            continue
        acc, f1 = np.array(res["accuracy"]), np.array(res["macro_f1"])
        out[f"{k}-shot"] = {"shots": k, "accuracy_mean": float(acc.mean()),
                            "accuracy_std": float(acc.std()), "macro_f1_mean": float(f1.mean()),
                            "macro_f1_std": float(f1.std()), "n_sets": len(acc),
                            "classes": int(len(np.unique(py)))}
    return out


def cross_modal_task(qx: np.ndarray, q_items: list[Item], gx: np.ndarray, g_items: list[Item],
                     cfg: EvalConfig) -> dict:
    """Linked-patient retrieval a->b: class-level precision@K (relevance by shared condition)
    with chance and bootstrap interval, and patient-level Recall@K (MIMIC-PAIR style)."""
    sim = qx @ gx.T
    rel = relevance_matrix([it.condition for it in q_items], [it.condition for it in g_items],
                           cfg.relevance)
    out: dict[str, Any] = {"n_queries": len(q_items), "n_gallery": len(g_items),
                           "relevance": cfg.relevance}
    ci: dict[str, list[float]] = {}
    for k in cfg.precision_ks:
        p = M.precision_at_k(sim, rel, k)
        out[f"precision@{k}"] = float(p.mean())
        if cfg.bootstrap:
            ci[f"precision@{k}"] = _ci(p, cfg, k)
    out["chance"] = M.precision_chance(rel)
    same = np.array([it.patient for it in q_items])[:, None] == np.array(
        [it.patient for it in g_items])[None, :]
    for k, hits in M.recall_at_k(sim, same, cfg.retrieval_ks).items():
        out[f"patient_R@{k}"] = float(hits.mean())
        out[f"patient_chance_R@{k}"] = float(np.mean(np.minimum(k, len(g_items)) / len(g_items)
                                                     * same.any(1)))
        if cfg.bootstrap:
            ci[f"patient_R@{k}"] = _ci(hits, cfg, 200 + k)
    head = f"precision@{10 if 10 in cfg.precision_ks else cfg.precision_ks[-1]}"
    out["headline"] = head
    if ci:
        out["ci95"] = ci[head]
        out["ci95_by_metric"] = ci
    return out


def cross_modal_zeroshot_task(qx: np.ndarray, q_items: list[Item], gx: np.ndarray,
                              g_items: list[Item], cfg: EvalConfig) -> dict | None:
    """MEDBind's cross-modality zero-shot: each query is classified by the class prototypes of
    the other modality's support set (labels shared through the patient's primary condition);
    the query patient's own items are left out of the support set."""
    qc = [primary_condition(it.condition) for it in q_items]
    gc = [primary_condition(it.condition) for it in g_items]
    classes = sorted(set(gc))
    if len(classes) < 2:
        return None
    keep = [i for i, c in enumerate(qc) if c in classes]
    if not keep:
        return None
    y = np.array([classes.index(qc[i]) for i in keep])
    gy = np.array([classes.index(c) for c in gc])
    excl = np.array([q_items[i].patient for i in keep])[:, None] == np.array(
        [it.patient for it in g_items])[None, :]
    scores = M.prototype_classify(qx[keep], gx, gy, len(classes), excl)
    probs = _softmax(np.where(np.isfinite(scores), scores * 10.0, -1e9))
    out = M.classification_metrics(y, probs, cfg.chance)
    out.update({"n": len(keep), "classes": classes})
    if cfg.bootstrap:
        cis = M.classification_cis(y, probs, cfg.bootstrap, cfg.ci_level, cfg.seed)
        out["ci95"] = cis["accuracy"]
        out["ci95_by_metric"] = cis
    return out


# --------------------------------------------------------------------------- the run

def _clean(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    return obj


def _ordered(models: dict[str, Any]) -> dict[str, Any]:
    known = [s for s in STAGE_ORDER if s in models]
    return {s: models[s] for s in known + [s for s in models if s not in known]}


def evaluate(models: dict[str, Any], cohort_root: str | Path, out_dir: str | Path,
             cfg: EvalConfig | None = None, *,
             loader: Callable[[Path, Item], Any] | None = None,
             items: list[Item] | None = None) -> dict:
    """Evaluate every model (stage) on a cohort and write ``report.json``, ``report.md``, ``plots/``.

    Args:
        models: Stage name -> BoundModel (``zoo``, ``bound``, ``distilled`` or any names).
        cohort_root: Folder with ``manifest.csv`` (paths relative to it).
        out_dir: Where the report and plots go (created).
        cfg: What to run; defaults to :class:`EvalConfig` ().
        loader: Reads one item (defaults to ``m3bind.io.load``); for tests.
        items: The items to evaluate instead of ``cohort_root/manifest.csv`` (e.g. from
            :func:`items_from_dataset`); their paths are relative to ``cohort_root`` or absolute.

    Returns:
        The report dict written to ``report.json``.
    """
    cfg = cfg or EvalConfig()
    if not models:
        raise ConfigError("evaluate needs at least one model")
    models = _ordered(models)
    root, out = Path(cohort_root), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(phase: str) -> None:
        now = time.perf_counter()
        timing[phase] = round(now - clock[0], 2)
        clock[0] = now
        log.info("evaluation: %s took %.1f s", phase, timing[phase])
    items = read_items(root) if items is None else items
    simulated = cfg.simulated if cfg.simulated is not None else detect_simulated(root, items)
    covered = set().union(*(set(m.modalities) for m in models.values()))
    mods = [m for m in MODALITIES if m in covered and (cfg.modalities is None or m in cfg.modalities)
            and any(it.modality == m for it in items)]
    rng = np.random.default_rng(cfg.seed)
    notes: list[str] = []
    test: dict[str, list[Item]] = {}
    pool: dict[str, list[Item]] = {}
    keep = _test_patients(items, cfg, rng)
    for m in mods:
        labels = set(SPECS[m].labels)
        test[m] = [it for it in items if it.modality == m and it.split == cfg.test_split
                   and it.patient in keep]
        unknown = [it for it in test[m] if it.label not in labels]
        if unknown:
            notes.append(f"{m}: {len(unknown)} test items without one of the modality's zero-shot "
                         f"labels take part in the finding and report tasks only")
        by_label: dict[str, list[Item]] = {}
        for it in items:
            if it.modality == m and it.split in cfg.support_splits and it.label in labels:
                by_label.setdefault(it.label, []).append(it)
        pool[m] = [v[i] for v in by_label.values()
                   for i in sorted(rng.permutation(len(v))[: cfg.fewshot_pool_per_class])]
    lap("read manifest")
    cache = EmbeddingCache(models, root, cfg.batch_size, loader)
    for m in mods:
        test[m] = cache.ensure(test[m], f"{m} test")
        pool[m] = cache.ensure(pool[m], f"{m} support")
        if len(test[m]) < 2:
            notes.append(f"{m}: fewer than 2 readable test items; not evaluated")
    mods = [m for m in mods if len(test[m]) >= 2]

    lap("read and embed items")
    metrics: dict[str, dict] = {s: {} for s in models}
    confusions: dict[str, dict[str, np.ndarray]] = {s: {} for s in models}
    for stage, model in tqdm(models.items(), desc="evaluate", leave=False):
        for m in mods:
            if m not in model.modalities:
                continue
            emb = cache.get(stage, test[m])
            labels = set(SPECS[m].labels)
            labelled = [i for i, it in enumerate(test[m]) if it.label in labels]
            lab_items, lab_emb = [test[m][i] for i in labelled], emb[labelled]
            entry: dict[str, Any] = {}
            for mode in cfg.zeroshot_modes if len(labelled) >= 2 else ():
                try:
                    res, cm = zeroshot_task(model, lab_emb, lab_items, m, mode, cfg)
                except (KeyError, ValueError, M3BindError) as e:
                    notes.append(f"{stage}/{m}: zero-shot {mode} prompts unavailable ({e})")
                    continue
                res["prompts"] = mode
                head = "ensemble" if "ensemble" in cfg.zeroshot_modes else cfg.zeroshot_modes[0]
                entry["zeroshot" if mode == head else f"zeroshot_{mode}"] = res
                if mode == head:
                    confusions[stage][m] = cm
            ml = multilabel_task(model, emb, test[m], m, cfg)
            if ml:
                entry["multilabel"] = ml
            with_text = [i for i, it in enumerate(test[m]) if it.report]
            if len(with_text) >= 2:
                entry["retrieval"] = retrieval_task(cache, stage, emb[with_text],
                                                    [test[m][i] for i in with_text], m, cfg)
            if pool[m] and len(labelled) >= 2:
                fs = fewshot_task(cache.get(stage, pool[m]), pool[m], lab_emb, lab_items, m, cfg,
                                  notes, stage)
                if fs:
                    entry["fewshot"] = fs
            metrics[stage][m] = entry
        _cross_modal(stage, model, mods, test, cache, cfg, metrics[stage], notes)

    lap("image tasks")
    reference: dict[str, Any] = {}
    if cfg.openi_reports:
        _openi(models, cache, cfg, metrics, reference, notes)

    report: dict[str, Any] = {
        "schema": "m3bind-report/1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "simulated": bool(simulated),
        "data": {"root": str(root), "test_split": cfg.test_split,
                 "n_test": {m: len(test[m]) for m in mods},
                 "n_support": {m: len(pool[m]) for m in mods},
                 "failed_items": dict(cache.failed)},
        "models": {s: {"model_id": getattr(mdl, "model_id", s), "modalities": list(mdl.modalities),
                       "dim": int(getattr(mdl, "dim", 0))} for s, mdl in models.items()},
        "chance": ("accuracy chance = share of the most frequent test class (majority)"
                   if cfg.chance == "majority" else "accuracy chance = 1/K (uniform guessing)"),
        "config": to_dict(cfg),
        "metrics": metrics,
        "reference": reference,
        "notes": notes,
        "plots": {},
    }
    lap("clinical text")
    report["timing_seconds"] = timing
    if cfg.plots:
        from train import plots

        report["plots"] = plots.make_all(report, confusions, _tsne_inputs(models, mods, test, cache),
                                         out / "plots", cfg)
        lap("plots")
    report = _clean(report)
    from train.report import render_markdown

    for name, text in (("report.json", json.dumps(report, indent=2)),
                       ("report.md", render_markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)  # atomic: a reader never sees half a report
    log.info("evaluation report written to %s", out)
    return report


def _linked(test: dict[str, list[Item]], a: str, b: str) -> tuple[list[Item], list[Item]]:
    both = {it.patient for it in test[a]} & {it.patient for it in test[b]}
    return ([it for it in test[a] if it.patient in both], [it for it in test[b] if it.patient in both])


def _cross_modal(stage: str, model, mods: list[str], test: dict[str, list[Item]],
                 cache: EmbeddingCache, cfg: EvalConfig, into: dict, notes: list[str]) -> None:
    """Every ordered pair ``a->b`` of modalities the model covers, over linked test patients."""
    have = [m for m in mods if m in model.modalities]
    for a in have:
        for b in have:
            if a == b:
                continue
            qa, gb = _linked(test, a, b)
            if len({it.patient for it in qa}) < 2 or not any(it.condition for it in qa + gb):
                continue
            qx, gx = cache.get(stage, qa), cache.get(stage, gb)
            entry = {"cross_modal": cross_modal_task(qx, qa, gx, gb, cfg)}
            zs = cross_modal_zeroshot_task(qx, qa, gx, gb, cfg)
            if zs:
                entry["cross_modal_zeroshot"] = zs
            into[f"{a}->{b}"] = entry


def _openi(models: dict[str, Any], cache: EmbeddingCache, cfg: EvalConfig, metrics: dict,
           reference: dict, notes: list[str]) -> None:
    from train import clinical_text as ct

    try:
        reports = ct.openi_reports(cfg.openi_reports, cfg.seed)
    except (ImportError, OSError, M3BindError) as e:
        notes.append(f"OpenI reports unavailable ({e}); clinical-text check skipped")
        return
    if not reports:
        notes.append("no OpenI reports with text; clinical-text check skipped")
        return
    for stage, model in models.items():
        if "cxr" not in model.modalities:
            continue
        res = ct.openi_text_task(lambda t, s=stage: cache.text(s, "cxr", t), reports,
                                 cfg.bootstrap, cfg.ci_level, cfg.seed)
        metrics[stage].setdefault("cxr", {})["openi_text"] = res
    if cfg.text_baseline:
        try:
            encode = ct.minilm_encoder()
        except (ImportError, OSError) as e:
            notes.append(f"MiniLM initialisation unavailable ({e})")
            return
        reference["minilm_init"] = {"cxr": {"openi_text": ct.openi_text_task(
            encode, reports, cfg.bootstrap, cfg.ci_level, cfg.seed)}}


def _tsne_inputs(models: dict[str, Any], mods: list[str], test: dict[str, list[Item]],
                 cache: EmbeddingCache) -> dict[str, tuple[np.ndarray, list[str], list[str]]]:
    """Per stage: embeddings of the linked test items, their modality and primary condition."""
    out = {}
    for stage, model in models.items():
        items = [it for m in mods if m in model.modalities for it in test[m]]
        patients: dict[str, set[str]] = {}
        for it in items:
            patients.setdefault(it.patient, set()).add(it.modality)
        items = [it for it in items if len(patients[it.patient]) > 1]  # linked patients only
        if len(items) >= 5:
            out[stage] = (cache.get(stage, items), [it.modality for it in items],
                          [primary_condition(it.condition) for it in items])
    return out


# --------------------------------------------------------------------------- CLI

def stage_name(model_dir: Path) -> str | None:
    """The stage recorded in a model directory's provenance (``provenance.json`` or the
    ``provenance`` entry of ``config.json``), if any."""
    for name, key in (("provenance.json", None), ("config.json", "provenance")):
        p = model_dir / name
        if not p.is_file() or p.stat().st_size > 10_000_000:
            continue
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        prov = data.get(key) if key else data
        if isinstance(prov, dict) and isinstance(prov.get("stage"), str):
            return PROVENANCE_STAGES.get(prov["stage"], prov["stage"])
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m train.stages.evaluate --model DIR [--model DIR ...] --data COHORT --out DIR``."""
    ap = argparse.ArgumentParser(prog="python -m train.stages.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, type=Path,
                    help="model directory (repeat for several stages)")
    ap.add_argument("--stage-names", default=None,
                    help="comma-separated stage names, one per --model (default: from provenance)")
    ap.add_argument("--data", required=True, type=Path,
                    help="cohort folder with manifest.csv, or a data set's root with --dataset")
    ap.add_argument("--dataset", default=None,
                    help="read --data through this public data-set adapter (data_registry)")
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--config", type=Path, default=None, help="YAML file of EvalConfig fields")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override an EvalConfig field (YAML value), e.g. --set bootstrap=200")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        from m3bind.config import load_yaml

        if args.config:
            cfg = load_yaml(args.config, EvalConfig, args.set)
        else:
            cfg = from_dict(EvalConfig, apply_overrides({}, args.set))
        names = args.stage_names.split(",") if args.stage_names else [None] * len(args.model)
        if len(names) != len(args.model):
            raise ConfigError("--stage-names must give one name per --model")
        from m3bind.model import load_model

        models = {}
        for d, name in zip(args.model, names):
            name = name or stage_name(d) or d.name
            if name in models:
                raise ConfigError(f"two models have stage {name!r}; use --stage-names")
            models[name] = load_model(d)
        items = items_from_dataset(args.dataset, args.data) if args.dataset else None
        report = evaluate(models, args.data, args.out, cfg, items=items)
    except M3BindError as e:
        print(f"error: {e.line()}", file=sys.stderr)
        return 2
    print(f"wrote {args.out / 'report.json'} and {args.out / 'report.md'} "
          f"({len(report['metrics'])} stages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
