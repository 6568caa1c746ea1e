"""Every metric of ``train.metrics`` against scikit-learn or a hand-worked case."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from train import metrics as M


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def _random_problem(rng, n=60, k=4):
    y = rng.integers(0, k, size=n)
    scores = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    return y, scores


def test_classification_metrics_match_sklearn(rng):
    for trial in range(5):
        y, scores = _random_problem(rng, n=40 + trial, k=3 + trial % 3)
        k = scores.shape[1]
        pred = scores.argmax(1)
        np.testing.assert_array_equal(M.confusion_matrix(y, pred, k),
                                      skm.confusion_matrix(y, pred, labels=range(k)))
        assert M.accuracy(y, pred) == pytest.approx(skm.accuracy_score(y, pred))
        assert M.macro_f1(y, pred, k) == pytest.approx(
            skm.f1_score(y, pred, average="macro", zero_division=0))
        assert M.macro_precision(y, pred, k) == pytest.approx(
            skm.precision_score(y, pred, average="macro", zero_division=0))
        assert M.balanced_accuracy(y, pred, k) == pytest.approx(skm.balanced_accuracy_score(y, pred))
        probs = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)
        assert M.ovr_auc(y, probs) == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr"))


def test_macro_f1_with_never_predicted_class():
    y = np.array([0, 0, 1, 1, 2])
    pred = np.array([0, 0, 0, 1, 0])  # class 2 never predicted, precision of 2 is 0
    assert M.macro_f1(y, pred, 3) == pytest.approx(skm.f1_score(y, pred, average="macro",
                                                               zero_division=0))
    assert M.macro_precision(y, pred, 3) == pytest.approx(
        skm.precision_score(y, pred, average="macro", zero_division=0))


def test_binary_auc_ties_and_hand_case():
    # Pairs (pos, neg): 0.8>0.3 yes, 0.8>0.5 yes, 0.5=0.5 half, 0.5>0.3 yes -> 3.5 / 4.
    y = np.array([1, 0, 1, 0])
    s = np.array([0.8, 0.3, 0.5, 0.5])
    assert M.binary_auc(y, s) == pytest.approx(0.875)
    assert M.binary_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s))
    assert np.isnan(M.binary_auc(np.ones(3), np.arange(3)))


def test_average_ranks_match_scipy(rng):
    from scipy.stats import rankdata

    x = rng.integers(0, 5, size=40).astype(float)  # many ties
    np.testing.assert_allclose(M.average_ranks(x), rankdata(x))


def test_ovr_auc_skips_absent_class(rng):
    y = np.array([0, 0, 1, 1, 0, 1])
    scores = rng.normal(size=(6, 3))
    expected = np.mean([skm.roc_auc_score(y == c, scores[:, c]) for c in (0, 1)])
    assert M.ovr_auc(y, scores) == pytest.approx(expected)


def test_per_label_auc_matches_sklearn(rng):
    y = rng.integers(0, 2, size=(50, 3))
    y[:, 2] = 0  # undefined label
    s = rng.normal(size=(50, 3)) + y
    aucs = M.per_label_auc(y, s)
    for j in range(2):
        assert aucs[j] == pytest.approx(skm.roc_auc_score(y[:, j], s[:, j]))
    assert np.isnan(aucs[2])


def test_chance_level():
    y = np.array([0, 0, 0, 1, 2])
    assert M.chance_level(y, 4, "majority") == pytest.approx(0.6)
    assert M.chance_level(y, 4, "uniform") == pytest.approx(0.25)
    with pytest.raises(ValueError):
        M.chance_level(y, 4, "other")


def test_dedupe_and_recall_with_duplicate_reports():
    texts = ["normal", "effusion", "normal", "mass"]
    uniq, inv = M.dedupe_texts(texts)
    assert uniq == ["normal", "effusion", "mass"]
    np.testing.assert_array_equal(inv, [0, 1, 0, 2])
    # Hand-built similarities: item x distinct text.
    sim = np.array([
        [0.9, 0.1, 0.0],   # item 0 (normal): rank 0
        [0.8, 0.5, 0.1],   # item 1 (effusion): rank 1
        [0.2, 0.3, 0.1],   # item 2 (normal): rank 1
        [0.7, 0.6, 0.5],   # item 3 (mass): rank 2
    ])
    rel = inv[:, None] == np.arange(3)[None]
    hits = M.recall_at_k(sim, rel, ks=(1, 2, 3))
    assert hits[1].tolist() == [1, 0, 0, 0]
    assert hits[2].tolist() == [1, 1, 1, 0]
    assert hits[3].tolist() == [1, 1, 1, 1]
    # text->item: "normal" is relevant to items 0 and 2 and counted once, as a single query.
    t2i = M.recall_at_k(sim.T, rel.T, ks=(1,))
    # normal: best item 0 (0.9) top -> hit; effusion: item 3 (0.6) beats item 1 (0.5) -> miss;
    # mass: item 3 (0.5) top -> hit.
    assert t2i[1].tolist() == [1, 0, 1]


def test_text_retrieval_matches_direct_computation(rng):
    emb = rng.normal(size=(5, 8))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    texts = ["a", "b", "a", "c", "b"]
    uniq, inv = M.dedupe_texts(texts)
    temb = np.stack([emb[inv == j].mean(0) for j in range(len(uniq))])  # texts near their items
    out = M.text_retrieval(emb, temb, inv, ks=(1, 3))
    assert out["i2t"][3].tolist() == [1.0] * 5  # only 3 distinct texts
    assert len(out["t2i"][1]) == 3


def test_ties_are_pessimistic():
    sim = np.zeros((2, 4))
    rel = np.array([[True, False, False, False], [False, False, False, True]])
    np.testing.assert_array_equal(M.first_relevant_rank(sim, rel), [3, 3])
    assert M.recall_at_k(sim, rel, ks=(1,))[1].sum() == 0


def test_rsum():
    assert M.rsum({"i2t": {1: 0.1, 5: 0.5}, "t2i": {1: 0.2, 5: 0.4}}) == pytest.approx(120.0)


def test_precision_at_k_hand_case():
    sim = np.array([[0.9, 0.8, 0.1, 0.5], [0.1, 0.2, 0.3, 0.4]])
    rel = np.array([[1, 0, 1, 1], [0, 0, 0, 1]], dtype=bool)
    # query 0 top-2: items 0,1 -> 1/2; query 1 top-2: items 3,2 -> 1/2
    np.testing.assert_allclose(M.precision_at_k(sim, rel, 2), [0.5, 0.5])
    # top-3: q0 items 0,1,3 -> 2/3; q1 3,2,1 -> 1/3
    np.testing.assert_allclose(M.precision_at_k(sim, rel, 3), [2 / 3, 1 / 3])
    # k beyond gallery size is capped
    np.testing.assert_allclose(M.precision_at_k(sim, rel, 10), [0.75, 0.25])
    assert M.precision_chance(rel) == pytest.approx((0.75 + 0.25) / 2)


def test_precision_chance_is_random_ranking_expectation(rng):
    rel = rng.random((20, 30)) < 0.3
    expected = M.precision_chance(rel)
    sims = [M.precision_at_k(rng.random((20, 30)), rel, 10).mean() for _ in range(400)]
    assert np.mean(sims) == pytest.approx(expected, abs=0.01)


def test_bootstrap_ci_coverage():
    """A 95% percentile interval of a Bernoulli mean covers the true mean about 95% of the time."""
    rng = np.random.default_rng(0)
    p, n, reps = 0.3, 200, 300
    covered = 0
    for r in range(reps):
        x = (rng.random(n) < p).astype(float)
        lo, hi = M.bootstrap_mean_ci(x, n_boot=400, seed=r)
        covered += lo <= p <= hi
    assert 0.90 <= covered / reps <= 0.99


def test_bootstrap_ci_generic_agrees_with_mean_version():
    x = np.random.default_rng(3).normal(size=100)
    a = M.bootstrap_mean_ci(x, n_boot=2000, seed=1)
    b = M.bootstrap_ci(np.mean, [x], n_boot=2000, seed=1)
    assert a[0] == pytest.approx(b[0], abs=0.03) and a[1] == pytest.approx(b[1], abs=0.03)
    assert a[0] < x.mean() < a[1]
    assert M.bootstrap_mean_ci(np.ones(10), n_boot=50) == (1.0, 1.0)
    assert np.isnan(M.bootstrap_mean_ci(np.array([]))[0])


def test_classification_cis_bracket_point_estimates(rng):
    y, scores = _random_problem(rng, n=80, k=3)
    point = M.classification_metrics(y, scores)
    cis = M.classification_cis(y, scores, n_boot=200)
    for key in ("accuracy", "macro_f1", "auc"):
        lo, hi = cis[key]
        assert lo <= point[key] <= hi, key


def test_weighted_bootstrap_statistics_equal_index_resampling(rng):
    """Each weighted statistic equals the plain one on the resample its weight row encodes."""
    y, scores = _random_problem(rng, n=30, k=3)
    scores = np.round(scores, 1)  # ties
    pred = scores.argmax(1)
    w = M.resample_counts(30, 25, np.random.default_rng(4))
    assert (w.sum(1) == 30).all()
    f1 = M.weighted_macro_f1(w.astype(float), y, pred, 3)
    auc = M.weighted_ovr_auc(w.astype(float), y, scores)
    for b in range(25):
        idx = np.repeat(np.arange(30), w[b])
        assert f1[b] == pytest.approx(M.macro_f1(y[idx], pred[idx], 3))
        assert auc[b] == pytest.approx(M.ovr_auc(y[idx], scores[idx]))
        assert M.weighted_binary_auc(w[b:b + 1].astype(float), y == 0, scores[:, 0])[0] == \
            pytest.approx(M.binary_auc(y[idx] == 0, scores[idx, 0]), nan_ok=True)


def test_label_auc_ci_agrees_with_generic_bootstrap(rng):
    y = rng.integers(0, 2, size=(80, 3))
    s = rng.normal(size=(80, 3)) + y
    fast = M.label_auc_ci(y, s, n_boot=1500, seed=0)
    slow = M.bootstrap_ci(M.mean_label_auc, [y, s], n_boot=1500, seed=1)
    assert fast[0] == pytest.approx(slow[0], abs=0.03) and fast[1] == pytest.approx(slow[1], abs=0.03)
    assert fast[0] < M.mean_label_auc(y, s) < fast[1]


def test_sample_support_and_few_shot_probe(rng):
    k = 3
    train_y = np.repeat(np.arange(k), 12)
    centres = rng.normal(size=(k, 6)) * 4
    train_x = centres[train_y] + rng.normal(size=(len(train_y), 6))
    test_y = np.repeat(np.arange(k), 10)
    test_x = centres[test_y] + rng.normal(size=(len(test_y), 6))
    idx = M.sample_support(train_y, 4, rng)
    assert np.bincount(train_y[idx]).tolist() == [4, 4, 4] and len(set(idx)) == 12
    assert M.sample_support(train_y, 13, rng) is None
    res = M.linear_probe_few_shot(train_x, train_y, test_x, test_y, shots=5, n_sets=6)
    assert len(res["accuracy"]) == 6
    assert np.mean(res["accuracy"]) > 0.8  # separable clusters
    assert M.linear_probe_few_shot(train_x, train_y, test_x, test_y, shots=20) is None


def test_prototype_classify_against_loop(rng):
    q = rng.normal(size=(4, 5))
    s = rng.normal(size=(9, 5))
    sy = np.array([0, 0, 1, 1, 1, 2, 2, 0, 1])
    excl = np.zeros((4, 9), dtype=bool)
    excl[0, [5, 6]] = True  # query 0 loses class 2 entirely
    excl[1, 0] = True
    out = M.prototype_classify(q, s, sy, 3, excl)
    for i in range(4):
        for c in range(3):
            members = s[(sy == c) & ~excl[i]]
            if len(members) == 0:
                assert out[i, c] == -np.inf
                continue
            proto = members.mean(0)
            assert out[i, c] == pytest.approx(q[i] @ proto / np.linalg.norm(proto))
