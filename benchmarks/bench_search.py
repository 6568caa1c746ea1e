"""Search latency of the archive's vector index and recall@10 of its approximate index.

For each size N (default 1e4, 1e5, 1e6) of unit vectors in the shared dimension (default 512,
the model default), it measures single-query latency p50/p99 of the exact index (FAISS
``IndexFlatIP``) and of the IVF index :class:`m3bind.index.VectorIndex` builds above its size
threshold, and the IVF's recall@10 against exact search (also at other ``nprobe`` values).
Vectors are *simulated*: a mixture of Gaussian clusters on the sphere (real embeddings are
clustered; uniformly random vectors would make any inverted index look bad).

    python benchmarks/bench_search.py [--sizes 10000 100000 1000000] [--dim 512] [--queries 200]

Writes ``benchmarks/results/bench_search.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np

from m3bind.index import EXACT_MAX, VectorIndex, choose_kind, ivf_params

log = logging.getLogger("bench_search")
RESULTS = Path(__file__).parent / "results"


def simulated_vectors(n: int, dim: int, seed: int, point_seed: int, centres: int = 1000,
                      spread: float = 1.0) -> np.ndarray:
    """``n`` unit vectors around ``centres`` random directions (simulated embeddings); the
    directions depend on ``seed``, the points on ``point_seed``."""
    c = np.random.default_rng(seed).normal(size=(centres, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    rng = np.random.default_rng([seed, point_seed])
    out = np.empty((n, dim), np.float32)
    step = 100_000
    for i in range(0, n, step):
        m = min(step, n - i)
        v = c[rng.integers(0, centres, m)] + spread * rng.normal(size=(m, dim)).astype(np.float32) / np.sqrt(dim)
        out[i:i + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def latencies(index: VectorIndex, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Per-query seconds (one query at a time, as a user's search) and the ids found."""
    times, found = [], []
    index.search(queries[:5], k)  # warm-up
    for q in queries:
        t = time.perf_counter()
        _, ids = index.search(q[None], k)
        times.append(time.perf_counter() - t)
        found.append(ids[0])
    return np.asarray(times), np.stack(found)


def recall_at(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(found, truth)]))


def bench(n: int, dim: int, n_queries: int, seed: int) -> dict:
    t = time.perf_counter()
    vectors = simulated_vectors(n, dim, seed, 0)
    queries = simulated_vectors(n_queries, dim, seed, 1)  # same clusters, new points
    ids = np.arange(n, dtype=np.int64)
    log.info("N=%d: vectors in %.1f s", n, time.perf_counter() - t)
    row: dict = {"n": n, "dim": dim, "queries": len(queries), "auto_kind": choose_kind(n)}
    t = time.perf_counter()
    exact = VectorIndex.build(vectors, ids, kind="flat")
    row["exact_build_s"] = round(time.perf_counter() - t, 3)
    lat, truth = latencies(exact, queries)
    row["exact_ms_p50"] = round(1e3 * float(np.percentile(lat, 50)), 3)
    row["exact_ms_p99"] = round(1e3 * float(np.percentile(lat, 99)), 3)
    del exact
    nlist, nprobe = ivf_params(n)
    t = time.perf_counter()
    ivf = VectorIndex.build(vectors, ids, kind="ivf")
    row["ivf_build_s"] = round(time.perf_counter() - t, 3)
    row["ivf_nlist"], row["ivf_nprobe"] = nlist, nprobe
    lat, found = latencies(ivf, queries)
    row["ivf_ms_p50"] = round(1e3 * float(np.percentile(lat, 50)), 3)
    row["ivf_ms_p99"] = round(1e3 * float(np.percentile(lat, 99)), 3)
    row["ivf_recall_at_10"] = round(recall_at(found, truth), 4)
    sweep = {}
    for p in sorted({max(1, nprobe // 4), max(1, nprobe // 2), nprobe, min(nlist, nprobe * 2)}):
        ivf._index.nprobe = p
        lat, found = latencies(ivf, queries[: max(50, len(queries) // 2)])
        sweep[str(p)] = {"recall_at_10": round(recall_at(found, truth), 4),
                         "ms_p50": round(1e3 * float(np.percentile(lat, 50)), 3)}
    row["ivf_nprobe_sweep"] = sweep
    log.info("N=%d: %s", n, row)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="FAISS OpenMP threads (1: single queries on a shared machine are faster "
                         "without OpenMP spin-waits)")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_search.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import faiss

    faiss.omp_set_num_threads(args.threads)
    rows = [bench(n, args.dim, args.queries, args.seed) for n in args.sizes]
    out = {
        "benchmark": "vector search latency and IVF recall@10 (simulated clustered unit vectors)",
        "simulated": True,
        "exact_threshold": EXACT_MAX,
        "machine": {"cpus": os.cpu_count(), "faiss_threads": faiss.omp_get_max_threads(),
                    "platform": platform.platform(), "load_avg": os.getloadavg(),
                    "faiss": faiss.__version__},
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
