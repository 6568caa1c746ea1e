"""SeLIP components: clause extraction, TDC and the soft similarity matrix, distinct-text sampler, retrieval."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import data_registry.synthetic.reports as reports
from train.losses import selip_loss
from train.selip import (
    EXTRACTORS,
    Clause,
    ClauseParseError,
    DistinctTextBatchSampler,
    LLMExtractor,
    ReportSimilarity,
    RuleBasedExtractor,
    build_extractor,
    clause_similarity,
    distinct_texts,
    report_similarity,
    retrieval_topk,
    similarity_matrix,
    tdc,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- similarity


def test_tdc_hand_worked():
    assert tdc({"a", "b", "c"}, {"b", "c", "d", "e"}) == pytest.approx(4 / 7)
    assert tdc({"a"}, {"a"}) == 1.0
    assert tdc({"a"}, {"b"}) == 0.0
    assert tdc(set(), set()) == 0.0


C1 = Clause("FLAIR", "left", "frontal lobe", "hyperintense")
C2 = Clause("DWI", "left", "frontal lobe", "hyperintense")
C3 = Clause("T1", "right", "parietal lobe", "hypointense mass")
C4 = Clause("FLAIR", "left", "frontal lobe", "mildly hyperintense")


def test_clause_similarity_hand_worked():
    # C1 vs C2: 4 shared of 5+5 tokens -> TDC 0.8; same site and appearance -> ½·0.8·2
    assert clause_similarity(C1, C2) == pytest.approx(0.8)
    # C1 vs C4: 5 shared of 5+6 -> 10/11; same site, different appearance -> ½·(10/11)·1
    assert clause_similarity(C1, C4) == pytest.approx(5 / 11)
    # C1 vs C3: share only "lobe", neither site nor appearance agrees -> 0
    assert clause_similarity(C1, C3) == 0.0
    assert clause_similarity(C3, C3) == 1.0
    # normalisation of fields: case and punctuation do not matter for w_loc / w_per
    assert clause_similarity(
        C1, Clause("flair", "Left", "Frontal  lobe", "hyperintense.")
    ) == pytest.approx(1.0)


def test_similarity_matrix_three_tiny_reports():
    r1, r2, r3 = [C1], [C2], [C3, C4]
    s = similarity_matrix([r1, r2, r3])
    want = torch.tensor(
        [
            [1.0, 0.8, (0 + 5 / 11) / 2],
            [0.8, 1.0, (0 + 4 / 11) / 2],  # C2 vs C4: 4 shared of 5+6 -> 8/11, same site -> 4/11
            [(0 + 5 / 11) / 2, (0 + 4 / 11) / 2, (1 + 0 + 0 + 1) / 4],
        ]
    )
    assert torch.allclose(s, want, atol=1e-6)
    assert report_similarity(r3, r1) == pytest.approx(report_similarity(r1, r3))
    # the matrix feeds selip_loss (soft targets with a positive diagonal)
    img = torch.randn(3, 8, generator=gen(1))
    txt = torch.randn(3, 8, generator=gen(2))
    assert torch.isfinite(selip_loss(img, txt, s, 10.0))


def test_similarity_matrix_fallback_for_reports_without_clauses():
    s = similarity_matrix([[C1], [], [], [C2]], texts=["a", "Normal study.", "normal  study.", "b"])
    assert s[1, 1] == 1 and s[2, 2] == 1 and s[1, 2] == 1 and s[2, 1] == 1
    assert s[0, 1] == 0 and s[3, 2] == 0
    assert s[0, 3] == pytest.approx(0.8)


def test_report_similarity_caches_extraction():
    calls = []

    class Counting:
        def extract(self, report):
            calls.append(report)
            return RuleBasedExtractor().extract(report)

    rs = ReportSimilarity(Counting())
    texts = [
        "FLAIR: left frontal lobe shows hyperintense.",
        "DWI: left frontal lobe shows hyperintense.",
        "FLAIR: left frontal lobe shows hyperintense.",
    ]
    s = rs(texts)
    assert torch.allclose(s, similarity_matrix([[C1], [C2], [C1]]))
    rs(texts[:2])
    assert sorted(calls) == sorted(set(texts))  # each distinct text extracted once


# --------------------------------------------------------------------------- extractors


def test_rule_extractor_sentence_forms():
    text = (
        "History: suspected stroke. DWI: left frontoparietal cortex shows hyperintense, restricted diffusion. "
        "On FLAIR, mildly hyperintense in the left frontoparietal cortex. "
        "T2 deep white matter: hyperintense foci. Impression: acute infarct."
    )
    assert RuleBasedExtractor().extract(text) == [
        Clause("DWI", "left", "frontoparietal cortex", "hyperintense, restricted diffusion"),
        Clause("FLAIR", "left", "frontoparietal cortex", "mildly hyperintense"),
        Clause("T2", "", "deep white matter", "hyperintense foci"),
    ]
    assert RuleBasedExtractor().extract("Impression: normal study.") == []


def test_rule_extractor_recovers_the_simulated_clauses(monkeypatch):
    captured = []
    original = reports.mri_clauses

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        captured.append(out)
        return out

    monkeypatch.setattr(reports, "mri_clauses", spy)
    ex = build_extractor("rule")
    for seed in range(120):
        f = {
            "acute ischemic stroke": seed % 2,
            "white matter lesions": (seed // 2) % 2,
            "brain tumor": (seed // 4) % 2,
        }
        attrs = {
            "stroke_side": ("left", "right")[seed % 2],
            "territory": ("MCA", "PCA", "ACA")[seed % 3],
            "tumor_side": "right",
        }
        text = reports.mri_report(f, attrs, ("stroke", "hypertension"), np.random.default_rng(seed))
        want = [(seq, side, site, app) for seq, side, site, app in captured[-1]]
        # an omitted side is written only for bilateral findings
        got = [
            (c.modality, c.orientation or "bilateral", c.site, c.appearance)
            for c in ex.extract(text)
        ]
        assert got == want, text


def test_llm_extractor_with_a_local_callable():
    prompts = []

    def fake_llm(prompt: str) -> str:
        prompts.append(prompt)
        return (
            'Here you go:\n```json\n[{"modality": "FLAIR", "orientation": "left", "site": "frontal lobe", '
            '"appearance": "hyperintense"}, {"modality": "DWI", "site": "brain", "appearance": "normal"}]\n```'
        )

    ex = build_extractor("llm", generate=fake_llm)
    assert "llm" in EXTRACTORS and "rule" in EXTRACTORS
    got = ex.extract("FLAIR left frontal lobe: hyperintense.")
    assert got == [C1, Clause("DWI", "", "brain", "normal")]
    assert "FLAIR left frontal lobe: hyperintense." in prompts[0]
    for bad in ("no list here", "[{'modality': 1}]", '[{"modality": "T1"}]', '["x"]'):
        with pytest.raises(ClauseParseError):
            LLMExtractor(lambda p, b=bad: b).extract("x")
    with pytest.raises(ValueError):
        LLMExtractor(fake_llm, prompt="no field")


# --------------------------------------------------------------------------- sampler


def _check_epoch(batches, texts, batch_size):
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(texts)))  # covers the data, each item once
    for b in batches:
        assert 1 <= len(b) <= batch_size
        keys = [" ".join(texts[i].lower().split()) for i in b]
        assert len(set(keys)) == len(keys)  # never a repeated text within a batch


def test_distinct_text_sampler_properties():
    rng = np.random.default_rng(0)
    pool = [f"report {k}" for k in range(12)]
    texts = [pool[int(rng.integers(12))] for _ in range(57)] + ["Report 3", "report  3"]
    s = DistinctTextBatchSampler(texts, batch_size=8, generator=gen(0))
    epochs = [list(s) for _ in range(3)]
    for batches in epochs:
        _check_epoch(batches, texts, 8)
        assert len(batches) == len(s)
    assert epochs[0] != epochs[1]  # a fresh order each epoch
    again = DistinctTextBatchSampler(texts, batch_size=8, generator=gen(0))
    assert list(again) == epochs[0]  # deterministic given the generator


def test_distinct_text_sampler_with_a_dominant_text():
    texts = ["normal"] * 10 + [f"t{i}" for i in range(10)]
    s = DistinctTextBatchSampler(texts, batch_size=8, generator=gen(1))
    batches = list(s)
    _check_epoch(batches, texts, 8)
    assert len(batches) == 10  # the 10 copies of "normal" need 10 batches
    dl = DistinctTextBatchSampler(
        [f"t{i}" for i in range(20)], batch_size=8, generator=gen(2), drop_last=True
    )
    # ceil(20/8) = 3 batches of 7, 7, 6 -> none is full
    assert list(dl) == [] and len(dl) == 0
    full = DistinctTextBatchSampler(
        [f"t{i}" for i in range(24)], batch_size=8, generator=gen(2), drop_last=True
    )
    assert len(list(full)) == len(full) == 3


# --------------------------------------------------------------------------- retrieval


def test_distinct_texts_and_retrieval_topk_hand_worked():
    uniq, where = distinct_texts(["A b", "c", "a  B", "d"])
    assert uniq == ["A b", "c", "d"] and where.tolist() == [0, 1, 0, 2]
    txt = np.eye(4)
    img = np.array(
        [
            [1.0, 0.5, 0.2, 0.1],  # own text 0 -> rank 1
            [0.9, 0.1, 0.8, 0.0],  # own text 1 -> rank 3
            [0.3, 0.2, 0.1, 0.0],  # own text 3 -> rank 4
            [0.0, 0.5, 0.6, 0.0],  # own text 1 -> rank 2
        ]
    )
    got = retrieval_topk(img, txt, [0, 1, 3, 1], ks=(1, 2, 5, 10))
    assert got == {"Top-1": 0.25, "Top-2": 0.5, "Top-5": 1.0, "Top-10": 1.0}
    # independent: rank by argsort
    sims = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ txt.T
    ranks = [int(np.where(np.argsort(-sims[i]) == g)[0][0]) + 1 for i, g in enumerate([0, 1, 3, 1])]
    assert ranks == [1, 3, 4, 2]
