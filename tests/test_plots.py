"""Report plots: stage order, identical-probe note, significance marks (files written, values checked)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from train import plots


def _fewshot(acc: float) -> dict:
    return {"1-shot": {"shots": 1, "accuracy_mean": acc, "accuracy_std": 0.05},
            "4-shot": {"shots": 4, "accuracy_mean": acc + 0.1, "accuracy_std": 0.05}}


def _report() -> dict:
    def mods(acc, p10):
        return {"ecg": {"fewshot": _fewshot(acc), "zeroshot": {"accuracy": acc, "chance": 0.2}},
                "cxr->ecg": {"cross_modal": {"precision@10": p10, "chance": 0.3, "ci95": [p10 - 0.05, p10 + 0.05],
                                             "headline": "precision@10"}},
                "ecg->cxr": {"cross_modal": {"precision@10": 0.31, "chance": 0.3, "ci95": [0.25, 0.37],
                                             "headline": "precision@10"}}}
    # deliberately out of order, as a JSON round trip with sorted keys leaves them
    return {"metrics": {"bound": mods(0.6, 0.45), "distilled": mods(0.6, 0.45), "zoo": mods(0.4, 0.32)},
            "config": {"chance": "uniform"}, "simulated": True}


def test_identical_probes_are_named_and_stages_ordered():
    r = _report()
    ordered = sorted(r["metrics"], key=plots._stage_order)
    assert ordered == ["zoo", "bound", "distilled"]
    note = plots._identical_probes({s: r["metrics"][s] for s in ordered}, ["ecg"])
    assert "distilled = bound" in note and "zoo" not in note
    r["metrics"]["distilled"]["ecg"]["fewshot"] = _fewshot(0.61)
    assert plots._identical_probes({s: r["metrics"][s] for s in ordered}, ["ecg"]) == ""


def test_plots_are_written(tmp_path):
    r = _report()
    assert plots.fewshot_curves(r, tmp_path / "f.png") and (tmp_path / "f.png").stat().st_size > 1000
    assert plots.cross_modal_plot(r, tmp_path / "c.png") and (tmp_path / "c.png").stat().st_size > 1000


def test_repeated_embedding_map_is_drawn_once(tmp_path):
    """A stage whose image embeddings equal an earlier stage's (distillation trains text only)
    gets no second t-SNE, and the report says which map it shares."""
    import types

    import numpy as np

    from train.report import _figures

    rng = np.random.default_rng(0)
    bound = rng.normal(size=(40, 8)).astype(np.float32)
    mods = ["cxr", "ecg"] * 20
    conds = ["healthy", "heart failure"] * 20
    tsne = {"zoo": (rng.normal(size=(40, 8)).astype(np.float32), mods, conds),
            "distilled": (bound.copy(), mods, conds), "bound": (bound, mods, conds)}
    r = _report()
    cfg = types.SimpleNamespace(tsne_max_points=40, seed=0)
    made = plots.make_all(r, {}, tsne, tmp_path / "plots", cfg)
    assert {"tsne_zoo", "tsne_bound"} <= set(made) and "tsne_distilled" not in made
    assert (tmp_path / "plots" / "tsne_bound.png").is_file()
    assert not (tmp_path / "plots" / "tsne_distilled.png").exists()
    assert r["tsne_same_as"] == {"distilled": "bound"}
    r["plots"] = made
    assert any("Stage 'distilled' embeds every item exactly as stage 'bound'" in line
               for line in _figures(r))
