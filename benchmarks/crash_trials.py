"""Crash trials: kill -9 indexing and training at random points, rerun, check convergence.

Indexing (``--index-trials``, default 20): a simulated-cohort archive (6 patients, 11 items of
the six modalities) is indexed once without interruption (the reference, committing every
item: ``--batch-size 1``), and the times at which its catalogue grew are recorded. Each trial
indexes it into a fresh SQLite catalogue in a child process and sends SIGKILL at a random
point tied to progress, not to the clock: after ``k`` committed items (``k`` uniform over the
items) plus a delay drawn from the reference's time to its first commit (``k = 0``: start-up,
scanning, hashing, decoding) or its gap between commits; a run that finished before its kill
point is run again with a new point (every attempt recorded). It then checks what the kill left
(SQLite integrity), reruns the indexer to completion and compares with the reference: the
same items (paths, modalities) with exactly one embedding each, no duplicate paths, the same
failures, the rerun's counts adding up, and the FAISS file of each modality on disk holding
exactly the catalogue's embedding ids (read as written, before any self-repair).

Training (``--train-trials`` per stage, default 5): ``train/run_all.py`` with D's tiny config
(stages pretrain, bind, distill). A trial of a stage starts where the uninterrupted reference
run stood when that stage began (a copy of the earlier stages' model directories and
checkpoints: what a run stopped between stages leaves) and is killed a random delay after the
stage started, uniform over the stage's duration in the reference run; if the stage finished
first (the machine's load varies), the trial is repeated with half the range, every attempt
recorded. Right after the kill every model directory present must pass its sha256 manifest
and every ``latest.json`` must point to a complete checkpoint (never half-written); the rerun
must finish with all three model directories valid. The final weights are compared with the
reference run and with a control resumed from the same point without a kill.

Children are forked from a fork server that has done the heavy imports, so a trial costs
its work, not Python start-up. Writes ``benchmarks/results/crash_trials.json``::

    nice -n 10 python benchmarks/crash_trials.py --out benchmarks/results/crash_trials.json
"""

from __future__ import annotations

import argparse
import itertools
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


#: Imported once by the fork server: the indexer and trainer, and what the readers and the index
#: import lazily (a third of a 40 s indexing run under load was these imports, in every child).
PRELOAD = ["data_registry.indexer", "data_registry.decode", "train.run_all", "m3bind.io.dicom", "m3bind.io.nifti", "m3bind.io.photo",
           "m3bind.io.wfdb_reader", "m3bind.io.wsi", "m3bind.index", "pydicom", "nibabel", "wfdb", "openslide",
           "skimage.filters", "faiss"]


def preload_model_imports(model: Path) -> None:
    """Add to the fork server's preload what loading a model imports (torch, timm, the
    transformers model classes, scipy ...), found by loading ``model`` once in this process:
    without it every child spent ~15 s of a 45 s indexing run importing them."""
    before = set(sys.modules)
    from m3bind.model import load_model

    load_model(model)
    site = ("site-packages", "/lib/python3")
    new = sorted(n for n in set(sys.modules) - before
                 if not n.startswith("_") and any(x in str(getattr(sys.modules[n], "__file__", "")) for x in site))
    PRELOAD[:] = list(dict.fromkeys(PRELOAD + new))
    log.info("fork server preloads %d modules", len(PRELOAD))


def _ctx():
    """Children come from a fork server that imported the indexer and the trainer once.

    Forking this process directly would deadlock children once it has run a torch op (its
    OpenMP pool does not survive fork); the fork server never runs one.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
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


def _count_items(db: Path) -> int:
    """Items committed so far (read-only; WAL lets this read while the indexer writes)."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.5)
        try:
            return int(con.execute("SELECT COUNT(*) FROM items").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def run_index(archive: Path, db: Path, model: Path, kill: tuple[int, float] | None, batch_size: int = 32,
              trace: bool = False) -> dict[str, Any]:
    """Index in a forked child.

    Args:
        kill: ``(k, delay)``: SIGKILL the child ``delay`` s after the catalogue first holds at
            least ``k`` items (``k = 0``: ``delay`` s after the start); None lets it finish.
        trace: Record the times at which the item count grew (the reference run).
    """
    ctx = _ctx()
    p = ctx.Process(target=_index_child, args=(str(archive), str(db), str(model), batch_size))
    t0 = time.monotonic()
    p.start()
    killed, at_kill, commits = False, None, []
    if kill is not None:
        k, delay = kill
        while p.is_alive() and k > 0 and _count_items(db) < k:
            time.sleep(0.01)
        p.join(delay)
        if p.is_alive():
            at_kill = _count_items(db)
            os.kill(p.pid, signal.SIGKILL)
            killed = True
    elif trace:
        last = 0
        while p.is_alive():
            n = _count_items(db)
            if n > last:
                commits.append((round(time.monotonic() - t0, 3), n))
                last = n
            time.sleep(0.01)
    p.join()
    out = {"seconds": round(time.monotonic() - t0, 2), "killed": killed, "exitcode": p.exitcode,
           "items_at_kill": at_kill}
    if trace:
        out["commits"] = commits
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


def kill_plan(rng: random.Random, ref: dict[str, Any], n_items: int) -> tuple[int, float]:
    """A random kill point of an indexing run: after ``k`` committed items, uniform in ``[0, n)``,
    plus a delay uniform over the reference run's time to its first commit (``k = 0``: start-up,
    scanning, hashing, decoding) or its median gap between commits. Tied to progress rather than
    to the clock, so a loaded machine still gets its kill inside the run."""
    t = [c[0] for c in ref.get("commits", [])]
    first = t[0] if t else ref["seconds"]
    gaps = sorted(b - a for a, b in itertools.pairwise(t)) or [0.1]
    k = rng.randrange(max(n_items, 1))
    return k, rng.uniform(0.0, first if k == 0 else gaps[len(gaps) // 2])


def index_trials(work: Path, n: int, patients: int, rng: random.Random, save=None,
                 batch_size: int = 1, max_attempts: int = 4) -> dict[str, Any]:
    """``n`` trials, each killed at a random :func:`kill_plan` point; a run that finished before
    its kill point is repeated with a new point (up to ``max_attempts``), every attempt counted."""
    from data_registry.synthetic import generate
    from m3bind.testing import build_tiny_model

    archive = work / "archive"
    if not (archive / "manifest.csv").exists():
        generate(archive, patients, 0, size="small")
    model = work / "model"
    if not (model / "config.json").exists():
        build_tiny_model(model)
    preload_model_imports(model)
    for p in list(work.glob("ref.db*")) + list(work.glob("trial*.db*")) + list(work.glob("warm.db*")):
        p.unlink() if p.is_file() else None
    run_index(archive, work / "warm.db", model, None, batch_size)  # starts the fork server: not in the timing
    ref_db = work / "ref.db"
    ref = run_index(archive, ref_db, model, None, batch_size, trace=True)
    ref_state = catalogue_state(ref_db)
    log.info("reference indexing: %s items in %.1fs, commits at %s", ref_state["n_items"], ref["seconds"],
             ref["commits"])
    trials = []
    for t in range(n):
        db = work / f"trial{t:02d}.db"
        attempts = []
        for a in range(max_attempts):  # a run that finished before its kill point is run again
            for p in work.glob(f"trial{t:02d}.db*"):
                p.unlink() if p.is_file() else None
            plan = kill_plan(rng, ref, ref_state["n_items"])
            first = run_index(archive, db, model, plan, batch_size)
            attempts.append({"kill_after_items": plan[0], "kill_delay_s": round(plan[1], 3), "killed": first["killed"]})
            if first["killed"]:
                break
        after_kill = catalogue_state(db) if db.exists() else None
        second = run_index(archive, db, model, None, batch_size)
        st = catalogue_state(db)
        res = second.get("result", {})
        ok = (second["exitcode"] == 0 and st["integrity"] == "ok" and st["items"] == ref_state["items"]
              and st["duplicate_paths"] == 0 and st["items_without_one_embedding"] == 0
              and st["n_embeddings"] == ref_state["n_embeddings"] and st["faiss_agrees"]
              and st["failures"] == ref_state["failures"]
              and res.get("added", 0) + res.get("skipped", 0) + res.get("failed", 0) == res.get("total"))
        trial = {"trial": t, "attempts": len(attempts), "kill_after_items": plan[0], "kill_delay_s": round(plan[1], 3),
                 "killed": first["killed"], "seconds_to_kill": first["seconds"],
                 "items_at_kill": first["items_at_kill"],
                 "items_before_rerun": after_kill["n_items"] if after_kill else 0,
                 "integrity_after_kill": after_kill["integrity"] if after_kill else "no file",
                 "faiss_agrees_after_kill": after_kill["faiss_agrees"] if after_kill else None,
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
                          "commits": ref["commits"], "result": ref.get("result")},
            "trials": trials, "n": len(trials), "killed": sum(t["killed"] for t in trials),
            "converged": sum(t["converged"] for t in trials),
            "killed_and_converged": sum(t["killed"] and t["converged"] for t in trials)}


# ------------------------------------------------------------------------------ training
def _marker(out: Path) -> Path:
    """File (beside the run folder, not in it) naming the stage the child has entered."""
    return out.parent / f"{out.name}.stage"


def _train_child(argv: list[str], marker: str) -> None:
    """Run ``train/run_all.py``; each stage function writes its name to ``marker`` when called."""
    _quiet_child()
    import importlib

    def announcing(stage: str, fn):
        def entered(*a, **k):
            Path(marker).write_text(stage)
            return fn(*a, **k)
        return entered

    for stage, name in (("pretrain", "run_pretrain"), ("bind", "run_bind"), ("distill", "run_distill")):
        mod = importlib.import_module(f"train.stages.{stage}")  # run_all imports them at call time
        setattr(mod, name, announcing(stage, getattr(mod, name)))
    from train.run_all import main

    sys.exit(main(argv))


def _train_argv(out: Path, work: Path) -> list[str]:
    return ["--config", str(ROOT / "train/configs/tiny.yaml"), "--out", str(out), "stages=[pretrain,bind,distill]",
            f"data.cohort={work / 'cohort'}", f"data.cache_dir={work / 'cache'}"]


def _stage_started(out: Path, stage: str) -> bool:
    """The child has entered ``stage`` (or a later one): its stage function was called, so the
    time spent loading data and finished stages' models before it does not count."""
    try:
        entered = _marker(out).read_text()
    except OSError:
        return False
    return entered in STAGES and STAGES.index(entered) >= STAGES.index(stage)


def _stage_done(out: Path, stage: str) -> bool:
    return (out / "checkpoints" / stage / "done.json").exists()


def run_train(out: Path, work: Path, stage: str | None = None, delay: float = 0.0, timeout: float = 900,
              trace: bool = False) -> dict[str, Any]:
    """Train in a forked child.

    With ``stage``, SIGKILL it ``delay`` s after that stage has started, unless the stage is
    done by then (``killed_mid_stage`` says which). With ``trace``, record when each stage
    started and finished (the reference run).
    """
    ctx = _ctx()
    _marker(out).unlink(missing_ok=True)
    p = ctx.Process(target=_train_child, args=(_train_argv(out, work), str(_marker(out))))
    t0 = time.monotonic()
    p.start()
    killed, mid, started, marks = False, False, None, {}
    if stage is not None:
        while p.is_alive() and time.monotonic() - t0 < timeout and not _stage_started(out, stage):
            time.sleep(0.02)
        started = time.monotonic() - t0
        p.join(delay)
        if p.is_alive():
            mid = not _stage_done(out, stage)
            os.kill(p.pid, signal.SIGKILL)
            killed = True
    elif trace:
        while p.is_alive() and time.monotonic() - t0 < timeout:
            for st in STAGES:
                for what, f in (("start", _stage_started), ("end", _stage_done)):
                    if (st, what) not in marks and f(out, st):
                        marks[(st, what)] = round(time.monotonic() - t0, 2)
            time.sleep(0.02)
    p.join(timeout)
    if p.is_alive():
        os.kill(p.pid, signal.SIGKILL)
        p.join()
    res = {"seconds": round(time.monotonic() - t0, 2), "killed": killed, "killed_mid_stage": mid,
           "exitcode": p.exitcode, "stage_started_s": None if started is None else round(started, 2)}
    if trace:
        res["stage_seconds"] = {st: round(marks.get((st, "end"), res["seconds"]) - marks.get((st, "start"), 0.0), 2)
                                for st in STAGES}
        res["marks"] = {f"{a}_{b}": v for (a, b), v in marks.items()}
    return res


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


def _seed_from_reference(ref_out: Path, out: Path, stage: str) -> None:
    """Start a trial of ``stage`` where the reference run stood when that stage began: its
    config, the model directories, checkpoints and summary of the stages before (what a run
    stopped between stages leaves), so a trial costs its own stage, not the ones before."""
    import shutil

    out.mkdir(parents=True)
    shutil.copy2(ref_out / "config.yaml", out / "config.yaml")
    summary = json.loads((ref_out / "train_summary.json").read_text())
    later = STAGES[STAGES.index(stage):]
    (out / "train_summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k not in later}))
    for prev in STAGES[:STAGES.index(stage)]:
        shutil.copytree(ref_out / MODEL_DIRS[prev], out / MODEL_DIRS[prev])
        for ck in (ref_out / "checkpoints").glob(f"{prev}*"):
            shutil.copytree(ck, out / "checkpoints" / ck.name)


def train_trials(work: Path, n: int, rng: random.Random, save=None, stages=STAGES,
                 max_attempts: int = 4, reuse_reference: bool = False) -> dict[str, Any]:
    """``n`` trials per stage, each killed at a random moment inside the stage.

    The kill delay is uniform over the stage's duration in the reference run; when the stage
    finished before the kill (the machine's load varies), the trial is repeated with half the
    range, up to ``max_attempts`` times, and every attempt is recorded.
    """
    import shutil

    ref_out = work / "train_ref"
    trace = ref_out / "trace.json"
    if reuse_reference and trace.exists() and (ref_out / "model" / "config.json").exists():
        ref = {**json.loads(trace.read_text()), "reused": True}
    else:
        shutil.rmtree(ref_out, ignore_errors=True)
        ref = run_train(ref_out, work, trace=True)
        trace.write_text(json.dumps(ref))
    log.info("reference training: %s", ref)
    trials = []
    controls = {}
    for stage in stages:
        # control: resumed from the same point without a kill (the weights a resume gives anyway)
        ctrl = work / f"train_{stage}_control"
        shutil.rmtree(ctrl, ignore_errors=True)
        _seed_from_reference(ref_out, ctrl, stage)
        c = run_train(ctrl, work)
        controls[stage] = {"exitcode": c["exitcode"], "seconds": c["seconds"],
                           "max_weight_diff_vs_uninterrupted": max_weight_diff(ref_out / "model", ctrl / "model")
                           if (ctrl / "model").exists() else None}
        shutil.rmtree(ctrl, ignore_errors=True)
        log.info("control %s (resumed, not killed): %s", stage, controls[stage])
        for t in range(n):
            out = work / f"train_{stage}_{t}"
            span = max(ref["stage_seconds"][stage], 0.5)
            attempts = []
            for a in range(max_attempts):
                shutil.rmtree(out, ignore_errors=True)
                _seed_from_reference(ref_out, out, stage)
                delay = rng.uniform(0.0, span * 0.5 ** a)
                first = run_train(out, work, stage, delay)
                attempts.append({"delay_s": round(delay, 2), "killed": first["killed"],
                                 "killed_mid_stage": first["killed_mid_stage"]})
                if first["killed_mid_stage"]:
                    break
            after_kill = run_state(out)
            second = run_train(out, work)
            final = run_state(out)
            diff = max_weight_diff(ref_out / "model", out / "model") if (out / "model").exists() else None
            ok = (second["exitcode"] == 0 and not after_kill["problems"] and not final["problems"]
                  and all(v == "valid" for v in final["models"].values()))
            trial = {"stage": stage, "trial": t, "attempts": attempts, "delay_s": attempts[-1]["delay_s"],
                     "killed": first["killed"], "killed_mid_stage": first["killed_mid_stage"],
                     "stage_started_s": first["stage_started_s"], "after_kill": after_kill,
                     "rerun_exitcode": second["exitcode"], "rerun_seconds": second["seconds"],
                     "final": final, "max_weight_diff_vs_uninterrupted": diff, "converged": ok}
            log.info("train trial %s/%d: attempts=%d killed_mid_stage=%s converged=%s diff=%s after_kill=%s",
                     stage, t, len(attempts), first["killed_mid_stage"], ok, diff, after_kill["checkpoints"])
            trials.append(trial)
            if save is not None:
                save({"reference": ref, "controls": controls, "trials": trials, "partial": True})
            shutil.rmtree(out, ignore_errors=True)
            _marker(out).unlink(missing_ok=True)
    by_stage = {s: {"n": sum(1 for t in trials if t["stage"] == s),
                    "killed_mid_stage": sum(1 for t in trials if t["stage"] == s and t["killed_mid_stage"]),
                    "converged": sum(1 for t in trials if t["stage"] == s and t["converged"])} for s in stages}
    return {"reference": ref, "controls": controls, "trials": trials, "by_stage": by_stage}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/crash_trials.json")
    ap.add_argument("--work", type=Path, default=Path("/tmp/m3bind_crash_trials"))
    ap.add_argument("--index-trials", type=int, default=20)
    ap.add_argument("--train-trials", type=int, default=5, help="trials per training stage")
    ap.add_argument("--stages", default=",".join(STAGES), help="training stages to kill, comma-separated")
    ap.add_argument("--patients", type=int, default=6, help="patients of the simulated archive")
    ap.add_argument("--reuse-reference", action="store_true", help="reuse the uninterrupted training run in --work")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=1, help="indexer commit batch (1: a kill can fall between any two commits)")
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
                                          tuple(args.stages.split(",")), reuse_reference=args.reuse_reference)
    result["ended"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save()
    print(json.dumps({k: result.get(k, {}).get("converged") if k == "indexing" else
                      result.get(k, {}).get("by_stage") for k in ("indexing", "training")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
