"""Encoders: registry, shapes, weights files, volume set pooling, ECG tokens, text pooling, heads."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from m3bind.encoders import ENCODERS, HeadConfig, ImageEncoderConfig, TextEncoderConfig, build_image_encoder
from m3bind.encoders.heads import build_head, l2_normalize
from m3bind.encoders.signal import ECGTransformer
from m3bind.encoders.text import build_text_encoder, pool
from m3bind.encoders.volume import SequenceSetEncoder
from m3bind.errors import ConfigError, ModelDirError


def test_registry_names():
    assert {"timm", "volume_cnn", "volume_vit", "ecg_transformer", "ecg_cnn", "hf_vision", "open_clip"} <= set(
        ENCODERS.names())
    with pytest.raises(KeyError, match="unknown encoder"):
        build_image_encoder(ImageEncoderConfig(arch="nope"))


@pytest.mark.parametrize("name", ["test_convnext", "test_vit", "test_efficientnet_gn"])
def test_timm_any_arch_grey_input(name):
    trunk = build_image_encoder(ImageEncoderConfig(arch="timm", name=name, in_chans=1)).eval()
    out = trunk(torch.randn(2, 1, 32, 32) if name != "test_vit" else torch.randn(2, 1, 160, 160))
    assert out.shape == (2, trunk.embed_dim)


def test_timm_unknown_and_dim_mismatch():
    with pytest.raises(ValueError, match="timm cannot build"):
        build_image_encoder(ImageEncoderConfig(arch="timm", name="no_such_net"))
    with pytest.raises(ValueError, match="embed_dim"):
        build_image_encoder(ImageEncoderConfig(arch="timm", name="test_convnext", embed_dim=7))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_timm_local_weights_file(tmp_path, suffix):
    torch.manual_seed(0)
    src = build_image_encoder(ImageEncoderConfig(arch="timm", name="test_convnext", in_chans=3)).eval()
    path = tmp_path / f"w{suffix}"
    sd = {k: v.contiguous() for k, v in src.model.state_dict().items()}  # a bare timm checkpoint
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": sd}, path)
    torch.manual_seed(1)
    cfg = ImageEncoderConfig(arch="timm", name="test_convnext", in_chans=3, weights=str(path))
    dst = build_image_encoder(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(src(x), dst(x))


def test_weights_file_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": ConfigError("x")}, path)  # needs full unpickling
    cfg = ImageEncoderConfig(arch="timm", name="test_convnext", weights=str(path))
    with pytest.raises(ModelDirError, match="cannot read weights"):
        build_image_encoder(cfg)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"unrelated": torch.zeros(2)}, str(wrong))
    with pytest.raises(ModelDirError, match="lacks"):
        build_image_encoder(ImageEncoderConfig(arch="timm", name="test_convnext", weights=str(wrong)))


def test_volume_cnn_and_vit_shapes():
    cnn = build_image_encoder(ImageEncoderConfig(arch="volume_cnn", in_chans=1, params={"widths": [4, 8]}))
    assert cnn(torch.randn(2, 1, 8, 32, 32)).shape == (2, 8)
    vit = build_image_encoder(ImageEncoderConfig(
        arch="volume_vit", in_chans=1,
        params={"img_size": [8, 32, 32], "patch_size": [4, 16, 16], "width": 16, "depth": 1, "heads": 2}))
    assert vit(torch.randn(2, 1, 8, 32, 32)).shape == (2, 16)
    with pytest.raises(ValueError, match="expects grid"):
        vit(torch.randn(1, 1, 8, 16, 16))
    with pytest.raises(ValueError, match="sequence_mode"):
        build_image_encoder(ImageEncoderConfig(arch="volume_cnn", params={"sequence_mode": "bag"}))


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_mri_set_pooling_matches_hand_computation(pooling):
    torch.manual_seed(0)
    enc = build_image_encoder(ImageEncoderConfig(
        arch="volume_cnn", in_chans=4, params={"widths": [4, 8], "sequence_mode": "set", "set_pooling": pooling}))
    assert isinstance(enc, SequenceSetEncoder)
    with torch.no_grad():
        enc.sequence_embed.normal_()
        x = torch.randn(1, 4, 4, 16, 16)
        x[:, 2] = 0  # sequence 2 missing
        out = enc(x)[0]
        feats = torch.stack([enc.trunk(x[:, c:c + 1])[0] + enc.sequence_embed[c] for c in (0, 1, 3)])
        if pooling == "mean":
            want = feats.mean(0)
        else:
            w = torch.softmax(enc.key(feats) @ enc.query / math.sqrt(enc.embed_dim), dim=0)
            want = (w[:, None] * feats).sum(0)
    assert torch.allclose(out, want, atol=1e-5)


def test_ecg_transformer_time_point_tokens():
    torch.manual_seed(0)
    enc = build_image_encoder(ImageEncoderConfig(
        arch="ecg_transformer", in_chans=12, params={"seq_len": 1000, "width": 16, "depth": 1, "heads": 2}))
    assert enc.token_embed.in_features == 12 and enc.encoder.pos_embed.shape[1] == 1001  # one token per time point
    x = torch.randn(2, 12, 1000)
    assert enc(x).shape == (2, 16)
    # patch_size p: token j holds time points j*p .. j*p+p-1 of all 12 leads, time-major
    p = ECGTransformer(seq_len=20, patch_size=5, width=8, depth=1, heads=2)
    x = torch.randn(1, 12, 20)
    seen = {}
    p.token_embed.register_forward_hook(lambda m, inp, out: seen.update(tokens=inp[0]))
    p(x)
    want = torch.stack([torch.cat([x[0, :, j * 5 + i] for i in range(5)]) for j in range(4)])
    assert torch.equal(seen["tokens"][0], want)
    with pytest.raises(ValueError, match="expects"):
        enc(torch.randn(1, 12, 999))


def test_ecg_cnn_shape():
    enc = build_image_encoder(ImageEncoderConfig(arch="ecg_cnn", in_chans=12, params={"widths": [8, 16]}))
    assert enc(torch.randn(3, 12, 500)).shape == (3, 16)


def test_pooling_hand_computed():
    h = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(pool(h, mask, "cls"), h[:, 0])
    assert torch.allclose(pool(h, mask, "mean"), torch.stack([h[0, :2].mean(0), h[1].mean(0)]))
    assert torch.equal(pool(h, mask, "eos"), torch.stack([h[0, 1], h[1, 2]]))
    with pytest.raises(ValueError):
        pool(h, mask, "pooler")


@pytest.fixture(scope="module")
def tiny_text():
    from m3bind.testing import tiny_text_config

    torch.manual_seed(0)
    return build_text_encoder(tiny_text_config(max_length=8), dim=16).eval()


def test_text_random_bert_from_minilm_tokenizer(tiny_text):
    assert tiny_text.backbone.config.num_hidden_layers == 2 and tiny_text.backbone.config.hidden_size == 64
    batch = tiny_text.tokenize(["a very long report " * 20, "short"])
    assert batch["input_ids"].shape[1] == 8  # max_length from config
    with torch.no_grad():
        out = tiny_text(**batch)
        hidden = tiny_text.backbone(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        want = tiny_text.head((hidden * m).sum(1) / m.sum(1))
    assert out.shape == (2, 16) and torch.allclose(out, want, atol=1e-6)


def test_text_pretrained_minilm_loads_offline():
    enc = build_text_encoder(TextEncoderConfig(arch="hf", pooling="mean", max_length=32), dim=8).eval()
    with torch.no_grad():
        a, b, c = l2_normalize(enc.features(**enc.tokenize(
            ["pleural effusion", "fluid in the pleural space", "the cat sat on the mat"])))
    assert float(a @ b) > float(a @ c)  # real pretrained sentence embeddings


def test_text_missing_dir(tmp_path):
    with pytest.raises(ModelDirError, match="not found"):
        build_text_encoder(TextEncoderConfig(path=str(tmp_path / "none")), dim=8)
    with pytest.raises(ValueError, match="pooling"):
        TextEncoderConfig(pooling="max")


def test_heads():
    x = torch.randn(4, 6)
    assert build_head(HeadConfig(kind="mlp", hidden=5), 6, 3)(x).shape == (4, 3)
    assert torch.equal(build_head(HeadConfig(kind="identity"), 6, 6)(x), x)
    with pytest.raises(ValueError):
        build_head(HeadConfig(kind="identity"), 6, 3)
    with pytest.raises(ValueError):
        HeadConfig(kind="conv")
    assert torch.allclose(l2_normalize(x).norm(dim=-1), torch.ones(4))
