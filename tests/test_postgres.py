"""A shared archive on PostgreSQL: the throwaway server, several clients of one catalogue.

The server is Debian's postgresql, started by ``archive_support.postgres_server`` in a
temporary folder on a free port (as the ``postgres`` user when the tests run as root, since
initdb refuses root); ``M3BIND_TEST_POSTGRES_URL`` points at an existing server instead.
The catalogue and indexer tests also run on PostgreSQL (their ``postgres`` parameter).
"""

from __future__ import annotations

import numpy as np
import pytest
from archive_support import FakeModel, fresh_postgres_db, make_archive, postgres_server
from sqlalchemy import text

from data_registry.catalog import Catalog
from data_registry.indexer import index_archive
from data_registry.search import search

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_url(request):
    url = fresh_postgres_db(request.node.name)
    if url is None:
        pytest.skip("PostgreSQL is not installed (Debian package postgresql)")
    return url


def test_throwaway_server_answers(pg_url):
    assert postgres_server() is not None
    cat = Catalog(pg_url, index_dir="/nonexistent-unused")
    with cat.engine.connect() as conn:
        assert conn.dialect.name == "postgresql"
        assert "PostgreSQL" in conn.execute(text("SELECT version()")).scalar()
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0001"


def test_two_clients_share_one_archive(pg_url, tmp_path):
    """One machine indexes; another (its own FAISS cache, empty) searches the same catalogue."""
    root = make_archive(tmp_path / "a")
    writer = Catalog(pg_url, index_dir=tmp_path / "idx-writer")
    r = index_archive(root, writer, FakeModel(), workers=0)
    assert (r["added"], r["failed"]) == (8, 0)
    reader = Catalog(pg_url, index_dir=tmp_path / "idx-reader")
    assert reader.pseudonym("PAT-1") == writer.pseudonym("PAT-1")
    assert reader.stats() == writer.stats()
    q = str(root / "cxr" / "p1.png")
    a = search(writer, FakeModel(), q, "cxr", k=3)
    b = search(reader, FakeModel(), q, "cxr", k=3)
    assert a == b and a["results"][0]["path"] == q
    assert (tmp_path / "idx-reader").is_dir()  # rebuilt from the catalogue there
    res = search(reader, FakeModel(), q, "ecg", k=5, same_patient=True, nearest_in_time=True)
    assert [r["days_apart"] for r in res["results"]] == [-44]  # rec1 (2024-01-07) vs 2024-02-20


def test_vectors_round_trip_exactly(pg_url, tmp_path):
    root = make_archive(tmp_path / "a")
    cat = Catalog(pg_url, index_dir=tmp_path / "idx")
    index_archive(root, cat, FakeModel(), workers=0)
    from archive_support import vector_of
    from PIL import Image

    vecs, _ = cat.load_vectors("retina", "fake-0001")
    with Image.open(root / "fundus" / "eye.png") as im:
        want = vector_of(np.ascontiguousarray(np.asarray(im)).tobytes(), 8)
    np.testing.assert_array_equal(vecs[0], want)
