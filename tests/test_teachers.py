"""Teacher loaders: Hugging Face CLIP dirs, open_clip checkpoints, factories, m3bind dirs (all offline)."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from m3bind.errors import ModelDirError
from m3bind.model import BoundModel, ModalityCLIP, load_model
from m3bind.teachers import TEACHER_FORMATS, TeacherSource, load_teacher

HAS_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None
TINY_OPEN_CLIP = {"embed_dim": 16,
                  "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
                  "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def bert_tokenizer():
    from transformers import AutoTokenizer

    from m3bind.encoders.text import default_text_path

    return AutoTokenizer.from_pretrained(default_text_path(), local_files_only=True)


def _pooled(out):
    # transformers 5 returns a model output from get_*_features, older versions a tensor
    return getattr(out, "pooler_output", out)


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory, bert_tokenizer):
    from transformers import CLIPConfig, CLIPModel

    tok = bert_tokenizer
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, eos_token_id=tok.sep_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    clip = CLIPModel(cfg).eval()
    d = tmp_path_factory.mktemp("hf") / "clip"
    clip.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d, clip


def test_formats_registered():
    assert set(TEACHER_FORMATS.names()) == {"m3bind", "hf_clip", "open_clip", "factory"}
    with pytest.raises(ValueError, match="needs path"):
        TeacherSource(format="hf_clip")
    with pytest.raises(ValueError, match="module:function"):
        TeacherSource(format="factory", factory="nocolon")


def test_hf_clip_dir_loads_and_matches_reference(hf_clip_dir, bert_tokenizer, tmp_path):
    d, clip = hf_clip_dir
    t = load_teacher(TeacherSource(format="hf_clip", modality="retina", path=str(d)))
    assert t.config.dim == 16 and t.config.preprocess["size"] == 32
    x = torch.randn(2, 3, 32, 32)
    texts = ["fundus photograph", "hypertensive retinopathy"]
    with torch.no_grad():
        want_img = F.normalize(_pooled(clip.get_image_features(pixel_values=x)), dim=-1)
        b = bert_tokenizer(texts, padding=True, return_tensors="pt")
        want_txt = F.normalize(_pooled(clip.get_text_features(input_ids=b["input_ids"],
                                                              attention_mask=b["attention_mask"])), dim=-1)
        assert torch.allclose(t.encode_image(x), want_img, atol=1e-6)
        assert torch.allclose(t.encode_text(texts), want_txt, atol=1e-6)
    assert float(t.logit_scale.detach()) == pytest.approx(float(clip.logit_scale.detach()))
    # bind it, save it as an m3bind model directory, and load that back bit-identically
    bound = BoundModel.from_teachers({"retina": t}, name="hfclip")
    loaded = load_model(bound.save(tmp_path / "bound"))
    assert torch.equal(loaded.embed_tensors("retina", x), bound.embed_tensors("retina", x))
    assert np.array_equal(loaded.embed_text(texts, "retina"), bound.embed_text(texts, "retina"))


def test_vision_text_dual_encoder_dir(tmp_path, bert_tokenizer):
    from transformers import BertConfig, ViTConfig, VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    cfg = VisionTextDualEncoderConfig.from_vision_text_configs(
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
                  patch_size=8),
        BertConfig(vocab_size=len(bert_tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=64),
        projection_dim=8)
    torch.manual_seed(0)
    model = VisionTextDualEncoderModel(config=cfg).eval()
    model.save_pretrained(tmp_path / "vtde", safe_serialization=True)
    bert_tokenizer.save_pretrained(tmp_path / "vtde")
    t = load_teacher(TeacherSource(format="hf_clip", modality="cxr", path=str(tmp_path / "vtde")))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = F.normalize(_pooled(model.get_image_features(pixel_values=x)), dim=-1)
        assert torch.allclose(t.encode_image(x), want, atol=1e-6)
        assert t.encode_text(["chest x-ray"]).shape == (1, 8)


def test_hf_clip_refuses_pickle_only_and_non_clip(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ModelDirError, match="refusing pickle"):
        load_teacher(TeacherSource(format="hf_clip", path=str(d)))
    with pytest.raises(ModelDirError, match="config.json missing"):
        load_teacher(TeacherSource(format="hf_clip", path=str(tmp_path / "none")))


@pytest.mark.skipif(not HAS_OPEN_CLIP, reason="optional open_clip_torch not installed")
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_open_clip_checkpoint(tmp_path, suffix):
    import open_clip
    from safetensors.torch import save_file

    cfg = TINY_OPEN_CLIP
    (tmp_path / "tiny-oc.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    ref = open_clip.CLIP(**cfg).eval()
    ck = tmp_path / f"tiny{suffix}"
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(sd, str(ck)) if suffix == ".safetensors" else torch.save({"state_dict": sd}, ck)
    t = load_teacher(TeacherSource(format="open_clip", modality="pathology", model_name="tiny-oc",
                                   checkpoint=str(ck), model_config=str(tmp_path / "tiny-oc.json")))
    x = torch.randn(2, 3, 32, 32)
    texts = ["an h&e image of high grade tumor.", "normal tissue"]
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    with torch.no_grad():
        assert torch.allclose(t.encode_image(x), ref.encode_image(x, normalize=True), atol=1e-6)
        assert torch.allclose(t.encode_text(texts), ref.encode_text(tok(texts), normalize=True), atol=1e-6)
    bound = BoundModel.from_teachers({"pathology": t})
    loaded = load_model(bound.save(tmp_path / "bound"))
    assert torch.equal(loaded.embed_tensors("pathology", x), bound.embed_tensors("pathology", x))
    assert np.array_equal(loaded.embed_text(texts, "pathology"), bound.embed_text(texts, "pathology"))


@pytest.mark.skipif(not HAS_OPEN_CLIP, reason="optional open_clip_torch not installed")
def test_open_clip_wrong_checkpoint(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    (tmp_path / "tiny-oc2.json").write_text(json.dumps(TINY_OPEN_CLIP))
    with pytest.raises(ModelDirError, match="does not fit"):
        load_teacher(TeacherSource(format="open_clip", model_name="tiny-oc2", checkpoint=str(tmp_path / "w.safetensors"),
                                   model_config=str(tmp_path / "tiny-oc2.json")))
    with pytest.raises(ModelDirError, match="unknown open_clip model"):
        load_teacher(TeacherSource(format="open_clip", model_name="nope", checkpoint=str(tmp_path / "w.safetensors")))


def test_factory_and_m3bind_formats(tmp_path, monkeypatch):
    from m3bind.testing import build_tiny_model

    d = build_tiny_model(tmp_path / "tiny", modalities=["cxr", "ecg"])
    t = load_teacher(TeacherSource(format="m3bind", modality="ecg", path=str(d)))
    ref = load_model(d)
    x = torch.randn(2, 12, 500)
    with torch.no_grad():
        assert torch.equal(t.encode_image(x), ref.embed_tensors("ecg", x))
        assert np.array_equal(t.encode_text(["sinus rhythm"]).numpy(), ref.embed_text(["sinus rhythm"]))
    with pytest.raises(ModelDirError, match="no ct encoder"):
        load_teacher(TeacherSource(format="m3bind", modality="ct", path=str(d)))

    mod = types.ModuleType("my_teachers")
    mod.make = lambda path, modality: load_teacher(TeacherSource(format="m3bind", modality=modality, path=path))
    mod.bad = lambda: "not a model"
    monkeypatch.setitem(sys.modules, "my_teachers", mod)
    t2 = load_teacher(TeacherSource(format="factory", modality="cxr", factory="my_teachers:make",
                                    params={"path": str(d), "modality": "cxr"}))
    assert isinstance(t2, ModalityCLIP) and t2.modality == "cxr"
    with pytest.raises(ModelDirError, match="not ModalityCLIP"):
        load_teacher(TeacherSource(format="factory", factory="my_teachers:bad"))
    with pytest.raises(ModelDirError, match="cannot import"):
        load_teacher(TeacherSource(format="factory", factory="no_such_module_xyz:f"))
