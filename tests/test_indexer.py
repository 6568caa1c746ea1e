"""The archive walk and the incremental, resumable indexer (SQLite and PostgreSQL)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from archive_support import (
    FakeModel,
    catalog_url,
    make_archive,
    tiny_model_dir,
    write_dicom_series,
    write_png,
    write_wfdb,
)
from sqlalchemy import func, select

from data_registry.catalog import Catalog, Embedding, Failure, Item, Patient, Study, ZeroShotLabel
from data_registry.indexer import content_hash, index_archive, wfdb_links
from data_registry.scan import folder_hint, scan

FAKE = "archive_support:load"
TESTS = Path(__file__).parent


def faiss_consistent(cat: Catalog, model_key: str) -> None:
    """Every modality's FAISS file holds exactly the catalogue's embedding ids."""
    with cat.session() as s:
        mods = set(s.scalars(select(Embedding.modality).where(Embedding.model_key == model_key)))
    for m in mods:
        with cat.session() as s:
            want = set(s.scalars(select(Embedding.id).where(Embedding.model_key == model_key,
                                                            Embedding.modality == m)))
        from m3bind.index import VectorIndex

        path = cat.index_path(m, model_key)
        assert path.exists(), path
        assert set(VectorIndex.load(path).ids().tolist()) == want, m


def counts(cat: Catalog) -> dict[str, int]:
    with cat.session() as s:
        return {
            "items": s.scalar(select(func.count()).select_from(Item)),
            "paths": s.scalar(select(func.count(func.distinct(Item.path)))),
            "embeddings": s.scalar(select(func.count()).select_from(Embedding)),
            "embedded_items": s.scalar(select(func.count(func.distinct(Embedding.item_id)))),
            "failures": s.scalar(select(func.count()).select_from(Failure)),
        }


# --- the walk ---------------------------------------------------------------------------------
def test_scan_groups_series_records_and_studies(tmp_path):
    root = make_archive(tmp_path / "a")
    write_dicom_series(root / "cxr_dicom", 1, "P9", "9.1", "9.1.1", "20240101")  # single file
    (root / "notes.txt").write_text("ignored")
    cands, fails = scan(root)
    kinds = {c.rel: c.kind for c in cands}
    assert kinds == {
        "cxr/p0.png": "file", "cxr/p1.png": "file", "cxr/p2.png": "file",
        "fundus/eye.png": "file", "ct/series1": "dicom_series", "ecg/rec1.hea": "wfdb",
        "ecg/rec2.hea": "wfdb", "mri/s1": "mri_study", "cxr_dicom/slice000.dcm": "file"}
    assert fails == []
    by = {c.rel: c for c in cands}
    assert sorted(by["ecg/rec1.hea"].members) == ["ecg/rec1.dat", "ecg/rec1.hea"]
    assert len(by["ct/series1"].members) == 3
    assert by["cxr/p0.png"].hints == {"patient": "PAT-1", "study": "CXR-1", "date": "2024-01-06",
                                      "modality": "cxr"}
    assert by["fundus/eye.png"].hints == {"modality": "retina"}
    assert by["ct/series1"].size == sum((root / m).stat().st_size for m in by["ct/series1"].members)


def test_scan_records_links_out_of_root_loops_and_special_files(tmp_path):
    root = tmp_path / "a"
    write_png(root / "x.png", 0)
    outside = write_png(tmp_path / "outside.png", 1)
    (root / "escape.png").symlink_to(outside)
    (root / "sub").mkdir()
    (root / "sub" / "up").symlink_to(root)
    (root / "dangling.png").symlink_to(tmp_path / "missing.png")
    os.mkfifo(root / "pipe")
    (root / "inside.png").symlink_to(root / "x.png")
    cands, fails = scan(root)
    assert {c.rel for c in cands} == {"x.png", "inside.png"}
    errors = dict(fails)
    assert "outside the archive root" in errors["escape.png"]
    assert "loop" in errors["sub/up"]
    assert "broken" in errors["dangling.png"]
    assert "regular" in errors["pipe"]


def test_scan_skips_excluded_paths_through_links_and_reports_link_loops(tmp_path):
    """The walk resolves only links: an excluded path is skipped whether it is reached directly,
    through a link or through a broken link (the catalogue's ``-wal`` before it exists); a loop
    of file links is a failure, not a crash (``Path.resolve`` raised RuntimeError on it)."""
    root = tmp_path / "a"
    write_png(root / "cxr" / "x.png", 0)
    db = root / "cat.db"
    db.write_bytes(b"")
    (root / "cat.db.index").mkdir()
    (root / "cat.db.index" / "cxr.m3idx").write_bytes(b"")
    (root / "sub").mkdir()
    (root / "sub" / "to_db").symlink_to(db)
    (root / "sub" / "to_wal").symlink_to(root / "cat.db-wal")  # broken, and excluded
    (root / "sub" / "to_index").symlink_to(root / "cat.db.index")
    (root / "sub" / "gone.png").symlink_to(root / "missing.png")  # broken, not excluded
    (root / "sub" / "loop1").symlink_to(root / "sub" / "loop2")
    (root / "sub" / "loop2").symlink_to(root / "sub" / "loop1")
    (root / "viadir").symlink_to(root / "cxr")  # the same folder twice: the second is a loop
    exclude = (db, Path(f"{db}-wal"), root / "cat.db.index")
    cands, fails = scan(root, exclude=exclude)
    assert [c.rel for c in cands] == ["viadir/x.png"]  # "viadir" sorts after "cxr": popped first
    assert dict(fails) == {"sub/gone.png": "broken symbolic link",
                           "sub/loop1": "broken symbolic link", "sub/loop2": "broken symbolic link",
                           "cxr": "symbolic link loop (folder visited twice)"}
    _, fails = scan(root)  # without the exclusions the catalogue's files are walked
    assert dict(fails)["sub/to_wal"] == "broken symbolic link"
    assert "sub/to_db" in {c.rel for c in scan(root)[0]}
    import hashlib

    st = (root / "cxr" / "x.png").stat()  # the walk's stat gives size, mtime and fingerprint
    want = hashlib.sha256(f"viadir/x.png\0{st.st_size}\0{st.st_mtime_ns}\n".encode()).hexdigest()
    assert (cands[0].size, cands[0].mtime, cands[0].fingerprint) == (st.st_size, st.st_mtime, want)


def test_sidecar_paths_relative_to_the_root_as_relpath_gives_them(tmp_path):
    """read_sidecar's string arithmetic against os.path.relpath, the obvious version."""
    import os

    from data_registry.scan import read_sidecar

    root = (tmp_path / "archive").resolve()
    (root / "site").mkdir(parents=True)
    paths = ["a.dcm", "./b/c.png", "../site2/x.png", "../../outside.png", "b/../d.png", ".",
             "..", str(root / "site" / "abs.png"), str(tmp_path / "elsewhere.png"),
             "deep/../../up.png", "e f/g.hea"]
    csv_path = root / "site" / "m3bind_sidecar.csv"
    csv_path.write_text("path,patient,modality\n" + "".join(f"{p},P{i},cxr\n" for i, p in enumerate(paths)))
    want = {}
    for i, p in enumerate(paths):
        rel = os.path.relpath(os.path.normpath(csv_path.parent / p), root)
        if not rel.startswith("..") and rel != ".":  # the root itself is no item
            want[rel] = {"patient": f"P{i}", "modality": "cxr"}
    got = read_sidecar(csv_path, root)
    assert got == want
    assert set(got) == {"site", "site/a.dcm", "site/b/c.png", "site2/x.png", "site/d.png", "site/abs.png",
                        "up.png", "site/e f/g.hea"}


def test_folder_hints_and_wfdb_comment_links(tmp_path):
    assert folder_hint("data/Fundus/img.png") == "retina"
    assert folder_hint("x/ECG/rec.hea") == "ecg"
    assert folder_hint("misc/img.png") is None
    hea = write_wfdb(tmp_path, "r", 0, ["patient: P-77", "study_date: 2023-05-01", "age: 61"])
    assert wfdb_links(str(hea)) == {"patient": "P-77", "date": "2023-05-01"}


def test_content_hash_matches_for_copies_and_ignores_file_names(tmp_path):
    a = write_png(tmp_path / "a.png", 0)
    (tmp_path / "b.png").write_bytes(a.read_bytes())
    ha = content_hash(str(tmp_path), "file", "a.png", ["a.png"])
    assert ha == content_hash(str(tmp_path), "file", "b.png", ["b.png"])
    import hashlib

    assert ha == hashlib.sha256(a.read_bytes() + b"\1").hexdigest()
    write_dicom_series(tmp_path / "s1", 2, "P", "1", "1.1", "20240101")
    import shutil

    shutil.copytree(tmp_path / "s1", tmp_path / "s2")
    members = lambda d: sorted(f"{d}/{p.name}" for p in (tmp_path / d).iterdir())
    assert content_hash(str(tmp_path), "dicom_series", "s1", members("s1")) == \
        content_hash(str(tmp_path), "dicom_series", "s2", members("s2"))


# --- incremental indexing (fake model and PNG reader; both backends) ----------------------------
@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request):
    return request.param


def _png_archive(root: Path, n: int) -> Path:
    for i in range(n):
        write_png(root / "cxr" / f"{i:03d}.png", i)
    return root


def test_reindex_unchanged_adds_nothing_and_one_change_reindexes_one(backend, tmp_path):
    root = _png_archive(tmp_path / "a", 8)
    write_png(root / "fundus" / "f.png", 99, rgb=True)
    cat = Catalog(catalog_url(backend, tmp_path, "incr"), index_dir=tmp_path / "idx")
    model = FakeModel()
    first = index_archive(root, cat, model, workers=0, batch_size=3, loader=FAKE)
    assert first == {"added": 9, "skipped": 0, "failed": 0, "total": 9, "duplicates": 0,
                     "removed": 0}
    assert model.calls == 9
    faiss_consistent(cat, model.model_id)
    again = index_archive(root, cat, model, workers=0, batch_size=3, loader=FAKE)
    assert (again["added"], again["skipped"], again["total"]) == (0, 9, 9)
    assert model.calls == 9  # nothing decoded or embedded
    # touch without change: rehashed, not re-embedded
    os.utime(root / "cxr" / "001.png", (time.time() + 5, time.time() + 5))
    touched = index_archive(root, cat, model, workers=0, loader=FAKE)
    assert touched["added"] == 0 and model.calls == 9
    # one real change: exactly that file
    with cat.session() as s:
        old = s.scalar(select(Embedding.id).join(Item).where(Item.path == "cxr/002.png"))
    write_png(root / "cxr" / "002.png", 1002)
    changed = index_archive(root, cat, model, workers=0, loader=FAKE)
    assert (changed["added"], changed["skipped"]) == (1, 8) and model.calls == 10
    assert counts(cat)["embeddings"] == 9
    with cat.session() as s:
        new = s.scalar(select(Embedding.id).join(Item).where(Item.path == "cxr/002.png"))
    assert new != old
    faiss_consistent(cat, model.model_id)
    assert cat.stats()["items"] == {"cxr": 8, "retina": 1}


def test_duplicates_removal_and_promotion(backend, tmp_path):
    root = _png_archive(tmp_path / "a", 3)
    (root / "cxr" / "copy.png").write_bytes((root / "cxr" / "000.png").read_bytes())
    (root / "cxr" / "copy2.png").write_bytes((root / "cxr" / "000.png").read_bytes())
    cat = Catalog(catalog_url(backend, tmp_path, "dup"), index_dir=tmp_path / "idx")
    model = FakeModel()
    r = index_archive(root, cat, model, workers=0, loader=FAKE)
    assert (r["added"], r["skipped"], r["duplicates"]) == (3, 2, 2) and model.calls == 3
    assert cat.stats()["items"] == {"cxr": 3} and cat.stats()["duplicates"] == 2
    # the original goes: a copy inherits its vector (same FAISS id), nothing is re-embedded
    with cat.session() as s:
        eid = s.scalar(select(Embedding.id).join(Item).where(Item.path == "cxr/000.png"))
    (root / "cxr" / "000.png").unlink()
    r = index_archive(root, cat, model, workers=0, loader=FAKE)
    assert r["removed"] == 1 and r["added"] == 0 and model.calls == 3
    with cat.session() as s:
        heir = s.scalar(select(Item).join(Embedding).where(Embedding.id == eid))
        assert heir.path in ("cxr/copy.png", "cxr/copy2.png") and heir.duplicate_of_id is None
        other = s.scalar(select(Item).where(Item.path.in_(["cxr/copy.png", "cxr/copy2.png"]),
                                            Item.id != heir.id))
        assert other.duplicate_of_id == heir.id
    assert counts(cat)["embeddings"] == 3
    faiss_consistent(cat, model.model_id)
    # every copy gone: the vector goes too
    (root / "cxr" / "copy.png").unlink()
    (root / "cxr" / "copy2.png").unlink()
    r = index_archive(root, cat, model, workers=0, loader=FAKE)
    assert r["removed"] == 2 and counts(cat)["embeddings"] == 2
    faiss_consistent(cat, model.model_id)


def test_junk_is_recorded_and_retried_only_when_changed(backend, tmp_path):
    root = _png_archive(tmp_path / "a", 2)
    (root / "cxr" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    (root / "junk.bin").write_bytes(os.urandom(64))
    (root / "empty.dcm").write_bytes(b"")
    cat = Catalog(catalog_url(backend, tmp_path, "junk"), index_dir=tmp_path / "idx")
    model = FakeModel()
    r = index_archive(root, cat, model, workers=0, loader=FAKE)
    assert (r["added"], r["failed"]) == (2, 3)
    with cat.session() as s:
        errs = dict(s.execute(select(Failure.path, Failure.error)).all())
    assert set(errs) == {"cxr/bad.png", "junk.bin", "empty.dcm"}
    assert all(e and "\n" not in e for e in errs.values())
    r = index_archive(root, cat, model, workers=0, loader=FAKE)
    assert (r["added"], r["skipped"], r["failed"]) == (0, 2, 3)
    write_png(root / "cxr" / "bad.png", 50)  # repaired
    r = index_archive(root, cat, model, workers=0, loader=FAKE)
    assert (r["added"], r["failed"]) == (1, 2)
    assert cat.stats()["failed"] == 2
    (root / "junk.bin").unlink()
    index_archive(root, cat, model, workers=0, loader=FAKE)
    assert cat.stats()["failed"] == 1


def test_parallel_workers_give_the_same_catalogue(tmp_path, monkeypatch):
    monkeypatch.setattr("data_registry.indexer.POOL_MIN_ITEMS", 0)
    root = _png_archive(tmp_path / "a", 6)
    (root / "junk.bin").write_bytes(b"junk")
    inline = Catalog(tmp_path / "inline.db")
    pooled = Catalog(tmp_path / "pooled.db")
    index_archive(root, inline, FakeModel(), workers=0, loader=FAKE)
    r = index_archive(root, pooled, FakeModel(), workers=2, loader=FAKE)
    assert (r["added"], r["failed"]) == (6, 1)
    a, _ = inline.load_vectors("cxr", "fake-0001")
    b, _ = pooled.load_vectors("cxr", "fake-0001")
    with inline.session() as s1, pooled.session() as s2:
        order1 = [p for p, in s1.execute(select(Item.path).join(Embedding).order_by(Embedding.id))]
        order2 = [p for p, in s2.execute(select(Item.path).join(Embedding).order_by(Embedding.id))]
    np.testing.assert_array_equal(a[np.argsort(order1)], b[np.argsort(order2)])


def test_commits_group_embedding_batches_by_time_and_size(tmp_path, monkeypatch):
    """Embedded batches wait for a commit until COMMIT_EVERY_S passed or COMMIT_MAX_ITEMS
    wait; the catalogue and the FAISS files do not depend on how the commits fell."""
    import data_registry.indexer as ix

    root = _png_archive(tmp_path / "a", 13)
    sizes: list[int] = []
    commit = ix._Run.commit

    def counted(run):
        if run.pending:
            sizes.append(len(run.pending))
        commit(run)

    monkeypatch.setattr(ix._Run, "commit", counted)
    tables = []
    for every_s, most, expect in ((0.0, 500, [2, 2, 2, 2, 2, 2, 1]), (1e9, 5, [6, 6, 1])):
        monkeypatch.setattr(ix, "COMMIT_EVERY_S", every_s)
        monkeypatch.setattr(ix, "COMMIT_MAX_ITEMS", most)
        sizes.clear()
        cat = Catalog(tmp_path / f"c{most}.db")
        r = index_archive(root, cat, FakeModel(), workers=0, batch_size=2, loader=FAKE)
        assert r["added"] == 13 and sizes == expect
        faiss_consistent(cat, "fake-0001")
        with cat.session() as s:
            tables.append([tuple(row) for row in s.execute(
                select(Item.path, Item.modality, Item.content_hash, Embedding.id, Embedding.vector)
                .join(Embedding).order_by(Item.path))])
            tables[-1].append(sorted(s.execute(select(ZeroShotLabel.item_id, ZeroShotLabel.label,
                                                      ZeroShotLabel.score)).all()))
    assert tables[0] == tables[1]


def test_objects_older_than_a_run_are_frozen_during_it_only(tmp_path):
    """The collector leaves the process's older objects alone while a run lasts, and a process
    that froze objects itself keeps them frozen."""
    import gc

    class Watching(FakeModel):
        seen: list[int] = []

        def embed(self, samples, batch_size=32):
            self.seen.append(gc.get_freeze_count())
            return super().embed(samples, batch_size)

    root = _png_archive(tmp_path / "a", 3)
    assert gc.get_freeze_count() == 0
    model = Watching()
    index_archive(root, Catalog(tmp_path / "c.db"), model, workers=0, loader=FAKE)
    assert model.seen and min(model.seen) > 0 and gc.get_freeze_count() == 0
    gc.freeze()
    try:
        write_png(root / "cxr" / "new.png", 77)
        index_archive(root, Catalog(tmp_path / "c.db"), model, workers=0, loader=FAKE)
        assert gc.get_freeze_count() > 0  # not unfrozen by the run
    finally:
        gc.unfreeze()


def test_faiss_rebuilt_from_catalogue_when_missing_or_stale(tmp_path):
    root = _png_archive(tmp_path / "a", 5)
    cat = Catalog(tmp_path / "c.db")
    model = FakeModel()
    index_archive(root, cat, model, workers=0, loader=FAKE)
    path = cat.index_path("cxr", model.model_id)
    path.unlink()
    assert len(cat.vector_index("cxr", model.model_id)) == 5 and path.exists()
    # a stale file (an older state) is replaced
    from m3bind.index import VectorIndex

    vecs, ids = cat.load_vectors("cxr", model.model_id)
    VectorIndex.build(vecs[:2], ids[:2]).save(path)
    assert len(cat.vector_index("cxr", model.model_id)) == 5
    path.write_bytes(b"garbage")
    assert len(cat.vector_index("cxr", model.model_id)) == 5
    faiss_consistent(cat, model.model_id)


_KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from archive_support import SlowFakeModel
from data_registry.indexer import index_archive
index_archive({root!r}, {db!r}, SlowFakeModel(delay=0.15), workers=0, batch_size=2,
              loader="archive_support:load")
"""


@pytest.mark.slow
def test_kill_minus_nine_then_rerun_loses_and_duplicates_nothing(backend, tmp_path, monkeypatch):
    root = _png_archive(tmp_path / "a", 30)
    (root / "cxr" / "dup.png").write_bytes((root / "cxr" / "029.png").read_bytes())
    db = catalog_url(backend, tmp_path, "kill")
    # the FAISS files of a server catalogue live in ~/.cache: keep them in the test's folder
    monkeypatch.setenv("HOME", str(tmp_path))
    script = _KILL_SCRIPT.format(tests=str(TESTS), root=str(root), db=db)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        n = 0
        while time.time() < deadline:
            if backend == "postgres" or Path(db).exists():
                try:
                    with Catalog(db) as c:
                        n = counts(c)["embeddings"]
                except Exception:  # noqa: BLE001 - schema being created
                    n = 0
            if n >= 6:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "indexer finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    cat = Catalog(db)
    before = counts(cat)
    assert 6 <= before["embeddings"] < 30
    model = FakeModel()
    r = index_archive(root, cat, model, workers=0, loader=FAKE)
    assert r["added"] == 30 - before["embeddings"]
    assert r["total"] == 31 and r["failed"] == 0
    after = counts(cat)
    assert after == {"items": 31, "paths": 31, "embeddings": 30, "embedded_items": 30,
                     "failures": 0}
    assert cat.stats()["duplicates"] == 1
    faiss_consistent(cat, model.model_id)
    r = index_archive(root, cat, model, workers=0, loader=FAKE)
    assert (r["added"], r["skipped"]) == (0, 31)


# --- real readers and the tiny random model ----------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from m3bind.model import load_model

    return load_model(tiny_model_dir(tmp_path_factory.getbasetemp()))


def test_mixed_archive_with_real_readers_links_studies_without_phi(tiny_model, tmp_path):
    root = make_archive(tmp_path / "a")
    cat = Catalog(tmp_path / "c.db")
    r = index_archive(root, cat, tiny_model, workers=0, batch_size=4)
    assert r == {"added": 8, "skipped": 0, "failed": 0, "total": 8, "duplicates": 0, "removed": 0}
    assert cat.stats()["items"] == {"cxr": 3, "ct": 1, "ecg": 2, "mri": 1, "retina": 1}
    key1 = cat.pseudonym("PAT-1")
    with cat.session() as s:
        rows = s.execute(select(Item.path, Patient.key, Item.study_date)
                         .outerjoin(Patient, Patient.id == Item.patient_id)).all()
        pats = {p: k for p, k, _ in rows}
        dates = {p: d.isoformat() if d else None for p, _, d in rows}
        names = s.execute(select(Patient.name, Patient.birth_date)).all()
        uids = list(s.scalars(select(Study.uid)))
        meta = {p: m for p, m in s.execute(select(Item.path, Item.meta))}
    assert pats["ct/series1"] == pats["ecg/rec1.hea"] == pats["cxr/p0.png"] == key1
    assert pats["ecg/rec2.hea"] == pats["cxr/p2.png"] == cat.pseudonym("PAT-2") != key1
    assert pats["mri/s1"] is None
    assert dates["ct/series1"] == "2024-01-05" and dates["ecg/rec1.hea"] == "2024-01-07"
    assert all(n == (None, None) for n in names) and uids == [None] * len(uids)
    dump = repr(meta) + repr(rows)
    assert "PAT-1" not in dump and "Doe" not in dump
    assert cat.stats()["embeddings"] == {tiny_model.model_id: 8}
    faiss_consistent(cat, tiny_model.model_id)
    again = index_archive(root, cat, tiny_model, workers=0)
    assert (again["added"], again["skipped"]) == (0, 8)


def test_keep_phi_opt_in_stores_names(tiny_model, tmp_path):
    root = tmp_path / "a"
    write_dicom_series(root / "ct" / "s", 2, "PAT-9", "7.7", "7.7.1", "20230303", name="Roe^Rick")
    cat = Catalog(tmp_path / "c.db", keep_phi=True)
    index_archive(root, cat, tiny_model, workers=0)
    with cat.session() as s:
        p = s.scalar(select(Patient))
        assert (p.key, p.name, p.birth_date) == (cat.pseudonym("PAT-9"), "Roe^Rick", "19600101")
        assert s.scalar(select(Study.uid)) == "7.7"


@pytest.mark.slow
def test_a_reader_that_kills_its_worker_fails_only_its_file(tmp_path, monkeypatch):
    monkeypatch.setattr("data_registry.indexer.POOL_MIN_ITEMS", 0)
    root = _png_archive(tmp_path / "a", 4)
    write_png(root / "cxr" / "crash.png", 77)
    cat = Catalog(tmp_path / "c.db")
    r = index_archive(root, cat, FakeModel(), workers=2, loader="archive_support:crashing_load")
    assert (r["added"], r["failed"], r["total"]) == (4, 1, 5)
    with cat.session() as s:
        assert s.execute(select(Failure.path, Failure.error)).all() == [
            ("cxr/crash.png", "reader process crashed")]
    faiss_consistent(cat, "fake-0001")


def test_two_models_share_a_catalogue_and_the_catalogue_may_sit_in_the_root(tmp_path):
    root = _png_archive(tmp_path / "a", 4)
    cat = Catalog(root / "catalog.db")  # inside the archive: its own files are not items
    m1, m2 = FakeModel(model_id="m-one"), FakeModel(dim=6, model_id="m-two")
    assert index_archive(root, cat, m1, workers=0, loader=FAKE)["added"] == 4
    r = index_archive(root, cat, m2, workers=0, loader=FAKE)
    assert (r["added"], r["failed"], r["total"]) == (4, 0, 4)
    assert cat.stats()["embeddings"] == {"m-one": 4, "m-two": 4}
    assert index_archive(root, cat, m1, workers=0, loader=FAKE)["added"] == 0
    faiss_consistent(cat, "m-one")
    faiss_consistent(cat, "m-two")
    assert cat.vector_index("cxr", "m-two").dim == 6
    from m3bind.modalities import MODALITIES  # the run's one-query states equal the per-index ones

    for key in ("m-one", "m-two", "m-none"):
        each = {m: cat.embedding_state(m, key) for m in MODALITIES}
        assert cat.embedding_states(key) == {m: st for m, st in each.items() if st[0]}
        for m, st in each.items():  # against the stored rows themselves
            _, ids = cat.load_vectors(m, key)
            assert st == (len(ids), int(ids.sum()))
    assert len(cat.vector_index("ecg", "m-one", state=(0, 0))) == 0
    with cat.session() as s:
        assert all(p.startswith("cxr/") for p in s.scalars(select(Item.path)))


def test_links_from_the_readers_metadata_equal_the_header_links(tmp_path):
    """The indexer takes DICOM links from the one read of the reader (``keep_phi``); they must
    equal :func:`dicom_links`, an independent header read."""
    from data_registry.indexer import _dicom_meta_links, dicom_links
    from m3bind.io import load

    folder = tmp_path / "s"
    write_dicom_series(folder, 2, "PAT-3", "3.3", "3.3.1", "20220202", name="Poe^Pat")
    first = str(min(folder.iterdir()))
    want = dicom_links(first)
    assert want["patient"] == "PAT-3" and want["series"] == "3.3.1"
    assert _dicom_meta_links(load(folder, None, keep_phi=True).meta) == want
    assert _dicom_meta_links(load(first, None, keep_phi=True).meta) == want


def test_zero_shot_scores_copies_over_indexed_paths_and_files_turned_junk(tmp_path):
    """Stored zero-shot scores equal a softmax computed here, label by label, from the stored
    vector; a path rewritten with another item's bytes becomes its duplicate (its own vector
    goes); an indexed file turned junk loses its row, vector and labels to one failure row."""
    from m3bind.modalities import get_spec
    from m3bind.zeroshot import label_embeddings

    root = _png_archive(tmp_path / "a", 4)
    cat = Catalog(tmp_path / "z.db", index_dir=tmp_path / "idx")
    model = FakeModel()
    index_archive(root, cat, model, workers=0, batch_size=3, loader=FAKE)
    labels = list(get_spec("cxr").labels)
    lvec = np.asarray(label_embeddings(model, "cxr", labels), np.float64)
    with cat.session() as s:
        for iid, blob in s.execute(select(Embedding.item_id, Embedding.vector)):
            v = np.frombuffer(blob, np.float32).astype(np.float64)
            z = [model.logit_scale * float(row @ v) for row in lvec]
            e = [math.exp(x - max(z)) for x in z]
            got = dict(s.execute(select(ZeroShotLabel.label, ZeroShotLabel.score)
                                 .where(ZeroShotLabel.item_id == iid)).tuples().all())
            assert sorted(got) == sorted(labels)
            for name, x in zip(labels, e):
                assert got[name] == pytest.approx(x / sum(e), rel=1e-5, abs=1e-7)

    (root / "cxr" / "001.png").write_bytes((root / "cxr" / "000.png").read_bytes())
    r = index_archive(root, cat, model, workers=0, loader=FAKE)
    assert (r["added"], r["duplicates"], r["failed"]) == (0, 1, 0)
    with cat.session() as s:
        a, b = (s.scalar(select(Item).where(Item.path == p)) for p in ("cxr/000.png", "cxr/001.png"))
        assert b.duplicate_of_id == a.id and b.content_hash == a.content_hash
        assert b.modality == a.modality and b.meta == a.meta
    assert counts(cat)["embeddings"] == 3
    faiss_consistent(cat, model.model_id)

    (root / "cxr" / "002.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    r = index_archive(root, cat, model, workers=0, loader=FAKE)
    assert (r["added"], r["failed"]) == (0, 1)
    with cat.session() as s:
        assert s.scalar(select(Item).where(Item.path == "cxr/002.png")) is None
        assert s.scalar(select(func.count()).select_from(ZeroShotLabel)) == 2 * len(labels)
        assert list(s.scalars(select(Failure.path))) == ["cxr/002.png"]
    assert counts(cat)["embeddings"] == 2
    faiss_consistent(cat, model.model_id)


def test_label_embeddings_cached_per_model_and_prompts(tiny_model, tmp_path, monkeypatch):
    """The zero-shot label embeddings are read back from the catalogue folder only for the same
    model and prompts: the cached rows equal a fresh ``label_embeddings``; another prompt list,
    another label list or changed weights are embedded afresh; a damaged file is recomputed;
    an indexing run stores the same label scores with the cache as without it."""
    import copy

    import torch

    from data_registry import indexer
    from m3bind import zeroshot
    from m3bind.modalities import get_spec

    labels = list(get_spec("cxr").labels)
    calls = []
    real = zeroshot.label_embeddings

    def counted(*a, **k):
        calls.append(a[1])
        return real(*a, **k)

    monkeypatch.setattr(zeroshot, "label_embeddings", counted)
    folder = tmp_path / "idx"
    first = indexer.label_vectors(tiny_model, "cxr", labels, folder)
    assert np.array_equal(first, np.asarray(real(tiny_model, "cxr", labels), np.float32))
    assert np.array_equal(indexer.label_vectors(tiny_model, "cxr", labels, folder), first)
    assert len(calls) == 1 and len(list(folder.glob("labels--cxr--*.npy"))) == 1
    indexer.label_vectors(tiny_model, "cxr", labels[:3], folder)  # another label list
    assert len(calls) == 2
    prompts = zeroshot.label_prompts
    monkeypatch.setattr(zeroshot, "label_prompts",  # another prompt list (one more template)
                        lambda m, ls, *a, **k: {x: [*p, f"an image with {x}"]
                                                for x, p in prompts(m, ls, *a, **k).items()})
    changed = indexer.label_vectors(tiny_model, "cxr", labels, folder)
    assert len(calls) == 3 and not np.array_equal(changed, first)
    monkeypatch.setattr(zeroshot, "label_prompts", prompts)
    other = copy.deepcopy(tiny_model)  # another model: text weights changed, so its model_id
    other._model_id = None
    with torch.no_grad():
        next(iter(other.text_encoders[other.text_key("cxr")].parameters())).add_(0.5)
    assert other.model_id != tiny_model.model_id
    theirs = indexer.label_vectors(other, "cxr", labels, folder)
    assert len(calls) == 4 and not np.array_equal(theirs, first)
    assert np.array_equal(indexer.label_vectors(tiny_model, "cxr", labels, folder), first)
    assert len(calls) == 4  # the first model's file is still there
    for f in folder.glob("labels--cxr--*.npy"):
        f.write_bytes(b"\x93NUMPY garbage")
    assert np.array_equal(indexer.label_vectors(tiny_model, "cxr", labels, folder), first)
    assert len(calls) == 5

    root = tmp_path / "a"
    for k in range(3):
        write_png(root / "cxr" / f"p{k}.png", k)

    def scores(db):  # a new catalogue each time, its index folder shared
        cat = Catalog(tmp_path / db, index_dir=tmp_path / "shared")
        index_archive(root, cat, tiny_model, workers=0)
        with cat.session() as s:
            return sorted(s.execute(select(Item.path, ZeroShotLabel.label, ZeroShotLabel.score)
                                    .join(Item, Item.id == ZeroShotLabel.item_id)).tuples().all())

    calls.clear()
    digest = indexer._label_digest
    monkeypatch.setattr(indexer, "_label_digest", lambda *a: None)  # the path without a cache
    uncached = scores("u.db")
    assert calls == ["cxr"]
    monkeypatch.setattr(indexer, "_label_digest", digest)
    assert scores("c1.db") == uncached and calls == ["cxr", "cxr"]  # embedded, cached
    assert scores("c2.db") == uncached and calls == ["cxr", "cxr"]  # read back
    assert len(uncached) == 3 * len(labels)


def test_decoder_workers_import_neither_sqlalchemy_nor_torch():
    """A spawned decoder imports :mod:`data_registry.decode` only (its start-up cost)."""
    code = ("import sys, data_registry.decode as d; assert d.decode_task; "
            "print(sorted(m for m in ('sqlalchemy', 'torch', 'faiss') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=TESTS.parent)
    assert out.stdout.strip() == "[]"


def test_parse_date_fast_path_equals_strptime():
    """:func:`_parse_date` reads the usual spellings without strptime: it must give what the
    strptime-only parse gives, for valid, invalid and odd strings alike."""
    import datetime as dt
    import random

    from data_registry.indexer import _parse_date

    def by_strptime(text):
        if not text:
            return None
        t = str(text).strip()
        for fmt, n in (("%Y%m%d", 8), ("%Y-%m-%d", 10)):
            try:
                return dt.datetime.strptime(t[:n], fmt).date().isoformat()
            except ValueError:
                continue
        return None

    cases = [None, "", "20240105", "2024-01-07", " 2024-01-07T10:00 ", "20241301", "20230229",
             "2024-02-29", "2024-2-9", "2024019", "0000-01-01", "2024/01/05", "20240105123000"]
    rng = random.Random(0)
    for _ in range(3000):
        y, m, d = rng.randint(0, 9999), rng.randint(0, 13), rng.randint(0, 32)
        cases += [f"{y:04d}{m:02d}{d:02d}", f"{y:04d}-{m:02d}-{d:02d}", f"{y}-{m}-{d}",
                  "".join(rng.choice("0123456789- T") for _ in range(rng.randint(1, 12)))]
    assert [_parse_date(c) for c in cases] == [by_strptime(c) for c in cases]


def test_decoding_detects_each_file_once_and_reads_what_two_detections_read(tmp_path, monkeypatch):
    """With the library reader, a file item's format is detected once (the reader is handed
    the result); the decoded item equals that of the path that detects twice (any other loader)."""
    import m3bind.io
    from data_registry import decode

    root = make_archive(tmp_path / "a")
    cands, _ = scan(root)
    calls = []
    real_detect = m3bind.io.detect
    monkeypatch.setattr(m3bind.io, "detect", lambda p: calls.append(str(p)) or real_detect(p))

    def decode_all():
        calls.clear()
        out = {c.rel: decode.decode_task(str(root), c, None, decode.DEFAULT_LOADER) for c in cands}
        return out, {c.rel: sum(Path(p) == root / c.rel for p in calls) for c in cands}

    fast, fast_calls = decode_all()
    monkeypatch.setattr(decode, "_library_load", None)  # as for any other loader
    slow, slow_calls = decode_all()
    files = [c.rel for c in cands if c.kind == "file" and not c.rel.endswith(".dcm")]
    assert files and all(fast_calls[r] == 1 and slow_calls[r] == 2 for r in files)
    assert set(fast) == set(slow) == {c.rel for c in cands}
    for rel, a in fast.items():
        b = slow[rel]
        assert "error" not in a and a["links"] == b["links"] and a["meta"] == b["meta"], rel
        sa, sb = a["sample"], b["sample"]
        assert (sa.modality, sa.format, sa.modality_guess) == (sb.modality, sb.format,
                                                               sb.modality_guess), rel
        np.testing.assert_array_equal(sa.array, sb.array)
