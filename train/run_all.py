"""Run M3Bind end to end: teachers (stage 0), binding (1), SESKD (2), evaluation (3).

Usage::

    python train/run_all.py --config train/configs/demo.yaml --out runs/demo [key=value ...]
    torchrun --nproc_per_node 4 train/run_all.py --config train/configs/gpu.yaml --out runs/gpu

Writes ``<out>/zoo_model``, ``<out>/bound_model`` and ``<out>/model`` (the distilled model) as
model directories with provenance, ``<out>/report.json`` / ``report.md`` (evaluation),
``<out>/metrics.csv`` (training log), ``<out>/train_summary.json`` and ``<out>/train.log``.
Every stage checkpoints atomically under ``<out>/checkpoints``; rerunning the same command
after a kill resumes where it stopped (finished stages are loaded from their model directory).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # runnable as `python train/run_all.py`
    sys.path.insert(0, str(_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import hashlib
import json
import logging
import time
from typing import Any

import torch
import yaml

from m3bind.atomic import atomic_write_text
from m3bind.config import from_dict, to_dict
from m3bind.errors import ConfigError, M3BindError
from m3bind.model import BoundModel, load_model
from m3bind.teachers import teachers_from_model
from train import distributed as D
from train.checkpoint import atomic_write_json, is_done, mark_done
from train.config import TrainConfig, load_train_config
from train.data import (
    ensure_cohort,
    load_modality_data,
    preprocess_params,
    read_items,
    shared_text_pools,
)
from train.stages.common import MetricsLog, Runtime

log = logging.getLogger("train.run_all")

MODEL_DIRS = {"pretrain": "zoo_model", "bind": "bound_model", "distill": "model"}


def _setup_logging(out: Path, rank: int, verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(level)
    for h in list(root.handlers):
        root.removeHandler(h)
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(fmt)
    root.addHandler(err)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(out / "train.log")
        fh.setFormatter(fmt)
        root.addHandler(fh)
    for noisy in ("transformers", "peft", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def training_fingerprint(cfg: TrainConfig) -> str:
    """Hash of everything that determines the trained weights (evaluation and logging excluded)."""
    d = to_dict(cfg)
    d.pop("eval", None)
    d.pop("stages", None)
    rt = d.pop("runtime", {})
    d["seed"] = rt.get("seed")
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_out_dir(cfg: TrainConfig, out: Path) -> None:
    fp = training_fingerprint(cfg)
    f = out / "run.json"
    if f.is_file():
        old = json.loads(f.read_text()).get("fingerprint")
        if old != fp:
            raise ConfigError("the output folder holds a run with a different training config "
                              "(use a new --out or delete it)", str(out))
    else:
        atomic_write_json(f, {"fingerprint": fp})


def _cohort_is_simulated(root: Path) -> bool:
    info = root / "cohort.json"
    try:
        return bool(json.loads(info.read_text()).get("simulated", False)) if info.is_file() else False
    except (OSError, ValueError):
        return False


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children so far."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class PhaseClock:
    """Wall and CPU seconds per phase (``timing[phase] = {"wall_s", "cpu_s"}``); phases that do not
    run in this process (done before a resume) keep what an earlier run recorded."""

    def __init__(self, timing: dict):
        self.timing = timing
        self.wall, self.cpu = time.time(), cpu_seconds()

    def lap(self, phase: str) -> None:
        """Close ``phase`` (it ran since the previous lap) and start the next one."""
        wall, cpu = time.time(), cpu_seconds()
        self.timing[phase] = {"wall_s": round(wall - self.wall, 1), "cpu_s": round(cpu - self.cpu, 1)}
        log.info("timing: %s took %.1f s wall, %.1f s CPU", phase, wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu

    def skip(self) -> None:
        """Restart the clock without recording (a phase loaded rather than run)."""
        self.wall, self.cpu = time.time(), cpu_seconds()


def _save_model(model: BoundModel, path: Path, provenance: dict, rt: Runtime) -> None:
    if rt.dist.is_main:
        model.save(path, provenance=provenance)
    D.barrier()


def run(cfg: TrainConfig, out: Path) -> dict[str, Any]:
    """Run the configured stages into ``out``; returns the summary (and the report when evaluated)."""
    info = D.init_distributed(cfg.runtime.device)
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    rt = Runtime(cfg.runtime, info, out)
    t_start = time.time()
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _check_out_dir(cfg, out)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    D.barrier()

    # ------------------------------------------------------------------ data
    timing: dict[str, dict] = {}
    clock = PhaseClock(timing)
    if info.is_main:
        root = ensure_cohort(cfg.data)
    D.barrier()
    root = ensure_cohort(cfg.data)
    clock.lap("cohort")
    rows = read_items(cfg.data, root)
    mods = list(cfg.data.modalities)
    from m3bind.teachers import load_teacher

    sourced = {m: load_teacher(cfg.teacher(m).source) for m in mods if cfg.teacher(m).source is not None}
    params = {m: (dict(sourced[m].config.preprocess) if m in sourced
                  else preprocess_params(m, cfg.teacher(m).preprocess)) for m in mods}
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else out / "cache"
    t0 = time.time()
    train = {m: load_modality_data(rows, root, m, "train", params[m], cache_dir,
                                   cfg.data.max_train_per_modality, cfg.runtime.num_workers,
                                   cfg.runtime.progress and info.is_main) for m in mods}
    pools = shared_text_pools(train, cfg.data)
    sizes = {m: len(train[m]) for m in mods}
    log.info("data: %s training pairs, %d shared texts, preprocessing %.1fs", sizes,
             len({t for p in pools.values() for t in p}), time.time() - t0)
    metrics = MetricsLog(out / "metrics.csv", info.is_main, cfg.runtime.tensorboard)
    summary_path = out / "train_summary.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    clock.lap("preprocess")
    timing = clock.timing = {**summary.get("timing", {}), **timing}
    summary["timing"] = timing
    simulated = not cfg.data.datasets and _cohort_is_simulated(root)
    summary.update(data={"cohort": str(root), "datasets": {m: s.adapter for m, s in cfg.data.datasets.items()},
                         "train_sizes": sizes, "simulated": simulated,
                         "shared_prompts": cfg.data.shared_prompts})
    base_prov = {"run": cfg.name, "config": to_dict(cfg), "data": summary["data"],
                 "fingerprint": training_fingerprint(cfg)}

    def stage_dir(stage: str) -> Path:
        return out / "checkpoints" / stage

    def finish(stage: str, model: BoundModel, stage_summary: dict) -> None:
        summary[stage] = stage_summary
        _save_model(model, out / MODEL_DIRS[stage], {**base_prov, "stage": stage, "summary": stage_summary}, rt)
        if info.is_main:
            mark_done(stage_dir(stage), {"model": MODEL_DIRS[stage]})
            atomic_write_json(summary_path, summary)

    def load_stage(stage: str) -> dict | None:
        path = out / MODEL_DIRS[stage]
        if is_done(stage_dir(stage)) and (path / "config.json").is_file():
            log.info("%s: already done, loading %s", stage, path)
            return teachers_from_model(load_model(path), root=path)
        return None

    # ------------------------------------------------------------------ stage 0
    from train.stages.pretrain import run_pretrain

    zoo = load_stage("pretrain")
    clock.skip()
    if zoo is None:
        if "pretrain" not in cfg.stages and len(sourced) < len(mods):
            raise ConfigError("stage pretrain is off but some modalities have no teacher source "
                              "and no zoo_model exists", str(out))
        teachers, s0 = run_pretrain(cfg, train, params, rt, metrics, sourced)
        clock.lap("pretrain")
        finish("pretrain", BoundModel.from_teachers(teachers, name=f"{cfg.name}-zoo"), s0)
        zoo = teachers

    # ------------------------------------------------------------------ stage 1
    bound = None
    if "bind" in cfg.stages or "distill" in cfg.stages:
        bound = load_stage("bind")
        clock.skip()
        if bound is None:
            from train.stages.bind import run_bind

            bound, s1 = run_bind(cfg, zoo, train, pools, rt, metrics)
            clock.lap("bind")
            finish("bind", BoundModel.from_teachers(bound, name=f"{cfg.name}-bound"), s1)

    # ------------------------------------------------------------------ stage 2
    final_dir = out / MODEL_DIRS["distill"]
    if "distill" in cfg.stages and cfg.distill.enabled:
        if not (is_done(stage_dir("distill")) and (final_dir / "config.json").is_file()):
            from train.stages.distill import run_distill

            clock.skip()
            student, s2 = run_distill(cfg, bound, train, pools, rt, metrics)
            clock.lap("distill")
            model = BoundModel.from_teachers(bound, student_text=student, name=cfg.name,
                                             student_head=cfg.distill.head)
            finish("distill", model, s2)
    elif bound is not None and not (final_dir / "config.json").is_file():
        # no distillation: the bound model (one text encoder per modality) is the final model
        finish("distill", BoundModel.from_teachers(bound, name=cfg.name), {"skipped": True})

    # accumulated over resumed runs of the same folder
    summary["train_seconds"] = round(float(summary.get("train_seconds", 0.0)) + time.time() - t_start, 1)
    if info.is_main:
        atomic_write_json(summary_path, summary)

    # ------------------------------------------------------------------ stage 3
    result: dict[str, Any] = {"summary": summary}
    if "evaluate" in cfg.stages and info.is_main:
        result["report"] = run_evaluate(cfg, root, out, summary)
    D.barrier()
    return result


def run_evaluate(cfg: TrainConfig, root: Path, out: Path, summary: dict) -> dict:
    """Stage 3: evaluate the zoo, bound and distilled models with engineer G's harness."""
    from train.stages.evaluate import EvalConfig, evaluate

    ecfg = from_dict(EvalConfig, dict(cfg.eval), where="eval")
    names = {"zoo": "zoo_model", "bound": "bound_model"}
    if cfg.distill.enabled and "distill" in cfg.stages:
        names["distilled"] = "model"
    models = {stage: load_model(out / d) for stage, d in names.items() if (out / d / "config.json").is_file()}
    t0 = time.time()
    c0 = cpu_seconds()
    report = evaluate(models, root, out, ecfg)
    summary["eval_seconds"] = round(time.time() - t0, 1)
    summary.setdefault("timing", {})["evaluate"] = {"wall_s": summary["eval_seconds"],
                                                     "cpu_s": round(cpu_seconds() - c0, 1)}
    _add_training_section(out, report, summary)
    return report


def _add_training_section(out: Path, report: dict, summary: dict) -> None:
    """Record how the models were trained (balancing variant, steps, skipped steps) in the report."""
    report["training"] = summary
    atomic_write_json(out / "report.json", report)
    bal = (summary.get("bind") or {}).get("balancing") or {}
    lines = ["", "## Training", ""]
    data = summary.get("data", {})
    if data.get("simulated"):
        lines.append("All models were trained on the **simulated** cohort (no real patients).")
    lines.append(f"- training pairs per modality: {data.get('train_sizes')}")
    if bal:
        lines.append(f"- adaptive modality balancing: {bal.get('variant')}; p_m = {_r(bal.get('probs'))}, "
                     f"w_m = {_r(bal.get('weights'))}, η_m = {_r(bal.get('lrs'))}")
    prompted = {m: s["prompt_caption_prob"] for m, s in (summary.get("pretrain") or {}).items()
                if isinstance(s, dict) and s.get("prompt_caption_prob")}
    if prompted:
        lines.append(f"- **label prompts as captions** in stage 0 (share of training captions): {prompted}. "
                     "These teachers saw disease prompts built from training labels with the zero-shot "
                     "templates (MMCLIP-style), so their zero-shot scores measure transfer to held-out "
                     "images, not to label phrasings never seen in training.")
    if data.get("shared_prompts"):
        lines.append("- **label prompts as shared texts**: binding aligned the teachers, and distillation "
                     "fitted the student, on the label prompts (templates, expert descriptions, label names) "
                     "as well as on the training reports; no test item or label enters training.")
    for stage in ("pretrain", "bind", "distill"):
        s = summary.get(stage)
        if isinstance(s, dict):
            lines.append(f"- {stage}: {_stage_line(stage, s)}")
    lines.append(f"- training wall time: {summary.get('train_seconds')} s; evaluation: {summary.get('eval_seconds')} s")
    timing = summary.get("timing") or {}
    if timing:
        lines += ["", "| phase | wall s | CPU s |", "|---|---|---|"]
        lines += [f"| {k} | {v.get('wall_s')} | {v.get('cpu_s')} |" for k, v in timing.items()]
        lines.append("")
        lines.append("CPU s counts every thread and worker process (user + system); on a loaded machine "
                     "wall time is an upper bound of what the same run takes alone.")
    with (out / "report.md").open("a") as f:
        f.write("\n".join(lines) + "\n")


def _r(d: Any) -> Any:
    return {k: round(v, 4) for k, v in d.items()} if isinstance(d, dict) else d


def _stage_line(stage: str, s: dict) -> str:
    if stage == "pretrain":
        return "; ".join(f"{m}: {v.get('steps', 0)} steps, {v.get('skipped_steps', 0)} skipped"
                         if "steps" in v else f"{m}: {v.get('source')}" for m, v in s.items())
    if stage == "distill":
        parts = [f"{k}: {v.get('steps')} steps, {v.get('skipped_steps')} skipped"
                 for k, v in s.items() if isinstance(v, dict) and "steps" in v]
        if not parts:
            return "skipped"
        targets = {"own": "each teacher on its own modality's texts",
                   "shared": "every teacher on every shared text"}.get(s.get("kd_texts"))
        return "; ".join(parts) + (f" (L_KD: {targets})" if targets else "")
    return f"{s.get('steps')} steps, {s.get('skipped_steps')} skipped, last {s.get('last')}"


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML training config (train/configs/*.yaml)")
    p.add_argument("--out", required=True, help="run folder (created; rerun to resume)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. bind.steps=10)")
    args = p.parse_args(argv)
    out = Path(args.out)
    rank = int(os.environ.get("RANK", "0"))
    _setup_logging(out, rank, args.verbose)
    try:
        cfg = load_train_config(args.config, args.overrides)
        result = run(cfg, out)
    except M3BindError as e:
        log.error("%s", e.line())
        print(f"error: {e.line()}", file=sys.stderr)
        return 2
    finally:
        D.cleanup()
    if rank == 0 and "report" in result:
        print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
