"""Search latency of the archive's vector index against exact search, and its recall@10.

For each size N (default 1e4, 1e5, 1e6) of unit vectors in the shared dimension (default 512,
the model default) it builds the exact index (FAISS ``IndexFlatIP``, the baseline) and the index
:meth:`m3bind.index.VectorIndex.build` chooses for that size (exact up to ``EXACT_MAX``, above
it an 8-bit IVF whose ``nprobe`` is calibrated at build time on stored vectors) and, above the
threshold, the previous version's float IVF (``before``), then times single
queries (one at a time, as a user searches) *interleaved*: query i on the exact index, then on
the chosen one, so machine load hits both alike. It records wall and CPU latency p50/p99,
recall@10 against exact on held-out queries (never seen by the calibration), build time, the
index's resident memory, an ``nprobe`` sweep and the load average.

Vectors are *simulated* (``--data``):

* ``lowrank`` (default): a mixture of Gaussians in a random 32-dimensional subspace (1000
  centres, within-cluster spread 1) plus isotropic noise (norm 0.3), normalised; learned
  embeddings have low intrinsic dimension and form clusters. Queries are new points.
* ``clusters``: 1000 isotropic Gaussian clusters in the full dimension (the earlier, easier
  data: any inverted index scores recall 1.0 on it).

Uniformly random vectors (no structure at all) are the worst case of every inverted or graph
index and not what an embedding model produces.

    python benchmarks/bench_search.py [--sizes 10000 100000 1000000] [--dim 512] [--threads 2]

Writes ``benchmarks/results/bench_search.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import write_results  # noqa: E402
from m3bind.index import EXACT_MAX, TARGET_RECALL, VectorIndex, choose_kind  # noqa: E402

log = logging.getLogger("bench_search")
RESULTS = Path(__file__).parent / "results"


def _unit_rows(n: int, dim: int, draw, step: int = 100_000) -> np.ndarray:
    """``n`` L2-normalised rows from ``draw(m)`` (``[m, dim]`` float32), drawn ``step`` at a time
    so that 10^6 points never hold more than one chunk of float64 temporaries."""
    out = np.empty((n, dim), np.float32)
    for i in range(0, n, step):
        m = min(step, n - i)
        v = draw(m)
        out[i:i + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def simulated_vectors(n: int, dim: int, seed: int, point_seed: int, centres: int = 1000,
                      spread: float = 1.0) -> np.ndarray:
    """``n`` unit vectors around ``centres`` random directions of the full space (isotropic
    clusters); the directions depend on ``seed``, the points on ``point_seed``."""
    c = np.random.default_rng(seed).normal(size=(centres, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    rng = np.random.default_rng([seed, point_seed])

    def draw(m: int) -> np.ndarray:
        return c[rng.integers(0, centres, m)] + spread * rng.normal(size=(m, dim)).astype(np.float32) / np.sqrt(dim)

    return _unit_rows(n, dim, draw)


def lowrank_vectors(n: int, dim: int, seed: int, point_seed: int, rank: int = 32,
                    centres: int = 1000, spread: float = 1.0, noise: float = 0.3) -> np.ndarray:
    """``n`` unit vectors: a Gaussian mixture in a random ``rank``-dimensional subspace plus
    isotropic noise of norm about ``noise``; subspace and centres depend on ``seed``."""
    g = np.random.default_rng(seed)
    c = g.normal(size=(centres, rank)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    basis = np.linalg.qr(g.normal(size=(dim, rank)))[0].T.astype(np.float32)  # [rank, dim]
    rng = np.random.default_rng([seed, point_seed])

    def draw(m: int) -> np.ndarray:
        z = c[rng.integers(0, centres, m)] + spread * rng.normal(size=(m, rank)).astype(np.float32) / np.sqrt(rank)
        z /= np.linalg.norm(z, axis=1, keepdims=True)
        return z @ basis + noise * rng.normal(size=(m, dim)).astype(np.float32) / np.sqrt(dim)

    return _unit_rows(n, dim, draw)


DATA = {"lowrank": lowrank_vectors, "clusters": simulated_vectors}


def rss_mb() -> float:
    """Resident memory of this process now, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def previous_ivf(vectors: np.ndarray, ids: np.ndarray, seed: int) -> VectorIndex:
    """The index of the previous version (the "before" arm): ``IndexIVFFlat`` (float vectors),
    2·√n lists trained on up to 64 per list (25 k-means iterations), nprobe = nlist/16 (≥ 16)."""
    import faiss

    n, dim = vectors.shape
    nlist = int(min(65536, max(16, 2 * np.sqrt(n))))
    nprobe = min(nlist, max(16, nlist // 16))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed = seed
    pick = np.random.default_rng(seed).choice(n, min(n, 64 * nlist), replace=False)
    ivf.train(vectors[np.sort(pick)])
    ivf.add_with_ids(vectors, ids)
    ivf.nprobe = nprobe
    index = VectorIndex(None, "ivf", nlist=nlist, nprobe=nprobe)
    index.dim, index._index = dim, ivf
    return index


def timed_search(index: VectorIndex, q: np.ndarray, k: int) -> tuple[float, float, np.ndarray]:
    """(wall s, CPU s, ids) of one query."""
    c, t = time.process_time(), time.perf_counter()
    _, ids = index.search(q[None], k)
    return time.perf_counter() - t, time.process_time() - c, ids[0]


def recall_at(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(found, truth)]))


def pct(a: list[float], p: float) -> float:
    return round(1e3 * float(np.percentile(a, p)), 3)


def bench(n: int, dim: int, n_queries: int, seed: int, data: str, k: int = 10,
          before: bool = True, threads: int = 1) -> dict:
    t = time.perf_counter()
    vectors = DATA[data](n, dim, seed, 0)
    queries = DATA[data](n_queries, dim, seed, 1)  # same structure, new points
    ids = np.arange(n, dtype=np.int64)
    log.info("N=%d: vectors in %.1f s", n, time.perf_counter() - t)
    row: dict = {"n": n, "dim": dim, "data": data, "queries": len(queries), "kind": choose_kind(n)}
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)  # builds use every core; queries `threads`
    m0 = rss_mb()
    t = time.perf_counter()
    exact = VectorIndex.build(vectors, ids, kind="flat")
    row["exact_build_s"] = round(time.perf_counter() - t, 2)
    row["exact_mem_mb"] = round(rss_mb() - m0, 1)
    m0 = rss_mb()
    t = time.perf_counter()
    chosen = VectorIndex.build(vectors, ids)  # what the catalogue builds at this size
    row["build_s"] = round(time.perf_counter() - t, 2)
    row["mem_mb"] = round(rss_mb() - m0, 1)
    indices = {"exact": exact, "": chosen}
    if chosen.kind == "ivf":
        row["nlist"], row["nprobe"] = chosen.nlist, chosen.nprobe
        if before:
            m0 = rss_mb()
            t = time.perf_counter()
            indices["before"] = previous_ivf(vectors, ids, seed)
            row["before_build_s"] = round(time.perf_counter() - t, 2)
            row["before_mem_mb"] = round(rss_mb() - m0, 1)
            nlist = indices["before"].nlist
            row["before_nlist"], row["before_nprobe"] = nlist, indices["before"].nprobe
    del vectors
    faiss.omp_set_num_threads(threads)
    for q in queries[:5]:  # warm-up
        for index in indices.values():
            index.search(q[None], k)
    lat = {name: ([], [], []) for name in indices}
    for q in queries:  # interleaved: load hits all alike
        for name, index in indices.items():
            w, c, i = timed_search(index, q, k)
            lat[name][0].append(w), lat[name][1].append(c), lat[name][2].append(i)
    truth = np.stack(lat["exact"][2])
    for name, (wall, cpu, got) in lat.items():
        pre = f"{name}_" if name else ""
        row[pre + "ms_p50"], row[pre + "ms_p99"] = pct(wall, 50), pct(wall, 99)
        row[pre + "cpu_ms_p50"], row[pre + "cpu_ms_p99"] = pct(cpu, 50), pct(cpu, 99)
        if name != "exact":
            row[pre + "recall_at_10"] = round(recall_at(np.stack(got), truth, k), 4)
    row["speedup_p99"] = round(row["exact_ms_p99"] / max(row["ms_p99"], 1e-9), 1)
    if chosen.kind == "ivf":
        del indices
        sweep = {}
        p0 = chosen.nprobe
        for p in sorted({max(1, p0 // 4), max(1, p0 // 2), p0, min(chosen.nlist, 2 * p0)}):
            chosen._index.nprobe = p
            wall, got = [], []
            for q in queries:
                w, _, i = timed_search(chosen, q, k)
                wall.append(w), got.append(i)
            sweep[str(p)] = {"recall_at_10": round(recall_at(np.stack(got), truth, k), 4),
                             "ms_p50": pct(wall, 50), "ms_p99": pct(wall, 99)}
        chosen._index.nprobe = p0
        row["nprobe_sweep"] = sweep
    row["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    log.info("N=%d: %s", n, row)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", choices=sorted(DATA), default="lowrank")
    ap.add_argument("--threads", type=int, default=1,
                    help="FAISS OpenMP threads per query (1: a single query gains nothing from a "
                         "second thread on a loaded machine, whose spin-waits doubled CPU time "
                         "in a 2-thread run; the second core serves a concurrent query)")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_search.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import faiss

    faiss.omp_set_num_threads(args.threads)
    load0 = os.getloadavg()
    rows = [bench(n, args.dim, args.queries, args.seed, args.data, threads=args.threads)
            for n in args.sizes]
    out = {
        "benchmark": "single-query search: exact (baseline) vs the index VectorIndex.build "
                     "chooses, interleaved; recall@10 vs exact on held-out queries (simulated)",
        "simulated": True, "data": args.data, "exact_threshold": EXACT_MAX,
        "calibration_target_recall": TARGET_RECALL,
        "machine": {"cpus": os.cpu_count(), "faiss_threads_per_query": args.threads,
                    "faiss_threads_build": os.cpu_count(),
                    "platform": platform.platform(), "load_avg_start": load0,
                    "load_avg_end": os.getloadavg(), "faiss": faiss.__version__,
                    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)},
        "results": rows,
    }
    write_results(out, args.out)


if __name__ == "__main__":
    main()
