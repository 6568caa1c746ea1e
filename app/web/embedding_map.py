"""The embedding map: the archive's stored vectors projected to 2D.

Items are coloured by modality, or by the zero-shot label their own modality's default labels
give them (:func:`m3bind.zeroshot.label_embeddings`, argmax of cosine similarity — the same
decision :func:`~m3bind.zeroshot.classify` makes).
"""

from __future__ import annotations

import logging

import numpy as np

from m3bind.modalities import MODALITIES, SPECS

log = logging.getLogger(__name__)

#: Most points drawn (a random subset beyond this).
MAX_POINTS = 4000


def project(vectors: np.ndarray, method: str = "PCA", seed: int = 0) -> np.ndarray:
    """2D coordinates ``[N, 2]`` of ``vectors`` by PCA or t-SNE (scikit-learn)."""
    n = len(vectors)
    if n == 0:
        return np.zeros((0, 2), np.float32)
    if n < 3:
        return np.column_stack([np.arange(n, dtype=np.float32), np.zeros(n, np.float32)])
    if method == "t-SNE" and n >= 5:
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
        return TSNE(n_components=2, perplexity=perplexity, init="pca",
                    random_state=seed).fit_transform(vectors).astype(np.float32)
    from sklearn.decomposition import PCA

    return PCA(n_components=2, random_state=seed).fit_transform(vectors).astype(np.float32)


def zeroshot_labels(model, items: list[dict], vectors: np.ndarray) -> list[str]:
    """Each item's best default zero-shot label of its own modality (``"modality: label"``)."""
    from m3bind.zeroshot import label_embeddings

    out = ["unknown"] * len(items)
    for m in MODALITIES:
        rows = [i for i, it in enumerate(items) if it["modality"] == m]
        if not rows or m not in getattr(model, "modalities", MODALITIES):
            continue
        labels = list(SPECS[m].labels)
        lab = np.asarray(label_embeddings(model, m, labels), np.float32)
        best = np.argmax(vectors[rows] @ lab.T, axis=1)
        for r, b in zip(rows, best):
            out[r] = f"{m}: {labels[b]}"
    return out


def draw_map(services, *, colour_by: str = "modality", method: str = "PCA"):
    """A matplotlib figure of the archive in 2D and a one-line note."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from app.web import archive as archive_api

    catalog = services.catalog()
    model = services.model
    items, vecs = archive_api.vectors(catalog, model)
    if not items:
        return None, "No embedded items yet: index the archive in the Archive tab."
    if len(items) > MAX_POINTS:
        pick = np.sort(np.random.default_rng(0).choice(len(items), MAX_POINTS, replace=False))
        items, vecs = [items[i] for i in pick], vecs[pick]
    xy = project(vecs, method)
    groups = ([it["modality"] for it in items] if colour_by == "modality"
              else zeroshot_labels(model, items, vecs))
    fig, ax = plt.subplots(figsize=(9, 6.5), dpi=100)
    names = sorted(set(groups), key=lambda g: (g.split(":")[0] not in MODALITIES, g))
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    for j, g in enumerate(names):
        sel = [i for i, x in enumerate(groups) if x == g]
        ax.scatter(xy[sel, 0], xy[sel, 1], s=22, color=cmap(j % cmap.N), label=f"{g} ({len(sel)})",
                   alpha=0.8, edgecolors="none")
    ax.set_xlabel(f"{method} 1")
    ax.set_ylabel(f"{method} 2")
    ax.set_title(f"{len(items)} archive items in the shared embedding space")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    note = (f"{len(items)} items, {method}, coloured by {colour_by}. "
            "Proximity across modalities reflects shared findings as learnt by the model.")
    return fig, note
