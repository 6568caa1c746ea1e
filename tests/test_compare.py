"""The options comparison runner (train.compare) and its report section (train.report)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import yaml

from train.compare import (
    BASE_CONFIG,
    COMPARISONS,
    EXPERIMENTS,
    METRICS,
    attach,
    deep_merge,
    mean_std,
    paired_test,
    render_paired_tests,
    run_config,
    summarize,
    validate,
    write_summary,
)


def test_deep_merge_merges_mappings_and_replaces_the_rest():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 3}
    out = deep_merge(base, {"a": {"c": [9], "e": 5}, "f": {"g": 1}})
    assert out == {"a": {"b": 1, "c": [9], "e": 5}, "d": 3, "f": {"g": 1}}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 3}  # untouched


@pytest.mark.parametrize("exp,arm", [(e, a) for e, x in EXPERIMENTS.items() for a in x.arms])
def test_every_arm_is_a_valid_config(exp, arm, tmp_path):
    base = yaml.safe_load(BASE_CONFIG.read_text())
    cfg = run_config(base, exp, arm, 2, tmp_path)
    validate(cfg)
    assert cfg["data"]["modalities"] == EXPERIMENTS[exp].modalities
    assert set(cfg["teachers"]) == set(EXPERIMENTS[exp].modalities)
    assert cfg["runtime"]["seed"] == cfg["data"]["generate_seed"] == 2
    tag = f"_{EXPERIMENTS[exp].cohort}" if EXPERIMENTS[exp].cohort else ""
    assert cfg["data"]["cohort"] == str(tmp_path / f"cohort_s2{tag}")
    # the arms of one experiment differ only in their option (and name)
    plain = run_config(base, exp, next(iter(EXPERIMENTS[exp].arms)), 2, tmp_path)
    diff = {k for k in set(cfg) | set(plain) if cfg.get(k) != plain.get(k)} - {"name"}
    assert diff <= set(EXPERIMENTS[exp].arms[arm])


def test_emcl_arm_has_a_paired_subset_and_steps_scale(tmp_path):
    base = yaml.safe_load(BASE_CONFIG.read_text())
    cfg = run_config(base, "cxr_ecg", "emcl", 0, tmp_path, steps_scale=0.1)
    assert cfg["bind"]["emcl_weight"] > 0 and cfg["data"]["generate_kwargs"]["paired_fraction"] > 0
    assert cfg["teachers"]["cxr"]["steps"] == 8 and cfg["bind"]["steps"] == 4


@pytest.mark.parametrize("exp", ["cxr_vit_image_only", "cxr_vit_image_only_scarce", "cxr_vit_image_only_long"])
def test_image_only_arms_differ_only_in_feeding_the_withheld_items(exp, tmp_path):
    base = yaml.safe_load(BASE_CONFIG.read_text())
    io = run_config(base, exp, "mmclip_image_only", 1, tmp_path)
    none = run_config(base, exp, "mmclip", 1, tmp_path)
    assert io["mmclip"]["image_only"] and not none["mmclip"]["image_only"]
    assert io["data"]["image_only_fraction"] == none["data"]["image_only_fraction"] > 0
    # same steps, batch and masked warm-up; the held-out MIM loss on the same (all) test images
    for k in ("steps", "batch_size", "warmup_steps"):
        assert io["teachers"]["cxr"][k] == none["teachers"]["cxr"][k]
    assert io["mmclip"]["warmup_steps"] == none["mmclip"]["warmup_steps"] > 0
    assert io["mmclip"]["heldout_items"] == none["mmclip"]["heldout_items"] > 0
    # its own cohort and cache (other generation settings than the shared one of the seed)
    assert io["data"]["cohort"] == none["data"]["cohort"] == str(tmp_path / "cohort_s1_cxr1500")
    assert io["data"]["cache_dir"] == str(tmp_path / "cache_s1_cxr1500")
    assert run_config(base, "cxr_vit", "mmclip", 1, tmp_path)["data"]["cohort"] == str(tmp_path / "cohort_s1")


def test_scarce_reports_reuse_the_image_only_cohorts_with_fewer_reports(tmp_path):
    base = yaml.safe_load(BASE_CONFIG.read_text())
    scarce = run_config(base, "cxr_vit_image_only_scarce", "mmclip_image_only", 3, tmp_path)
    plenty = run_config(base, "cxr_vit_image_only", "mmclip_image_only", 3, tmp_path)
    assert scarce["data"]["cohort"] == plenty["data"]["cohort"]  # same patients and images
    assert scarce["data"]["generate_kwargs"] == plenty["data"]["generate_kwargs"]
    assert scarce["data"]["image_only_fraction"] > plenty["data"]["image_only_fraction"]
    assert scarce["mmclip"]["heldout_every"] > 0
    assert scarce["mmclip"]["heldout_items"] == plenty["mmclip"]["heldout_items"]


def test_mean_std_is_the_sample_std():
    assert mean_std([1.0, 2.0, 4.0]) == pytest.approx((statistics.mean([1, 2, 4]), statistics.stdev([1, 2, 4])))
    assert mean_std([3.0]) == (3.0, 0.0)


def test_paired_test_on_a_hand_example():
    # diffs 1, 2, 3: mean 2, std 1, se 1/sqrt(3), t = 2 sqrt(3); with 2 degrees of freedom the t
    # distribution has the closed form F(t) = 1/2 + t / (2 sqrt(2 + t^2)), so the two-sided
    # p = 1 - t / sqrt(2 + t^2) = 1 - sqrt(12/14) and the 0.975 quantile is
    # q = (2 * 0.975 - 1) / sqrt(2 * 0.975 * 0.025)
    r = paired_test([1.0, 2.0, 3.0])
    t = 2 * math.sqrt(3)
    q = 0.95 / math.sqrt(2 * 0.975 * 0.025)
    assert (r["mean"], r["std"], r["n"], r["df"]) == (pytest.approx(2.0), pytest.approx(1.0), 3, 2)
    assert r["t"] == pytest.approx(t)
    assert r["p"] == pytest.approx(1 - math.sqrt(12 / 14), rel=1e-9)
    assert r["ci"] == pytest.approx([2 - q / math.sqrt(3), 2 + q / math.sqrt(3)], rel=1e-9)
    assert r["p"] == pytest.approx(0.07418, abs=1e-5) and r["ci"][0] < 0 < r["ci"][1]


def test_paired_test_matches_scipy_ttest_rel():
    from scipy import stats

    ref, opt = [0.0839, 0.0918, 0.0876, 0.0901, 0.0850], [0.0780, 0.0710, 0.0872, 0.0799, 0.0861]
    r = paired_test([o - f for o, f in zip(opt, ref, strict=True)])
    want = stats.ttest_rel(opt, ref)
    assert r["t"] == pytest.approx(want.statistic) and r["p"] == pytest.approx(want.pvalue)
    ci = want.confidence_interval(0.95)
    assert r["ci"] == pytest.approx([ci.low, ci.high])


def test_paired_test_degenerate_cases():
    assert paired_test([0.5])["p"] is None and paired_test([0.5])["ci"] is None
    assert paired_test([])["n"] == 0
    same = paired_test([0.013, 0.013, 0.013])
    assert same["p"] is None and same["t"] is None and same["ci"] == pytest.approx([0.013, 0.013])
    # equal up to float rounding (one more R@1 hit out of 80 on every seed) is zero spread too
    rounded = paired_test([0.025 - 0.0125, 0.0375 - 0.025, 0.0125 - 0.0])
    assert rounded["p"] is None and rounded["ci"] == pytest.approx([0.0125, 0.0125])
    assert paired_test([0.0, 0.0])["ci"] == [0.0, 0.0]


def _fake_run(path, value, mim=None):
    path.mkdir(parents=True)
    metrics = {"bound": {"cxr->ecg": {"cross_modal": {"precision@10": value}}}}
    (path / "report.json").write_text(json.dumps({"metrics": metrics}))
    summary = {"pretrain": {"cxr": {"mmclip": {"heldout_mim_loss": mim}}}} if mim is not None else {}
    (path / "train_summary.json").write_text(json.dumps(summary))


def test_summarize_and_render(tmp_path):
    from train.report import render_comparison, render_markdown

    for s, (plain, emcl) in enumerate([(0.30, 0.40), (0.35, 0.33), (0.25, 0.45)]):
        _fake_run(tmp_path / "cxr_ecg" / "plain" / f"s{s}", plain)
        _fake_run(tmp_path / "cxr_ecg" / "emcl" / f"s{s}", emcl)
    _fake_run(tmp_path / "cxr_vit_image_only" / "mmclip" / "s0", 0.0, mim=0.5)
    comp = summarize(tmp_path, [0, 1, 2])
    assert comp["simulated"] and len(comp["comparisons"]) == len(COMPARISONS)
    emcl = next(c for c in comp["comparisons"] if c["option"] == "emcl")
    row = next(r for r in emcl["rows"] if r["metric"].startswith("cxr->ecg cross-modal P@10"))
    assert row["plain"]["mean"] == pytest.approx(0.30) and row["plain"]["std"] == pytest.approx(0.05)
    assert row["emcl"]["mean"] == pytest.approx(statistics.mean([0.40, 0.33, 0.45]))
    assert row["delta"]["mean"] == pytest.approx(statistics.mean([0.10, -0.02, 0.20]))
    assert row["delta"]["std"] == pytest.approx(statistics.stdev([0.10, -0.02, 0.20]))
    assert (row["delta"]["wins"], row["delta"]["losses"], row["delta"]["n"]) == (2, 1, 3)
    assert row["delta"]["p"] == pytest.approx(paired_test([0.10, -0.02, 0.20])["p"])
    assert len(emcl["rows"]) == 1  # metrics absent from every run are left out
    io = next(c for c in comp["comparisons"] if c["option"] == "mmclip_image_only")
    mim = io["rows"][0]
    assert mim["mmclip"]["n"] == 1 and mim["mmclip_image_only"]["n"] == 0 and mim["delta"]["n"] == 0
    md = render_comparison(comp)
    assert "simulated" in md and "0.300 ± 0.050" in md and "2/3" in md
    assert all(f"### {c[0]}" in md for c in COMPARISONS)
    paired = render_paired_tests(comp)
    p = paired_test([0.10, -0.02, 0.20])
    assert f"| {row['metric']} | 3 | 0.0933 ± 0.1102 | [{p['ci'][0]:.4f}, {p['ci'][1]:.4f}] | " in paired
    assert f"{p['t']:.2f} | {p['p']:.3f} | 2/1 |" in paired
    assert "MMCLIP image-only" not in paired  # no paired seed there
    # written and attached to a run's report
    write_summary(tmp_path, [0, 1, 2])
    assert "Paired differences over seeds" in (tmp_path / "comparison.md").read_text()
    assert json.loads((tmp_path / "comparison.json").read_text())["seeds"] == [0, 1, 2]
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps({"simulated": True, "metrics": {}}))
    attach(run, comp)
    assert "Options against the plain run" in (run / "report.md").read_text()
    assert render_markdown({"metrics": {}}).count("Options against") == 0


def _fake_curve(run: Path, points: dict[int, float], other: float = 9.0, finished: bool = True) -> None:
    run.mkdir(parents=True, exist_ok=True)
    if finished:
        (run / "report.json").write_text(json.dumps({"metrics": {}}))
    rows = ["stage,step,time,name,value"]
    for step, v in points.items():
        rows += [f"pretrain_cxr,{step},0,mim_loss,{other}", f"pretrain_cxr,{step},0,heldout_mim_loss,{v}"]
    (run / "metrics.csv").write_text("\n".join(rows) + "\n")


def test_heldout_curves_average_the_steps_every_seed_logged(tmp_path):
    from train.compare import heldout_curves, read_curve

    exp = tmp_path / "cxr_vit_image_only"
    _fake_curve(exp / "mmclip" / "s0", {10: 0.5, 20: 0.4, 30: 0.3})
    _fake_curve(exp / "mmclip" / "s1", {10: 0.7, 20: 0.2})  # stopped early: step 30 is not common
    _fake_curve(exp / "mmclip_image_only" / "s0", {10: 0.6, 20: 0.1})
    (exp / "mmclip_image_only" / "s1").mkdir(parents=True)  # no metrics.csv: left out
    _fake_curve(exp / "mmclip_image_only" / "s2", {10: 0.3, 20: 0.2}, finished=False)  # still running
    assert read_curve(exp / "mmclip" / "s0" / "metrics.csv") == {10: 0.5, 20: 0.4, 30: 0.3}
    assert read_curve(exp / "mmclip" / "s0" / "metrics.csv", "mim_loss") == {10: 9.0, 20: 9.0, 30: 9.0}
    curves = heldout_curves(tmp_path, [0, 1, 2])
    assert list(curves) == ["cxr_vit_image_only"]
    c = curves["cxr_vit_image_only"]["mmclip"]
    assert c["steps"] == [10, 20] and c["per_seed"] == {0: [0.5, 0.4], 1: [0.7, 0.2]}
    assert c["mean"] == pytest.approx([0.6, 0.3])
    assert c["std"] == pytest.approx([statistics.stdev([0.5, 0.7]), statistics.stdev([0.4, 0.2])])
    io = curves["cxr_vit_image_only"]["mmclip_image_only"]
    assert io["per_seed"] == {0: [0.6, 0.1]} and io["std"] == [0.0, 0.0]
    write_summary(tmp_path, [0, 1])
    assert (tmp_path / "heldout_mim_curves.png").stat().st_size > 1000
    assert "heldout_mim_curves.png" in (tmp_path / "comparison.md").read_text()


def test_metrics_name_known_experiments():
    assert set(METRICS) == set(EXPERIMENTS)
    for _, exp, arm, ref in COMPARISONS:
        assert {arm, ref} <= set(EXPERIMENTS[exp].arms)


def test_main_runs_only_the_named_arms(tmp_path, monkeypatch):
    from train import compare

    ran = []
    monkeypatch.setattr(compare, "run_one", lambda cfg, run_dir, **kw: ran.append(run_dir) or 0.0)
    assert compare.main(["--out", str(tmp_path), "--seeds", "0", "1", "--experiments", "cxr_vit_image_only",
                         "--arms", "mmclip_image_only"]) == 0
    assert ran == [tmp_path / "cxr_vit_image_only" / "mmclip_image_only" / f"s{s}" for s in (0, 1)]
    assert (tmp_path / "comparison.md").is_file()
