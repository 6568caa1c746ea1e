"""Simulated cohort benchmarks: generation speed, and how hard the tasks are.

1. ``speed``: generate a cohort to a temporary folder and report items per second (overall and
   per modality, rendering + writing the real file formats).
2. ``separability``: per modality, a class-balanced set of simulated items rendered in memory;
   a small supervised CNN (trained from scratch, CPU) against a logistic regression on 8x8
   down-sampled pixels (ECG: on 10 summary numbers of the signal). The CNN should land well
   above chance and the pixel baseline well below the CNN, so that the tasks need real
   features. All numbers are on SIMULATED data.

    python benchmarks/bench_cohort.py speed --patients 300
    python benchmarks/bench_cohort.py separability --per-class 120 --out /tmp/separability.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_registry.synthetic import cohort, generate
from data_registry.synthetic.generate import SIZES
from m3bind.modalities import MODALITIES, SPECS

log = logging.getLogger("bench_cohort")


def bench_speed(patients: int, seed: int) -> dict:
    """Generate ``patients`` patients (small size) and return ``cohort.json``'s speed fields."""
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        generate(tmp, patients, seed, progress=False)
        wall = time.perf_counter() - t
        info = json.loads((Path(tmp) / "cohort.json").read_text())
    return {"patients": patients, "items": info["items"], "wall_seconds": round(wall, 1),
            "items_per_second": info["items_per_second"], "cpu_seconds": info["cpu_seconds"],
            "items_per_cpu_second": info["items_per_cpu_second"],
            "items_per_second_by_modality": info["items_per_second_by_modality"]}


# ----------------------------------------------------------------------------- separability

def _render(m: str, p: cohort.Patient, rng: np.random.Generator) -> np.ndarray:
    """The model input of one item at the small size (no file writing)."""
    from data_registry.synthetic.ct import render_ct
    from data_registry.synthetic.cxr import render_cxr
    from data_registry.synthetic.ecg import render_ecg
    from data_registry.synthetic.mri import SEQUENCES, render_mri
    from data_registry.synthetic.pathology import render_tissue
    from data_registry.synthetic.retina import render_retina

    sz, f, a = SIZES["small"], p.findings[m], p.attrs[m]
    if m == "cxr":
        img = render_cxr(f, a, rng, size=sz["cxr"])[0]
        return img.reshape(64, 2, 64, 2).mean((1, 3))[None]  # 64x64 model input
    if m == "ct":
        v = render_ct(f, a, rng, shape=sz["ct"])[0]
        return (np.clip(v, -1000, 400)[None] + 300) / 700
    if m == "ecg":
        x = render_ecg(f, a, rng, fs=sz["ecg_fs"], seconds=sz["ecg_seconds"])[0]
        return x[:, ::5]  # 100 Hz
    if m == "retina":
        return render_retina(f, a, rng, size=sz["retina"]).transpose(2, 0, 1) / 255.0  # lesions need 128 px
    if m == "pathology":
        img = render_tissue(int(a.get("grade", 0)), rng, size=sz["tile"] * 2).astype(np.float32) / 255.0
        return img.reshape(64, 2, 64, 2, 3).mean((1, 3)).transpose(2, 0, 1)
    if m == "mri":
        v = render_mri(f, a, rng, shape=sz["mri"])[0]
        return np.stack([v[s] for s in SEQUENCES]) / 1000.0
    raise ValueError(m)


def balanced_items(m: str, per_class: int, seed: int, pool: int = 6000):
    """Up to ``per_class`` patients per label of modality ``m`` from a large simulated pool,
    rendered; returns ``(X [N, ...] float32, y [N] int, label_names)``."""
    labels = list(SPECS[m].labels)
    people = cohort.build_patients(pool, seed, test_fraction=0.0, val_fraction=0.0)
    chosen: dict[str, list] = {lab: [] for lab in labels}
    for p in people:
        lab = cohort.label_for(m, p.findings[m], p.attrs[m])
        if len(chosen[lab]) < per_class:
            chosen[lab].append(p)
    X, y = [], []
    for k, lab in enumerate(labels):
        for p in chosen[lab]:
            X.append(_render(m, p, np.random.default_rng([seed, p.index, 900 + MODALITIES.index(m)])))
            y.append(k)
    return np.stack(X).astype(np.float32), np.array(y), labels


def pixel_features(m: str, X: np.ndarray) -> np.ndarray:
    """The naive baseline's inputs: 8x8 down-sampled pixels (mean over z for volumes, per channel),
    or for ECG 10 summary numbers of the signal."""
    import torch
    import torch.nn.functional as F

    if m == "ecg":
        ii, v1 = X[:, 1], X[:, 6]
        flat = X.reshape(len(X), -1)
        feats = [flat.mean(1), flat.std(1), flat.min(1), flat.max(1), np.percentile(flat, 5, axis=1),
                 np.percentile(flat, 95, axis=1), np.abs(flat).mean(1), ii.std(1), v1.max(1) - v1.min(1),
                 ii.max(1) - ii.min(1)]
        return np.stack(feats, 1)
    t = torch.from_numpy(X)
    if t.ndim == 5:  # [N, C, Z, Y, X] -> mean over z
        t = t.mean(2)
    return F.adaptive_avg_pool2d(t, 8).flatten(1).numpy()


def _cnn(m: str, in_ch: int, n_cls: int):
    from torch import nn

    if m == "ecg":
        conv, pool, bn = nn.Conv1d, nn.AdaptiveAvgPool1d, nn.BatchNorm1d
    elif m in ("ct", "mri"):
        conv, pool, bn = nn.Conv3d, nn.AdaptiveAvgPool3d, nn.BatchNorm3d
    else:
        conv, pool, bn = nn.Conv2d, nn.AdaptiveAvgPool2d, nn.BatchNorm2d
    k = 7 if m == "ecg" else 3
    layers, c = [], in_ch
    for w in (16, 32, 64):
        layers += [conv(c, w, k, padding=k // 2, stride=2 if m == "ecg" else 1), bn(w), nn.ReLU()]
        if m != "ecg":
            layers.append({"ct": nn.MaxPool3d, "mri": nn.MaxPool3d}.get(m, nn.MaxPool2d)(2))
        c = w
    return nn.Sequential(*layers, pool(1), nn.Flatten(), nn.Linear(c, n_cls))


def train_cnn(m: str, Xtr, ytr, Xte, epochs: int, seed: int) -> np.ndarray:
    """Train a small CNN from scratch; returns test predictions."""
    import torch

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # nn init uses the default generator; this script owns its process
    net = _cnn(m, Xtr.shape[1], int(ytr.max()) + 1)

    def norm(x):  # per item and channel, as the preprocessing does
        dims = tuple(range(2, x.ndim))
        return (x - x.mean(dims, keepdim=True)) / (x.std(dims, keepdim=True) + 1e-6)

    xt, yt, xe = norm(torch.from_numpy(Xtr)), torch.from_numpy(ytr), norm(torch.from_numpy(Xte))
    steps = epochs * ((len(xt) + 31) // 32)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(xt), generator=g).split(32):
            xb = xt[idx]
            if m == "ecg":  # random time shift
                xb = xb.roll(int(torch.randint(0, xb.shape[-1], (1,), generator=g)), dims=-1)
            elif m in ("retina", "pathology") and torch.rand(1, generator=g) < 0.5:
                xb = xb.flip(-1)
            loss = torch.nn.functional.cross_entropy(net(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        return net(xe).argmax(1).numpy()


def bench_separability(per_class: int, epochs: int, seed: int, modalities=MODALITIES) -> dict:
    """Balanced accuracy of the CNN and of the pixel baseline per modality (held-out 30%)."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    torch.set_num_threads(1)
    out = {}
    for m in modalities:
        t0 = time.perf_counter()
        X, y, labels = balanced_items(m, per_class, seed)
        tr, te = train_test_split(np.arange(len(y)), test_size=0.3, stratify=y, random_state=seed)
        F = pixel_features(m, X)
        lr = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
        lr.fit(F[tr], y[tr])
        base = balanced_accuracy_score(y[te], lr.predict(F[te]))
        pred = train_cnn(m, X[tr], y[tr], X[te], epochs, seed)
        cnn = balanced_accuracy_score(y[te], pred)
        out[m] = {"classes": len(labels), "items": len(y), "per_class": np.bincount(y).tolist(),
                  "chance": round(1 / len(labels), 3), "cnn_balanced_accuracy": round(float(cnn), 3),
                  "pixel8x8_logreg_balanced_accuracy": round(float(base), 3),
                  "seconds": round(time.perf_counter() - t0, 1)}
        log.info("%s: %s", m, out[m])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--patients", type=int, default=300)
    s.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("separability")
    c.add_argument("--per-class", type=int, default=120)
    c.add_argument("--epochs", type=int, default=30)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--modalities", default=",".join(MODALITIES))
    for q in (s, c):
        q.add_argument("--out", default=None, help="write the JSON result here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cmd == "speed":
        res = bench_speed(args.patients, args.seed)
    else:
        res = bench_separability(args.per_class, args.epochs, args.seed, tuple(args.modalities.split(",")))
    res = {"simulated": True, **res} if isinstance(res, dict) else res
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
