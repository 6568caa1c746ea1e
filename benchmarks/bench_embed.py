"""Embedding throughput per modality on CPU (items/s at batch sizes 1 and 32), plus text.

Measures ``BoundModel.embed_tensors`` on already-preprocessed random inputs of each modality's
preprocessed shape (the encoder forward pass, no file reading or preprocessing) and
``BoundModel.embed_text``. Weights are random: speed does not depend on them.

Presets:
  tiny     the test model of ``m3bind.testing`` (32-pixel grids);
  default  realistic encoders at the modalities' default preprocessing (ResNet-50 at 224 px for
           CXR/fundus/pathology tiles, a 3D ResNet on CT 64x128x128 and on every MRI sequence of
           24x256x256 as a set, MEDBind's ECG transformer on 12x1000, MiniLM text);
  --model DIR  any saved model directory.

    python benchmarks/bench_embed.py --preset tiny --preset default
Writes ``benchmarks/results/embed_<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m3bind.encoders import HeadConfig, ImageEncoderConfig, TextEncoderConfig  # noqa: E402
from m3bind.modalities import MODALITIES, get_spec  # noqa: E402
from m3bind.model import BoundModel, BoundModelConfig, default_preprocess, load_model  # noqa: E402

log = logging.getLogger("bench_embed")
RESULTS = Path(__file__).resolve().parent / "results"

DEFAULT_IMAGE = {
    "cxr": ImageEncoderConfig(arch="timm", name="resnet50", in_chans=1),
    "retina": ImageEncoderConfig(arch="timm", name="resnet50", in_chans=3),
    "pathology": ImageEncoderConfig(arch="timm", name="resnet50", in_chans=3),
    "ct": ImageEncoderConfig(arch="volume_cnn", name="cnn3d", in_chans=1, params={"widths": [16, 32, 64, 128]}),
    "mri": ImageEncoderConfig(arch="volume_cnn", name="cnn3d", in_chans=4,
                              params={"widths": [16, 32, 64, 128], "sequence_mode": "set"}),
    "ecg": ImageEncoderConfig(arch="ecg_transformer", name="medbind_ecg", in_chans=12,
                              params={"seq_len": 1000, "patch_size": 1, "width": 128, "depth": 4, "heads": 4}),
}


def default_model(dim: int = 512) -> BoundModel:
    """Realistic-size random encoders at the default preprocessing (see module docstring)."""
    cfg = BoundModelConfig(name="bench-default", dim=dim, image=dict(DEFAULT_IMAGE),
                           image_heads={m: HeadConfig() for m in MODALITIES},
                           text={"shared": TextEncoderConfig(arch="hf", pooling="mean", max_length=128)},
                           preprocess={m: default_preprocess(m) for m in MODALITIES})
    return BoundModel.from_config(cfg)


def input_shape(modality: str, params: dict) -> tuple[int, ...]:
    """The preprocessed shape of one item (pathology: one tile)."""
    spec = get_spec(modality)
    if spec.kind == "image2d":
        return (spec.channels, int(params["size"]), int(params["size"]))
    if spec.kind == "volume":
        chans = len(params.get("sequences", ())) or spec.channels if modality == "mri" else 1
        return (chans, *[int(g) for g in params["grid"]])
    return (12, int(float(params["fs"]) * float(params["seconds"])))


def time_it(fn, items: int, min_seconds: float, max_reps: int) -> dict:
    fn()  # warm-up
    reps, t0 = 0, time.perf_counter()
    while reps < max_reps and (reps == 0 or time.perf_counter() - t0 < min_seconds):
        fn()
        reps += 1
    wall = time.perf_counter() - t0
    return {"items_per_s": round(items * reps / wall, 2), "ms_per_batch": round(1000 * wall / reps, 1), "reps": reps}


def bench(model: BoundModel, batch_sizes: list[int], min_seconds: float, max_reps: int,
          max_batch_seconds: float) -> dict:
    out: dict = {}
    with torch.inference_mode():
        for m in model.modalities:
            shape = input_shape(m, model.preprocess_params[m])
            out[m] = {"input_shape": list(shape)}
            est = None
            for b in batch_sizes:
                if est is not None and est * b > max_batch_seconds:
                    out[m][f"batch_{b}"] = {"skipped": f"estimated {est * b:.0f} s per batch"}
                    continue
                x = torch.randn(b, *shape)
                r = time_it(lambda m=m, x=x: model.embed_tensors(m, x), b, min_seconds, max_reps)
                est = r["ms_per_batch"] / 1000 / b
                out[m][f"batch_{b}"] = r
                log.info("%s batch %d: %.1f items/s", m, b, r["items_per_s"])
        texts = ["chest x-ray showing a moderate right pleural effusion and cardiomegaly."] * max(batch_sizes)
        first = model.modalities[0]
        out["text"] = {f"batch_{b}": time_it(lambda b=b: model.embed_text(texts[:b], first), b,
                                              min_seconds, max_reps) for b in batch_sizes}
    return out


def write(name: str, result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"embed_{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    sizes = result["batch_sizes"]
    lines = [f"# Embedding throughput — {name}", "",
             f"{result['machine']}; torch {result['torch']}, {result['threads']} threads; load average "
             f"{result['load_average']} during the run (other jobs share the CPU: numbers are lower bounds); "
             "random weights (speed only); encoder forward on preprocessed inputs (no file reading/preprocessing). "
             "Pathology counts tiles.", "",
             "| modality | input | " + " | ".join(f"items/s @ batch {b}" for b in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    for m, r in result["results"].items():
        cells = []
        for b in sizes:
            c = r.get(f"batch_{b}", {})
            cells.append(str(c.get("items_per_s", c.get("skipped", "-"))))
        lines.append(f"| {m} | {'x'.join(map(str, r.get('input_shape', ['text'])))} | " + " | ".join(cells) + " |")
    (RESULTS / f"embed_{name}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", action="append", choices=["tiny", "default"], default=[])
    ap.add_argument("--model", action="append", default=[], help="model directory")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--min-seconds", type=float, default=1.0, help="measure each case at least this long")
    ap.add_argument("--max-reps", type=int, default=20)
    ap.add_argument("--max-batch-seconds", type=float, default=60.0,
                    help="skip a batch size whose estimated time per batch exceeds this")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    jobs = [(p, None) for p in (args.preset or ([] if args.model else ["tiny"]))] + [(None, d) for d in args.model]
    for preset, path in jobs:
        if preset == "tiny":
            from m3bind.testing import build_tiny_bound_model

            model, name = build_tiny_bound_model(), "tiny"
        elif preset == "default":
            model, name = default_model(), "default"
        else:
            model, name = load_model(path), Path(path).name
        res = bench(model.eval(), args.batch_sizes, args.min_seconds, args.max_reps, args.max_batch_seconds)
        write(name, {"load_average": [round(x, 1) for x in os.getloadavg()], "cpu_count": os.cpu_count(),"name": name, "model_id": model.model_id, "batch_sizes": args.batch_sizes,
                     "machine": f"{platform.processor() or platform.machine()} CPU",
                     "torch": torch.__version__, "threads": torch.get_num_threads(), "results": res})
        log.info("wrote %s", RESULTS / f"embed_{name}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
