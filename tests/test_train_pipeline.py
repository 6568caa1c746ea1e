"""Training pipeline: samplers, schedule, checkpoints, the loop's skipping and resuming, and the
tiny config end to end, killed during stage 1 and resumed to the same result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from m3bind.errors import ConfigError
from train.checkpoint import load_checkpoint, save_checkpoint
from train.config import STAGES, TrainConfig, load_train_config
from train.data import SharedTextSampler, StepBatcher, distinct_text_batches, generator
from train.distributed import DistInfo
from train.stages.common import MetricsLog, Runtime, train_loop, warmup_cosine

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "train" / "configs" / "tiny.yaml"


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["tiny.yaml", "demo.yaml", "gpu.yaml", "real_medical.yaml"])
def test_shipped_configs_load(name):
    cfg = load_train_config(REPO / "train" / "configs" / name)
    assert set(cfg.teachers) >= set(cfg.data.modalities)
    assert cfg.bind.lora_r == 8
    # the paper's λ = 10, except the CPU demo's documented λ = 3 (docs/performance.md)
    assert cfg.bind.lambda_align == (3.0 if name == "demo.yaml" else 10.0)


def test_overrides_and_validation():
    cfg = load_train_config(TINY, ["bind.steps=3", "bind.balancing=false", "runtime.seed=7"])
    assert cfg.bind.steps == 3 and cfg.bind.balancing is False and cfg.runtime.seed == 7
    with pytest.raises(ConfigError):
        load_train_config(TINY, ["bind.no_such_field=1"])
    with pytest.raises(ConfigError):
        load_train_config(TINY, ["stages=[pretrain, fly]"])
    with pytest.raises(ConfigError):
        load_train_config(TINY, ["data.modalities=[cxr, xray]"])
    with pytest.raises(ConfigError, match="kd_texts"):
        load_train_config(TINY, ["distill.kd_texts=mine"])
    assert tuple(TrainConfig().stages) == STAGES


# ---------------------------------------------------------------- samplers


def test_distinct_text_batches_have_no_duplicate_texts():
    texts = ["a", "a", "a", "b", "b", "c", "d", "e", "f", "g"]
    batches = distinct_text_batches(texts, 4, generator(0, "t", 0))
    assert batches and all(len(b) == 4 for b in batches)
    for b in batches:
        assert len({texts[i] for i in b}) == len(b)
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))  # no row twice in one epoch


def test_step_batcher_is_a_function_of_step():
    texts = [f"r{i % 7}" for i in range(30)]
    a, b = StepBatcher(texts, 5, 0, "x"), StepBatcher(texts, 5, 0, "x")
    seq = [a.batch(s) for s in range(20)]
    assert [b.batch(s) for s in reversed(range(20))] == list(reversed(seq))  # order-independent
    assert StepBatcher(texts, 5, 1, "x").batch(0) != seq[0] or StepBatcher(texts, 5, 1, "x").batch(1) != seq[1]


def test_shared_text_sampler_follows_probabilities():
    pools = {"cxr": [f"c{i}" for i in range(500)], "ecg": [f"e{i}" for i in range(500)]}
    s = SharedTextSampler(pools, {"cxr": 0.8, "ecg": 0.2}, seed=0)
    counts = Counter(t[0] for step in range(40) for t in s.sample(step, 25))
    share = counts["c"] / (counts["c"] + counts["e"])
    assert 0.74 < share < 0.86
    assert s.sample(3, 10) == s.sample(3, 10)
    uniform = SharedTextSampler({"cxr": ["a"] * 1 + ["b"], "ecg": [f"e{i}" for i in range(98)]}, None, 0)
    got = Counter(t[0] for step in range(30) for t in uniform.sample(step, 10))
    assert got["e"] > 5 * (got["a"] + got["b"])  # proportional to pool size when balancing is off


# ---------------------------------------------------------------- schedule and checkpoints


def test_warmup_cosine():
    f = warmup_cosine(4, 14)
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(9) == pytest.approx(0.5)  # halfway through the 10 decay steps
    assert f(14) == pytest.approx(0.0, abs=1e-12)
    assert all(f(s) >= f(s + 1) for s in range(4, 14))


def test_checkpoint_roundtrip_and_atomic_latest(tmp_path):
    sd = {"w": torch.arange(6.0).view(2, 3)}
    save_checkpoint(tmp_path, 5, {"m": sd}, {"phase": "kd"}, {"optimizer": {"state": {}, "x": torch.ones(2)}})
    save_checkpoint(tmp_path, 10, {"m": {"w": sd["w"] * 2}}, {"phase": "joint"})
    ck = load_checkpoint(tmp_path)
    assert ck["step"] == 10 and ck["state"]["phase"] == "joint"
    torch.testing.assert_close(ck["tensors"]["m"]["w"], sd["w"] * 2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000010"]  # older pruned
    assert not list(tmp_path.glob(".*"))  # no temporaries left behind
    assert load_checkpoint(tmp_path / "missing") is None


# ---------------------------------------------------------------- the loop


def _rt(tmp_path, **kw):
    from train.config import RuntimeConfig

    return Runtime(RuntimeConfig(device="cpu", progress=False, ckpt_every=3, log_every=1, **kw),
                   DistInfo(), tmp_path)


class Crash(Exception):
    pass


def _toy_loop(tmp_path, total, bad_steps=(), crash_at=None):
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1)
    x = torch.randn(16, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])

    def step_fn(step):
        loss = ((lin(x) - y) ** 2).mean()
        if step in bad_steps:
            loss = loss * float("nan")
        if step == crash_at:
            raise Crash
        return {"mse_loss": loss}

    rt = _rt(tmp_path)
    out = train_loop("toy", rt, {"lin": lin}, opt, total, 2, step_fn, MetricsLog(tmp_path / "m.csv", True))
    return lin, out


def test_loop_skips_non_finite_steps_and_logs(tmp_path):
    lin, out = _toy_loop(tmp_path, 8, bad_steps={2, 5})
    assert out["skipped_steps"] == 2 and out["steps"] == 8
    assert all(torch.isfinite(p).all() for p in lin.parameters())
    rows = (tmp_path / "m.csv").read_text().splitlines()
    assert rows[0] == "stage,step,time,name,value" and any(",skipped_steps,2" in r for r in rows)


def test_loop_resumes_exactly(tmp_path):
    full, _ = _toy_loop(tmp_path / "a", 9)
    with pytest.raises(Crash):
        _toy_loop(tmp_path / "b", 9, crash_at=7)  # dies in step 7; last checkpoint after step 6
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "toy")["step"] == 6
    again, _ = _toy_loop(tmp_path / "b", 9)     # rerun: resumes from step 6
    for p, q in zip(full.parameters(), again.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "toy")["step"] == 9


# ---------------------------------------------------------------- end to end (tiny config)


def _run(out: Path, cohort: Path, cache: Path, env_extra: dict | None = None, subprocess_run=False):
    args = ["--config", str(TINY), "--out", str(out), f"data.cohort={cohort}", f"data.cache_dir={cache}"]
    if subprocess_run:
        env = {**os.environ, **(env_extra or {})}
        return subprocess.run([sys.executable, str(REPO / "train" / "run_all.py"), *args], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=600, check=False).returncode
    from train.run_all import main

    return main(args)


def _zeroshot(report: dict) -> dict:
    return {(s, m): v["zeroshot"]["accuracy"] for s, mods in report["metrics"].items()
            for m, v in mods.items() if "zeroshot" in v}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    cohort, cache = base / "cohort", base / "cache"
    assert _run(base / "a", cohort, cache) == 0
    return base, cohort, cache


@pytest.mark.slow
def test_tiny_end_to_end(tiny_runs):
    from m3bind.model import load_model

    base, _, _ = tiny_runs
    out = base / "a"
    report = json.loads((out / "report.json").read_text())
    assert set(report["metrics"]) == {"zoo", "bound", "distilled"}
    acc = _zeroshot(report)
    assert len(acc) == 9 and all(0.0 <= v <= 1.0 for v in acc.values())
    assert "cross_modal" in report["metrics"]["bound"]["cxr->ecg"]
    assert report["training"]["bind"]["balancing"]["variant"].startswith("normalized")
    for d in ("zoo_model", "bound_model", "model"):
        m = load_model(out / d)
        assert m.modalities == ["cxr", "retina", "ecg"]
        assert json.loads((out / d / "config.json").read_text())["provenance"]["stage"]
    assert load_model(out / "model").shared_text and not load_model(out / "bound_model").shared_text
    text = (out / "report.md").read_text()
    assert "Training" in text and "L_KD: each teacher on its own modality's texts" in text
    names = {line.split(",")[3] for line in (out / "metrics.csv").read_text().splitlines()[1:]}
    assert {"clip_loss", "align_loss", "kd_loss", "contrastive_loss", "skipped_steps"} <= names
    # binding changed the text side, not the frozen image trunks
    zoo, bound = load_model(out / "zoo_model"), load_model(out / "bound_model")
    t_zoo = zoo.embed_text(["cardiomegaly"], modality="cxr")
    t_bound = bound.embed_text(["cardiomegaly"], modality="cxr")
    assert not torch.allclose(torch.from_numpy(t_zoo), torch.from_numpy(t_bound))
    for (k, v), (k2, v2) in zip(zoo.image_encoders["ecg"].trunk.state_dict().items(),
                                bound.image_encoders["ecg"].trunk.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


@pytest.mark.slow
def test_kill_in_bind_then_resume_gives_same_result(tiny_runs):
    base, cohort, cache = tiny_runs
    out = base / "b"
    rc = _run(out, cohort, cache, {"M3BIND_KILL_AT": "bind:7"}, subprocess_run=True)
    assert rc == -9  # SIGKILLed itself after bind step 7
    ck = load_checkpoint(out / "checkpoints" / "bind")
    assert ck is not None and ck["step"] == 5
    assert not (out / "bound_model").exists()
    assert _run(out, cohort, cache) == 0
    ref = json.loads((base / "a" / "report.json").read_text())
    got = json.loads((out / "report.json").read_text())
    a, b = _zeroshot(ref), _zeroshot(got)
    assert a.keys() == b.keys()
    for k in a:
        assert b[k] == pytest.approx(a[k], abs=1e-9), k
    cm = ("bound", "cxr->ecg")
    assert got["metrics"][cm[0]][cm[1]]["cross_modal"] == ref["metrics"][cm[0]][cm[1]]["cross_modal"]
    for d in ("bound_model", "model"):
        ida = json.loads((base / "a" / d / "config.json").read_text())["model_id"]
        idb = json.loads((out / d / "config.json").read_text())["model_id"]
        assert ida == idb, d  # identical weights files


def test_changed_config_refuses_reused_out_dir(tmp_path):
    from train.run_all import _check_out_dir

    cfg = load_train_config(TINY)
    _check_out_dir(cfg, tmp_path)
    _check_out_dir(cfg, tmp_path)  # same config: fine (resume)
    with pytest.raises(ConfigError):
        _check_out_dir(load_train_config(TINY, ["bind.steps=99"]), tmp_path)
    _check_out_dir(load_train_config(TINY, ["eval.bootstrap=5"]), tmp_path)  # eval only: fine


def test_stale_generated_cohort_is_refused(tmp_path):
    from m3bind.errors import ConfigError
    from train.config import DataConfig
    from train.data import ensure_cohort

    (tmp_path / "manifest.csv").write_text("item_id,modality,path,label,report,split\n")
    (tmp_path / "cohort.json").write_text(json.dumps(
        {"config": {"patients": 700, "seed": 0, "size": "small", "test_fraction": 0.1}}))
    same = DataConfig(cohort=str(tmp_path), generate_patients=700, generate_kwargs={"test_fraction": 0.1})
    assert ensure_cohort(same) == tmp_path
    for other in (DataConfig(cohort=str(tmp_path), generate_patients=2400, generate_kwargs={"test_fraction": 0.1}),
                  DataConfig(cohort=str(tmp_path), generate_patients=700, generate_kwargs={"test_fraction": 0.2})):
        with pytest.raises(ConfigError, match="other settings"):
            ensure_cohort(other)
    # a setting the cohort.json does not record was generated at its default (label_noise 0.0);
    # the worker count does not change the output
    with pytest.raises(ConfigError, match="label_noise"):
        ensure_cohort(DataConfig(cohort=str(tmp_path), generate_patients=700,
                                 generate_kwargs={"test_fraction": 0.1, "label_noise": 0.2}))
    assert ensure_cohort(DataConfig(cohort=str(tmp_path), generate_patients=700,
                                    generate_kwargs={"test_fraction": 0.1, "label_noise": 0.0, "workers": 2})) == tmp_path
    # a cohort the config does not generate (generate_patients null) is taken as it is
    assert ensure_cohort(DataConfig(cohort=str(tmp_path), generate_patients=None)) == tmp_path


@pytest.mark.slow
def test_kill_after_stage0_then_resume_gives_same_result(tiny_runs):
    """Killed right after the last teacher's final step (before the zoo is saved): the rerun
    restores the teachers from their checkpoints and builds the same LoRA adapters (their init
    does not depend on the global RNG state that stage 0 leaves behind)."""
    base, cohort, cache = tiny_runs
    out = base / "c"
    rc = _run(out, cohort, cache, {"M3BIND_KILL_AT": "pretrain_ecg:12"}, subprocess_run=True)
    assert rc == -9
    assert not (out / "zoo_model").exists()
    assert _run(out, cohort, cache) == 0
    from safetensors.torch import load_file

    # the zoo's weights are identical (its tokenizer.json may be serialised with other padding
    # state, which changes the zoo's model id but not a weight)
    for f in sorted((base / "a" / "zoo_model").glob("*.safetensors")):
        a, b = load_file(str(f)), load_file(str(out / "zoo_model" / f.name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f.name
    for d in ("bound_model", "model"):
        ida = json.loads((base / "a" / d / "config.json").read_text())["model_id"]
        idb = json.loads((out / d / "config.json").read_text())["model_id"]
        assert ida == idb, d  # identical weights and files
