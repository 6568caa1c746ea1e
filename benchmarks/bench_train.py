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
    record["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(json.dumps(record, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
