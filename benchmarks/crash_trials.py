"""Crash trials: kill -9 indexing and training at random moments, rerun, check convergence.

Indexing (``--index-trials``, default 20): a simulated-cohort archive is indexed once without
interruption (the reference). Each trial indexes it into a fresh SQLite catalogue in a child
process, sends SIGKILL after a random fraction of the reference duration, checks the state
left behind (SQLite opens, FAISS files complete), reruns the indexer to completion and
compares with the reference: the same items (paths, modalities) with exactly one embedding
each, no duplicate paths, the rerun's counts adding up, the FAISS file of each modality on
disk holding exactly the catalogue's embedding ids (read as written, before any self-repair).

Training (``--train-trials`` per stage, default 5): ``train/run_all.py`` with D's tiny
config (stages pretrain, bind, distill), killed at a random moment after the stage named
has started; right after the kill every model directory present must pass its sha256
manifest and every ``latest.json`` must point to a complete checkpoint (never half-written);
the rerun must finish, with all three model directories valid, and the final weights are
compared with an uninterrupted reference run.

Children are forked from a fork server that has done the heavy imports, so a trial costs
its work, not Python start-up. Writes ``benchmarks/results/crash_trials.json``::

    python benchmarks/crash_trials.py --out benchmarks/results/crash_trials.json
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import random
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

log = logging.getLogger("crash_trials")
STAGES = ("pretrain", "bind", "distill")
MODEL_DIRS = {"pretrain": "zoo_model", "bind": "bound_model", "distill": "model"}


def _ctx():
    """Children come from a fork server that imported the indexer and the trainer once.

    Forking this process directly would deadlock children once it has run a torch op (its
    OpenMP pool does not survive fork); the fork server never runs one.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["data_registry.indexer", "train.run_all"])
    return ctx


def _quiet_child() -> None:
    logging.disable(logging.WARNING)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)


# ------------------------------------------------------------------------------ indexing
def _index_child(archive: str, db: str, model: str, batch_size: int = 32) -> None:
    _quiet_child()
    from data_registry.indexer import index_archive

    res = index_archive(archive, db, model, workers=0, progress=False, batch_size=batch_size)
    Path(db + ".result.json").write_text(json.dumps(res))


def run_index(archive: Path, db: Path, model: Path, kill_after: float | None, batch_size: int = 32) -> dict[str, Any]:
    """Index in a forked child; SIGKILL it after ``kill_after`` seconds (None: let it finish)."""
    ctx = _ctx()
    p = ctx.Process(target=_index_child, args=(str(archive), str(db), str(model), batch_size))
    t0 = time.monotonic()
    p.start()
    p.join(kill_after)
    killed = False
    if p.is_alive():
        os.kill(p.pid, signal.SIGKILL)
        killed = True
        p.join()
    out = {"seconds": round(time.monotonic() - t0, 2), "killed": killed, "exitcode": p.exitcode}
    res = Path(str(db) + ".result.json")
    if res.exists() and not killed:
        out["result"] = json.loads(res.read_text())
        res.unlink()
    return out


def catalogue_state(db: Path) -> dict[str, Any]:
    """Items, embeddings and on-disk FAISS ids of a catalogue, read without repairing anything."""
    import numpy as np

    from data_registry.catalog import Catalog
    from m3bind.index import VectorIndex

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        integrity = con.execute("PRAGMA integrity_check").fetchone()[0]
        items = con.execute("SELECT id, path, modality, duplicate_of_id FROM items").fetchall()
        embs = con.execute("SELECT id, item_id, modality, model_key FROM embeddings").fetchall()
        failures = con.execute("SELECT path FROM failures").fetchall()
    finally:
        con.close()
    cat = Catalog(str(db), create=False)
    faiss_ok, faiss_detail = True, {}
    try:
        for key in {e[3] for e in embs}:
            for mod in {e[2] for e in embs if e[3] == key}:
                want = sorted(e[0] for e in embs if e[3] == key and e[2] == mod)
                path = cat.index_path(mod, key)
                if not path.exists():
                    faiss_ok, faiss_detail[mod] = False, "missing"
                    continue
                got = sorted(int(i) for i in np.asarray(VectorIndex.load(path).ids()))
                if got != want:
                    faiss_ok = False
                    faiss_detail[mod] = f"faiss {len(got)} ids vs catalogue {len(want)}"
    finally:
        cat.close()
    paths = [i[1] for i in items]
    per_item: dict[int, int] = {}
    for e in embs:
        per_item[e[1]] = per_item.get(e[1], 0) + 1
    return {
        "integrity": integrity, "items": {(i[1]): i[2] for i in items}, "n_items": len(items),
        "duplicate_paths": len(paths) - len(set(paths)), "n_embeddings": len(embs),
        "items_without_one_embedding": sum(1 for i in items if i[3] is None and per_item.get(i[0], 0) != 1),
        "failures": sorted(f[0] for f in failures), "faiss_agrees": faiss_ok, "faiss_detail": faiss_detail,
    }


def index_trials(work: Path, n: int, patients: int, rng: random.Random, save=None,
                 batch_size: int = 32) -> dict[str, Any]:
    from data_registry.synthetic import generate
    from m3bind.testing import build_tiny_model

    archive = work / "archive"
    if not (archive / "manifest.csv").exists():
        generate(archive, patients, 0, size="small")
    model = work / "model"
    if not (model / "config.json").exists():
        build_tiny_model(model)
    ref_db = work / "ref.db"
    for p in work.glob("ref.db*"):
        p.unlink() if p.is_file() else None
    ref = run_index(archive, ref_db, model, None, batch_size)
    ref_state = catalogue_state(ref_db)
    log.info("reference indexing: %s items in %.1fs", ref_state["n_items"], ref["seconds"])
    trials = []
    for t in range(n):
        db = work / f"trial{t:02d}.db"
        kill_at = rng.uniform(0.05, 0.9) * ref["seconds"]
        first = run_index(archive, db, model, kill_at, batch_size)
        after_kill = catalogue_state(db) if db.exists() else None
        second = run_index(archive, db, model, None, batch_size)
        st = catalogue_state(db)
        res = second.get("result", {})
        ok = (second["exitcode"] == 0 and st["integrity"] == "ok" and st["items"] == ref_state["items"]
              and st["duplicate_paths"] == 0 and st["items_without_one_embedding"] == 0
              and st["n_embeddings"] == ref_state["n_embeddings"] and st["faiss_agrees"]
              and st["failures"] == ref_state["failures"]
              and res.get("added", 0) + res.get("skipped", 0) + res.get("failed", 0) == res.get("total"))
        trial = {"trial": t, "kill_after_s": round(kill_at, 2), "killed": first["killed"],
                 "items_before_rerun": after_kill["n_items"] if after_kill else 0,
                 "integrity_after_kill": after_kill["integrity"] if after_kill else "no file",
                 "rerun": res, "rerun_seconds": second["seconds"], "n_items": st["n_items"],
                 "n_embeddings": st["n_embeddings"], "duplicate_paths": st["duplicate_paths"],
                 "faiss_agrees": st["faiss_agrees"], "faiss_detail": st["faiss_detail"], "converged": ok}
        log.info("index trial %d: %s", t, trial)
        trials.append(trial)
        if save is not None:
            save({"reference": ref, "trials": trials, "n": len(trials), "partial": True})
        for p in work.glob(f"trial{t:02d}.db*"):
            if p.is_file():
                p.unlink()
    return {"batch_size": batch_size, "reference": {"seconds": ref["seconds"], "n_items": ref_state["n_items"],
                          "n_embeddings": ref_state["n_embeddings"], "failures": len(ref_state["failures"]),
                          "result": ref.get("result")},
            "trials": trials, "n": len(trials), "killed": sum(t["killed"] for t in trials),
            "converged": sum(t["converged"] for t in trials)}


# ------------------------------------------------------------------------------ training
def _train_child(argv: list[str]) -> None:
    _quiet_child()
    from train.run_all import main

    sys.exit(main(argv))


def _train_argv(out: Path, work: Path) -> list[str]:
    return ["--config", str(ROOT / "train/configs/tiny.yaml"), "--out", str(out), "stages=[pretrain,bind,distill]",
            f"data.cohort={work / 'cohort'}", f"data.cache_dir={work / 'cache'}"]


def run_train(out: Path, work: Path, stage: str | None = None, delay: float = 0.0,
              timeout: float = 900) -> dict[str, Any]:
    """Train in a forked child; with ``stage``, SIGKILL it ``delay`` s after that stage has started."""
    ctx = _ctx()
    p = ctx.Process(target=_train_child, args=(_train_argv(out, work),))
    t0 = time.monotonic()
    p.start()
    killed, started = False, None
    if stage is not None:
        prev_done = out / "checkpoints" / STAGES[STAGES.index(stage) - 1] / "done.json" if stage != "pretrain" else None
        while p.is_alive() and time.monotonic() - t0 < timeout:
            # a stage has started once its checkpoint folder (pretrain: pretrain_<modality>) exists
            if any((out / "checkpoints").glob(f"{stage}*")) or (prev_done is not None and prev_done.exists()):
                started = time.monotonic() - t0
                break
            time.sleep(0.05)
        p.join(delay)
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
            killed = True
    p.join(timeout)
    if p.is_alive():
        os.kill(p.pid, signal.SIGKILL)
        p.join()
    return {"seconds": round(time.monotonic() - t0, 2), "killed": killed, "exitcode": p.exitcode,
            "stage_started_s": None if started is None else round(started, 2)}


def run_state(out: Path) -> dict[str, Any]:
    """Model directories and checkpoints of a run folder: complete or absent, never half-written."""
    from safetensors.torch import load_file

    from m3bind.model_dir import check_model_dir

    bad = []
    models = {}
    for stage, d in MODEL_DIRS.items():
        path = out / d
        if not path.exists():
            models[stage] = "absent"
            continue
        try:
            check_model_dir(path, verify=True)
            models[stage] = "valid"
        except Exception as e:  # noqa: BLE001 - recorded, this is what the trial checks
            models[stage] = f"INVALID: {e}"
            bad.append(f"{d}: {e}")
    ckpts = {}
    for sd in sorted((out / "checkpoints").glob("*")) if (out / "checkpoints").exists() else []:
        stage = sd.name
        latest = sd / "latest.json"
        if not latest.exists():
            ckpts[stage] = "done" if (sd / "done.json").exists() else "none"
            continue
        try:
            info = json.loads(latest.read_text())
            c = sd / info["dir"]
            json.loads((c / "state.json").read_text())
            for f in c.glob("*.safetensors"):
                load_file(str(f))
            ckpts[stage] = f"step {info['step']} complete"
        except Exception as e:  # noqa: BLE001
            ckpts[stage] = f"HALF-WRITTEN: {e}"
            bad.append(f"checkpoint {stage}: {e}")
    leftovers = [str(p.relative_to(out)) for p in out.rglob(".*") if p.name not in (".", "..")]
    return {"models": models, "checkpoints": ckpts, "problems": bad, "temp_leftovers": len(leftovers)}


def _weights(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.name}:{k}"] = v
    return out


def max_weight_diff(a: Path, b: Path) -> float | None:
    wa, wb = _weights(a), _weights(b)
    if set(wa) != set(wb):
        return None
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa) if wa else 0.0


def train_trials(work: Path, n: int, rng: random.Random, save=None, stages=STAGES,
                 max_delay: float = 12.0) -> dict[str, Any]:
    import shutil

    ref_out = work / "train_ref"
    if not (ref_out / "model" / "config.json").exists():
        shutil.rmtree(ref_out, ignore_errors=True)
        ref = run_train(ref_out, work)
    else:
        ref = {"seconds": None, "exitcode": 0, "reused": True}
    log.info("reference training: %s", ref)
    trials = []
    for stage in stages:
        for t in range(n):
            out = work / f"train_{stage}_{t}"
            shutil.rmtree(out, ignore_errors=True)
            delay = rng.uniform(0.0, max_delay)
            first = run_train(out, work, stage, delay)
            after_kill = run_state(out)
            second = run_train(out, work)
            final = run_state(out)
            diff = max_weight_diff(ref_out / "model", out / "model") if (out / "model").exists() else None
            ok = (second["exitcode"] == 0 and not after_kill["problems"] and not final["problems"]
                  and all(v == "valid" for v in final["models"].values()))
            trial = {"stage": stage, "trial": t, "delay_s": round(delay, 2), "killed": first["killed"],
                     "stage_started_s": first["stage_started_s"], "after_kill": after_kill,
                     "rerun_exitcode": second["exitcode"], "rerun_seconds": second["seconds"],
                     "final": final, "max_weight_diff_vs_uninterrupted": diff, "converged": ok}
            log.info("train trial %s/%d: killed=%s converged=%s diff=%s", stage, t, first["killed"], ok, diff)
            trials.append(trial)
            if save is not None:
                save({"reference": ref, "trials": trials, "partial": True})
            shutil.rmtree(out, ignore_errors=True)
    by_stage = {s: {"n": sum(1 for t in trials if t["stage"] == s),
                    "killed": sum(1 for t in trials if t["stage"] == s and t["killed"]),
                    "converged": sum(1 for t in trials if t["stage"] == s and t["converged"])} for s in stages}
    return {"reference": ref, "trials": trials, "by_stage": by_stage}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/crash_trials.json")
    ap.add_argument("--work", type=Path, default=Path("/tmp/m3bind_crash_trials"))
    ap.add_argument("--index-trials", type=int, default=20)
    ap.add_argument("--train-trials", type=int, default=5, help="trials per training stage")
    ap.add_argument("--stages", default=",".join(STAGES), help="training stages to kill, comma-separated")
    ap.add_argument("--max-delay", type=float, default=12.0, help="kill at most this many seconds into the stage")
    ap.add_argument("--patients", type=int, default=12, help="patients of the simulated archive")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32, help="indexer commit batch (small: many commits to kill between)")
    ap.add_argument("--skip-index", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    result: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "machine": {"cores": os.cpu_count(), "loadavg_start": os.getloadavg()}}
    prev = json.loads(args.out.read_text()) if args.out.exists() else {}

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        merged = {**prev, **result}
        merged["machine"]["loadavg_end"] = os.getloadavg()
        args.out.write_text(json.dumps(merged, indent=1, default=str))

    def partial(key):
        def _save(obj):
            result[key] = obj
            save()
        return _save

    if not args.skip_index:
        result["indexing"] = index_trials(args.work / "index", args.index_trials, args.patients, rng,
                                          partial("indexing"), args.batch_size)
        save()
    if not args.skip_train:
        result["training"] = train_trials(args.work, args.train_trials, rng, partial("training"),
                                          tuple(args.stages.split(",")), args.max_delay)
    result["ended"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save()
    print(json.dumps({k: result.get(k, {}).get("converged") if k == "indexing" else
                      result.get(k, {}).get("by_stage") for k in ("indexing", "training")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
