"""Evaluation metrics, written out in numpy so that each is short, fast and checkable.

Every function here is checked in ``tests/test_metrics.py`` against scikit-learn or a
hand-computed case. They are vectorised where the bootstrap calls them many times.

Conventions:
    * class labels are integer indices ``0..K-1``;
    * ``scores`` are ``[N, K]`` (higher = more likely), ``sim`` matrices are ``[Q, G]``
      (queries by gallery, higher = more similar);
    * ``relevant`` matrices are boolean ``[Q, G]``;
    * recalls and precisions are fractions in ``[0, 1]``; RSUM is in percent (max 600) as
      the retrieval papers print it.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- classification

def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts ``C[i, j]`` of items of true class ``i`` predicted as ``j``.

    Args:
        y_true: ``[N]`` true class indices.
        y_pred: ``[N]`` predicted class indices.
        n_classes: K, the number of classes.

    Returns:
        ``[K, K]`` int64 matrix (rows true, columns predicted), as sklearn's.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes)


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of items predicted correctly."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean(y_true == y_pred)) if len(y_true) else float("nan")


def _per_class_prf(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    tp = np.diag(cm).astype(np.float64)
    pred = cm.sum(axis=0).astype(np.float64)
    true = cm.sum(axis=1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(pred > 0, tp / pred, 0.0)
        recall = np.where(true > 0, tp / true, 0.0)
        f1 = np.where(pred + true > 0, 2 * tp / (pred + true), 0.0)
    present = (pred + true) > 0
    return precision, recall, f1, present


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Unweighted mean F1 over classes that occur in ``y_true`` or ``y_pred``.

    Matches ``sklearn.metrics.f1_score(average="macro", zero_division=0)``.
    """
    _, _, f1, present = _per_class_prf(confusion_matrix(y_true, y_pred, n_classes))
    return float(f1[present].mean()) if present.any() else float("nan")


def macro_precision(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Unweighted mean precision over classes in ``y_true`` or ``y_pred`` (0 for never-predicted).

    Matches ``sklearn.metrics.precision_score(average="macro", zero_division=0)``.
    """
    precision, _, _, present = _per_class_prf(confusion_matrix(y_true, y_pred, n_classes))
    return float(precision[present].mean()) if present.any() else float("nan")


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Mean recall over the classes present in ``y_true`` (sklearn's ``balanced_accuracy_score``)."""
    cm = confusion_matrix(y_true, y_pred, n_classes)
    true = cm.sum(axis=1)
    keep = true > 0
    return float((np.diag(cm)[keep] / true[keep]).mean()) if keep.any() else float("nan")


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-d array, ties given their average rank (``scipy.stats.rankdata``)."""
    n = len(x)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    counts = np.diff(np.r_[starts, n])
    ranks = np.empty(n)
    ranks[order] = np.repeat(starts + (counts + 1) / 2.0, counts)
    return ranks


def binary_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of a binary problem by the Mann-Whitney U statistic (ties count one half).

    Returns NaN when ``y`` holds only one class (AUC undefined), where sklearn raises.
    """
    y = np.asarray(y).astype(bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(np.asarray(score, dtype=np.float64))
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def ovr_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Macro one-vs-rest AUC: mean binary AUC of ``scores[:, c]`` over classes with positives
    and negatives in ``y_true``.

    Equals ``sklearn.metrics.roc_auc_score(y_true, scores, multi_class="ovr")`` when every
    class occurs (sklearn refuses otherwise; here absent classes are left out).
    """
    y_true = np.asarray(y_true)
    aucs = [binary_auc(y_true == c, scores[:, c]) for c in range(scores.shape[1])]
    aucs = [a for a in aucs if not np.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def per_label_auc(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Binary AUC per column of a multi-label problem (NaN where a label is all 0 or all 1).

    Args:
        y: ``[N, L]`` 0/1 targets.
        scores: ``[N, L]`` scores.
    """
    return np.array([binary_auc(y[:, j], scores[:, j]) for j in range(y.shape[1])])


def mean_label_auc(y: np.ndarray, scores: np.ndarray) -> float:
    """Mean of :func:`per_label_auc` over the labels where it is defined (NaN if none)."""
    aucs = per_label_auc(y, scores)
    return float("nan") if np.all(np.isnan(aucs)) else float(np.nanmean(aucs))


def chance_level(y_true: np.ndarray, n_classes: int, kind: str = "majority") -> float:
    """Accuracy of a classifier that ignores its input.

    Args:
        y_true: ``[N]`` true class indices of the test set.
        n_classes: K.
        kind: ``"majority"`` (always predict the most frequent test class, the stricter
            baseline on unbalanced sets) or ``"uniform"`` (1/K, random guessing).
    """
    if kind == "uniform":
        return 1.0 / n_classes
    if kind != "majority":
        raise ValueError(f"chance kind must be 'majority' or 'uniform', got {kind!r}")
    counts = np.bincount(np.asarray(y_true, dtype=np.int64), minlength=n_classes)
    return float(counts.max() / counts.sum()) if counts.sum() else float("nan")


def classification_metrics(y_true: np.ndarray, scores: np.ndarray, chance: str = "majority"
                           ) -> dict[str, float]:
    """The zero-shot / probe table row: accuracy, macro F1, macro precision, balanced accuracy,
    one-vs-rest AUC and chance level, from class scores ``[N, K]``."""
    k = scores.shape[1]
    y_pred = scores.argmax(axis=1)
    return {
        "accuracy": accuracy(y_true, y_pred),
        "macro_f1": macro_f1(y_true, y_pred, k),
        "precision": macro_precision(y_true, y_pred, k),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred, k),
        "auc": ovr_auc(y_true, scores),
        "chance": chance_level(y_true, k, chance),
    }


# --------------------------------------------------------------------------- retrieval

def dedupe_texts(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Distinct texts (first-seen order) and, per input text, the index of its distinct text.

    Retrieval against distinct texts counts a report that several items share once (SeLIP):
    a query matching any copy is not rewarded several times, and the gallery holds no
    duplicates to tie with.
    """
    index: dict[str, int] = {}
    inverse = np.empty(len(texts), dtype=np.int64)
    for i, t in enumerate(texts):
        inverse[i] = index.setdefault(t, len(index))
    return list(index), inverse


def first_relevant_rank(sim: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """0-based rank of the best-scoring relevant gallery item of each query.

    Ties are broken pessimistically: an irrelevant item scoring the same as the best relevant
    one ranks above it, so a constant model never looks good. Queries with no relevant item
    get rank ``G`` (never a hit).

    Args:
        sim: ``[Q, G]`` similarities.
        relevant: ``[Q, G]`` booleans.
    """
    sim = np.asarray(sim, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    best = np.where(relevant, sim, -np.inf).max(axis=1, keepdims=True)
    ranks = ((sim >= best) & ~relevant).sum(axis=1)
    ranks[~relevant.any(axis=1)] = sim.shape[1]
    return ranks


def recall_at_k(sim: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = (1, 5, 10)
                ) -> dict[int, np.ndarray]:
    """Per-query hit indicators for Recall@K: 1 when a relevant item is among the top K.

    Returns:
        ``{k: float array [Q]}``; its mean is Recall@K.
    """
    ranks = first_relevant_rank(sim, relevant)
    return {k: (ranks < k).astype(np.float64) for k in ks}


def text_retrieval(item_emb: np.ndarray, text_emb: np.ndarray, text_of_item: np.ndarray,
                   ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[int, np.ndarray]]:
    """Item->text and text->item retrieval against distinct texts.

    Args:
        item_emb: ``[N, D]`` item embeddings (L2-normalised).
        text_emb: ``[T, D]`` embeddings of the distinct texts.
        text_of_item: ``[N]`` index of each item's distinct text (see :func:`dedupe_texts`).
        ks: cut-offs.

    Returns:
        ``{"i2t": {k: hits [N]}, "t2i": {k: hits [T]}}``; in ``t2i`` a text's relevant items are
        all items that carry it.
    """
    sim = item_emb @ text_emb.T
    relevant = text_of_item[:, None] == np.arange(text_emb.shape[0])[None, :]
    return {"i2t": recall_at_k(sim, relevant, ks), "t2i": recall_at_k(sim.T, relevant.T, ks)}


def rsum(recalls: dict[str, dict[int, float]]) -> float:
    """RSUM: the sum of all recalls of both directions, in percent (max 100 x their count)."""
    return float(100.0 * sum(v for d in recalls.values() for v in d.values()))


def precision_at_k(sim: np.ndarray, relevant: np.ndarray, k: int) -> np.ndarray:
    """Per-query precision@K: fraction of the top ``min(k, G)`` gallery items that are relevant.

    Ties in ``sim`` keep gallery order (stable sort).
    """
    k = min(k, sim.shape[1])
    order = np.argsort(-np.asarray(sim, dtype=np.float64), axis=1, kind="stable")[:, :k]
    return np.take_along_axis(np.asarray(relevant, dtype=np.float64), order, axis=1).mean(axis=1)


def precision_chance(relevant: np.ndarray) -> float:
    """Expected precision@K of a random ranking: mean over queries of the relevant fraction."""
    return float(np.asarray(relevant, dtype=np.float64).mean(axis=1).mean())


# --------------------------------------------------------------------------- bootstrap

def bootstrap_mean_ci(values: np.ndarray, n_boot: int = 1000, level: float = 0.95,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-item ``values`` (vectorised).

    Returns ``(nan, nan)`` for empty input; a constant input gives a zero-width interval.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or n_boot <= 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // values.size)  # bound memory of the index matrix
    for s in range(0, n_boot, chunk):
        idx = rng.integers(0, values.size, size=(min(chunk, n_boot - s), values.size))
        means[s:s + len(idx)] = values[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_ci(stat: Callable[..., float], arrays: Sequence[np.ndarray], n_boot: int = 1000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat(*arrays)``, resampling items (axis 0) jointly.

    Resamples where the statistic is undefined (NaN, e.g. an AUC with one class drawn) are
    left out; ``(nan, nan)`` when fewer than half are defined.
    """
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0])
    if n == 0 or n_boot <= 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    vals = np.empty(n_boot)
    for b in range(n_boot):
        idx = rng.integers(0, n, size=n)
        vals[b] = stat(*(a[idx] for a in arrays))
    vals = vals[~np.isnan(vals)]
    if len(vals) < n_boot / 2:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(vals, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def resample_counts(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_boot, n]`` multiplicities of each item in ``n_boot`` bootstrap resamples of size n.

    Equivalent to drawing ``n`` indices with replacement per resample; statistics below take
    these counts as weights, so a whole bootstrap is a few matrix operations.
    """
    idx = rng.integers(0, n, size=(n_boot, n))
    flat = (np.arange(n_boot)[:, None] * n + idx).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n)


def weighted_macro_f1(w: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray,
                      n_classes: int) -> np.ndarray:
    """:func:`macro_f1` of each resample given by weight rows ``w`` ``[B, N]``."""
    k = n_classes
    codes = np.asarray(y_true) * k + np.asarray(y_pred)
    cm = (w @ np.eye(k * k)[codes]).reshape(len(w), k, k)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    denom = cm.sum(axis=1) + cm.sum(axis=2)
    present = denom > 0
    f1 = np.where(present, 2 * tp / np.maximum(denom, 1e-12), 0.0)
    with np.errstate(invalid="ignore"):
        return f1.sum(axis=1) / present.sum(axis=1)


def weighted_binary_auc(w: np.ndarray, y: np.ndarray, score: np.ndarray) -> np.ndarray:
    """:func:`binary_auc` of each resample given by weight rows ``w`` ``[B, N]`` (NaN where a
    resample holds one class only); ties count one half, as in the unweighted version."""
    y = np.asarray(y).astype(bool)
    order = np.argsort(score, kind="mergesort")
    s = np.asarray(score)[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of tied scores
    ws = w[:, order].astype(np.float64)
    wp = np.add.reduceat(ws * y[order], starts, axis=1)
    wn = np.add.reduceat(ws * ~y[order], starts, axis=1)
    below = np.cumsum(wn, axis=1) - wn
    u = (wp * (below + 0.5 * wn)).sum(axis=1)
    pn = wp.sum(axis=1) * wn.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pn > 0, u / pn, np.nan)


def weighted_ovr_auc(w: np.ndarray, y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """:func:`ovr_auc` of each resample given by weight rows ``w`` ``[B, N]``."""
    aucs = np.stack([weighted_binary_auc(w, np.asarray(y_true) == c, scores[:, c])
                     for c in range(scores.shape[1])], axis=1)
    defined = ~np.isnan(aucs)
    with np.errstate(invalid="ignore"):
        return np.where(defined.any(axis=1), np.nansum(aucs, axis=1) / defined.sum(axis=1), np.nan)


def label_auc_ci(y: np.ndarray, scores: np.ndarray, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> list[float]:
    """Bootstrap interval of :func:`mean_label_auc` (multi-label ``[N, L]``), resampling items."""
    n = len(y)
    if n == 0 or n_boot <= 0 or y.shape[1] == 0:
        return [float("nan"), float("nan")]
    w = resample_counts(n, n_boot, np.random.default_rng(seed)).astype(np.float64)
    aucs = np.stack([weighted_binary_auc(w, y[:, j], scores[:, j]) for j in range(y.shape[1])], 1)
    defined = ~np.isnan(aucs)
    with np.errstate(invalid="ignore"):
        means = np.where(defined.any(1), np.nansum(aucs, 1) / defined.sum(1), np.nan)
    if np.isnan(means).sum() > n_boot / 2:
        return [float("nan"), float("nan")]
    return list(_percentile_ci(means, level))


def _percentile_ci(values: np.ndarray, level: float) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def classification_cis(y_true: np.ndarray, scores: np.ndarray, n_boot: int = 1000,
                       level: float = 0.95, seed: int = 0) -> dict[str, list[float]]:
    """Bootstrap intervals of the headline classification metrics (accuracy, macro F1, AUC),
    all from the same resamples of the test items (vectorised through resample weights)."""
    y_true = np.asarray(y_true)
    n, k = scores.shape
    if n == 0 or n_boot <= 0:
        return {key: [float("nan"), float("nan")] for key in ("accuracy", "macro_f1", "auc")}
    w = resample_counts(n, n_boot, np.random.default_rng(seed)).astype(np.float64)
    pred = scores.argmax(axis=1)
    auc = weighted_ovr_auc(w, y_true, scores)
    out = {
        "accuracy": list(_percentile_ci(w @ (pred == y_true) / n, level)),
        "macro_f1": list(_percentile_ci(weighted_macro_f1(w, y_true, pred, k), level)),
        "auc": list(_percentile_ci(auc, level)),
    }
    if np.isnan(auc).sum() > n_boot / 2:
        out["auc"] = [float("nan"), float("nan")]
    return out


# --------------------------------------------------------------------------- few-shot

def sample_support(labels: np.ndarray, shots: int, rng: np.random.Generator,
                   classes: Sequence[int] | None = None) -> np.ndarray | None:
    """Indices of a support set with exactly ``shots`` items of each class, drawn without
    replacement; None when some class has fewer than ``shots`` items."""
    labels = np.asarray(labels)
    classes = np.unique(labels) if classes is None else classes
    picks = []
    for c in classes:
        pool = np.flatnonzero(labels == c)
        if len(pool) < shots:
            return None
        picks.append(rng.choice(pool, size=shots, replace=False))
    return np.concatenate(picks)


def linear_probe_few_shot(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                          test_y: np.ndarray, shots: int, n_sets: int = 20, seed: int = 0,
                          c: float = 1.0) -> dict[str, list[float]] | None:
    """Few-shot linear probing on frozen embeddings (logistic regression per support set).

    Draws ``n_sets`` support sets of ``shots`` items per class (every class that occurs in
    ``train_y``), fits sklearn's ``LogisticRegression`` on each, and scores the test set.

    Returns:
        ``{"accuracy": [...], "macro_f1": [...]}`` one value per support set, or None when a
        class has fewer than ``shots`` training items or fewer than two classes exist.
    """
    from sklearn.linear_model import LogisticRegression

    classes = np.unique(train_y)
    if len(classes) < 2:
        return None
    n_classes = int(max(classes.max(), np.max(test_y)) + 1)
    rng = np.random.default_rng(seed)
    out: dict[str, list[float]] = {"accuracy": [], "macro_f1": []}
    for _ in range(n_sets):
        idx = sample_support(train_y, shots, rng, classes)
        if idx is None:
            return None
        clf = LogisticRegression(C=c, max_iter=1000)
        clf.fit(train_x[idx], train_y[idx])
        pred = clf.predict(test_x)
        out["accuracy"].append(accuracy(test_y, pred))
        out["macro_f1"].append(macro_f1(test_y, pred, n_classes))
    return out


# --------------------------------------------------------------------------- cross-modal

def prototype_classify(query: np.ndarray, support: np.ndarray, support_y: np.ndarray,
                       n_classes: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """Class scores of each query by cosine similarity to class prototypes of a support set.

    A prototype is the normalised mean of the support embeddings of a class (MEDBind's
    cross-modality zero-shot: the support set is of another modality).

    Args:
        query: ``[Q, D]`` normalised query embeddings.
        support: ``[S, D]`` support embeddings.
        support_y: ``[S]`` support class indices.
        n_classes: K.
        exclude: optional ``[Q, S]`` booleans: support items left out for that query (the
            query patient's own items, so that a linked twin cannot answer for it).

    Returns:
        ``[Q, K]`` cosine scores; ``-inf`` for a class with no support left.
    """
    onehot = np.eye(n_classes)[np.asarray(support_y)]  # [S, K]
    if exclude is None:
        exclude = np.zeros((len(query), len(support)), dtype=bool)
    keep = (~exclude).astype(np.float64)  # [Q, S]
    counts = keep @ onehot  # [Q, K]
    scores = np.full((len(query), n_classes), -np.inf)
    for q in range(len(query)):
        sums = (support * keep[q][:, None]).T @ onehot  # [D, K]
        norms = np.linalg.norm(sums, axis=0)
        ok = (counts[q] > 0) & (norms > 0)
        scores[q, ok] = (query[q] @ sums[:, ok]) / norms[ok]
    return scores
