"""ModalityCLIP, BoundModel, the model directory (save/load, refusals), embedding of Samples."""

from __future__ import annotations

import json
import math
import pickle
import shutil

import numpy as np
import pytest
import torch

from m3bind.errors import M3BindError, ModelDirError
from m3bind.io.sample import Sample
from m3bind.modalities import MODALITIES
from m3bind.model import BoundModel, ModalityCLIP, TeacherConfig, load_model
from m3bind.testing import (TINY_PREPROCESS, build_tiny_bound_model, build_tiny_model, tiny_image_config,
                            tiny_text_config)

DIM = 32


def batch(modality: str, n: int = 2) -> torch.Tensor:
    """A random preprocessed batch of the tiny model's shapes."""
    g = torch.Generator().manual_seed(hash(modality) % 1000)
    p = TINY_PREPROCESS[modality]
    shape = {"cxr": (1, p.get("size", 0), p.get("size", 0)), "retina": (3, p.get("size", 0), p.get("size", 0)),
             "pathology": (3, p.get("size", 0), p.get("size", 0)), "ct": (1, *p.get("grid", ())),
             "mri": (4, *p.get("grid", ())), "ecg": (12, int(p.get("fs", 0) * p.get("seconds", 0)))}[modality]
    return torch.randn(n, *shape, generator=g)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_bound_model(seed=0)


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    return tiny.save(tmp_path_factory.mktemp("m") / "tiny", provenance={"stage": "test", "metrics": {"a": 1}})


def test_embed_tensors_every_modality(tiny):
    assert tiny.modalities == list(MODALITIES) and tiny.dim == DIM and tiny.shared_text
    for m in MODALITIES:
        e = tiny.embed_tensors(m, batch(m))
        assert e.shape == (2, DIM) and e.dtype == torch.float32
        assert torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-5)
    t = tiny.embed_text(["cardiomegaly", "normal sinus rhythm", "x"])
    assert t.shape == (3, DIM) and np.allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)
    assert math.isclose(tiny.logit_scale, 1 / 0.07, rel_tol=1e-6)


def test_save_load_bit_identical(tiny, tiny_dir):
    loaded = load_model(tiny_dir)
    assert loaded.model_id == tiny.model_id and loaded.model_id.startswith("tiny-")
    assert loaded.preprocess_params == tiny.preprocess_params and loaded.logit_scale == tiny.logit_scale
    with torch.inference_mode():
        for m in MODALITIES:
            assert torch.equal(loaded.embed_tensors(m, batch(m)), tiny.embed_tensors(m, batch(m))), m
    texts = ["pleural effusion", "a tissue section with high grade tumor."]
    assert np.array_equal(loaded.embed_text(texts), tiny.embed_text(texts))
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["format_version"] == 1 and cfg["provenance"]["metrics"] == {"a": 1}
    assert cfg["preprocess"]["ct"]["grid"] == [8, 32, 32] and cfg["dim"] == DIM
    assert "image_cxr.safetensors" in cfg["files"] and "text_shared/tokenizer.json" in cfg["files"]
    import m3bind

    assert m3bind.load_model(tiny_dir).model_id == tiny.model_id


def test_tiny_model_deterministic_per_seed(tmp_path):
    a = build_tiny_model(tmp_path / "a", modalities=["cxr", "ecg"], seed=3)
    b = build_tiny_model(tmp_path / "b", modalities=["cxr", "ecg"], seed=3)
    c = build_tiny_model(tmp_path / "c", modalities=["cxr", "ecg"], seed=4)
    files = [json.loads((d / "config.json").read_text())["files"] for d in (a, b, c)]
    assert files[0] == files[1] and files[0] != files[2]
    assert load_model(a).modalities == ["cxr", "ecg"]


def _copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_refuses_missing_and_wrong_dirs(tmp_path, tiny_dir):
    with pytest.raises(ModelDirError, match="model directory not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelDirError, match="config.json missing"):
        load_model(tmp_path / "empty")
    d = _copy(tiny_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, format_version=99)))
    with pytest.raises(ModelDirError, match="unsupported model format version 99"):
        load_model(d)


@pytest.mark.parametrize("how", ["extra_pt", "pickle_bytes_in_recorded_file", "zip_container"])
def test_refuses_pickles(tmp_path, tiny_dir, how):
    d = _copy(tiny_dir, tmp_path)
    if how == "extra_pt":
        torch.save({"w": torch.zeros(1)}, d / "extra.pt")
    elif how == "pickle_bytes_in_recorded_file":
        (d / "text_shared" / "tokenizer.json").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    else:
        torch.save({"w": torch.zeros(1)}, d / "weights.safetensors")  # torch's zip format, renamed
    with pytest.raises(ModelDirError, match="pickle") as e:
        load_model(d)
    assert "\n" not in str(e.value)


def test_refuses_hash_mismatch_and_unrecorded_files(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path)
    f = d / "image_cxr.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF  # flip bits of the last weight byte
    f.write_bytes(bytes(raw))
    with pytest.raises(ModelDirError, match="does not match its recorded sha256: image_cxr.safetensors"):
        load_model(d)
    load_model(d, verify=False)  # still a valid safetensors file: the hash check is what caught it
    (d / "notes.txt").write_text("hi")
    with pytest.raises(ModelDirError, match="not in the manifest"):
        load_model(d, verify=False)


def _samples():
    rng = np.random.default_rng(0)
    return {
        "cxr": Sample(rng.random((60, 50), dtype=np.float32), "cxr", "png", "cxr.png"),
        "retina": Sample(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8), "retina", "jpeg", "f.jpg"),
        "pathology": Sample(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8), "pathology", "png", "t.png"),
        "ct": Sample(rng.normal(-500, 300, (12, 40, 40)).astype(np.float32), "ct", "dicom", "ct",
                     spacing=(5.0, 1.0, 1.0)),
        "mri": Sample(rng.random((2, 10, 40, 40), dtype=np.float32), "mri", "nifti", "mri",
                      spacing=(3.0, 1.0, 1.0), channel_names=["t1", "flair"]),
        "ecg": Sample(rng.normal(0, 0.3, (12, 5000)).astype(np.float32), "ecg", "wfdb", "ecg", sampling_rate=500.0,
                      lead_names=["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]),
    }


def test_embed_samples_routes_and_preprocesses(tiny):
    from m3bind.preprocess import preprocess

    samples = _samples()
    order = ["ecg", "cxr", "mri", "retina", "ct", "pathology", "cxr"]
    out = tiny.embed([samples[m] for m in order], batch_size=2)
    assert out.shape == (len(order), DIM) and out.dtype == np.float32
    for i, m in enumerate(order):
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in tiny.preprocess_params[m].items()}
        x = torch.from_numpy(preprocess(samples[m], **kw))
        want = tiny.embed_tensors(m, x if m == "pathology" else x[None])
        want = torch.nn.functional.normalize(want.mean(0), dim=0) if m == "pathology" else want[0]
        assert np.allclose(out[i], want.detach().numpy(), atol=1e-5), m


def test_embed_pathology_averages_tiles(tiny):
    rng = np.random.default_rng(1)
    tiles = rng.integers(0, 255, (3, 40, 40, 3), dtype=np.uint8)
    slide = Sample(tiles[0], "pathology", "wsi", "s.svs", tiles=tiles)
    per_tile = tiny.embed([Sample(t, "pathology", "png", f"{i}.png") for i, t in enumerate(tiles)])
    want = per_tile.mean(0) / np.linalg.norm(per_tile.mean(0))
    assert np.allclose(tiny.embed(slide)[0], want, atol=1e-5)


def test_embed_errors(tiny):
    s = _samples()["cxr"]
    with pytest.raises(M3BindError, match="modality unknown; pass --modality"):
        tiny.embed([Sample(s.array, None, "png", "x.png")])
    small = build_tiny_bound_model(["ecg"])
    with pytest.raises(M3BindError, match="no cxr encoder"):
        small.embed([s])


def test_bfloat16_autocast(tiny_dir, tiny):
    bf = load_model(tiny_dir, dtype="bfloat16")
    x = batch("ecg")
    e = bf.embed_tensors("ecg", x)
    assert e.dtype == torch.float32 and torch.allclose(e, tiny.embed_tensors("ecg", x), atol=0.05)
    assert not torch.equal(e, tiny.embed_tensors("ecg", x))  # it did run in bfloat16


def test_modality_clip_and_per_modality_text(tmp_path):
    teachers = {}
    for m in ("cxr", "ecg"):
        torch.manual_seed(MODALITIES.index(m))
        t = ModalityCLIP.from_config(TeacherConfig(modality=m, image=tiny_image_config(m), text=tiny_text_config(),
                                                   dim=16, preprocess=TINY_PREPROCESS[m]))
        teachers[m] = t
    t = teachers["cxr"]
    assert float(t.logit_scale.detach()) == pytest.approx(math.log(1 / 0.07))
    assert t.tokenizer is t.text_encoder.tokenizer
    img, txt, s = t(batch("cxr"), ["a", "b"])
    assert img.shape == txt.shape == (2, 16) and torch.allclose(txt.norm(dim=-1), torch.ones(2))
    with torch.no_grad():
        t.logit_scale.fill_(10.0)
    assert float(t.scale()) == 100.0  # CLIP's clamp
    bound = BoundModel.from_teachers(teachers)
    assert not bound.shared_text and bound.modalities == ["cxr", "ecg"]
    assert bound.logit_scale_for("cxr") == 100.0
    with pytest.raises(M3BindError, match="one text encoder per modality"):
        bound.embed_text(["x"])
    a, b = bound.embed_text(["x"], "cxr"), bound.embed_text(["x"], "ecg")
    assert not np.allclose(a, b)  # each modality has its own text encoder
    bound.embed_tensors("cxr", batch("cxr"))
    assert t.training and t.image_encoder.training  # binding/embedding leaves a training teacher training
    loaded = load_model(bound.save(tmp_path / "pm"))
    assert np.array_equal(loaded.embed_text(["x y"], "ecg"), bound.embed_text(["x y"], "ecg"))
    assert torch.equal(loaded.embed_tensors("ecg", batch("ecg")), bound.embed_tensors("ecg", batch("ecg")))
    with pytest.raises(ValueError, match="dimension"):
        other = ModalityCLIP.from_config(TeacherConfig(modality="ct", image=tiny_image_config("ct"),
                                                       text=tiny_text_config(), dim=8))
        BoundModel.from_teachers({"cxr": t, "ct": other})


@pytest.mark.parametrize("merge", [True, False])
def test_lora_merged_or_kept(tmp_path, merge):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = build_tiny_bound_model(["ecg"], seed=1)
    enc = model.text_encoders["shared"]
    enc.backbone = get_peft_model(enc.backbone, LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]))
    with torch.no_grad():
        for name, p in enc.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained-looking adapter (lora_B starts at zero)
    texts = ["consolidation", "no finding at all"]
    live = model.embed_text(texts)
    before = build_tiny_bound_model(["ecg"], seed=1).embed_text(texts)
    assert not np.allclose(live, before, atol=1e-3)  # the adapter changes the embedding
    d = model.save(tmp_path / "lora", merge_lora=merge)
    assert isinstance(enc.backbone, PeftModel)  # saving leaves the live model as it was
    loaded = load_model(d)
    cfg = json.loads((d / "config.json").read_text())
    if merge:
        assert cfg["lora"] == {"shared": "merged"} and not (d / "text_shared" / "adapter").exists()
        assert np.allclose(loaded.embed_text(texts), live, atol=1e-5)
    else:
        assert cfg["lora"] == {"shared": "adapter"}
        assert (d / "text_shared" / "adapter" / "adapter_model.safetensors").is_file()
        assert isinstance(loaded.text_encoders["shared"].backbone, PeftModel)
        assert np.array_equal(loaded.embed_text(texts), live)
    again = load_model(loaded.save(tmp_path / "again", merge_lora=merge))
    assert np.array_equal(again.embed_text(texts), loaded.embed_text(texts))


def test_save_refuses_to_overwrite_other_folders(tmp_path, tiny):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.csv").write_text("x")
    with pytest.raises(ModelDirError, match="refusing to overwrite"):
        tiny.save(tmp_path / "data")


def test_image_trunk_lora_is_merged_on_save(tmp_path):
    from peft import LoraConfig, inject_adapter_in_model

    model = build_tiny_bound_model(["ecg"], seed=2)
    trunk = model.image_encoders["ecg"].trunk
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["token_embed"]), trunk)
    with torch.no_grad():
        for name, p in trunk.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    x = batch("ecg")
    live = model.embed_tensors("ecg", x)
    loaded = load_model(model.save(tmp_path / "m"))
    assert not any("lora_" in n for n, _ in loaded.named_parameters())
    assert any("lora_" in n for n, _ in model.named_parameters())  # live model untouched
    assert torch.allclose(loaded.embed_tensors("ecg", x), live, atol=1e-5)
