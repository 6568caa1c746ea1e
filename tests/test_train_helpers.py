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


def test_prefix_fill_runs_only_the_frozen_blocks_and_warm_matches_on_demand(text_encoder):
    import copy

    from train.stages.common import PrefixFeatureCache

    enc = copy.deepcopy(text_encoder).eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    layers = transformer_layers(enc.backbone)
    ran: list[int] = []
    hooks = [layer.register_forward_hook(lambda *_a, i=i: ran.append(i)) for i, layer in enumerate(layers)]
    try:
        warm = PrefixFeatureCache(enc, blocks=1)
        warm.warm(TEXTS)
        assert set(ran) == {0} and len(warm.table) == 3  # filling ran block 0 only
        ran.clear()
        lazy = PrefixFeatureCache(enc, blocks=1)
        with torch.no_grad():
            got, want = warm(TEXTS[::-1]), lazy(TEXTS[::-1])
        assert set(ran) == {0, 1} and ran.count(0) == 1  # the call runs block 1; block 0 once, to fill
    finally:
        for h in hooks:
            h.remove()
    assert torch.allclose(got, want, atol=1e-6)
    for t in TEXTS:  # cached states: block 0's output for the text alone (no padding), unpadded
        with torch.no_grad():
            h = layers[0](enc.backbone.embeddings(input_ids=enc.tokenize([t])["input_ids"]))
        ref = (h[0] if isinstance(h, tuple) else h)[0]
        assert warm.table[t].shape == ref.shape and torch.allclose(warm.table[t], ref, atol=1e-5)


def test_text_feature_cache_warm_fills_every_text_once(text_encoder):
    import copy

    enc = copy.deepcopy(text_encoder).eval()
    for p in enc.backbone.parameters():
        p.requires_grad_(False)
    cache = TextFeatureCache(enc, batch_size=2)
    cache.warm(TEXTS + TEXTS)
    assert sorted(cache.table) == sorted(TEXTS)
    with torch.no_grad():
        full = torch.nn.functional.normalize(enc(**enc.tokenize(TEXTS)).float(), dim=-1)
        assert torch.allclose(cache(TEXTS), full, atol=1e-5)


def test_label_prompt_texts_join_the_shared_pools_only_when_asked():
    from m3bind import zeroshot
    from m3bind.modalities import get_spec
    from train.config import DataConfig
    from train.data import ModalityData, label_prompt_texts, shared_text_pools

    spec = get_spec("ct")
    prompts = label_prompt_texts("ct")
    for label in spec.labels:  # every text any zero-shot mode embeds for the default labels
        for mode in zeroshot.MODES:
            assert set(zeroshot.label_prompts("ct", [label], mode=mode)[label]) <= set(prompts)
    assert len(prompts) == len(set(prompts))
    train = {"ct": ModalityData("ct", torch.zeros(2, 1), ["r1", "r2"], ["normal", "normal"], ["a", "b"])}
    assert shared_text_pools(train, DataConfig())["ct"] == ["r1", "r2"]
    pooled = shared_text_pools(train, DataConfig(shared_prompts=True))["ct"]
    assert set(pooled) == {"r1", "r2"} | set(prompts) and pooled == sorted(pooled)


def test_checkpoints_hold_only_the_state_training_changes():
    from m3bind.errors import M3BindError
    from train.stages.common import _load_changing_state, changing_state

    def build():
        torch.manual_seed(3)
        m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
        m[0].weight.requires_grad_(False)
        m[0].bias.requires_grad_(False)
        return m

    trained = build()
    trained.train()
    with torch.no_grad():
        trained(torch.randn(8, 4))  # moves the BatchNorm statistics
        trained[2].weight.add_(1.0)
    saved = changing_state(trained)
    assert set(saved) == {"1.weight", "1.bias", "1.running_mean", "1.running_var",
                          "1.num_batches_tracked", "2.weight", "2.bias"}  # frozen layer 0 left out
    fresh = build()
    _load_changing_state(fresh, saved, "toy")
    for k, v in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    with pytest.raises(M3BindError):
        _load_changing_state(build(), {k: v for k, v in saved.items() if k != "2.weight"}, "toy")
