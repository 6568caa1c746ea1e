"""The evaluation's figures (matplotlib, Agg backend, PNG).

* ``fewshot.png`` — few-shot linear-probe accuracy against K per modality, one line per stage
  with a +/- 1 std band and the zero-shot accuracy as a dashed level (as M3Bind Fig. 3);
* ``tsne_<stage>.png`` — t-SNE of the linked test set, coloured by modality and by the
  patient's primary condition (as MEDBind Fig. 2);
* ``confusion_<stage>.png`` — zero-shot confusion matrices per modality, rows normalised;
* ``cross_modal.png`` — class-level precision@10 of every modality pair per stage, with the
  chance level subtracted;
* ``heldout_mim_curves.png`` (``train.compare``) — held-out MIM loss against the training step,
  one line per arm (mean, ± 1 std band over seeds), one panel per experiment.

Every title says when the data are simulated.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from m3bind.modalities import MODALITIES, SPECS  # noqa: E402

log = logging.getLogger(__name__)

STAGE_COLOURS = {"zoo": "#7f7f7f", "bound": "#1f77b4", "distilled": "#d62728"}


def _suffix(report: dict) -> str:
    return " (simulated data)" if report.get("simulated") else ""


def _stage_colour(stage: str, i: int) -> str:
    return STAGE_COLOURS.get(stage, f"C{(i + 3) % 10}")


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(n, max_cols)
    return (n + cols - 1) // cols, cols


def _stage_order(stage: str) -> tuple[int, str]:
    order = {"zoo": 0, "bound": 1, "distilled": 2}
    return order.get(stage, 3), stage


def _identical_probes(metrics: dict, mods: list[str]) -> str:
    """A note naming stages whose probes are identical everywhere (distillation changes the text
    side only, so the distilled model's probes repeat the bound model's)."""
    def curve(stage: str) -> list:
        return [sorted((v["shots"], round(v["accuracy_mean"], 6)) for v in
                       metrics[stage].get(m, {}).get("fewshot", {}).values()) for m in mods]
    stages = list(metrics)
    pairs = [f"{b} = {a}" for i, a in enumerate(stages) for b in stages[i + 1:]
             if any(curve(a)) and curve(a) == curve(b)]
    return ("probes coincide: " + ", ".join(pairs) + " (same image encoders; markers side by side)") if pairs else ""


def fewshot_curves(report: dict, path: Path) -> bool:
    """Few-shot accuracy vs K per modality (stages as lines); False when there is nothing to plot."""
    metrics = report["metrics"]
    mods = [m for m in MODALITIES if any(metrics[s].get(m, {}).get("fewshot") for s in metrics)]
    if not mods:
        return False
    rows, cols = _grid(len(mods))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    metrics = {s: metrics[s] for s in sorted(metrics, key=_stage_order)}
    n_stages = len(metrics)
    for ax, m in zip(axes.flat, mods):
        chance = None
        for i, (stage, by_mod) in enumerate(metrics.items()):
            fs = by_mod.get(m, {}).get("fewshot")
            if not fs:
                continue
            pts = sorted((v["shots"], v["accuracy_mean"], v["accuracy_std"]) for v in fs.values())
            k, mean, std = (np.array(x, dtype=float) for x in zip(*pts))
            c = _stage_colour(stage, i)
            # stages side by side around each K (log axis), so that equal results stay visible
            k = k * (1.0 + 0.06 * (i - (n_stages - 1) / 2))
            ax.errorbar(k, mean, yerr=std, fmt="o-", color=c, capsize=3, label=f"{stage} probe")
            if len(k) > 1:
                ax.fill_between(k, mean - std, mean + std, color=c, alpha=0.15)
            zs = by_mod.get(m, {}).get("zeroshot", {})
            if zs.get("accuracy") is not None:
                ax.axhline(zs["accuracy"], color=c, ls="--", lw=1, label=f"{stage} zero-shot")
            chance = zs.get("chance", chance)
        if chance is not None:
            kind = report.get("config", {}).get("chance", "majority")
            ax.axhline(chance, color="black", ls=":", lw=1,
                       label="chance (majority class)" if kind == "majority" else "chance (1/K)")
        ax.set_xscale("log")
        ks = sorted({v["shots"] for s in metrics for v in metrics[s].get(m, {}).get("fewshot", {}).values()})
        ax.set_xlim(ks[0] / 1.6, ks[-1] * 1.6)
        ax.set_xticks(ks)
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylim(-0.02, 1.04)
        ax.set_title(SPECS[m].title)
        ax.set_xlabel("shots per class (K)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    spare = list(axes.flat)[len(mods):]
    for ax in spare:
        ax.axis("off")
    handles, labels = {}, {}
    for ax in list(axes.flat)[:len(mods)]:  # union: a stage may lack some modality
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    labels = list(handles)
    same = _identical_probes(metrics, mods)
    fig.suptitle(f"Few-shot linear probes (bars: ± 1 std over support sets; dashed: zero-shot)"
                 f"{_suffix(report)}" + (f"\n{same}" if same else ""))
    if spare:  # the legend takes an empty panel
        spare[0].legend([handles[k] for k in labels], labels, loc="center", fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 0.95))
    else:
        fig.legend([handles[k] for k in labels], labels, loc="lower center",
                   ncol=min(len(labels), 4), fontsize=8, bbox_to_anchor=(0.5, 0.0))
        fig.tight_layout(rect=(0, 0.07 + 0.05 / rows, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def tsne_plot(emb: np.ndarray, modalities: list[str], conditions: list[str], stage: str,
              report: dict, path: Path, seed: int = 0, max_points: int = 600) -> bool:
    """t-SNE of one stage's linked test embeddings, coloured by modality and by condition."""
    from sklearn.manifold import TSNE

    n = len(emb)
    if n < 5:
        return False
    if n > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
        emb = emb[keep]
        modalities = [modalities[i] for i in keep]
        conditions = [conditions[i] for i in keep]
        n = max_points
    # exact gradients: faster than Barnes-Hut below ~1000 points, and deterministic
    xy = TSNE(n_components=2, perplexity=float(min(30, (n - 1) / 3)), init="pca",
              random_state=seed, metric="cosine", method="exact" if n <= 1000 else "barnes_hut",
              max_iter=500).fit_transform(emb)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    for ax, values, title in ((axes[0], modalities, "coloured by modality"),
                              (axes[1], conditions, "coloured by primary condition")):
        cats = sorted(set(values), key=lambda v: (MODALITIES.index(v) if v in MODALITIES else 99, v))
        cmap = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20")
        for j, cat in enumerate(cats):
            sel = np.array([v == cat for v in values])
            ax.scatter(xy[sel, 0], xy[sel, 1], s=14, color=cmap(j % cmap.N), label=cat, alpha=0.8)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle(f"t-SNE of the linked test set, stage '{stage}' ({n} items){_suffix(report)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def confusion_plot(cms: dict[str, np.ndarray], stage: str, report: dict, path: Path) -> bool:
    """Row-normalised zero-shot confusion matrices of one stage, one panel per modality."""
    mods = [m for m in MODALITIES if m in cms]
    if not mods:
        return False
    rows, cols = _grid(len(mods))
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 4.6 * rows), squeeze=False)
    for ax, m in zip(axes.flat, mods):
        cm = np.asarray(cms[m], dtype=float)
        norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        labels = list(SPECS[m].labels)
        ax.set_xticks(range(len(labels)), labels, rotation=40, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        for i in range(len(labels)):
            for j in range(len(labels)):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
        acc = report["metrics"][stage].get(m, {}).get("zeroshot", {}).get("accuracy")
        ax.set_title(f"{SPECS[m].title}" + (f" (acc {100 * acc:.1f}%)" if acc is not None else ""),
                     fontsize=9)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
    for ax in list(axes.flat)[len(mods):]:
        ax.axis("off")
    fig.suptitle(f"Zero-shot confusion matrices (counts; colour = row share), stage '{stage}'"
                 f"{_suffix(report)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def cross_modal_plot(report: dict, path: Path) -> bool:
    """Heat maps of class-level precision@10 minus chance, query modality x gallery modality."""
    metrics = report["metrics"]
    stages = sorted((s for s in metrics if any("->" in k for k in metrics[s])), key=_stage_order)
    if not stages:
        return False
    mods = [m for m in MODALITIES if any(k.startswith(f"{m}->") for s in stages for k in metrics[s])]
    fig, axes = plt.subplots(1, len(stages), figsize=(4.4 * len(stages) + 1.5, 4.2), squeeze=False)
    im = None
    grids, sig = {}, {}
    for stage in stages:
        grid = np.full((len(mods), len(mods)), np.nan)
        above = np.zeros_like(grid, dtype=bool)
        for i, a in enumerate(mods):
            for j, b in enumerate(mods):
                cm = metrics[stage].get(f"{a}->{b}", {}).get("cross_modal")
                head = (cm or {}).get("headline", "precision@10")
                if cm and cm.get(head) is not None:
                    grid[i, j] = 100 * (cm[head] - cm["chance"])
                    ci = cm.get("ci95") or cm.get(f"{head}_ci95")
                    above[i, j] = bool(ci) and ci[0] > cm["chance"]
        grids[stage], sig[stage] = grid, above
    # the colour scale follows the data (at least ±10 points) so that small effects stay visible
    vmax = max(10.0, float(np.nanmax(np.abs(np.stack(list(grids.values()))))) if grids else 10.0)
    for ax, stage in zip(axes.flat, stages):
        grid = grids[stage]
        im = ax.imshow(grid, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        for i in range(len(mods)):
            for j in range(len(mods)):
                if not np.isnan(grid[i, j]):
                    star = "*" if sig[stage][i, j] else ""
                    ax.text(j, i, f"{grid[i, j]:+.0f}{star}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(mods)), mods, fontsize=8, rotation=45, ha="right")
        ax.set_yticks(range(len(mods)), mods if ax is axes.flat[0] else [""] * len(mods), fontsize=8)
        ax.set_xlabel("gallery modality")
        ax.set_title(stage)
    axes.flat[0].set_ylabel("query modality")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8,
                 label="class-level precision@10 minus chance (% points)")
    fig.suptitle(f"Cross-modal retrieval between linked patients{_suffix(report)}\n"
                 f"* = 95% interval entirely above chance")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def make_all(report: dict, confusions: dict[str, dict[str, np.ndarray]],
             tsne: dict[str, tuple[np.ndarray, list[str], list[str]]], out_dir: Path,
             cfg: Any) -> dict[str, str]:
    """Write every figure into ``out_dir``; returns ``{name: path relative to the report}``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}
    made_tsne: list[str] = []

    def _rel(p: Path) -> str:
        return f"{out_dir.name}/{p.name}"

    p = out_dir / "fewshot.png"
    if fewshot_curves(report, p):
        made["fewshot"] = _rel(p)
    p = out_dir / "cross_modal.png"
    if cross_modal_plot(report, p):
        made["cross_modal"] = _rel(p)
    for stage in sorted(report["metrics"], key=_stage_order):
        p = out_dir / f"confusion_{stage}.png"
        if confusion_plot(confusions.get(stage, {}), stage, report, p):
            made[f"confusion_{stage}"] = _rel(p)
        if stage in tsne and cfg.tsne_max_points:
            p = out_dir / f"tsne_{stage}.png"
            emb, mods, conds = tsne[stage]
            same = [s for s in made_tsne if np.array_equal(tsne[s][0], emb)]
            if same:
                # distillation trains the text side only: the map would repeat an earlier one
                report.setdefault("tsne_same_as", {})[stage] = same[0]
                continue
            made_tsne.append(stage)
            if tsne_plot(emb, mods, conds, stage, report, p, cfg.seed, cfg.tsne_max_points):
                made[f"tsne_{stage}"] = _rel(p)
    return made


def heldout_curve_plot(curves: dict[str, dict[str, Any]], path: Path, simulated: bool = True) -> bool:
    """Held-out MIM loss against the step per arm (``train.compare.heldout_curves``); False when
    there is nothing to plot."""
    exps = [e for e, arms in curves.items() if arms]
    if not exps:
        return False
    rows, cols = _grid(len(exps), max_cols=2)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax, exp in zip(axes.flat, exps):
        for i, (arm, c) in enumerate(curves[exp].items()):
            steps, mean, std = (np.asarray(c[k], dtype=float) for k in ("steps", "mean", "std"))
            ax.plot(steps, mean, "o-", ms=3, color=f"C{i}", label=f"{arm} (n={len(c['per_seed'])})")
            ax.fill_between(steps, mean - std, mean + std, color=f"C{i}", alpha=0.18)
        ax.set_title(exp)
        ax.set_xlabel("training step")
        ax.set_ylabel("held-out MIM loss (fixed masks)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(exps):]:
        ax.axis("off")
    fig.suptitle("Held-out MIM loss during stage 0 (mean ± 1 std over seeds)"
                 + (" (simulated data)" if simulated else ""))
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

