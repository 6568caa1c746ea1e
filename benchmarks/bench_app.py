"""App latency: upload a chest X-ray, get zero-shot labels and the top-10 cross-modal results.

Starts ``m3bind serve`` (a separate process, as a user runs it) over a *simulated* archive
(``data_registry.synthetic``: CXR and ECG of linked patients) indexed with the model, then,
for each query CXR, times what a client of the HTTP API does for one upload, through
``gradio_client``: ``/zeroshot(file, labels)`` then ``/search(query_file, "", "ecg", 10)``
(each call uploads the file). Interleaved with it, in this process, the same work through the
library alone (read, embed, classify, FAISS search): the floor the app adds HTTP, upload and
Gradio queueing to. Issue 10's target: the HTTP total at most 1.5 s.

Query CXRs: pydicom-data's real radiograph ``RG1_UNCR.dcm`` (a CR chest PA, 1955×1841) when
installed, and simulated DICOM CXRs of the cohort. The model is the tiny random model of
:mod:`m3bind.testing` unless ``--model`` names a model directory (``runs/demo/model``).

    python benchmarks/bench_app.py [--patients 200] [--rounds 5] [--model DIR]

Writes ``benchmarks/results/app_latency.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import write_results

log = logging.getLogger("bench_app")
RESULTS = Path(__file__).parent / "results"
LABELS = "cardiomegaly, pleural effusion, pneumonia, no finding"


def real_cxr() -> Path | None:
    """pydicom-data's chest radiograph (package ``data_store``), when it is installed."""
    import importlib.util

    spec = importlib.util.find_spec("data_store")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))) / "data" / "RG1_UNCR.dcm"
    return p if p.is_file() else None


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 300.0) -> float:
    """Seconds until ``url`` answers (the server's start-up)."""
    t = time.perf_counter()
    while time.perf_counter() - t < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"m3bind serve exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return time.perf_counter() - t
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patients", type=int, default=200, help="simulated patients in the archive")
    ap.add_argument("--rounds", type=int, default=5, help="passes over the query CXRs")
    ap.add_argument("--queries", type=int, default=3, help="simulated query CXRs")
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: tiny random)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server and the library arm")
    ap.add_argument("--work", type=Path, default=None, help="keep archive/catalogue here")
    ap.add_argument("--out", type=Path, default=RESULTS / "app_latency.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

    import torch
    from gradio_client import Client, handle_file

    from app.web.testing import free_port
    from data_registry.indexer import index_archive
    from data_registry.search import search as archive_search
    from data_registry.synthetic import generate, read_manifest
    from m3bind.io import load
    from m3bind.model import load_model
    from m3bind.zeroshot import classify

    torch.set_num_threads(args.threads)
    tmpdir = tempfile.TemporaryDirectory(prefix="m3bind-app-")
    work = args.work or Path(tmpdir.name)
    work.mkdir(parents=True, exist_ok=True)
    from app.web.testing import tiny_model_dir

    model_dir = args.model or tiny_model_dir(work)
    archive = work / "archive"
    if not (archive / "manifest.csv").exists():
        generate(archive, patients=args.patients, seed=0, modalities=("cxr", "ecg"),
                 progress=False, test_fraction=0.9, val_fraction=0.0)
    catalog = work / "catalog.db"
    url = f"sqlite:///{catalog}"
    t = time.perf_counter()
    indexed = index_archive(archive, url, str(model_dir), workers=0, progress=False)
    index_s = time.perf_counter() - t
    rows = read_manifest(archive)
    rows = rows.to_dict("records") if hasattr(rows, "to_dict") else rows
    queries = [archive / r["path"] for r in rows if r["modality"] == "cxr"][: args.queries]
    real = real_cxr()
    if real is not None:
        queries.insert(0, real)

    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    cmd = [str(Path(sys.executable).with_name("m3bind")), "serve", "--model", str(model_dir),
           "--catalog", url, "--archive", str(archive), "--port", str(port)]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}/"
        start_s = wait_up(base, server)
        client = Client(base, verbose=False)
        model = load_model(model_dir)
        from data_registry.catalog import Catalog

        cat = Catalog(url)

        def library(q: Path) -> float:
            t = time.perf_counter()
            classify(model, load(q), labels=[x.strip() for x in LABELS.split(",")])
            archive_search(cat, model, str(q), target="ecg", k=10)
            return time.perf_counter() - t

        def http(q: Path) -> tuple[float, float, float, dict]:
            t = time.perf_counter()
            zs = json.loads(client.predict(file=handle_file(str(q)), labels=LABELS, api_name="/zeroshot"))
            t1 = time.perf_counter()
            res = json.loads(client.predict(query_file=handle_file(str(q)), query_text="",
                                            target_modality="ecg", k=10, api_name="/search"))
            t2 = time.perf_counter()
            return t2 - t, t1 - t, t2 - t1, {"zeroshot": zs, "n_results": len(res.get("results", []))}

        def fresh(q: Path, r: int) -> Path:
            """A copy of ``q`` with other bytes (one comment tag), so no upload is a repeat the
            app's content-keyed embedding cache has seen; both arms read the same copy."""
            ds = pydicom.dcmread(q)
            ds.ImageComments = f"bench round {r}"
            out = Path(tmpdir.name) / "fresh" / f"r{r}_{q.name}"
            out.parent.mkdir(exist_ok=True)
            ds.save_as(out)
            return out

        http(fresh(queries[-1], -1)), library(queries[-1])  # warm-up: first-call costs of both arms
        per_query: dict[str, dict[str, list]] = {}
        last = {}
        for r in range(args.rounds):
            for q0 in queries:  # interleaved: load hits both arms alike
                name = "real RG1_UNCR.dcm" if q0 == real else f"simulated {q0.name}"
                q = fresh(q0, r)
                d = per_query.setdefault(name, {"http_s": [], "zeroshot_s": [], "search_s": [],
                                                "library_s": []})
                total, zs, se, last[name] = http(q)
                d["http_s"].append(total), d["zeroshot_s"].append(zs), d["search_s"].append(se)
                d["library_s"].append(library(q))
        results = {}
        for name, d in per_query.items():
            results[name] = {k: {"median": round(float(np.median(v)), 3), "max": round(float(np.max(v)), 3)}
                             for k, v in d.items()}
            results[name]["results_returned"] = last[name]["n_results"]
            results[name]["modality"] = last[name]["zeroshot"].get("modality")
        every = [x for d in per_query.values() for x in d["http_s"]]
        out = {"benchmark": "upload -> zero-shot labels + top-10 cross-modal (ecg) results through "
                            "the HTTP API (gradio_client vs m3bind serve), library-only interleaved",
               "simulated": True,
               "model": "tiny random (m3bind.testing.build_tiny_model)" if args.model is None else str(args.model),
               "archive": {"patients": args.patients, "indexed": indexed, "index_s": round(index_s, 1)},
               "server_start_s": round(start_s, 1), "rounds": args.rounds,
               "http_s_median_all": round(float(np.median(every)), 3),
               "http_s_p90_all": round(float(np.percentile(every, 90)), 3),
               "http_s_max_all": round(float(np.max(every)), 3),
               "machine": {"cpus": os.cpu_count(), "torch_threads": args.threads,
                           "platform": platform.platform(), "load_avg": os.getloadavg()},
               "results": results}
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    write_results(out, args.out)
    tmpdir.cleanup()


if __name__ == "__main__":
    main()
