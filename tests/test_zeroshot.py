"""Zero-shot: prompt construction, CLIP ensembling by hand, known-answer toy models, prompt files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from m3bind.errors import ConfigError, M3BindError
from m3bind.io.sample import Sample
from m3bind.modalities import SPECS
from m3bind.zeroshot import classify, ensemble, label_embeddings, label_prompts, load_prompt_file, parse_labels


class BagOfWordsModel:
    """A toy model: a text embeds as the normalised sum of one-hot word vectors; images are given."""

    def __init__(self, vocab: list[str], image: np.ndarray, scale: float = 10.0):
        self.vocab, self.image, self.scale, self.calls = vocab, image, scale, []

    def embed_text(self, texts, modality=None):
        self.calls.append((list(texts), modality))
        out = np.zeros((len(texts), len(self.vocab)), np.float32)
        for i, t in enumerate(texts):
            for w in t.replace(".", " ").split():
                out[i, self.vocab.index(w)] += 1
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def embed(self, samples):
        return np.stack([self.image for _ in samples])

    def logit_scale_for(self, modality):
        return self.scale


def onehot(vocab, word):
    v = np.zeros(len(vocab), np.float32)
    v[vocab.index(word)] = 1
    return v


def test_ensembling_equals_hand_computation():
    vocab = ["a", "b", "x", "y"]
    model = BagOfWordsModel(vocab, onehot(vocab, "x"))
    emb = label_embeddings(model, "cxr", ["x", "y"], templates=["a {}", "b {}"])
    # "a x" -> (e_a + e_x)/sqrt2, "b x" -> (e_b + e_x)/sqrt2; mean (e_a + e_b + 2 e_x)/(2 sqrt2); renormalised:
    assert np.allclose(emb[0], np.array([1, 1, 2, 0]) / math.sqrt(6), atol=1e-6)
    assert np.allclose(emb[1], np.array([1, 1, 0, 2]) / math.sqrt(6), atol=1e-6)
    ranked = classify(model, onehot(vocab, "x"), ["x", "y"], modality="cxr", templates=["a {}", "b {}"])
    logits = np.array([10 * 2 / math.sqrt(6), 0.0])
    want = np.exp(logits) / np.exp(logits).sum()
    assert [lab for lab, _ in ranked] == ["x", "y"]
    assert np.allclose([s for _, s in ranked], want, atol=1e-6)
    assert model.calls[-1] == (["a x", "b x", "a y", "b y"], "cxr")  # all prompts in one batch


def test_ensemble_is_mean_of_normalised_then_renormalised():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(5, 8)) * rng.uniform(0.5, 3, size=(5, 1))  # unequal norms
    slow = sum(v / np.sqrt((v * v).sum()) for v in e) / 5
    assert np.allclose(ensemble(e), slow / np.sqrt((slow * slow).sum()), atol=1e-6)


def test_modes_and_defaults():
    spec = SPECS["ecg"]
    p = label_prompts("ecg", ["atrial fibrillation", "my own label"], mode="expert")
    assert p["atrial fibrillation"] == list(spec.descriptions["atrial fibrillation"])
    assert p["my own label"] == [t.format("my own label") for t in spec.templates]  # no description: templates
    assert label_prompts("ecg", ["x"], mode="naive") == {"x": ["x"]}
    assert label_prompts("ecg", ["x"], mode="naive", prompts={"x": ["p1", "p2"]}) == {"x": ["p1", "p2"]}
    with pytest.raises(ConfigError, match="mode"):
        label_prompts("ecg", ["x"], mode="magic")
    with pytest.raises(ConfigError, match="placeholder"):
        label_prompts("ecg", ["x"], templates=["no slot"])
    assert parse_labels(" a, b ,,a,c ") == ["a", "b", "c"]
    with pytest.raises(ConfigError):
        parse_labels(" , ")


def test_toy_model_known_answer_with_default_labels():
    labels = list(SPECS["cxr"].labels)
    prompts = [t.format(lab) for lab in labels for t in SPECS["cxr"].templates]
    words = sorted({w for p in prompts for w in p.replace(".", " ").split()})
    model = BagOfWordsModel(words, onehot(words, "effusion"))
    ranked = classify(model, Sample(np.zeros((4, 4), np.float32), "cxr", "png", "x.png"))
    assert ranked[0][0] == "pleural effusion"
    assert sorted(lab for lab, _ in ranked) == sorted(labels)
    assert math.isclose(sum(s for _, s in ranked), 1.0, rel_tol=1e-6)
    with pytest.raises(M3BindError, match="modality unknown"):
        classify(model, Sample(np.zeros((4, 4), np.float32), None, "png", "x.png"))


def test_real_bound_model_built_to_know_the_answer():
    """Set the tiny model's CXR projection so that an image maps exactly onto one label's text embedding."""
    from m3bind.testing import build_tiny_bound_model

    model = build_tiny_bound_model(["cxr"], seed=0)
    labels = ["cardiomegaly", "pleural effusion", "lung mass"]
    text = label_embeddings(model, "cxr", labels)
    x = torch.randn(1, 1, 32, 32)
    enc = model.image_encoders["cxr"]
    with torch.no_grad():
        f = enc.trunk(x)[0]
        target = torch.from_numpy(text[1])
        enc.head[-1].weight.copy_(torch.outer(target, f) / (f @ f))  # W f = target
        emb = model.embed_tensors("cxr", x)[0].numpy()
    assert np.allclose(emb, text[1], atol=1e-4)
    ranked = classify(model, emb, labels, modality="cxr")
    assert ranked[0][0] == "pleural effusion"
    logits = model.logit_scale_for("cxr") * (text @ emb)
    want = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert np.allclose(dict(ranked)["lung mass"], want[2], atol=1e-5)


def test_prompt_files(tmp_path):
    (tmp_path / "p.yaml").write_text("cardiomegaly:\n  - big heart\n  - enlarged heart\neffusion: fluid\n")
    assert load_prompt_file(tmp_path / "p.yaml") == {"cardiomegaly": ["big heart", "enlarged heart"],
                                                     "effusion": ["fluid"]}
    (tmp_path / "p.json").write_text(json.dumps({"a": ["x y"]}))
    assert load_prompt_file(tmp_path / "p.json") == {"a": ["x y"]}
    for bad in ("[1, 2]", "a: []", "a: [3]", "{"):
        (tmp_path / "bad.yaml").write_text(bad)
        with pytest.raises(ConfigError):
            load_prompt_file(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError):
        load_prompt_file(tmp_path / "missing.yaml")
    vocab = ["big", "heart", "enlarged", "fluid"]
    model = BagOfWordsModel(vocab, onehot(vocab, "fluid"))
    ranked = classify(model, onehot(vocab, "fluid"), modality="cxr", prompts=load_prompt_file(tmp_path / "p.yaml"))
    assert [lab for lab, _ in ranked] == ["effusion", "cardiomegaly"]  # labels default to the file's
