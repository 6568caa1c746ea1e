"""Indexing throughput of the archive indexer, items/s per modality.

For each modality it generates a *simulated* archive with ``data_registry.synthetic``
(real file formats: DICOM CXR and CT series, WFDB ECG, NIfTI MRI studies, PNG fundus,
pyramidal TIFF slides), then times :func:`data_registry.indexer.index_archive` from an empty
catalogue (walk, hash, decode, embed, commit, FAISS) and a second, unchanged pass (the
incremental skip path). The model is the tiny random model of :mod:`m3bind.testing` unless
``--model`` names a model directory, so the numbers measure the pipeline, not a real encoder.

    python benchmarks/bench_index.py [--items 20] [--workers 0 2] [--model DIR]

Writes ``benchmarks/results/bench_index.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

from m3bind.modalities import MODALITIES

log = logging.getLogger("bench_index")
RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=20, help="simulated patients (items) per modality")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                    help="decoder processes to compare (0 decodes inline; a pool pays a few "
                         "seconds of process start-up per run)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: tiny random)")
    ap.add_argument("--modalities", nargs="+", default=list(MODALITIES))
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_index.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from data_registry.catalog import Catalog
    from data_registry.indexer import index_archive
    from data_registry.synthetic import generate
    from m3bind.model import load_model

    with tempfile.TemporaryDirectory(prefix="m3bind-bench-") as tmp:
        tmp = Path(tmp)
        model_dir = args.model
        if model_dir is None:
            from m3bind.testing import build_tiny_model

            model_dir = build_tiny_model(tmp / "model")
        model = load_model(model_dir)
        rows = {}
        for m in args.modalities:
            root = tmp / f"archive-{m}"
            t = time.perf_counter()
            # linked "test" patients are the ones that get every listed modality
            generate(root, patients=int(args.items / 0.95) + 1, seed=0, modalities=(m,),
                     progress=False, test_fraction=0.95, val_fraction=0.0, paired_fraction=0.0)
            gen_s = time.perf_counter() - t
            bytes_ = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
            rows[m] = {"archive_mb": round(bytes_ / 2**20, 2), "generate_s": round(gen_s, 2)}
            for w in args.workers:
                cat = Catalog(tmp / f"{m}-{w}.db")
                t = time.perf_counter()
                first = index_archive(root, cat, model, workers=w, batch_size=args.batch_size,
                                      progress=False)
                first_s = time.perf_counter() - t
                t = time.perf_counter()
                second = index_archive(root, cat, model, workers=w, progress=False)
                second_s = time.perf_counter() - t
                cat.close()
                rows[m][f"workers={w}"] = {
                    "items": first["total"], "added": first["added"], "failed": first["failed"],
                    "first_pass_s": round(first_s, 2),
                    "items_per_s": round(first["added"] / first_s, 2),
                    "unchanged_pass_s": round(second_s, 2),
                    "unchanged_items_per_s": round(second["skipped"] / max(second_s, 1e-9), 1),
                    "unchanged_added": second["added"]}
            log.info("%s: %s", m, rows[m])
    out = {"benchmark": "indexing throughput per modality (simulated archive, "
                        + ("tiny random model" if args.model is None else str(args.model)) + ")",
           "simulated": True, "batch_size": args.batch_size,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "load_avg": os.getloadavg()},
           "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
