"""Archive search: by file and text, exact against brute force, filters, same-patient links,
search while an indexer writes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from archive_support import FakeModel, make_archive, vector_of, write_png

from data_registry.catalog import Catalog
from data_registry.indexer import index_archive
from data_registry.search import search
from m3bind.errors import M3BindError, ModelDirError, UnsupportedFormat

TESTS = Path(__file__).parent


def fake_vector(path: Path, dim: int = 8) -> np.ndarray:
    """What FakeModel gives a PNG, computed independently of the catalogue."""
    from PIL import Image

    with Image.open(path) as im:
        return vector_of(np.ascontiguousarray(np.asarray(im)).tobytes(), dim)


@pytest.fixture
def pngs(tmp_path):
    root = tmp_path / "a"
    for i in range(12):
        write_png(root / "cxr" / f"{i:02d}.png", i)
    for i in range(4):
        write_png(root / "retina" / f"{i}.png", 100 + i, rgb=True)
    cat = Catalog(tmp_path / "c.db")
    index_archive(root, cat, FakeModel(), workers=0, loader="archive_support:load")
    return root, cat


def brute_force(root: Path, folder: str, q: np.ndarray, k: int) -> list[tuple[str, float]]:
    files = sorted((root / folder).glob("*.png"))
    scores = [(str(f), float(fake_vector(f) @ q)) for f in files]
    return sorted(scores, key=lambda t: -t[1])[:k]


def test_file_query_finds_itself_and_ranks_like_brute_force(pngs):
    root, cat = pngs
    query = root / "cxr" / "03.png"
    out = search(cat, FakeModel(), str(query), "cxr", k=5)["results"]
    assert out[0]["path"] == str(query) and out[0]["score"] == pytest.approx(1.0, abs=1e-5)
    want = brute_force(root, "cxr", fake_vector(query), 5)
    assert [r["path"] for r in out] == [p for p, _ in want]
    np.testing.assert_allclose([r["score"] for r in out], [s for _, s in want], atol=1e-5)
    assert all(set(r) >= {"path", "modality", "score", "patient", "study"} for r in out)


def test_cross_modal_and_text_queries(pngs, tmp_path):
    root, cat = pngs
    out = search(cat, FakeModel(), str(root / "cxr" / "00.png"), "retina", k=10)["results"]
    want = brute_force(root, "retina", fake_vector(root / "cxr" / "00.png"), 10)
    assert [r["path"] for r in out] == [p for p, _ in want] and len(out) == 4
    assert {r["modality"] for r in out} == {"retina"}
    q = vector_of(b"cardiomegaly", 8)
    out = search(cat, FakeModel(), "text: cardiomegaly", "cxr", k=3)["results"]
    assert [r["path"] for r in out] == [p for p, _ in brute_force(root, "cxr", q, 3)]
    # a file outside the archive is read and embedded
    outside = write_png(tmp_path / "query.png", 5)
    out = search(cat, FakeModel(), str(outside), "cxr", k=1, modality="cxr")["results"]
    assert out[0]["path"] == str(root / "cxr" / "05.png")  # identical pixels


def test_approximate_index_above_the_threshold(tmp_path, monkeypatch):
    import m3bind.index

    monkeypatch.setattr(m3bind.index, "EXACT_MAX", 20)
    root = tmp_path / "a"
    for i in range(40):
        write_png(root / "cxr" / f"{i:02d}.png", i)
    cat = Catalog(tmp_path / "c.db")
    model = FakeModel()
    index_archive(root, cat, model, workers=0, loader="archive_support:load")
    assert cat.vector_index("cxr", model.model_id).kind == "ivf"
    for i in (0, 17, 39):
        q = root / "cxr" / f"{i:02d}.png"
        assert search(cat, model, str(q), "cxr", k=1)["results"][0]["path"] == str(q)


@pytest.fixture
def linked(tmp_path):
    root = make_archive(tmp_path / "a")
    cat = Catalog(tmp_path / "c.db")
    index_archive(root, cat, FakeModel(), workers=0)
    return root, cat


def test_filters_by_patient_study_and_dates(linked):
    _, cat = linked
    m = FakeModel()
    q = "text:anything"
    res = search(cat, m, q, "cxr", k=10, patient="PAT-1")["results"]
    assert sorted(Path(r["path"]).name for r in res) == ["p0.png", "p1.png"]
    key = cat.pseudonym("PAT-1")
    assert {r["patient"] for r in res} == {key}
    assert search(cat, m, q, "cxr", k=10, patient=key)["results"] == res
    res = search(cat, m, q, "cxr", k=10, date_from="2024-02-01", date_to="2024-02-28")["results"]
    assert [Path(r["path"]).name for r in res] == ["p1.png"]
    res = search(cat, m, q, "cxr", k=10, study="CXR-1")["results"]
    assert [Path(r["path"]).name for r in res] == ["p0.png"]
    assert res[0]["study"] == cat.pseudonym("CXR-1", "study")
    assert search(cat, m, q, "cxr", k=10, patient="nobody")["results"] == []
    dump = repr(search(cat, m, q, "ecg", k=10))
    assert "PAT-1" not in dump and "PAT-2" not in dump


def test_same_patient_nearest_in_time(linked):
    root, cat = linked
    m = FakeModel()
    cxr = str(root / "cxr" / "p0.png")  # PAT-1, 2024-01-06
    res = search(cat, m, cxr, "ecg", k=1, same_patient=True, nearest_in_time=True)["results"]
    assert [(Path(r["path"]).name, r["days_apart"]) for r in res] == [("rec1.hea", 1)]
    res = search(cat, m, cxr, "cxr", k=5, same_patient=True, nearest_in_time=True)["results"]
    assert [(Path(r["path"]).name, r["days_apart"]) for r in res] == [("p0.png", 0), ("p1.png", 45)]
    res = search(cat, m, cxr, "ct", k=5, same_patient=True)["results"]
    assert [(Path(r["path"]).name, r["days_apart"]) for r in res] == [("series1", -1)]
    with pytest.raises(M3BindError, match="same-patient"):
        search(cat, m, str(root / "mri" / "s1"), "ct", same_patient=True)


def test_bad_queries(pngs, tmp_path):
    _, cat = pngs
    with pytest.raises(M3BindError, match="unknown target"):
        search(cat, FakeModel(), "text:x", "eeg")
    with pytest.raises(UnsupportedFormat):
        search(cat, FakeModel(), str(tmp_path / "nope.png"), "cxr")
    with pytest.raises(M3BindError, match="empty"):
        search(cat, FakeModel(), "text:  ", "cxr")
    with pytest.raises(ModelDirError):
        search(cat, FakeModel(model_id="other-model"), "text:x", "cxr")
    with pytest.raises(M3BindError, match="no such catalogue"):
        search(tmp_path / "none.db", FakeModel(), "text:x", "cxr")


_INDEX_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from archive_support import SlowFakeModel
from data_registry.indexer import index_archive
print(index_archive({root!r}, {db!r}, SlowFakeModel(delay=0.05), workers=0, batch_size=2,
                    loader="archive_support:load"))
"""


@pytest.mark.slow
def test_search_while_indexing(tmp_path):
    root = tmp_path / "a"
    for i in range(30):
        write_png(root / "cxr" / f"{i:02d}.png", i)
    db = tmp_path / "c.db"
    Catalog(db)  # created first, as an existing archive would be
    proc = subprocess.Popen(
        [sys.executable, "-c", _INDEX_SCRIPT.format(tests=str(TESTS), root=str(root), db=str(db))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        while proc.poll() is None:
            res = search(db, FakeModel(), "text:effusion", "cxr", k=3)["results"]
            seen.append(len(res))
            for r in res:
                assert Path(r["path"]).exists()
            time.sleep(0.02)
    finally:
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "'added': 30" in out
    assert len(seen) >= 3 and any(0 < n for n in seen)
    assert len(search(db, FakeModel(), "text:effusion", "cxr", k=100)["results"]) == 30
