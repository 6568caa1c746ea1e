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


def test_prefix_cache_matches_full_encoder_and_trains_the_top_blocks(text_encoder):
    from train.stages.common import PrefixFeatureCache

    enc = text_encoder
    for p in enc.parameters():
        p.requires_grad_(True)
    freeze_text_layers(enc, 1)  # embeddings + block 0 frozen, block 1 and the head train
    enc.eval()
    keys = list(enc.state_dict())
    tables: dict = {}
    cache = PrefixFeatureCache(enc, batch_size=2, shared=tables)
    assert cache.k == 1
    with torch.no_grad():
        full = torch.nn.functional.normalize(enc(**enc.tokenize(TEXTS)).float(), dim=-1)
    got = cache(TEXTS + TEXTS[:1])
    assert torch.allclose(got[:3], full, atol=1e-5) and torch.allclose(got[3], got[0], atol=1e-6)
    assert len(cache.table) == 3 and list(enc.state_dict()) == keys  # modules restored after the call
    assert PrefixFeatureCache(enc, shared=tables).table is cache.table  # same frozen prefix: one table
    got.sum().backward()
    layers = transformer_layers(enc.backbone)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layers[1].parameters()
               if p.requires_grad and p.dim() > 1)
    assert all(p.grad is None for p in layers[0].parameters())
    # a different frozen prefix gets its own table
    with torch.no_grad():
        layers[0].attention.self.query.weight.add_(0.01)
    assert PrefixFeatureCache(enc, shared=tables).table is not cache.table
    with torch.no_grad():
        layers[0].attention.self.query.weight.sub_(0.01)
    for p in enc.parameters():
        p.requires_grad_(True)
        p.grad = None


def test_prefix_cache_without_frozen_prefix_runs_the_full_encoder(text_encoder):
    from train.stages.common import PrefixFeatureCache

    enc = text_encoder
    for p in enc.parameters():
        p.requires_grad_(True)
    enc.eval()
    cache = PrefixFeatureCache(enc)
    assert cache.k == 0
    with torch.no_grad():
        full = torch.nn.functional.normalize(enc(**enc.tokenize(TEXTS)).float(), dim=-1)
        assert torch.allclose(cache(TEXTS), full, atol=1e-6)
    assert not cache.table


def test_prompt_captions_one_prompt_per_label_and_deterministic():
    from m3bind.modalities import get_spec
    from train.stages.pretrain import prompt_captions

    texts = [f"report {i}" for i in range(6)]
    labels = ["no finding", "no finding", "cardiomegaly", "not a label", "cardiomegaly", "lung mass"]
    assert prompt_captions(texts, labels, "cxr", 0.0, 1) == texts
    out = prompt_captions(texts, labels, "cxr", 1.0, 1)
    templates = get_spec("cxr").templates
    prompts = {i: t for i, t in enumerate(out) if t != texts[i]}
    assert sorted(prompts) == [0, 2, 5]  # the first item of each zero-shot label; unknown labels keep reports
    assert all(any(t == tpl.format(labels[i]) for tpl in templates) for i, t in prompts.items())
    assert len(set(out)) == len(out)  # the batch's captions stay distinct
    assert prompt_captions(texts, labels, "cxr", 0.5, 7) == prompt_captions(texts, labels, "cxr", 0.5, 7)
    picked = [sum(t != r for t, r in zip(prompt_captions(texts, labels, "cxr", 0.5, s), texts))
              for s in range(200)]
    assert 0.3 < sum(picked) / (200 * 3) < 0.7  # about half of the eligible items


def test_shared_prefix_blocks_and_cache_of_frozen_teachers(text_encoder):
    import copy

    from train.stages.common import PrefixFeatureCache, shared_prefix_blocks

    a = copy.deepcopy(text_encoder).eval()
    b = copy.deepcopy(text_encoder).eval()
    for p in list(a.parameters()) + list(b.parameters()):
        p.requires_grad_(False)
    assert shared_prefix_blocks([a, b]) == 2  # identical everywhere: every block
    with torch.no_grad():
        transformer_layers(b.backbone)[1].output.dense.weight.add_(0.05)  # teachers differ in block 1
    assert shared_prefix_blocks([a, b]) == 1
    tables: dict = {}
    ca, cb = (PrefixFeatureCache(e, shared=tables, blocks=1) for e in (a, b))
    assert ca.k == cb.k == 1 and ca.table is cb.table
    with torch.no_grad():
        for enc, cache in ((a, ca), (b, cb)):
            full = torch.nn.functional.normalize(enc(**enc.tokenize(TEXTS)).float(), dim=-1)
            assert torch.allclose(cache(TEXTS), full, atol=1e-5)
        b.backbone.embeddings.word_embeddings.weight.add_(0.01)
    assert shared_prefix_blocks([a, b]) == 0
