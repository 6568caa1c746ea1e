"""App searches while an indexing run writes the same SQLite catalogue, for minutes; errors counted.

An indexer process keeps indexing a changing archive (each round copies the next batch of
simulated-cohort files in, or once all are in takes a batch out or puts it back, and
re-indexes incrementally into the same catalogue) while
search threads in this process call the app's ``/search`` payload function
(:func:`app.web.api.search_json`, text and file queries, every modality) and
``Catalog.stats``. Every exception of a search is an error (an empty result is not, since
the catalogue starts empty). Writes ``benchmarks/results/concurrency.json``::

    python benchmarks/concurrency.py --seconds 180
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

log = logging.getLogger("concurrency")


def _is_query(rel: str, queries: list[str]) -> bool:
    """Whether the archive file ``rel`` is (part of) an item the searches query by file."""
    p = Path(rel)
    return any(rel == q or rel.startswith(q + "/") or (p.parent == Path(q).parent and p.stem == Path(q).stem)
               for q in queries)


def _indexer(source: str, archive: str, db: str, model: str, seconds: float, result: str,
             queries: list[str]) -> None:
    """Copy the cohort into the archive batch by batch, re-indexing after each batch; once all
    is in, take a batch of files out and put it back in turn (the searches' query files stay),
    so that every round writes (new items, removed items, failures of half records)."""
    logging.disable(logging.WARNING)
    from data_registry.indexer import index_archive

    files = sorted(p for p in Path(source).rglob("*") if p.is_file() and p.name != "manifest.csv")
    batches = [files[i::8] for i in range(8)]
    rounds, errors, t0 = [], [], time.monotonic()
    r = 0
    while time.monotonic() - t0 < seconds:
        churn = r >= len(batches)
        for f in batches[(r - len(batches)) // 2 % len(batches) if churn else r]:
            rel = f.relative_to(source)
            dst = Path(archive) / rel
            if churn and _is_query(rel.as_posix(), queries):
                continue
            if churn and (r - len(batches)) % 2 == 0:
                dst.unlink(missing_ok=True)
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dst)
        try:
            res = index_archive(archive, db, model, workers=0, progress=False)
            rounds.append({"round": r, **res, "t": round(time.monotonic() - t0, 1)})
        except Exception as e:  # noqa: BLE001 - counted
            errors.append(f"{type(e).__name__}: {e}")
        r += 1
    Path(result).write_text(json.dumps({"rounds": rounds, "errors": errors}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--threads", type=int, default=2, help="search threads")
    ap.add_argument("--patients", type=int, default=30)
    ap.add_argument("--work", type=Path, default=Path("/tmp/m3bind_concurrency"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/concurrency.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    from app.web.api import search_json
    from app.web.state import Services
    from data_registry.catalog import Catalog
    from data_registry.synthetic import generate, read_manifest
    from m3bind.modalities import MODALITIES
    from m3bind.testing import build_tiny_model

    work = args.work
    source = work / "cohort"
    if not (source / "manifest.csv").exists():
        generate(source, args.patients, 1, size="small")
    rows = read_manifest(source)
    rows = rows.to_dict("records") if hasattr(rows, "to_dict") else rows
    model = work / "model"
    if not (model / "config.json").exists():
        build_tiny_model(model)
    archive, db = work / "archive", work / "catalog.db"
    shutil.rmtree(archive, ignore_errors=True)
    for p in work.glob("catalog.db*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    archive.mkdir(parents=True)
    Catalog(str(db)).close()  # created before the searches start

    ctx = mp.get_context("spawn")
    result_file = work / "indexer.json"
    queries = [r for r in rows if r["modality"] in MODALITIES][:12]
    proc = ctx.Process(target=_indexer, args=(str(source), str(archive), str(db), str(model), args.seconds,
                                              str(result_file), [q["path"] for q in queries]))
    proc.start()
    services = Services(model, f"sqlite:///{db}", archive, work_dir=work / "app", index_workers=0)
    counts, errors, lat = Counter(), [], []
    start = time.monotonic()
    stop = start + args.seconds
    lock = threading.Lock()

    def searcher(k: int) -> None:
        i = k
        while time.monotonic() < stop:
            target = MODALITIES[i % len(MODALITIES)]
            t0 = time.perf_counter()
            try:
                if i % 3 == 0:
                    q = queries[i % len(queries)]
                    src = archive / q["path"]
                    if not src.exists():  # not copied in yet: this turn is skipped (the phase is kept)
                        with lock:
                            counts["file_not_yet_copied"] += 1
                        i += args.threads
                        continue
                    out = search_json(services, str(src), "", target, 5)
                    kind = "file"
                elif i % 3 == 1:
                    out = search_json(services, None, "cardiomegaly and effusion", target, 5)
                    kind = "text"
                else:
                    out = {"results": services.catalog().stats()}
                    kind = "stats"
                with lock:
                    counts[kind] += 1
                    counts["with_results" if out["results"] else "empty"] += 1
                    lat.append((time.perf_counter() - t0, kind, round(time.monotonic() - start, 1)))
            except Exception as e:  # noqa: BLE001 - counted
                with lock:
                    counts["errors"] += 1
                    errors.append(f"{type(e).__name__}: {' '.join(str(e).split())[:200]} "
                                  f"@ {traceback.extract_tb(e.__traceback__)[-1].name}")
            i += args.threads

    loads = [os.getloadavg()]
    code = hashlib.sha256()
    for f in sorted([*ROOT.glob("data_registry/*.py"), *ROOT.glob("app/web/*.py"), *ROOT.glob("m3bind/io/*.py")]):
        code.update(f.read_bytes())

    def sample_load() -> None:
        while time.monotonic() < stop:
            time.sleep(min(10.0, max(0.0, stop - time.monotonic())))
            loads.append(os.getloadavg())

    threads = [threading.Thread(target=searcher, args=(k,)) for k in range(args.threads)]
    threads.append(threading.Thread(target=sample_load, daemon=True))
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    proc.join(args.seconds + 600)
    indexer = json.loads(result_file.read_text()) if result_file.exists() else {"rounds": [], "errors": ["no result"]}
    final = Catalog(str(db)).stats()
    slowest = sorted(lat, reverse=True)[:8]
    lat = sorted(x[0] for x in lat)
    out = {
        "seconds": round(time.monotonic() - t0, 1), "search_threads": args.threads,
        "searches": {k: v for k, v in counts.items() if k != "errors"}, "search_errors": counts.get("errors", 0),
        "search_error_examples": sorted(set(errors))[:10],
        "latency_s": {"median": lat[len(lat) // 2] if lat else None, "p95": lat[int(0.95 * len(lat))] if lat else None,
                      "max": lat[-1] if lat else None},
        "slowest_calls": [{"seconds": round(d, 2), "kind": k, "at_s": t} for d, k, t in slowest],
        "indexer_rounds": len(indexer["rounds"]), "indexer_errors": indexer["errors"],
        "indexer_writes": {k: sum(x[k] for x in indexer["rounds"]) for k in ("added", "removed", "failed")},
        "indexer_exitcode": proc.exitcode, "indexed": indexer["rounds"][-1] if indexer["rounds"] else None,
        "final_catalogue": final,
        "machine": {"cores": os.cpu_count(), "loadavg_start": loads[0], "loadavg_end": os.getloadavg(),
                    "load1_min": min(x[0] for x in loads), "load1_max": max(x[0] for x in loads),
                    "load1_mean": round(sum(x[0] for x in loads) / len(loads), 2), "load_samples": len(loads)},
        "code_sha256": code.hexdigest()[:12],
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if argv is None else argv,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps({k: out[k] for k in ("seconds", "searches", "search_errors", "indexer_rounds", "indexer_errors")}))
    return 0 if not out["search_errors"] and not out["indexer_errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
