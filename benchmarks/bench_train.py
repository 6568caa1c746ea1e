"""Training throughput (steps/s) of each stage's step, on CPU or GPU (bf16 autocast there).

Builds the models a training config names and times optimisation steps on random inputs of
the configured preprocessed shapes (no cohort needed), so the numbers isolate model compute:

    python benchmarks/bench_train.py --config train/configs/demo.yaml --steps 10
    python benchmarks/bench_train.py --config train/configs/gpu.yaml --device cuda --steps 20

Prints a JSON record (and appends it to ``--out`` when given): device, dtype, per-modality
stage-0 steps/s, the stage-1 (bind, all modalities) and stage-2 (SESKD KD and joint) steps/s.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import logging
import os
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from m3bind.modalities import get_spec
from train.config import load_train_config
from train.data import preprocess_params
from train.losses import OBJECTIVES

log = logging.getLogger("bench_train")

REPORTS = [
    "Clinical history: heart failure. The cardiac silhouette is enlarged. No pleural effusion.",
    "Sinus rhythm with tall QRS voltages and lateral ST depression, consistent with LVH.",
    "Moderate non-proliferative diabetic retinopathy with dot and blot haemorrhages.",
    "FLAIR: periventricular hyperintense foci. DWI: no restricted diffusion.",
    "Solid pulmonary nodule in the right upper lobe. No consolidation.",
    "High grade tumour: solid sheets of pleomorphic nuclei without gland formation.",
]


def input_shape(modality: str, params: dict) -> tuple[int, ...]:
    """Shape of one preprocessed item (as ``m3bind.preprocess.preprocess`` returns it)."""
    spec = get_spec(modality)
    if spec.kind == "signal":
        return (spec.channels, int(float(params["fs"]) * float(params["seconds"])))
    if spec.kind == "volume":
        chans = len(params.get("sequences", ())) or spec.channels
        return (chans, *[int(g) for g in params["grid"]])
    s = int(params["size"])
    if modality == "pathology":
        return (int(params.get("max_tiles", 1)), 3, s, s)
    return (spec.channels, s, s)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(step, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="training steps/s per stage")
    p.add_argument("--config", default="train/configs/demo.yaml")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="append the JSON record to this file (JSON lines)")
    p.add_argument("--input-steps", type=int, default=0,
                   help="stage-1 steps per block of the data-pipeline vs pre-loaded comparison (0: skip)")
    p.add_argument("--input-reps", type=int, default=3, help="interleaved blocks per arm")
    p.add_argument("--input-rows", type=int, default=512, help="training rows per modality")
    p.add_argument("--skip-distill", action="store_true", help="stop after stage 1")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_train_config(args.config, args.overrides)
    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                          ("cpu" if args.device == "auto" else args.device))
    bf16 = device.type == "cuda" and cfg.runtime.bf16
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else nullcontext

    from train.distributed import DistInfo
    from train.stages.bind import add_lora
    from train.stages.common import Runtime
    from train.stages.distill import build_student
    from train.stages.pretrain import build_teacher, encode_images

    rt = Runtime(cfg.runtime, DistInfo(device=str(device)), Path("."))
    mods = list(cfg.data.modalities)
    record: dict = {"config": args.config, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                    else f"cpu x{torch.get_num_threads()} threads", "dtype": "bf16 autocast" if bf16 else "fp32",
                    "pretrain_steps_per_s": {}, "batch_sizes": {}}
    teachers, feats = {}, {}
    for m in mods:
        tcfg = cfg.teacher(m)
        params = preprocess_params(m, tcfg.preprocess)
        t = build_teacher(m, tcfg, cfg.dim, params, 0).to(device)
        if device.type == "cuda" and cfg.runtime.channels_last and get_spec(m).kind == "image2d":
            t.image_encoder.to(memory_format=torch.channels_last)
        b = tcfg.batch_size
        x = torch.randn(b, *input_shape(m, params), device=device)
        texts = [REPORTS[i % len(REPORTS)] + f" item {i}." for i in range(b)]
        opt = torch.optim.AdamW(t.parameters(), lr=1e-4)

        def step(t=t, x=x, texts=texts, opt=opt, m=m):
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = OBJECTIVES.get("clip")(encode_images(t.image_encoder, m, x, rt), t.encode_text(texts),
                                              t.scale())["clip_loss"]
            loss.backward()
            opt.step()

        record["pretrain_steps_per_s"][m] = round(_time(step, args.steps, args.warmup, device), 3)
        record["batch_sizes"][m] = b
        with torch.no_grad(), autocast():
            feats[m] = t.image_encoder.trunk(x.flatten(0, 1) if x.dim() == 5 and get_spec(m).kind == "image2d"
                                             else x).float()
        teachers[m] = t
        log.info("pretrain %s: %.3f steps/s", m, record["pretrain_steps_per_s"][m])

    bcfg = cfg.bind
    for t in teachers.values():
        add_lora(t, bcfg)
    opt = torch.optim.AdamW([p for t in teachers.values() for p in t.parameters() if p.requires_grad], lr=1e-4)
    shared = [REPORTS[i % len(REPORTS)] + f" shared {i}." for i in range(bcfg.shared_batch_size)]

    def bind_step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            images = {m: F.normalize(teachers[m].image_encoder.head(feats[m][: bcfg.batch_size]).float(), dim=-1)
                      for m in mods}
            texts = {m: teachers[m].encode_text(shared[: len(images[m])]) for m in mods}
            images = {m: images[m][: len(texts[m])] for m in mods}
            terms = OBJECTIVES.get("m3bind")(images, texts, {m: teachers[m].encode_text(shared) for m in mods},
                                             {m: teachers[m].scale() for m in mods}, None, bcfg.lambda_align)
        sum(terms.values()).backward()
        opt.step()

    record["bind_steps_per_s"] = round(_time(bind_step, args.steps, args.warmup, device), 3)
    log.info("bind: %.3f steps/s", record["bind_steps_per_s"])
    if args.input_steps > 0:
        record["bind_input"] = bind_input_ratio(cfg, teachers, feats, opt, autocast, device,
                                                args.input_steps, args.input_reps, args.input_rows)
        log.info("bind input pipeline: %s", record["bind_input"])

    if args.skip_distill:
        return _emit(record, args.out)
    dc = cfg.distill
    student = build_student(cfg, 0).to(device)
    if dc.freeze_embeddings and hasattr(student.backbone, "get_input_embeddings"):
        student.backbone.get_input_embeddings().weight.requires_grad_(False)
    sopt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    kd_texts = [REPORTS[i % len(REPORTS)] + f" kd {i}." for i in range(dc.batch_size)]
    targets = {m: F.normalize(torch.randn(len(kd_texts), cfg.dim, device=device), dim=-1) for m in mods}

    def embed(texts):
        tok = {k: v.to(device) for k, v in student.tokenize(texts).items()}
        return F.normalize(student(**tok).float(), dim=-1)

    def kd_step(joint=False):
        sopt.zero_grad(set_to_none=True)
        with autocast():
            loss = OBJECTIVES.get("seskd_kd")(embed(kd_texts), targets)["kd_loss"]
            if joint:
                n = dc.contrastive_batch_size
                studs = {m: embed(kd_texts[:n]) for m in mods}
                loss = loss + OBJECTIVES.get("seskd")(embed(kd_texts), targets, studs,
                                                      {m: targets[m][:n] for m in mods}, 14.0)["contrastive_loss"]
        loss.backward()
        sopt.step()

    record["distill_kd_steps_per_s"] = round(_time(kd_step, args.steps, args.warmup, device), 3)
    record["distill_joint_steps_per_s"] = round(_time(lambda: kd_step(True), args.steps, args.warmup, device), 3)
    log.info("distill: kd %.3f, joint %.3f steps/s", record["distill_kd_steps_per_s"],
             record["distill_joint_steps_per_s"])
    return _emit(record, args.out)


def _emit(record: dict, out: str | None) -> int:
    record["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(record, indent=2))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


def bind_input_ratio(cfg, teachers: dict, feats: dict, opt, autocast, device: torch.device,
                     steps: int, reps: int, rows: int) -> dict:
    """Stage-1 steps/s fed by the training data pipeline vs by pre-loaded tensors, interleaved.

    The pipeline is the stage's own (``train.stages.bind.run_bind``): per step, distinct-text
    batches from :class:`train.data.StepBatcher`, shared texts drawn by p_m from
    :class:`train.data.SharedTextSampler`, rows gathered with :func:`train.data.take` from the
    in-memory preprocessed tensors (here the frozen trunk's cached features, ``rows`` per
    modality), texts through :class:`PrefixFeatureCache`. The pre-loaded arm gets the very same
    batches (tensors, text lists) built before the clock starts, so the ratio isolates the input
    side. Blocks of ``steps`` steps alternate ``reps`` times so that machine load cancels.
    """
    from train.data import SharedTextSampler, StepBatcher, take
    from train.stages.bind import balancing_terms, head_embeddings
    from train.stages.common import PrefixFeatureCache

    bcfg = cfg.bind
    mods = list(teachers)
    g = torch.Generator().manual_seed(0)
    table = {m: feats[m][torch.randint(len(feats[m]), (rows,), generator=g)]
             + 0.01 * torch.randn(rows, *feats[m].shape[1:], generator=g).to(feats[m]) for m in mods}
    reports = {m: [f"{REPORTS[(i + j) % len(REPORTS)]} {m} case {i}." for i in range(rows)]
               for j, m in enumerate(mods)}
    bal = balancing_terms({m: rows for m in mods}, bcfg)
    batchers = {m: StepBatcher(reports[m], bcfg.batch_size, 0, f"bind_{m}") for m in mods}
    sampler = SharedTextSampler({m: sorted(set(reports[m])) for m in mods}, bal["probs"], 0, "bind_shared")
    shared_tables: dict = {}
    encode = {m: PrefixFeatureCache(teachers[m].text_encoder, shared=shared_tables) for m in mods}
    with torch.no_grad():  # the frozen-prefix cache filled as after the first epoch
        for m in mods:
            encode[m](reports[m])
    objective = OBJECTIVES.get("m3bind")

    def inputs(step: int) -> tuple[dict, dict, list]:
        idx = {m: batchers[m].batch(step) for m in mods}
        x = {m: take(table[m], idx[m]).to(device) for m in mods}
        texts = {m: [reports[m][i] for i in idx[m]] for m in mods}
        return x, texts, sampler.sample(step, bcfg.shared_batch_size)

    def train_step(x: dict, texts: dict, shared: list) -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            images = {m: head_embeddings(teachers[m], x[m]) for m in mods}
            terms = objective(images=images, texts={m: encode[m](texts[m]) for m in mods},
                              shared_texts={m: encode[m](shared) for m in mods},
                              logit_scale={m: teachers[m].scale() for m in mods},
                              weights=bal["weights"], lambda_align=bcfg.lambda_align)
        sum(terms.values()).backward()
        opt.step()

    train_step(*inputs(0))  # warm-up
    times = {"pipeline": 0.0, "preloaded": 0.0}
    for r in range(reps):
        block = range(1 + r * steps, 1 + (r + 1) * steps)
        ready = [inputs(s) for s in block]  # pre-loaded: built before the clock starts
        for arm in ("pipeline", "preloaded") if r % 2 == 0 else ("preloaded", "pipeline"):
            _sync(device)
            t = time.perf_counter()
            for k, s in enumerate(block):
                train_step(*(inputs(s) if arm == "pipeline" else ready[k]))
            _sync(device)
            times[arm] += time.perf_counter() - t
    n = steps * reps
    t = time.perf_counter()
    for s in range(n):
        inputs(s)
    input_s = (time.perf_counter() - t) / n
    return {"rows_per_modality": rows, "steps_per_arm": n,
            "pipeline_steps_per_s": round(n / times["pipeline"], 3),
            "preloaded_steps_per_s": round(n / times["preloaded"], 3),
            "ratio": round(times["preloaded"] / times["pipeline"], 3),
            "input_ms_per_step": round(1e3 * input_s, 2)}


if __name__ == "__main__":
    sys.exit(main())
