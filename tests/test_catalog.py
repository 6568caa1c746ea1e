"""The catalogue: Alembic schema, SQLite settings, pseudonymous keys, stats (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import threading

import numpy as np
import pytest
from archive_support import catalog_url
from sqlalchemy import inspect, select, text

from data_registry.catalog import (
    Base,
    Catalog,
    Embedding,
    Failure,
    Item,
    Setting,
    insert_ids,
    make_engine,
    normalize_url,
    put_failures,
)
from m3bind.errors import ConfigError, M3BindError


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request, tmp_path):
    return catalog_url(request.param, tmp_path, "cat")


def test_migration_creates_exactly_the_orm_schema(url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    cat = Catalog(url)
    with cat.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diffs == []
        assert MigrationContext.configure(conn).get_current_revision() == "0001"
    names = set(inspect(cat.engine).get_table_names())
    assert {"settings", "patients", "studies", "series", "items", "embeddings",
            "zeroshot_labels", "failures", "alembic_version"} <= names


def test_pseudonym_is_hmac_sha256_with_the_archive_salt(url, tmp_path):
    cat = Catalog(url)
    salt = cat.get_setting("salt")
    assert salt and len(salt) == 64
    want = hmac.new(salt.encode(), b"patient:PAT-1", hashlib.sha256).hexdigest()[:32]
    assert cat.pseudonym("PAT-1") == want == cat.pseudonym(" PAT-1 ")
    assert cat.pseudonym("PAT-1", "study") != want
    assert Catalog(url).pseudonym("PAT-1") == want  # stable across opens
    other = Catalog(tmp_path / "other.db")
    assert other.pseudonym("PAT-1") != want  # per-archive salt


def test_root_binding_and_stats(url, tmp_path):
    cat = Catalog(url, index_dir=tmp_path / "idx")
    root = cat.bind_root(tmp_path)
    assert cat.root() == root == tmp_path.resolve()
    with pytest.raises(ConfigError):
        cat.bind_root(tmp_path / "elsewhere")
    now = dt.datetime(2024, 1, 1)
    with cat.session() as s:
        a = Item(path="a.png", kind="file", modality="cxr", size=1, mtime=0.0, fingerprint="f",
                 content_hash="h1", meta={}, indexed_at=now)
        b = Item(path="b.png", kind="file", modality="cxr", size=1, mtime=0.0, fingerprint="f",
                 content_hash="h2", meta={}, indexed_at=now)
        e = Item(path="e.hea", kind="wfdb", modality="ecg", size=1, mtime=0.0, fingerprint="f",
                 content_hash="h3", meta={"k": [1, 2]}, indexed_at=now)
        s.add_all([a, b, e])
        s.flush()
        s.add(Item(path="c.png", kind="file", modality="cxr", size=1, mtime=0.0, fingerprint="f",
                   content_hash="h1", meta={}, indexed_at=now, duplicate_of_id=a.id))
        s.add(Failure(path="junk", error="unrecognised", size=1, mtime=0.0, failed_at=now))
        vec = np.arange(4, dtype=np.float32)
        s.add(Embedding(item_id=a.id, model_key="m1", modality="cxr", dim=4, vector=vec.tobytes()))
    st = cat.stats()
    assert st["items"] == {"cxr": 2, "ecg": 1}
    assert (st["failed"], st["duplicates"], st["embeddings"]) == (1, 1, {"m1": 1})
    vecs, ids = cat.load_vectors("cxr", "m1")
    np.testing.assert_array_equal(vecs, [np.arange(4, dtype=np.float32)])
    assert cat.embedding_state("cxr", "m1") == (1, int(ids[0]))
    with cat.session() as s:
        assert s.scalar(select(Item.meta).where(Item.path == "e.hea")) == {"k": [1, 2]}


def test_sqlite_is_wal_with_busy_timeout_and_foreign_keys(tmp_path):
    cat = Catalog(tmp_path / "c.db")
    with cat.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 60000
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1


def test_urls_and_missing_catalogue(tmp_path):
    assert normalize_url(tmp_path / "x.db") == f"sqlite:///{(tmp_path / 'x.db').resolve()}"
    assert normalize_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    with pytest.raises(M3BindError, match="no such catalogue"):
        Catalog(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()
    cat = Catalog(f"sqlite:///{tmp_path / 'u.db'}")
    assert cat.index_dir == tmp_path / "u.db.index"
    assert make_engine("sqlite://").dialect.name == "sqlite"


def test_keep_phi_is_fixed_at_creation(tmp_path):
    assert Catalog(tmp_path / "a.db").keep_phi is False
    assert Catalog(tmp_path / "b.db", keep_phi=True).keep_phi is True
    assert Catalog(tmp_path / "b.db").keep_phi is True
    assert Catalog(tmp_path / "a.db", keep_phi=True).keep_phi is False  # not switched later


def test_concurrent_first_opens_migrate_once_and_share_one_salt(tmp_path):
    path = tmp_path / "race.db"
    salts, errors = [], []

    def open_it():
        try:
            salts.append(Catalog(path).get_setting("salt"))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(salts)) == 1
    with Catalog(path).session() as s:
        assert len(s.scalars(select(Setting)).all()) == 2  # salt, keep_phi


def test_insert_ids_gives_each_rows_new_id_in_a_few_statements(url):
    """Batched ``INSERT … RETURNING``: the id handed back for each key is the one a SELECT
    finds; 605 rows take a few statements (not one a row); repeated keys insert nothing."""
    from sqlalchemy import event

    cat = Catalog(url)
    now = dt.datetime(2024, 1, 1)
    paths = [f"p{k:03d}.png" for k in (7, 3, 9, 1, 5)] + [f"q{k:03d}" for k in range(600)]
    rows = [{"path": p, "kind": "file", "size": k, "mtime": 0.0, "fingerprint": "f",
             "content_hash": f"h{k}", "meta": {"k": k}, "indexed_at": now}
            for k, p in enumerate(paths)]
    statements = []
    event.listen(cat.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    with cat.session() as s:
        got = insert_ids(s, Item.__table__, rows, "path")
        assert insert_ids(s, Item.__table__, [], "path") == {}
    inserts = [st for st in statements if st.lstrip().upper().startswith("INSERT")]
    assert 1 <= len(inserts) <= 10
    with cat.session() as s:
        want = dict(s.execute(select(Item.path, Item.id)).tuples().all())
        meta = dict(s.execute(select(Item.path, Item.meta)).tuples().all())
    assert got == want and len(set(want.values())) == len(paths)
    assert meta["p003.png"] == {"k": 1}
    with pytest.raises(ValueError, match="repeats"), cat.session() as s:
        insert_ids(s, Item.__table__, [dict(rows[0], path="r.png"), dict(rows[1], path="r.png")],
                   "path")
    with cat.session() as s:
        assert s.scalar(select(Item.id).where(Item.path == "r.png")) is None


def test_put_failures_inserts_then_updates_one_row_per_path(url):
    cat = Catalog(url)
    t0, t1 = dt.datetime(2024, 1, 1), dt.datetime(2024, 1, 2)
    with cat.session() as s:
        put_failures(s, [("a", "bad a", 1, 1.0), ("b", "bad b", 2, 2.0)], t0)
    with cat.session() as s:  # "a" again (twice: the last word wins), "c" new
        put_failures(s, [("a", "worse a", 3, 3.0), ("c", "bad c", 4, 4.0),
                         ("a", "worst a", 5, 5.0)], t1)
        put_failures(s, [], t1)
    with cat.session() as s:
        rows = {f.path: (f.error, f.size, f.mtime, f.failed_at) for f in s.scalars(select(Failure))}
    assert rows == {"a": ("worst a", 5, 5.0, t1), "b": ("bad b", 2, 2.0, t0),
                    "c": ("bad c", 4, 4.0, t1)}
