"""The FAISS vector index: exact vs brute force, IVF recall, removal, atomic persistence."""

from __future__ import annotations

import os

import numpy as np
import pytest

from m3bind.index import EXACT_MAX, MAGIC, VectorIndex, choose_kind, ivf_params


def unit(rng, n, d):
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def brute_force(vectors, ids, queries, k):
    """The obvious top-k by inner product."""
    sims = queries @ vectors.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), ids[order]


def clustered(rng, n, d, centres=50, spread=0.3):
    c = unit(rng, centres, d)
    v = c[rng.integers(0, centres, n)] + spread * rng.normal(size=(n, d)).astype(np.float32) / np.sqrt(d)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def test_flat_index_equals_brute_force():
    rng = np.random.default_rng(0)
    v, q = unit(rng, 500, 16), unit(rng, 20, 16)
    ids = rng.permutation(10_000)[:500].astype(np.int64)
    index = VectorIndex.build(v, ids)
    assert index.kind == "flat" and len(index) == 500
    scores, got = index.search(q, 5)
    want_s, want_ids = brute_force(v, ids, q, 5)
    np.testing.assert_array_equal(got, want_ids)
    np.testing.assert_allclose(scores, want_s, rtol=1e-5, atol=1e-6)


def test_search_pads_with_minus_one_when_fewer_than_k():
    rng = np.random.default_rng(1)
    index = VectorIndex.build(unit(rng, 3, 8), np.array([7, 8, 9]))
    scores, ids = index.search(unit(rng, 1, 8), 5)
    assert sorted(ids[0, :3].tolist()) == [7, 8, 9]
    assert ids[0, 3:].tolist() == [-1, -1] and np.isneginf(scores[0, 3:]).all()
    empty = VectorIndex()
    _, i = empty.search(unit(rng, 2, 8), 3)
    assert i.shape == (2, 3) and (i == -1).all()


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_remove_add_and_checksum(kind, tmp_path):
    rng = np.random.default_rng(2)
    v = clustered(rng, 2000, 16)
    ids = np.arange(100, 2100, dtype=np.int64)
    index = VectorIndex.build(v, ids, kind=kind)
    assert index.id_sum == int(ids.sum())
    assert index.remove(np.array([100, 101, 5])) == 2  # 5 was never there
    assert len(index) == 1998 and index.id_sum == int(ids.sum()) - 201
    assert index.contains(np.array([100, 102])).tolist() == [False, True]
    _, got = index.search(v[:2], 1)
    assert 100 not in got and 101 not in got
    index.add(v[:1], np.array([5000]))
    _, got = index.search(v[:1], 1)
    assert got[0, 0] == 5000
    path = tmp_path / "x.m3idx"
    index.save(path)
    again = VectorIndex.load(path)
    assert (again.kind, len(again), again.id_sum) == (kind, 1999, index.id_sum)
    np.testing.assert_array_equal(again.search(v[10:20], 3)[1], index.search(v[10:20], 3)[1])
    assert sorted(again.ids().tolist()) == sorted(index.ids().tolist())


def test_ivf_recall_against_exact():
    rng = np.random.default_rng(3)
    v = clustered(rng, 20_000, 32)
    ids = np.arange(len(v), dtype=np.int64)
    q = clustered(np.random.default_rng(4), 100, 32)
    exact = VectorIndex.build(v, ids, kind="flat")
    approx = VectorIndex.build(v, ids, kind="ivf")
    _, e = exact.search(q, 10)
    _, a = approx.search(q, 10)
    recall = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(e, a)])
    assert recall >= 0.9, recall


def test_kind_choice_and_params():
    assert choose_kind(EXACT_MAX) == "flat" and choose_kind(EXACT_MAX + 1) == "ivf"
    nlist, nprobe = ivf_params(1_000_000)
    assert nlist == 4000 and nprobe == 62
    assert ivf_params(10)[0] == 16


def test_save_is_atomic_and_load_rejects_junk(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    path = tmp_path / "a.m3idx"
    first = VectorIndex.build(unit(rng, 10, 8), np.arange(10))
    first.save(path)
    second = VectorIndex.build(unit(rng, 20, 8), np.arange(20))

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        second.save(path)
    monkeypatch.undo()
    assert len(VectorIndex.load(path)) == 10  # the old file is intact
    (tmp_path / "junk.m3idx").write_bytes(b"not an index")
    with pytest.raises(ValueError):
        VectorIndex.load(tmp_path / "junk.m3idx")
    data = path.read_bytes()
    assert data.startswith(MAGIC)
    (tmp_path / "cut.m3idx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        VectorIndex.load(tmp_path / "cut.m3idx")


def test_dimension_mismatch_is_an_error():
    index = VectorIndex.build(np.eye(4, dtype=np.float32), np.arange(4))
    with pytest.raises(ValueError):
        index.add(np.ones((1, 5), np.float32), np.array([9]))
    with pytest.raises(ValueError):
        index.search(np.ones((1, 5), np.float32), 1)


def test_calibrate_picks_smallest_nprobe_reaching_target():
    rng = np.random.default_rng(6)
    v = clustered(rng, 8_000, 32, centres=200, spread=1.0)
    ids = np.arange(100, 100 + len(v), dtype=np.int64)
    index = VectorIndex.build(v, ids, kind="ivf", nprobe=1)
    tried = index.calibrate(v, ids, target=0.9, queries=128, seed=1)
    p = index.nprobe
    assert index._index.nprobe == p and tried[p] >= 0.9
    assert all(r < 0.9 for q, r in tried.items() if q < p) and len(tried) > 1
    # independent leave-one-out recall at the chosen nprobe (same sample of queries)
    pick = np.random.default_rng(1).choice(len(v), 128, replace=False)
    _, want = brute_force(v, ids, v[pick], 11)
    _, got = index.search(v[pick], 11)
    rec = np.mean([len(set(w[1:]) & (set(g) - {ids[i]})) / 10 for w, g, i in zip(want, got, pick)])
    assert rec == pytest.approx(tried[p], abs=0.02)
