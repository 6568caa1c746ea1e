"""The MEDBind / SeLIP / MMCLIP options of the training stages (train.options, train.config)."""

from __future__ import annotations

import copy
import json
import math
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from m3bind.config import from_dict
from m3bind.errors import ConfigError
from train.config import TrainConfig
from train.data import ModalityData
from train.options import RandomBatcher, is_withheld, subset, text_objective, withhold_reports

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "train" / "configs"


def _cfg(**over) -> TrainConfig:
    base = {"data": {"modalities": ["cxr", "ecg", "mri"]}}
    for k, v in over.items():
        base[k] = v
    return from_dict(TrainConfig, base)


def _data(n: int, modality: str = "cxr") -> ModalityData:
    return ModalityData(modality=modality, x=torch.arange(n, dtype=torch.float32)[:, None],
                        reports=[f"report {i % 5}" for i in range(n)], labels=["a"] * n,
                        item_ids=[f"{modality}-{i:04d}" for i in range(n)], pair_ids=[""] * n)


# --------------------------------------------------------------------------- config


def test_option_fields_select_the_stage0_objective():
    cfg = _cfg(medbind={"modalities": ["cxr", "ecg"]}, selip={"modalities": ["mri"]},
               mmclip={"modalities": ["cxr"]})
    assert [cfg.stage0_objective(m) for m in ("cxr", "ecg", "mri")] == ["medbind", "medbind", "selip"]
    assert cfg.uses_mmclip("cxr") and not cfg.uses_mmclip("ecg")
    plain = _cfg()
    assert plain.medbind is plain.selip is plain.mmclip is None
    assert {plain.stage0_objective(m) for m in ("cxr", "ecg", "mri")} == {"clip"}
    assert plain.data.image_only_fraction == 0 and plain.bind.emcl_weight == 0


@pytest.mark.parametrize("over", [
    {"medbind": {"modalities": ["mri"]}, "selip": {"modalities": ["mri"]}},  # two text losses
    {"mmclip": {"modalities": ["ecg"]}},  # MMCLIP needs a 2D ViT modality
    {"medbind": {"modalities": ["xray"]}},
    {"data": {"modalities": ["cxr"], "image_only_fraction": 1.0}},
    {"data": {"modalities": ["cxr"], "image_only_modalities": ["xray"]}},
    {"medbind": {"text_loss": "infonce"}},
])
def test_option_fields_reject_bad_combinations(over):
    with pytest.raises(ConfigError):
        _cfg(**over)


# --------------------------------------------------------------------------- image-only items


def test_withheld_items_are_a_stable_hash_of_the_id():
    ids = [f"cxr-{i:04d}" for i in range(2000)]
    got = [is_withheld(k, 0.3) for k in ids]
    # independent: crc32 of the salted id, as a fraction of 2^32
    assert got == [zlib.crc32(f"image-only:{k}".encode()) < 0.3 * 2**32 for k in ids]
    assert abs(sum(got) / len(ids) - 0.3) < 0.04
    assert not any(is_withheld(k, 0.0) for k in ids)


def test_withhold_reports_splits_in_place_and_is_idempotent():
    cfg = _cfg(data={"modalities": ["cxr", "ecg"], "image_only_fraction": 0.4})
    train = {"cxr": _data(50), "ecg": _data(30, "ecg")}
    io = withhold_reports(train, cfg)
    assert set(io) == {"cxr"} and len(train["ecg"]) == 30  # only image_only_modalities
    kept, held = train["cxr"], io["cxr"]
    assert len(kept) + len(held) == 50 and not set(kept.item_ids) & set(held.item_ids)
    assert all(is_withheld(k, 0.4) for k in held.item_ids)
    for part in (kept, held):  # rows stay aligned
        assert [f"cxr-{int(v):04d}" for v in part.x[:, 0]] == part.item_ids
    assert withhold_reports(train, cfg) == {} and len(train["cxr"]) == len(kept)


def test_subset_keeps_rows_aligned():
    d = _data(6)
    s = subset(d, [4, 1])
    assert s.item_ids == ["cxr-0004", "cxr-0001"] and s.reports == ["report 4", "report 1"]
    assert s.x[:, 0].tolist() == [4.0, 1.0]


def test_random_batcher_is_deterministic_and_allows_repeated_texts():
    b = RandomBatcher(40, 16, seed=0, stream="s")
    assert b.batch(3) == RandomBatcher(40, 16, seed=0, stream="s").batch(3)
    assert b.batch(3) != b.batch(4) and len(set(b.batch(3))) == 16
    texts = [f"report {i % 5}" for i in range(40)]
    assert len({texts[i] for i in b.batch(0)}) < 16  # identical reports meet in a batch
    assert RandomBatcher(5, 16, 0, "s").batch(0) and len(RandomBatcher(5, 16, 0, "s").batch(0)) == 5


# --------------------------------------------------------------------------- modality-text losses


def _slow_multi_positive(z, t, texts, s):
    """MEDBind Eq. 1 by loops: positives of i are the rows with the same (normalised) text."""
    z, t = F.normalize(z, dim=-1), F.normalize(t, dim=-1)
    key = [" ".join(x.lower().split()) for x in texts]
    total = 0.0
    for q, k in ((t, z), (z, t)):
        logits = s * q @ k.t()
        rows = []
        for i in range(len(texts)):
            lse = torch.logsumexp(logits[i], 0)
            pos = [j for j in range(len(texts)) if key[j] == key[i]]
            rows.append(-sum(logits[i, j] - lse for j in pos) / len(pos))
        total = total + torch.stack(rows).mean()
    return total


def test_text_objective_medbind_is_multi_positive_tmcl():
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    texts = ["Normal.", "normal.", "Effusion.", "effusion. ", "Mass.", "Cardiomegaly."]
    cfg = _cfg(medbind={"modalities": ["cxr"]})
    terms = text_objective(cfg, "cxr")(z, t, texts, 10.0)
    assert set(terms) == {"tmcl_loss"}
    assert torch.allclose(terms["tmcl_loss"], _slow_multi_positive(z, t, texts, 10.0), atol=1e-5)
    # medbind.text_loss: clip -> the plain symmetric CLIP loss
    clip_cfg = _cfg(medbind={"modalities": ["cxr"], "text_loss": "clip"})
    plain = text_objective(clip_cfg, "cxr")(z, t, texts, 10.0)
    zn, tn = F.normalize(z, dim=-1), F.normalize(t, dim=-1)
    ref = 0.5 * (F.cross_entropy(10 * zn @ tn.t(), torch.arange(6)) + F.cross_entropy(10 * tn @ zn.t(), torch.arange(6)))
    assert set(plain) == {"clip_loss"} and torch.allclose(plain["clip_loss"], ref, atol=1e-5)
    assert torch.allclose(text_objective(_cfg(), "cxr")(z, t, texts, 10.0)["clip_loss"], ref, atol=1e-5)


def test_text_objective_selip_uses_report_similarity_soft_targets():
    from train.selip import ReportSimilarity, RuleBasedExtractor

    g = torch.Generator().manual_seed(1)
    z, t = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    texts = ["Axial FLAIR: hyperintense lesion in the left frontal lobe.",
             "Axial FLAIR: hyperintense lesion in the right frontal lobe.",
             "Axial T1: no abnormality."]
    cfg = _cfg(selip={"modalities": ["mri"], "alpha": 0.5, "beta": 2.0})
    terms = text_objective(cfg, "mri")(z, t, texts, 5.0)
    # independent: the KL of SeLIP Eqs. 8-13 by hand from the similarity matrix
    S = ReportSimilarity(RuleBasedExtractor())(texts).double()
    zn, tn = F.normalize(z.double(), dim=-1), F.normalize(t.double(), dim=-1)
    kl = 0.0
    for logits, target in ((5 * zn @ tn.t(), S / S.sum(1, keepdim=True)), (5 * tn @ zn.t(), S.t() / S.t().sum(1, keepdim=True))):
        p = logits.softmax(1)
        kl = kl + sum(float(target[i, j] * math.log(target[i, j] / p[i, j]))
                      for i in range(3) for j in range(3) if target[i, j] > 0) / 3
    assert set(terms) == {"clip_loss", "se_loss"}
    assert math.isclose(float(terms["se_loss"]), 2.0 * 0.5 * kl, rel_tol=1e-4)


# --------------------------------------------------------------------------- MMCLIP in stage 0


def _vit_teacher():
    from m3bind.encoders import ImageEncoderConfig
    from train.config import TeacherConfig
    from train.stages.pretrain import build_teacher

    tcfg = from_dict(TeacherConfig, {"image": {"arch": "timm", "name": "vit_tiny_patch16_224", "in_chans": 1,
                                               "params": {"img_size": 32, "patch_size": 8, "depth": 1}},
                                     "text": {"arch": "hf_random", "path": None, "pooling": "mean", "max_length": 32,
                                              "params": {"num_hidden_layers": 1, "hidden_size": 32,
                                                         "num_attention_heads": 2, "intermediate_size": 64}}})
    assert isinstance(tcfg.image, ImageEncoderConfig)
    return build_teacher("cxr", tcfg, 16, {"size": 32}, seed=0)


def test_masked_objectives_report_and_image_only_rows():
    from train.options import MaskedObjectives

    teacher = _vit_teacher()
    cfg = _cfg(mmclip={"modalities": ["cxr"], "patch_size": 8, "decoder_dim": 16, "decoder_depth": 1,
                       "text_decoder_dim": 16, "text_decoder_depth": 1, "lambda3": 1.0})
    mo = MaskedObjectives(cfg, "cxr", teacher, torch.zeros(1, 32, 32))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 32, 32, generator=g)
    texts = ["Cardiomegaly with pleural effusion.", "No acute finding.", "Right lower lobe consolidation."]
    terms = mo.terms(x, texts, torch.randn(2, 1, 32, 32, generator=g), torch.Generator().manual_seed(1))
    assert set(terms) == {"mim_loss", "mlm_loss"} and all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in mo.heads.image_decoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in mo.heads.text_decoder.parameters())
    loss = mo.heldout_mim(x, seed=3)
    assert math.isfinite(loss) and loss == mo.heldout_mim(x, seed=3)  # fixed masks
    with pytest.raises(ValueError, match="patch_size"):
        MaskedObjectives(_cfg(mmclip={"modalities": ["cxr"], "patch_size": 16}), "cxr", teacher,
                         torch.zeros(1, 32, 32))


# --------------------------------------------------------------------------- end to end


SMOKE = {
    "name": "options-smoke", "dim": 16,
    "data": {"modalities": ["cxr", "ecg", "mri"], "generate_patients": 90,
             "generate_kwargs": {"test_fraction": 0.2, "paired_fraction": 0.4, "modalities": ["cxr", "ecg", "mri"]},
             "image_only_fraction": 0.3},
    "medbind": {"modalities": ["ecg"]}, "selip": {"modalities": ["mri"]},
    "mmclip": {"modalities": ["cxr"], "patch_size": 8, "decoder_dim": 16, "decoder_depth": 1,
               "text_decoder_dim": 16, "text_decoder_depth": 1, "warmup_steps": 2, "heldout_items": 6},
    "teachers": {
        "cxr": {"image": {"arch": "timm", "name": "vit_tiny_patch16_224", "in_chans": 1,
                          "params": {"img_size": 32, "patch_size": 8, "depth": 1}},
                "preprocess": {"size": 32}, "steps": 4, "batch_size": 6, "warmup_steps": 1},
        "ecg": {"image": {"arch": "ecg_cnn", "name": "ecg_cnn", "in_chans": 12, "params": {"widths": [8]}},
                "preprocess": {"fs": 50.0, "band": [0.5, 20.0]}, "steps": 3, "batch_size": 6, "warmup_steps": 1},
        "mri": {"image": {"arch": "volume_cnn", "name": "cnn3d", "in_chans": 4,
                          "params": {"widths": [4], "blocks": 1, "sequence_mode": "channels"}},
                "preprocess": {"grid": [8, 16, 16]}, "steps": 3, "batch_size": 4, "warmup_steps": 1},
    },
    "bind": {"steps": 3, "batch_size": 6, "shared_batch_size": 6, "warmup_steps": 1, "emcl_weight": 1.0},
    "distill": {"enabled": False},
    "stages": ["pretrain", "bind"],
    "runtime": {"device": "cpu", "threads": 1, "ckpt_every": 50, "log_every": 5, "progress": False},
}


@pytest.mark.slow
def test_all_options_run_end_to_end(tmp_path):
    from train.run_all import run

    raw = copy.deepcopy(SMOKE)
    raw["data"]["cohort"] = str(tmp_path / "cohort")
    cfg = from_dict(TrainConfig, raw)
    out = tmp_path / "run"
    run(cfg, out)
    s = json.loads((out / "train_summary.json").read_text())
    pre = s["pretrain"]
    assert pre["cxr"]["objective"] == "clip + mmclip" and pre["ecg"]["objective"] == "medbind"
    assert pre["mri"]["objective"] == "selip"
    assert set(pre["cxr"]["last"]) == {"clip_loss", "mim_loss", "mlm_loss"}
    assert set(pre["ecg"]["last"]) == {"tmcl_loss"} and set(pre["mri"]["last"]) == {"clip_loss", "se_loss"}
    mm = pre["cxr"]["mmclip"]
    assert mm["image_only_items"] > 0 and mm["heldout_items"] == 6 and math.isfinite(mm["heldout_mim_loss"])
    assert s["bind"]["emcl_pairs"] > 0 and "emcl_loss" in s["bind"]["last"]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["medbind"]["modalities"] == ["ecg"] and config["data"]["image_only_fraction"] == 0.3


# --------------------------------------------------------------------------- named configs run

#: Tiny trunks per modality kind, so that every named config runs in seconds (the config's own
#: modalities, options, stages and flags stay as written).
TINY_TEACHER = {
    "image2d": lambda c: {"image": {"arch": "timm", "name": "test_convnext", "in_chans": c}, "preprocess": {"size": 32}},
    "volume": lambda c: {"image": {"arch": "volume_cnn", "name": "cnn3d", "in_chans": c,
                                   "params": {"widths": [4], "blocks": 1, "sequence_mode": "channels"}},
                         "preprocess": {"grid": [8, 16, 16]}},
    "signal": lambda c: {"image": {"arch": "ecg_cnn", "name": "ecg_cnn", "in_chans": c, "params": {"widths": [8]}},
                         "preprocess": {"fs": 50.0, "band": [0.5, 20.0]}},
}
NAMED = ["medbind_nm", "medbind_bd", "ecg_clip", "mmclip", "selip",
         *sorted(p.stem for p in CONFIG_DIR.glob("ablation_*.yaml"))]


def tiny_version(raw: dict, cohort: Path, cache: Path) -> dict:
    """``raw`` (a named config as loaded from YAML) with tiny trunks, steps and evaluation."""
    from m3bind.modalities import get_spec
    from train.compare import deep_merge

    cfg = from_dict(TrainConfig, copy.deepcopy(raw))
    teachers = {}
    for m in cfg.data.modalities:
        spec = get_spec(m)
        t = TINY_TEACHER[spec.kind](spec.channels)
        if cfg.uses_mmclip(m):  # MMCLIP keeps a (tiny) ViT
            t = {"image": {"arch": "timm", "name": "vit_tiny_patch16_224", "in_chans": spec.channels,
                           "params": {"img_size": 32, "patch_size": 8, "depth": 1}}, "preprocess": {"size": 32}}
        teachers[m] = {**t, "steps": 2, "batch_size": 4, "warmup_steps": 1,
                       "text": {"arch": "hf_random", "path": None, "pooling": "mean", "max_length": 32,
                                "params": {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                                           "intermediate_size": 64}}}
    over = {"dim": 16, "teachers": teachers,
            "data": {"cohort": str(cohort), "cache_dir": str(cache), "generate_patients": None,
                     "datasets": {}, "shared_texts": "train_reports"},
            "bind": {"steps": 2, "batch_size": 4, "shared_batch_size": 4, "warmup_steps": 1},
            "distill": {"kd_steps": 1, "joint_steps": 1, "batch_size": 4, "contrastive_batch_size": 4,
                        "warmup_steps": 1,
                        "student": {"arch": "hf_random", "path": None, "pooling": "mean", "max_length": 32,
                                    "params": {"num_hidden_layers": 1, "hidden_size": 32,
                                               "num_attention_heads": 2, "intermediate_size": 64}}},
            "eval": {"max_test_items": 6, "fewshot_sets": 1, "fewshot_pool_per_class": 1, "bootstrap": 5,
                     "fewshot_shots": {m: [1] for m in cfg.data.modalities}, "openi_reports": 0,
                     "text_baseline": False, "plots": False},
            "runtime": {"device": "cpu", "threads": 1, "ckpt_every": 50, "log_every": 5, "progress": False}}
    if cfg.mmclip is not None:
        over["mmclip"] = {"patch_size": 8, "decoder_dim": 16, "decoder_depth": 1, "text_decoder_dim": 16,
                          "text_decoder_depth": 1, "warmup_steps": 1, "heldout_items": 4}
    out = deep_merge(raw, over)
    for m, t in teachers.items():  # the trunk and its preprocessing are replaced, not merged
        out["teachers"][m].update(image=t["image"], preprocess=t["preprocess"])
    return out


@pytest.fixture(scope="module")
def all_modality_cohort(tmp_path_factory):
    from data_registry import synthetic

    root = tmp_path_factory.mktemp("named_cohort")
    synthetic.generate(root / "cohort", 60, 0, progress=False, test_fraction=0.2, paired_fraction=0.4,
                       slide_format="png")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMED)
def test_named_config_runs(name, all_modality_cohort, tmp_path):
    from train.run_all import run

    raw = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    cfg = from_dict(TrainConfig, tiny_version(raw, all_modality_cohort / "cohort", all_modality_cohort / "cache"))
    result = run(cfg, tmp_path / "run")
    final = "model" if {"bind", "distill"} & set(cfg.stages) else "zoo_model"
    assert (tmp_path / "run" / final / "config.json").is_file()
    if "evaluate" in cfg.stages:
        report = result["report"]
        assert "zoo" in report["metrics"] and (tmp_path / "run" / "report.md").is_file()
    summary = result["summary"]
    for m in cfg.data.modalities:
        assert summary["pretrain"][m]["objective" if cfg.stage0_objective(m) != "clip" or cfg.uses_mmclip(m)
                                      else "steps"]
    if cfg.bind.emcl_weight > 0 and "bind" in cfg.stages:
        assert summary["bind"]["emcl_pairs"] > 0
    if "distill" in cfg.stages:  # SESKD on/off ablation: off leaves the bound model as the final one
        assert bool(summary["distill"].get("skipped")) == (not cfg.distill.enabled)
