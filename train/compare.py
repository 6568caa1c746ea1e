"""Each training option against the plain run, over several seeds, on a small simulated set-up.

``python -m train.compare --out runs/compare --seeds 0 1 2`` runs every *arm* of every
*experiment* (:data:`EXPERIMENTS`) once per seed — ``python train/run_all.py`` in a subprocess on
``train/configs/compare_small.yaml`` with the experiment's modalities and the arm's option
merged in — into ``<out>/<experiment>/<arm>/s<seed>/``. One simulated cohort per seed
(``paired_fraction`` > 0 for EMCL) and one preprocessing cache per seed are shared by every
run of that seed; a finished run (its ``report.json`` exists) is not run again.

Then :func:`summarize` reads each run's ``report.json`` / ``train_summary.json``, takes the
metrics of :data:`COMPARISONS` and writes ``<out>/comparison.json`` (per metric and arm: the
values per seed, mean, sample std; per metric the paired option − reference differences over
seeds: mean, sample std, sign counts and a two-sided paired t-test with its 95% interval, see
:func:`paired_test`) and ``<out>/comparison.md`` (the table of
``train.report.render_comparison``, then the paired tests of :func:`render_paired_tests`), and,
where runs logged a held-out MIM curve (``mmclip.heldout_every``), ``<out>/heldout_mim_curves.png``
(:func:`heldout_curves`, ``train.plots.heldout_curve_plot``).
``train.report.render_markdown`` appends the former table to a run's report.md when the report
dict holds it under ``options_comparison``.

Every number is measured on the simulated cohort (simulated).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "train" / "configs" / "compare_small.yaml"

#: MMCLIP on a tiny ViT (32 px, 8 px patches, 16 patches): the trunk of the cxr_vit experiment.
VIT_CXR = {"image": {"arch": "timm", "name": "vit_tiny_patch16_224", "in_chans": 1,
                     "params": {"img_size": 32, "patch_size": 8, "depth": 1}}, "steps": 60}
MMCLIP = {"modalities": ["cxr"], "patch_size": 8, "decoder_dim": 64, "decoder_depth": 1,
          "text_decoder_dim": 64, "text_decoder_depth": 1, "warmup_steps": 15, "heldout_items": 80}
#: Single-modality experiments stop after stage 0 (binding one modality aligns nothing).
STAGE0_ONLY = {"stages": ["pretrain", "evaluate"]}
#: The image-only experiment (``cxr_vit_image_only``): a CXR-only cohort of its own (tiny files,
#: few test patients, so that the training split is large: about 190-225 training and 90 test
#: images per seed), 75% of the training reports withheld (about 50-60 pairs, three image-only
#: items per pair: MMCLIP's regime). Both arms take the same 64 steps with the same 16 pairs per
#: step (about 17 passes over the pairs), the same teacher initialisation and pair batches; the option
#: adds image-only items to each step's MIM batch in proportion (about 45), so it sees more
#: images per step, not more steps. The step count is sized to the shared 2-core machine. The
#: held-out MIM loss is measured on every test image under fixed random masks.
IMAGE_ONLY_COHORT = {"generate_patients": 1500, "generate_size": "tiny",
                     "generate_kwargs": {"test_fraction": 0.06, "paired_fraction": 0.0, "modalities": ["cxr"]}}
IMAGE_ONLY_BASE = {**STAGE0_ONLY,
                   "teachers": {"cxr": {**VIT_CXR, "steps": 64, "warmup_steps": 6}},
                   "data": {**IMAGE_ONLY_COHORT, "image_only_fraction": 0.75}}
IMAGE_ONLY_MMCLIP = {**MMCLIP, "text_decoder_dim": 32, "warmup_steps": 16, "heldout_items": 200}
#: The image-only MMCLIP settings with the held-out MIM loss also measured every 32 steps (a curve).
CURVE_MMCLIP = {**IMAGE_ONLY_MMCLIP, "heldout_every": 32}
#: Scarce reports (``cxr_vit_image_only_scarce``): the same cohorts with 95% of the training reports
#: withheld (5-17 pairs per seed over seeds 0-7, 175-214 image-only items), 8 pairs a step (the
#: option adds 97-214 image-only items to each step's MIM batch) and 256 steps.
SCARCE_BASE = {**STAGE0_ONLY,
               "teachers": {"cxr": {**VIT_CXR, "steps": 256, "warmup_steps": 6, "batch_size": 8}},
               "data": {**IMAGE_ONLY_COHORT, "image_only_fraction": 0.95}}
#: A longer schedule (``cxr_vit_image_only_long``): the 75% set-up of ``cxr_vit_image_only`` over
#: 384 steps instead of 64.
LONG_BASE = {**STAGE0_ONLY, "teachers": {"cxr": {**VIT_CXR, "steps": 384, "warmup_steps": 6}},
             "data": {**IMAGE_ONLY_COHORT, "image_only_fraction": 0.75}}


@dataclass
class Experiment:
    """One set-up (modalities, shared overrides) and its arms (option overrides).

    ``cohort`` names a cohort of the experiment's own (``<out>/cohort_s<seed>_<cohort>`` and its
    cache) when its base changes the simulated cohort; empty: the shared one of the seed.
    """

    modalities: list[str]
    arms: dict[str, dict[str, Any]]
    base: dict[str, Any] = field(default_factory=dict)
    cohort: str = ""


EXPERIMENTS: dict[str, Experiment] = {
    "cxr_ecg": Experiment(["cxr", "ecg"], {
        "plain": {},
        "medbind": {"medbind": {"modalities": ["cxr", "ecg"], "text_loss": "tmcl"}},
        "emcl": {"bind": {"emcl_weight": 1.0}},
    }),
    "cxr_vit": Experiment(["cxr"], {
        "plain": {},
        "mmclip": {"mmclip": {**MMCLIP, "image_only": False}},
    }, base={**STAGE0_ONLY, "teachers": {"cxr": VIT_CXR}, "data": {"image_only_fraction": 0.5}}),
    # image-only items vs none: the reference trains on the pairs alone, the option adds the
    # withheld-report items to the MIM loss (see IMAGE_ONLY_BASE)
    "cxr_vit_image_only": Experiment(["cxr"], {
        "mmclip": {"mmclip": {**IMAGE_ONLY_MMCLIP, "image_only": False}},
        "mmclip_image_only": {"mmclip": {**IMAGE_ONLY_MMCLIP, "image_only": True}},
    }, base=IMAGE_ONLY_BASE, cohort="cxr1500"),
    "cxr_vit_image_only_scarce": Experiment(["cxr"], {
        "mmclip": {"mmclip": {**CURVE_MMCLIP, "image_only": False}},
        "mmclip_image_only": {"mmclip": {**CURVE_MMCLIP, "image_only": True}},
    }, base=SCARCE_BASE, cohort="cxr1500"),
    "cxr_vit_image_only_long": Experiment(["cxr"], {
        "mmclip": {"mmclip": {**CURVE_MMCLIP, "image_only": False}},
        "mmclip_image_only": {"mmclip": {**CURVE_MMCLIP, "image_only": True}},
    }, base=LONG_BASE, cohort="cxr1500"),
    "mri": Experiment(["mri"], {
        "plain": {},
        "selip": {"selip": {"modalities": ["mri"], "alpha": 1.0, "beta": 1.0}},
    }, base=STAGE0_ONLY),
}

#: Metrics per experiment: (label, where) with where = ("report", stage, key, task, metric)
#: or ("summary", "pretrain", modality, "mmclip", field).
METRICS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "cxr_ecg": [
        ("cxr->ecg cross-modal P@10 (bound)", ("report", "bound", "cxr->ecg", "cross_modal", "precision@10")),
        ("ecg->cxr cross-modal P@10 (bound)", ("report", "bound", "ecg->cxr", "cross_modal", "precision@10")),
        ("cxr->ecg patient R@10 (bound)", ("report", "bound", "cxr->ecg", "cross_modal", "patient_R@10")),
        ("cxr->ecg cross-modal zero-shot acc (bound)",
         ("report", "bound", "cxr->ecg", "cross_modal_zeroshot", "accuracy")),
        ("cxr zero-shot AUC (zoo)", ("report", "zoo", "cxr", "zeroshot", "auc")),
        ("ecg zero-shot AUC (zoo)", ("report", "zoo", "ecg", "zeroshot", "auc")),
        ("cxr zero-shot AUC (bound)", ("report", "bound", "cxr", "zeroshot", "auc")),
        ("ecg zero-shot AUC (bound)", ("report", "bound", "ecg", "zeroshot", "auc")),
        ("cxr R@5 (bound)", ("report", "bound", "cxr", "retrieval", "R@5")),
        ("ecg R@5 (bound)", ("report", "bound", "ecg", "retrieval", "R@5")),
    ],
    "cxr_vit": [
        ("cxr held-out MIM loss (lower is better)", ("summary", "pretrain", "cxr", "mmclip", "heldout_mim_loss")),
        ("cxr zero-shot accuracy (zoo)", ("report", "zoo", "cxr", "zeroshot", "accuracy")),
        ("cxr zero-shot AUC (zoo)", ("report", "zoo", "cxr", "zeroshot", "auc")),
        ("cxr R@5 (zoo)", ("report", "zoo", "cxr", "retrieval", "R@5")),
        ("cxr R@1 (zoo)", ("report", "zoo", "cxr", "retrieval", "R@1")),
    ],
    "mri": [
        ("mri zero-shot accuracy (zoo)", ("report", "zoo", "mri", "zeroshot", "accuracy")),
        ("mri zero-shot AUC (zoo)", ("report", "zoo", "mri", "zeroshot", "auc")),
        ("mri R@1 (zoo)", ("report", "zoo", "mri", "retrieval", "R@1")),
        ("mri R@5 (zoo)", ("report", "zoo", "mri", "retrieval", "R@5")),
        ("mri R@10 (zoo)", ("report", "zoo", "mri", "retrieval", "R@10")),
    ],
}

METRICS["cxr_vit_image_only"] = [
    *METRICS["cxr_vit"][:1],
    ("cxr held-out MIM loss of the visible-mean predictor (model-free reference)",
     ("summary", "pretrain", "cxr", "mmclip", "heldout_mim_baseline")),
    *METRICS["cxr_vit"][1:],
    ("cxr R@10 (zoo)", ("report", "zoo", "cxr", "retrieval", "R@10")),
]
METRICS["cxr_vit_image_only_scarce"] = METRICS["cxr_vit_image_only_long"] = METRICS["cxr_vit_image_only"]

#: (comparison name, experiment, option arm, reference arm).
COMPARISONS: list[tuple[str, str, str, str]] = [
    ("MEDBind TMCL vs plain CLIP (stage 0)", "cxr_ecg", "medbind", "plain"),
    ("EMCL on the paired CXR-ECG subset vs none (stage 1)", "cxr_ecg", "emcl", "plain"),
    ("MMCLIP AttMIM + EntMLM vs plain CLIP (stage 0, ViT)", "cxr_vit", "mmclip", "plain"),
    ("MMCLIP image-only items vs none (75% of reports withheld; held-out MIM under fixed random masks)",
     "cxr_vit_image_only", "mmclip_image_only", "mmclip"),
    ("MMCLIP image-only items vs none, scarce reports (95% withheld, 256 steps; held-out MIM under fixed masks)",
     "cxr_vit_image_only_scarce", "mmclip_image_only", "mmclip"),
    ("MMCLIP image-only items vs none, longer schedule (75% withheld, 384 steps; held-out MIM under fixed masks)",
     "cxr_vit_image_only_long", "mmclip_image_only", "mmclip"),
    ("SeLIP soft targets vs plain CLIP (stage 0)", "mri", "selip", "plain"),
]


# --------------------------------------------------------------------------- configs


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in recursively (mappings merge, everything else replaces)."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def run_config(base: Mapping[str, Any], experiment: str, arm: str, seed: int, out: Path,
               steps_scale: float = 1.0) -> dict[str, Any]:
    """The config dict of one run: the base, the experiment's modalities and overrides, the arm's
    option, the seed's cohort/cache/seed; ``steps_scale`` scales every step count (smoke tests)."""
    exp = EXPERIMENTS[experiment]
    cfg = deep_merge(base, exp.base)
    cfg = deep_merge(cfg, exp.arms[arm])
    cfg["name"] = f"compare-{experiment}-{arm}-s{seed}"
    data = cfg.setdefault("data", {})
    tag = f"s{seed}_{exp.cohort}" if exp.cohort else f"s{seed}"
    data.update(modalities=list(exp.modalities), cohort=str(out / f"cohort_{tag}"),
                generate_seed=seed, cache_dir=str(out / f"cache_{tag}"))
    cfg["teachers"] = {m: t for m, t in cfg.get("teachers", {}).items() if m in exp.modalities}
    cfg.setdefault("runtime", {})["seed"] = seed
    if steps_scale != 1.0:
        for t in cfg["teachers"].values():
            for k in ("steps", "warmup_steps"):
                if k in t:
                    t[k] = max(1, round(t[k] * steps_scale))
        for k in ("steps", "warmup_steps"):
            if k in cfg.get("bind", {}):
                cfg["bind"][k] = max(1, round(cfg["bind"][k] * steps_scale))
        if cfg.get("mmclip"):
            cfg["mmclip"]["warmup_steps"] = round(cfg["mmclip"]["warmup_steps"] * steps_scale)
    return cfg


def validate(cfg: Mapping[str, Any]) -> None:
    """Raise when ``cfg`` does not load as a ``TrainConfig``."""
    from m3bind.config import from_dict
    from train.config import TrainConfig

    from_dict(TrainConfig, copy.deepcopy(dict(cfg)), where=cfg.get("name", "config"))


def run_one(cfg: Mapping[str, Any], run_dir: Path, nice: int = 10, timeout: float | None = None) -> float:
    """Run ``train/run_all.py`` on ``cfg`` into ``run_dir`` (skipped when its report exists);
    returns the wall seconds (0 when skipped)."""
    if (run_dir / "report.json").is_file():
        return 0.0
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "compare_config.yaml"
    cfg_path.write_text(yaml.safe_dump(dict(cfg), sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT)}
    cmd = ["nice", "-n", str(nice), sys.executable, str(ROOT / "train" / "run_all.py"),
           "--config", str(cfg_path), "--out", str(run_dir)]
    t0 = time.time()
    with (run_dir / "compare_log.txt").open("w") as logf:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT, timeout=timeout,
                              check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({proc.returncode}); see {run_dir / 'compare_log.txt'}")
    return time.time() - t0


# --------------------------------------------------------------------------- summary


def _lookup(run_dir: Path, where: Sequence[str]) -> float | None:
    kind, *keys = where
    f = run_dir / ("report.json" if kind == "report" else "train_summary.json")
    if not f.is_file():
        return None
    d: Any = json.loads(f.read_text())
    if kind == "report":
        d = d.get("metrics", {})
    for k in keys:
        if not isinstance(d, Mapping) or k not in d:
            return None
        d = d[k]
    return float(d) if isinstance(d, (int, float)) and math.isfinite(float(d)) else None


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    v = list(values)
    if not v:
        return math.nan, math.nan
    m = sum(v) / len(v)
    if len(v) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def paired_test(diffs: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Two-sided one-sample t-test of paired differences against 0 (the paired t-test).

    Args:
        diffs: per seed, option − reference.
        level: confidence level of the interval.

    Returns:
        ``mean``, ``std`` (sample, ddof 1), ``n``, ``df`` (n − 1), ``t``, ``p`` (two-sided) and
        ``ci`` ([lo, hi]: mean ± t quantile · std / √n). ``t``, ``p`` and ``ci`` are None with
        fewer than 2 differences; with zero spread (std at most 1e-9 of the largest difference,
        i.e. equal up to rounding) ``t`` and ``p`` are None (the test is undefined) and ``ci`` is
        [mean, mean].
    """
    from scipy import stats

    m, sd = mean_std(diffs)
    n = len(diffs)
    res: dict[str, Any] = {"mean": m, "std": sd, "n": n, "df": max(n - 1, 0), "t": None, "p": None,
                           "ci": None, "ci_level": level}
    if n < 2:
        return res
    if sd <= 1e-9 * max(abs(d) for d in diffs):
        res["ci"] = [m, m]
        return res
    se = sd / math.sqrt(n)
    t = m / se
    q = float(stats.t.ppf(0.5 + level / 2, n - 1))
    res.update(t=t, p=float(2 * stats.t.sf(abs(t), n - 1)), ci=[m - q * se, m + q * se])
    return res


def read_curve(metrics_csv: Path, name: str = "heldout_mim_loss") -> dict[int, float]:
    """``{step: value}`` of one logged quantity in a run's ``metrics.csv`` (the last row of a
    step wins: a resumed run may log a step twice); empty when the file or the name is absent."""
    import csv

    if not metrics_csv.is_file():
        return {}
    with metrics_csv.open(newline="") as f:
        return {int(r["step"]): float(r["value"]) for r in csv.DictReader(f) if r["name"] == name}


def heldout_curves(out: Path, seeds: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Per experiment and arm, the held-out MIM loss against the step (``mmclip.heldout_every``):
    ``{"steps", "per_seed": {seed: [value per step]}, "mean", "std"}`` over the steps that every
    finished seed (its ``report.json`` exists) logged; experiments and arms without curves are
    left out."""
    curves: dict[str, dict[str, Any]] = {}
    for exp, e in EXPERIMENTS.items():
        for arm in e.arms:
            runs = {s: out / exp / arm / f"s{s}" for s in seeds}
            got = {s: c for s, d in runs.items()
                   if (d / "report.json").is_file() and (c := read_curve(d / "metrics.csv"))}
            if not got:
                continue
            steps = sorted(set.intersection(*(set(c) for c in got.values())))
            if len(steps) < 2:
                continue
            per_seed = {s: [c[k] for k in steps] for s, c in got.items()}
            stats_ = [mean_std(v[i] for v in per_seed.values()) for i in range(len(steps))]
            curves.setdefault(exp, {})[arm] = {"steps": steps, "per_seed": per_seed,
                                               "mean": [m for m, _ in stats_], "std": [sd for _, sd in stats_]}
    return curves


def summarize(out: Path, seeds: Sequence[int]) -> dict[str, Any]:
    """The comparison dict (see module docstring) from the finished runs under ``out``."""
    comparisons = []
    for title, exp, arm, ref in COMPARISONS:
        rows = []
        for label, where in METRICS[exp]:
            row: dict[str, Any] = {"metric": label}
            for a in (ref, arm):
                vals = {s: _lookup(out / exp / a / f"s{s}", where) for s in seeds}
                got = [v for v in vals.values() if v is not None]
                mean, std = mean_std(got)
                row[a] = {"per_seed": vals, "n": len(got), "mean": mean, "std": std}
            if row[ref]["n"] == 0 and row[arm]["n"] == 0:
                continue
            diffs = [row[arm]["per_seed"][s] - row[ref]["per_seed"][s] for s in seeds
                     if row[arm]["per_seed"][s] is not None and row[ref]["per_seed"][s] is not None]
            row["delta"] = {**paired_test(diffs), "wins": sum(d > 0 for d in diffs),
                            "losses": sum(d < 0 for d in diffs)}
            rows.append(row)
        comparisons.append({"title": title, "experiment": exp, "option": arm, "reference": ref,
                            "rows": rows})
    return {"simulated": True, "seeds": list(seeds), "base_config": str(BASE_CONFIG.relative_to(ROOT)),
            "experiments": {k: {"modalities": e.modalities, "arms": e.arms, "base": e.base, "cohort": e.cohort}
                            for k, e in EXPERIMENTS.items()},
            "comparisons": comparisons, "curves": heldout_curves(out, seeds)}


def render_paired_tests(comparison: Mapping[str, Any]) -> str:
    """The paired-test section: per comparison and metric, the option − reference differences
    over seeds (mean ± sample std, the 95% t interval, t, two-sided p, seeds higher/lower)."""
    from train.report import DASH, table

    def num(v: float | None, fmt: str) -> str:
        return DASH if v is None else format(v, fmt)

    lines = ["## Paired differences over seeds (option − reference; two-sided paired t-test)", "",
             ("The interval is mean ± t(0.975, n − 1) · std / √n; with few seeds the test has little "
              "power, so an interval that includes 0 is no evidence of equality."), ""]
    for c in comparison.get("comparisons", []):
        rows = []
        for r in c["rows"]:
            d = r.get("delta") or {}
            if not d.get("n"):
                continue
            ci = d.get("ci")
            rows.append([r["metric"], d["n"], f"{d['mean']:.4f} ± {d['std']:.4f}",
                         f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else DASH, num(d.get("t"), ".2f"),
                         num(d.get("p"), ".3f"), f"{d['wins']}/{d['losses']}"])
        if rows:
            lines += [f"### {c['title']}", "",
                      table(["metric", "seeds", "mean ± std", "95% interval", "t", "p", "higher/lower"], rows),
                      ""]
    return "\n".join(lines) + "\n"


def write_summary(out: Path, seeds: Sequence[int]) -> dict[str, Any]:
    """:func:`summarize`, written to ``comparison.json`` and ``comparison.md`` (the comparison
    table, then :func:`render_paired_tests`) under ``out``."""
    from train.plots import heldout_curve_plot
    from train.report import render_comparison

    comp = summarize(out, seeds)
    (out / "comparison.json").write_text(json.dumps(comp, indent=2, sort_keys=False))
    md = render_comparison(comp) + "\n" + render_paired_tests(comp)
    if heldout_curve_plot(comp["curves"], out / "heldout_mim_curves.png"):
        md += "\n![held-out MIM loss against the step](heldout_mim_curves.png)\n"
    (out / "comparison.md").write_text(md)
    return comp


def attach(report_dir: Path, comparison: Mapping[str, Any]) -> None:
    """Put ``comparison`` into ``report_dir/report.json`` (``options_comparison``) and re-render
    ``report.md`` with it."""
    from train.report import render_markdown

    f = report_dir / "report.json"
    report = json.loads(f.read_text())
    report["options_comparison"] = dict(comparison)
    f.write_text(json.dumps(report, indent=2))
    (report_dir / "report.md").write_text(render_markdown(report))


def main(argv: list[str] | None = None) -> int:
    """Command line: run the missing runs, then write the comparison."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "compare")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=list(EXPERIMENTS))
    p.add_argument("--arms", nargs="+", default=None,
                   help="run only these arms (others are summarised if finished; parallel runs)")
    p.add_argument("--config", type=Path, default=BASE_CONFIG, help="base config (YAML)")
    p.add_argument("--steps-scale", type=float, default=1.0, help="scale every step count (smoke runs)")
    p.add_argument("--summary-only", action="store_true", help="only summarise finished runs")
    p.add_argument("--attach", type=Path, nargs="*", default=[],
                   help="run folders whose report.json/report.md get the comparison section")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    out = args.out.resolve()
    base = yaml.safe_load(args.config.read_text())
    if not args.summary_only:
        for seed in args.seeds:  # seed-major: one cohort at a time
            for exp in args.experiments:
                for arm in EXPERIMENTS[exp].arms:
                    if args.arms is not None and arm not in args.arms:
                        continue
                    cfg = run_config(base, exp, arm, seed, out, args.steps_scale)
                    validate(cfg)
                    secs = run_one(cfg, out / exp / arm / f"s{seed}")
                    log.info("%s/%s seed %d: %s", exp, arm, seed, f"{secs:.0f} s" if secs else "done before")
    comp = write_summary(out, args.seeds)
    log.info("wrote %s and %s (%d comparisons)", out / "comparison.json", out / "comparison.md",
             len(comp["comparisons"]))
    for d in args.attach:
        attach(d, comp)
        log.info("comparison attached to %s", d / "report.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
