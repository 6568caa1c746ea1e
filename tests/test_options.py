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
    mim = mo.heldout_mim(x, seed=3)
    assert math.isfinite(mim["loss"]) and mim == mo.heldout_mim(x, seed=3)  # fixed masks
    with pytest.raises(ValueError, match="patch_size"):
        MaskedObjectives(_cfg(mmclip={"modalities": ["cxr"], "patch_size": 16}), "cxr", teacher,
                         torch.zeros(1, 32, 32))


def test_masked_objectives_init_depends_on_the_run_seed_only():
    """The decoders' init is a function of runtime.seed, not of the global RNG state that the
    code before it left (reruns of one seed differed at step 1 before)."""
    from train.options import MaskedObjectives

    teacher = _vit_teacher()

    def heads(cfg, global_seed):
        torch.manual_seed(global_seed)
        return MaskedObjectives(cfg, "cxr", teacher, torch.zeros(1, 32, 32)).heads.state_dict()

    a, b = heads(_mmclip_cfg(), 1), heads(_mmclip_cfg(), 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = _mmclip_cfg()
    other.runtime.seed = 5
    c = heads(other, 1)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def _mmclip_cfg(**over):
    return _cfg(mmclip={"modalities": ["cxr"], "patch_size": 8, "decoder_dim": 16, "decoder_depth": 1,
                        "text_decoder_dim": 16, "text_decoder_depth": 1, **over})


def test_image_only_items_reach_the_mim_loss():
    from train.options import MaskedObjectives

    teacher = _vit_teacher()
    mo = MaskedObjectives(_mmclip_cfg(), "cxr", teacher, torch.zeros(1, 32, 32))
    g = torch.Generator().manual_seed(0)
    x_io = torch.randn(4, 1, 32, 32, generator=g)
    # a batch of image-only items alone: the MIM term only, nonzero, gradients to decoder and ViT
    terms = mo.terms(x_io[:0], [], x_io, torch.Generator().manual_seed(1))
    assert set(terms) == {"mim_loss"} and float(terms["mim_loss"].detach()) > 0
    terms["mim_loss"].backward()
    grad = lambda mod: sum(float(p.grad.abs().sum()) for p in mod.parameters() if p.grad is not None)
    assert grad(mo.heads.image_decoder) > 0 and grad(mo.vit) > 0
    assert grad(mo.heads.text_decoder) == 0  # no report, no EntMLM
    # mixed with report items, the image-only rows still drive the MIM loss (their pixels get a gradient)
    teacher.zero_grad()
    x_io = x_io.clone().requires_grad_(True)
    terms = mo.terms(torch.randn(2, 1, 32, 32, generator=g), ["Cardiomegaly.", "Pleural effusion."], x_io,
                     torch.Generator().manual_seed(1))
    terms["mim_loss"].backward()
    assert all(float(x_io.grad[i].abs().sum()) > 0 for i in range(len(x_io)))


@pytest.mark.parametrize("use_image_only", [True, False])
def test_stage0_feeds_image_only_items_only_when_asked(use_image_only, monkeypatch, tmp_path):
    from train.config import RuntimeConfig
    from train.distributed import DistInfo
    from train.options import MaskedObjectives, pretrain_teacher_with_options
    from train.stages.common import MetricsLog, Runtime

    seen: list[int] = []
    real = MaskedObjectives.terms

    def spy(self, x, texts, x_image_only, g):
        seen.append(0 if x_image_only is None else len(x_image_only))
        return real(self, x, texts, x_image_only, g)

    monkeypatch.setattr(MaskedObjectives, "terms", spy)
    cfg = from_dict(TrainConfig, {"data": {"modalities": ["cxr"], "image_only_fraction": 0.5},
                                  "mmclip": {"modalities": ["cxr"], "patch_size": 8, "decoder_dim": 16,
                                             "decoder_depth": 1, "text_decoder_dim": 16, "text_decoder_depth": 1,
                                             "warmup_steps": 1, "heldout_items": 0, "image_only": use_image_only},
                                  "teachers": {"cxr": {"steps": 3, "batch_size": 4, "warmup_steps": 1}}})
    g = torch.Generator().manual_seed(0)
    mk = lambda n, tag: ModalityData(modality="cxr", x=torch.randn(n, 1, 32, 32, generator=g),
                                     reports=[f"Finding {tag}{i}: pleural effusion." for i in range(n)],
                                     labels=["a"] * n, item_ids=[f"{tag}{i}" for i in range(n)], pair_ids=[])
    rt = Runtime(RuntimeConfig(device="cpu", progress=False, ckpt_every=100, log_every=1), DistInfo(), tmp_path)
    out = pretrain_teacher_with_options(cfg, "cxr", _vit_teacher(), mk(8, "p"), mk(8, "i"), {"size": 32}, rt,
                                        MetricsLog(tmp_path / "m.csv", True))
    assert seen == ([4] * 3 if use_image_only else [0] * 3)  # batch 4 · 8 image-only / 8 paired
    assert out["mmclip"]["image_only_items"] == (8 if use_image_only else 0)


def test_heldout_curve_is_logged_and_leaves_training_unchanged(monkeypatch, tmp_path):
    import csv

    from train import options
    from train.config import RuntimeConfig
    from train.distributed import DistInfo
    from train.stages.common import MetricsLog, Runtime

    g = torch.Generator().manual_seed(0)
    x_test = torch.randn(5, 1, 32, 32, generator=g)
    monkeypatch.setattr(options, "heldout_images", lambda cfg, m, params, rt, n: x_test[:n])
    mk = lambda n, tag: ModalityData(modality="cxr", x=torch.randn(n, 1, 32, 32, generator=g),
                                     reports=[f"Finding {tag}{i}: pleural effusion." for i in range(n)],
                                     labels=["a"] * n, item_ids=[f"{tag}{i}" for i in range(n)], pair_ids=[])
    paired, image_only = mk(8, "p"), mk(8, "i")

    def run(every: int, out: Path):
        cfg = from_dict(TrainConfig, {"data": {"modalities": ["cxr"], "image_only_fraction": 0.5},
                                      "mmclip": {"modalities": ["cxr"], "patch_size": 8, "decoder_dim": 16,
                                                 "decoder_depth": 1, "text_decoder_dim": 16,
                                                 "text_decoder_depth": 1, "warmup_steps": 2, "heldout_items": 5,
                                                 "heldout_every": every},
                                      "teachers": {"cxr": {"steps": 5, "batch_size": 4, "warmup_steps": 1}}})
        torch.manual_seed(123)  # the teacher's init
        teacher = _vit_teacher()
        rt = Runtime(RuntimeConfig(device="cpu", progress=False, ckpt_every=100, log_every=1), DistInfo(), out)
        summary = options.pretrain_teacher_with_options(cfg, "cxr", teacher, paired, image_only, {"size": 32}, rt,
                                                        MetricsLog(out / "m.csv", True))
        with (out / "m.csv").open() as f:
            curve = {int(r["step"]): float(r["value"]) for r in csv.DictReader(f) if r["name"] == "heldout_mim_loss"}
        return summary, teacher.state_dict(), curve

    plain, w_plain, curve_plain = run(0, tmp_path / "a")
    timed, w_timed, curve = run(2, tmp_path / "b")
    # scoring the held-out images on the way changes nothing in training
    assert plain["last"] == timed["last"] and plain["mmclip"] == timed["mmclip"]
    assert all(torch.equal(w_plain[k], w_timed[k]) for k in w_plain)
    # a point every 2 steps and the final score, which is the summary's
    assert sorted(curve) == [2, 4, 5] and sorted(curve_plain) == [5]
    assert math.isclose(curve[5], timed["mmclip"]["heldout_mim_loss"], rel_tol=1e-5)
    assert curve[2] != curve[4]  # the model moved between the points


def test_heldout_masks_are_fixed_random_and_sized_like_training():
    from train.options import heldout_mask_count, heldout_masks

    cfg = _mmclip_cfg().mmclip  # λ1 0.7, λ2 0.75: 16 patches -> top 11 (11.2) -> 8 masked (8.25)
    assert heldout_mask_count(16, cfg) == 8
    assert heldout_mask_count(4, _mmclip_cfg(lambda1=0.1, lambda2=0.1).mmclip) == 1  # at least one
    m = heldout_masks(5, 16, 8, seed=7)
    assert m.shape == (5, 16) and m.sum(1).tolist() == [8] * 5
    assert torch.equal(heldout_masks(3, 16, 8, seed=7), m[:3])  # image i's mask depends on (seed, i) only
    assert not torch.equal(heldout_masks(5, 16, 8, seed=8), m)
    assert len({tuple(r.tolist()) for r in m}) > 1  # different images, different masks


def _slow_heldout(mo, x, mask, norm_pix=False):
    """The held-out MIM loss one image at a time, masking and averaging with explicit loops."""
    model = getattr(mo.vit, "model", mo.vit)
    p, grid = mo.cfg.patch_size, x.shape[-1] // mo.cfg.patch_size
    losses = []
    for i in range(len(x)):
        img = x[i].clone()
        for j in range(mask.shape[1]):
            if mask[i, j]:
                r, c = divmod(j, grid)
                img[:, r * p:(r + 1) * p, c * p:(c + 1) * p] = 0.0
        with torch.no_grad():
            tok = model.forward_features(img[None])[:, 1:]
            pred = mo.heads.image_decoder(tok, mask[i:i + 1])[0]
        errs = []
        for j in range(mask.shape[1]):
            if mask[i, j]:
                r, c = divmod(j, grid)
                target = x[i, :, r * p:(r + 1) * p, c * p:(c + 1) * p].permute(1, 2, 0).reshape(-1)
                errs.append(float(((pred[j] - target) ** 2).mean()))
        losses.append(sum(errs) / len(errs))
    return sum(losses) / len(losses)


def test_heldout_mim_matches_a_slow_computation_and_ignores_the_model():
    from train.options import MaskedObjectives, heldout_mask_count, heldout_masks

    cfg = _mmclip_cfg()
    x = torch.randn(5, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    mo = MaskedObjectives(cfg, "cxr", _vit_teacher(), x[0])
    mask = heldout_masks(5, 16, heldout_mask_count(16, cfg.mmclip), seed=11)
    got = mo.heldout_mim(x, seed=11, batch_size=2)
    assert got["mask_ratio"] == 0.5
    assert math.isclose(got["loss"], _slow_heldout(mo, x, mask), rel_tol=1e-5)
    # another model (other weights) is scored on the same masks: the decoder sees exactly them
    other = MaskedObjectives(cfg, "cxr", _vit_teacher(), x[0])
    torch.nn.init.normal_(other.heads.image_decoder.pos)
    masks_seen = []
    other.heads.image_decoder.register_forward_pre_hook(lambda mod, args: masks_seen.append(args[1].clone()))
    other.heldout_mim(x, seed=11, batch_size=5)
    assert torch.equal(masks_seen[0], mask)


def test_heldout_mim_hand_worked_with_a_zero_decoder():
    from train.options import MaskedObjectives, heldout_masks

    mo = MaskedObjectives(_mmclip_cfg(), "cxr", _vit_teacher(), torch.zeros(1, 32, 32))
    mo.heads.image_decoder.forward = lambda tokens, mask: torch.zeros(len(tokens), 16, 64)
    # images of constant value 1, 2, 3: every masked pixel misses by that value -> (1 + 4 + 9) / 3;
    # the visible-mean baseline predicts them exactly
    x = torch.stack([torch.full((1, 32, 32), v) for v in (1.0, 2.0, 3.0)])
    got = mo.heldout_mim(x, seed=0)
    assert math.isclose(got["loss"], 14 / 3, rel_tol=1e-6) and got["baseline"] == 0.0
    # an image whose patch j holds the value j: the baseline misses patch j by j - mean(visible)
    img = torch.arange(16.0).view(4, 4).repeat_interleave(8, 0).repeat_interleave(8, 1)[None, None]
    got = mo.heldout_mim(img, seed=0)
    m = heldout_masks(1, 16, 8, seed=0)[0].tolist()
    masked, visible = [j for j in range(16) if m[j]], [j for j in range(16) if not m[j]]
    mean_vis = sum(visible) / 8
    assert math.isclose(got["loss"], sum(j * j for j in masked) / 8, rel_tol=1e-6)
    assert math.isclose(got["baseline"], sum((j - mean_vis) ** 2 for j in masked) / 8, rel_tol=1e-6)


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
    assert math.isfinite(mm["heldout_mim_baseline"]) and 0 < mm["heldout_mask_ratio"] < 1
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
