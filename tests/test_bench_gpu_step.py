"""CPU smoke run of benchmarks/bench_gpu_step.py: the record's fields, the steps each arm took, and
that the trainer and plain arms are the same computation (same weights after the same steps)."""

from __future__ import annotations

import json

import pytest

from benchmarks.bench_gpu_step import main

ARM_KEYS = {"steps", "warmup_steps", "seconds", "steps_per_s", "images_per_s", "peak_mem_gib",
            "peak_mem_over_start_gib", "error"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_tiny_cpu_run_matches_plain_loop(tmp_path):
    out = tmp_path / "bench_gpu_step.json"
    assert main(["--preset", "tiny", "--device", "cpu", "--grad-clip", "0", "--warmup", "1",
                 "--steps", "2", "--reps", "2", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert {"device", "torch", "model", "batch_size", "image_size", "dtype", "channels_last", "arms",
            "ratio_trainer_over_plain", "target_ratio", "compile", "reps_done"} <= set(rec)
    assert rec["dtype"] == "fp32" and rec["batch_size"] == 4 and rec["reps_done"] == 2
    assert set(rec["arms"]) == {"trainer", "plain"}  # no compiled arm on CPU by default
    for arm in rec["arms"].values():
        assert set(arm) == ARM_KEYS
        assert arm["steps"] == 4 and arm["warmup_steps"] == 1 and arm["steps_per_s"] > 0
        assert arm["error"] is None
    assert rec["ratio_trainer_over_plain"] > 0
    # Same init, inputs and 5 steps each in fp32: equal weights up to the batch order (the trainer's
    # batcher shuffles the rows). Attention key biases have a zero true gradient, which AdamW turns
    # from rounding noise into lr-sized steps, hence ~1e-5; a real difference (a step more or less,
    # another LR, clipping) moves weights by ~lr = 2e-3.
    assert rec["trainer_vs_plain_max_abs_diff"] < 2e-4
    assert (tmp_path / "bench_gpu_step.log").read_text().count("rep ") == 2
