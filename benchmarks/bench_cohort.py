"""Simulated cohort benchmarks: generation speed, and how hard the tasks are.

1. ``speed``: generate a cohort to a temporary folder and report items per second (overall and
   per modality, rendering + writing the real file formats).
2. ``separability``: per modality, a class-balanced set of simulated items rendered in memory;
   a small supervised CNN (trained from scratch, CPU) against a logistic regression on 8x8
   down-sampled pixels (ECG: on 10 summary numbers of the signal). The CNN should land well
   above chance and the pixel baseline well below the CNN, so that the tasks need real
   features. All numbers are on SIMULATED data.

    python benchmarks/bench_cohort.py speed --patients 300 --size small,tiny --rounds 2
    python benchmarks/bench_cohort.py separability --per-class 120 --out /tmp/separability.json
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
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


def bench_speed(patients: int, seed: int, sizes=("small",), workers: int = 1, rounds: int = 1) -> dict:
    """Generate ``patients`` patients per size preset and return ``cohort.json``'s speed fields.

    Each size is first warmed up on a few patients (imports and first-use costs are not
    counted); with several sizes or ``rounds > 1`` the runs are interleaved so that machine
    load affects them alike, and the per-size figures are the medians over rounds.
    """
    runs: dict[str, list[dict]] = {sz: [] for sz in sizes}
    with tempfile.TemporaryDirectory() as tmp:
        for sz in sizes:
            generate(Path(tmp) / f"warm_{sz}", 6, seed + 1, sz, progress=False, test_fraction=0.5)
        for r in range(rounds):
            for sz in sizes:
                out = Path(tmp) / f"{sz}_{r}"
                t = time.perf_counter()
                generate(out, patients, seed, sz, progress=False, workers=workers)
                wall = time.perf_counter() - t
                info = json.loads((out / "cohort.json").read_text())
                runs[sz].append({"wall_seconds": wall, **info})
                shutil.rmtree(out)
    res = {}
    for sz, rs in runs.items():
        med = lambda key, rs=rs: float(np.median([r[key] for r in rs]))
        res[sz] = {"patients": patients, "items": rs[0]["items"], "workers": rs[0]["workers"], "rounds": len(rs),
                   "wall_seconds": round(med("wall_seconds"), 1), "items_per_second": round(med("items_per_second"), 2),
                   "cpu_seconds": round(med("cpu_seconds"), 1),
                   "items_per_cpu_second": round(med("items_per_cpu_second"), 2),
                   "items_per_second_by_modality": {
                       m: round(float(np.median([r["items_per_second_by_modality"][m] for r in rs])), 2)
                       for m in rs[0]["items_per_second_by_modality"]}}
        log.info("%s: %s", sz, res[sz])
    return res


# ----------------------------------------------------------------------------- separability

#: What ``train/configs/demo.yaml`` feeds the teachers (the ``demo`` input resolution).
DEMO_INPUT: dict[str, dict] = {"cxr": {"size": 64}, "retina": {"size": 64},
                               "pathology": {"size": 32, "magnification": 10.0},
                               "ct": {"grid": (8, 32, 32), "spacing": None},
                               "mri": {"grid": (8, 32, 32)}, "ecg": {"fs": 50.0, "band": (0.5, 20.0)}}


def _render(m: str, p: cohort.Patient, rng: np.random.Generator, resolution: str = "demo",
            size: str = "small") -> np.ndarray:
    """The model input of one item (no file writing).

    ``resolution="demo"`` renders at the ``size`` preset and applies the library's own
    preprocessing (:mod:`m3bind.preprocess`) with the demo's parameters (:data:`DEMO_INPUT`):
    64-px CXR and fundus, one 32-px tile at 10x, CT and MRI on an ``[8, 32, 32]`` grid (CT in
    the lung window, resized straight to the grid), ECG at 50 Hz. ``resolution="small"`` is
    the earlier, larger input from the ``small`` preset (128-px fundus, 64-px tiles at 2 um/px,
    full ``small`` volumes, ECG at 100 Hz).
    """
    from data_registry.synthetic.ct import render_ct
    from data_registry.synthetic.cxr import render_cxr
    from data_registry.synthetic.ecg import LEAD_NAMES, render_ecg
    from data_registry.synthetic.mri import SEQUENCES, render_mri
    from data_registry.synthetic.pathology import render_tissue
    from data_registry.synthetic.retina import render_retina
    from m3bind import preprocess as pp
    from m3bind.io.sample import Sample

    demo = resolution == "demo"
    if not demo and size != "small":
        raise ValueError("resolution 'small' renders the small preset")
    sz, f, a = SIZES[size], p.findings[m], p.attrs[m]
    if m == "cxr":
        img = render_cxr(f, a, rng, size=sz["cxr"])[0]
        if demo:
            return pp.preprocess_cxr(Sample(img, m, "dicom", ""), **DEMO_INPUT[m])
        return img.reshape(64, 2, 64, 2).mean((1, 3))[None]  # 64x64 model input
    if m == "ct":
        v, spacing = render_ct(f, a, rng, shape=sz["ct"])
        if demo:
            return pp.preprocess_ct(Sample(v, m, "dicom", "", spacing=spacing), **DEMO_INPUT["ct"])
        return (np.clip(v, -1000, 400)[None] + 300) / 700
    if m == "ecg":
        x = render_ecg(f, a, rng, fs=sz["ecg_fs"], seconds=sz["ecg_seconds"])[0]
        if demo:
            s = Sample(x, m, "wfdb", "", sampling_rate=sz["ecg_fs"], lead_names=list(LEAD_NAMES))
            return pp.preprocess_ecg(s, **DEMO_INPUT["ecg"])
        return x[:, ::5]  # 100 Hz
    if m == "retina":
        rgb = render_retina(f, a, rng, size=sz["retina"])
        if demo:
            return pp.preprocess_retina(Sample(rgb, m, "png", ""), **DEMO_INPUT[m])
        return rgb.transpose(2, 0, 1) / 255.0  # lesions need 128 px
    if m == "pathology":
        if demo:  # one tile of the demo's size at the slides' 10x (1 um/px)
            from data_registry.synthetic.generate import SLIDE_MPP

            img = render_tissue(int(a.get("grade", 0)), rng, size=DEMO_INPUT[m]["size"], mpp=SLIDE_MPP)
            return img.astype(np.float32).transpose(2, 0, 1) / 255.0
        img = render_tissue(int(a.get("grade", 0)), rng, size=sz["tile"] * 2).astype(np.float32) / 255.0
        return img.reshape(64, 2, 64, 2, 3).mean((1, 3)).transpose(2, 0, 1)
    if m == "mri":
        v, spacing = render_mri(f, a, rng, shape=sz["mri"])
        if demo:
            s = Sample(np.stack([v[q] for q in SEQUENCES]), m, "nifti", "", spacing=spacing,
                       channel_names=list(SEQUENCES))
            return pp.preprocess_mri(s, **DEMO_INPUT["mri"])
        return np.stack([v[q] for q in SEQUENCES]) / 1000.0
    raise ValueError(m)


def balanced_items(m: str, per_class: int, seed: int, pool: int = 6000, resolution: str = "demo",
                   size: str = "small"):
    """Up to ``per_class`` patients per label of modality ``m`` from a large simulated pool,
    rendered (see :func:`_render`); returns ``(X [N, ...] float32, y [N] int, label_names)``."""
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
            X.append(_render(m, p, np.random.default_rng([seed, p.index, 900 + MODALITIES.index(m)]), resolution, size))
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


def bench_separability(per_class: int, epochs: int, seed: int, modalities=MODALITIES,
                       resolution: str = "demo", size: str = "small") -> dict:
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
        X, y, labels = balanced_items(m, per_class, seed, resolution=resolution, size=size)
        tr, te = train_test_split(np.arange(len(y)), test_size=0.3, stratify=y, random_state=seed)
        F = pixel_features(m, X)
        lr = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
        lr.fit(F[tr], y[tr])
        base = balanced_accuracy_score(y[te], lr.predict(F[te]))
        pred = train_cnn(m, X[tr], y[tr], X[te], epochs, seed)
        cnn = balanced_accuracy_score(y[te], pred)
        out[m] = {"resolution": resolution, "size": size, "classes": len(labels), "items": len(y), "per_class": np.bincount(y).tolist(),
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
    s.add_argument("--size", default="small", help="comma-separated size presets, e.g. small,tiny (interleaved)")
    s.add_argument("--workers", type=int, default=1, help="generator worker processes (0 = one per core)")
    s.add_argument("--rounds", type=int, default=1, help="repetitions per size (medians reported)")
    c = sub.add_parser("separability")
    c.add_argument("--per-class", type=int, default=120)
    c.add_argument("--epochs", type=int, default=30)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--modalities", default=",".join(MODALITIES))
    c.add_argument("--resolution", choices=("demo", "small"), default="demo",
                   help="model input: 'demo' = the demo config's preprocessing (default), 'small' = larger inputs")
    c.add_argument("--size", default="small", choices=tuple(SIZES), help="render size preset (default small)")
    for q in (s, c):
        q.add_argument("--out", default=None, help="write the JSON result here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cmd == "speed":
        res = bench_speed(args.patients, args.seed, tuple(args.size.split(",")), args.workers, args.rounds)
    else:
        res = bench_separability(args.per_class, args.epochs, args.seed, tuple(args.modalities.split(",")),
                                 args.resolution, args.size)
    res = {"simulated": True, **res} if isinstance(res, dict) else res
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
