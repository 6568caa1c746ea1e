"""Training helpers: text-layer freezing, the frozen-backbone feature cache, stage-0 augmentation."""

from __future__ import annotations

import pytest
import torch

from m3bind.encoders.text import build_text_encoder
from m3bind.testing import tiny_text_config
from train.stages.common import TextFeatureCache, freeze_text_layers, transformer_layers
from train.stages.pretrain import augment_batch

TEXTS = ["no pleural effusion.", "cardiomegaly with small effusions.", "atrial fibrillation."]


@pytest.fixture(scope="module")
def text_encoder():
    torch.manual_seed(0)
    return build_text_encoder(tiny_text_config(), dim=16)


def _trainable(module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def test_freeze_lowest_layers_and_embeddings(text_encoder):
    enc = text_encoder
    for p in enc.parameters():
        p.requires_grad_(True)
    layers = transformer_layers(enc.backbone)
    assert layers is not None and len(layers) == 2
    n_frozen = freeze_text_layers(enc, 1)
    expected = sum(p.numel() for p in enc.backbone.embeddings.parameters()) + sum(
        p.numel() for p in layers[0].parameters())
    assert n_frozen == expected
    trainable = _trainable(enc)
    assert not any(".layer.0." in n or "embeddings" in n for n in trainable)
    assert any(".layer.1." in n for n in trainable) and any(n.startswith("head") for n in trainable)
    assert freeze_text_layers(enc, None) == 0
    for p in enc.parameters():
        p.requires_grad_(True)


def test_feature_cache_matches_full_encoder_and_trains_the_head(text_encoder):
    enc = text_encoder
    for p in enc.parameters():
        p.requires_grad_(True)
    freeze_text_layers(enc, 99)  # >= number of blocks: whole backbone frozen
    assert _trainable(enc) and all(n.startswith("head") for n in _trainable(enc))
    enc.eval()
    cache = TextFeatureCache(enc, batch_size=2)
    assert cache.frozen
    with torch.no_grad():
        tok = enc.tokenize(TEXTS)
        full = torch.nn.functional.normalize(enc(**tok).float(), dim=-1)
    cached = cache(TEXTS + TEXTS[:1])
    assert torch.allclose(cached[:3], full, atol=1e-6) and torch.equal(cached[3], cached[0])
    assert len(cache.table) == 3  # each distinct text computed once
    cached.sum().backward()
    head_grads = [p.grad for p in enc.head.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in head_grads)
    for p in enc.parameters():
        p.requires_grad_(True)
        p.grad = None


@pytest.mark.parametrize("modality,shape", [("cxr", (3, 1, 8, 8)), ("ecg", (3, 12, 50)),
                                             ("ct", (2, 1, 4, 6, 6))])
def test_augment_shift_permutes_values_and_is_deterministic(modality, shape):
    x = torch.randn(shape)
    y = augment_batch(x, modality, shift=0.3, noise=0.0, seed=7)
    assert y.shape == x.shape
    for a, b in zip(x, y):  # a circular shift only moves values
        assert torch.equal(torch.sort(a.flatten()).values, torch.sort(b.flatten()).values)
    assert torch.equal(y, augment_batch(x, modality, shift=0.3, noise=0.0, seed=7))
    assert augment_batch(x, modality, shift=0.0, noise=0.0, seed=7) is x
    z = augment_batch(x, modality, shift=0.0, noise=0.5, seed=1)
    assert 0.3 < float((z - x).std()) < 0.7
