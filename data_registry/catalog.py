"""The study-archive catalogue: a SQLAlchemy 2.x schema, migrated by Alembic on open.

One catalogue describes one archive root. Its tables:

* ``settings`` — per-archive key/values: the HMAC salt of pseudonymous keys, the archive root,
  whether PHI is kept (opt-in).
* ``patients`` — a pseudonymous ``key`` (HMAC-SHA256 of the patient id with the archive salt);
  ``name``/``birth_date`` only when the archive was created with ``keep_phi=True``.
* ``studies`` / ``series`` — keyed the same way from the study/series identifiers.
* ``items`` — one indexed unit (a file, a DICOM series folder, a WFDB record, an MRI study
  folder): path relative to the root, size, mtime, a fingerprint of its member files, content
  hash, modality, format, reader metadata, study date; ``duplicate_of_id`` points to the item
  that already holds identical content.
* ``embeddings`` — one vector per (item, model key); the FAISS id of a vector is the embedding
  row id, so the FAISS files are a cache that can always be rebuilt from this table.
* ``zeroshot_labels`` and ``failures`` (path, error, time).

A plain file path means SQLite (WAL mode, busy timeout, so a search can run while an indexer
writes); any SQLAlchemy URL works, PostgreSQL (``postgresql+psycopg://``) for a shared archive.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import logging
import os
import secrets
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
from sqlalchemy import (
    JSON,
    BigInteger,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from m3bind.errors import ConfigError, M3BindError

log = logging.getLogger(__name__)

#: Seconds a SQLite connection waits for a writer's lock before giving up.
BUSY_TIMEOUT_S = 60.0


class Base(DeclarativeBase):
    """Declarative base of the catalogue tables."""


class Setting(Base):
    """A per-archive key/value (salt, root, keep_phi)."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Patient(Base):
    """A patient under a pseudonymous key; identifying fields only with the PHI opt-in."""

    __tablename__ = "patients"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str | None] = mapped_column(String(256), nullable=True)
    birth_date: Mapped[str | None] = mapped_column(String(32), nullable=True)


class Study(Base):
    """A study (DICOM study, WFDB ``study:`` comment or sidecar ``study`` column)."""

    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[int | None] = mapped_column(ForeignKey("patients.id"), nullable=True, index=True)
    study_date: Mapped[dt.date | None] = mapped_column(Date, nullable=True)
    uid: Mapped[str | None] = mapped_column(String(128), nullable=True)


class Series(Base):
    """A DICOM series (or the single series of a non-DICOM item)."""

    __tablename__ = "series"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), nullable=True, index=True)
    modality: Mapped[str | None] = mapped_column(String(16), nullable=True)


class Item(Base):
    """One indexed unit of the archive."""

    __tablename__ = "items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(String(1024), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    modality: Mapped[str | None] = mapped_column(String(16), nullable=True, index=True)
    format: Mapped[str | None] = mapped_column(String(16), nullable=True)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime: Mapped[float] = mapped_column(Float)
    fingerprint: Mapped[str] = mapped_column(String(64))
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    study_date: Mapped[dt.date | None] = mapped_column(Date, nullable=True, index=True)
    patient_id: Mapped[int | None] = mapped_column(ForeignKey("patients.id"), nullable=True, index=True)
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), nullable=True, index=True)
    series_id: Mapped[int | None] = mapped_column(ForeignKey("series.id"), nullable=True)
    duplicate_of_id: Mapped[int | None] = mapped_column(
        ForeignKey("items.id"), nullable=True, index=True)
    indexed_at: Mapped[dt.datetime] = mapped_column(DateTime)


class Embedding(Base):
    """The vector of one item under one model; ``id`` is the vector's FAISS id."""

    __tablename__ = "embeddings"
    __table_args__ = (
        UniqueConstraint("item_id", "model_key", name="uq_embedding_item_model"),
        Index("ix_embedding_model_modality", "model_key", "modality"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    model_key: Mapped[str] = mapped_column(String(128))
    modality: Mapped[str] = mapped_column(String(16))
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class ZeroShotLabel(Base):
    """A zero-shot label score of one item under one model."""

    __tablename__ = "zeroshot_labels"
    __table_args__ = (UniqueConstraint("item_id", "model_key", "label", name="uq_label"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    model_key: Mapped[str] = mapped_column(String(128))
    label: Mapped[str] = mapped_column(String(128))
    score: Mapped[float] = mapped_column(Float)


class Failure(Base):
    """A path that could not be indexed, with its one-line error."""

    __tablename__ = "failures"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(String(1024), unique=True)
    error: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger, default=-1)
    mtime: Mapped[float] = mapped_column(Float, default=-1.0)
    failed_at: Mapped[dt.datetime] = mapped_column(DateTime)


def normalize_url(catalog: str | os.PathLike) -> str:
    """A SQLAlchemy URL for ``catalog``: URLs pass through, plain paths become SQLite files."""
    text = os.fspath(catalog)
    if "://" in text:
        return text
    return f"sqlite:///{Path(text).expanduser().resolve()}"


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL mode, a busy timeout and foreign keys."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


_THREAD_LOCK = threading.Lock()  # flock serialises processes, not threads of one process


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """Serialise migrations of one catalogue across processes (a lock file beside a SQLite
    file; PostgreSQL takes a transaction-level advisory lock itself)."""
    u = make_url(str(engine.url))
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        import fcntl

        with _THREAD_LOCK, open(u.database + ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    else:
        yield


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (no-op when it is already there).

    Safe when several processes open a new catalogue at once: the migration runs under a
    lock and re-checks the revision first.
    """
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    with engine.connect() as conn:
        if MigrationContext.configure(conn).get_current_revision() == head:
            return
    with _migration_lock(engine), engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(7270331)"))
        if MigrationContext.configure(conn).get_current_revision() == head:
            return
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    log.info("catalogue migrated to %s", head)


class Catalog:
    """A study-archive catalogue behind a SQLAlchemy URL.

    Args:
        url: A SQLAlchemy URL, or a plain file path (a SQLite file, created when missing).
        create: Create a missing SQLite file (else :class:`M3BindError`).
        keep_phi: Store patient names and birth dates. Fixed when the catalogue is created;
            ``None`` keeps the stored choice (default off).
        index_dir: Folder of the FAISS files. Defaults to ``<sqlite file>.index/`` beside a
            SQLite catalogue, else ``~/.cache/m3bind/index/<hash of the URL>``.
    """

    def __init__(self, url: str | os.PathLike, *, keep_phi: bool | None = None,
                 index_dir: str | os.PathLike | None = None, create: bool = True):
        self.url = normalize_url(url)
        u = make_url(self.url)
        if (not create and u.get_backend_name() == "sqlite" and u.database
                and u.database != ":memory:" and not Path(u.database).exists()):
            raise M3BindError("no such catalogue", u.database)
        self.engine = make_engine(self.url)
        upgrade(self.engine)
        self._sessionmaker = sessionmaker(self.engine, expire_on_commit=False)
        self._salt = self._init_setting("salt", secrets.token_hex(32)).encode()
        stored = self._init_setting("keep_phi", "1" if keep_phi else "0")
        if keep_phi is not None and (stored == "1") != keep_phi:
            log.warning("catalogue keeps its PHI setting keep_phi=%s", stored == "1")
        self.keep_phi = stored == "1"
        self.index_dir = Path(index_dir) if index_dir is not None else self._default_index_dir()
        # (modality, model_key) -> (file stat, catalogue state, index): searches reuse a loaded
        # index until the file or the catalogue changes
        self._loaded_indices: dict[tuple[str, str], tuple[tuple, tuple, Any]] = {}

    def _default_index_dir(self) -> Path:
        u = make_url(self.url)
        if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
            return Path(u.database + ".index")
        digest = hashlib.sha256(u.render_as_string(hide_password=True).encode()).hexdigest()[:16]
        return Path.home() / ".cache" / "m3bind" / "index" / digest

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        with self._sessionmaker() as s, s.begin():
            yield s

    def close(self) -> None:
        """Release the connection pool."""
        self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # settings -----------------------------------------------------------------------------
    def get_setting(self, key: str) -> str | None:
        """The stored value of ``key``, or None."""
        with self.session() as s:
            row = s.get(Setting, key)
            return None if row is None else row.value

    def set_setting(self, key: str, value: str) -> None:
        """Store ``key = value``."""
        with self.session() as s:
            s.merge(Setting(key=key, value=value))

    def _init_setting(self, key: str, default: str) -> str:
        """Insert ``default`` unless ``key`` exists (race-safe); return the stored value."""
        value = self.get_setting(key)
        if value is not None:
            return value
        try:
            with self.session() as s:
                s.add(Setting(key=key, value=default))
        except Exception:  # noqa: BLE001 - another process inserted it first
            log.debug("setting %s created concurrently", key)
        value = self.get_setting(key)
        assert value is not None
        return value

    def root(self) -> Path | None:
        """The archive root this catalogue describes, once something was indexed."""
        value = self.get_setting("root")
        return None if value is None else Path(value)

    def bind_root(self, root: str | os.PathLike) -> Path:
        """Record ``root`` as the archive root; a catalogue describes one root only.

        Raises:
            ConfigError: The catalogue already belongs to another root.
        """
        root = Path(root).resolve()
        stored = self._init_setting("root", str(root))
        if Path(stored) != root:
            raise ConfigError(f"catalogue belongs to archive {stored}, not {root}")
        return root

    # pseudonymous keys -----------------------------------------------------------------------
    def pseudonym(self, identifier: str, kind: str = "patient") -> str:
        """HMAC-SHA256 of ``identifier`` under the archive salt (hex, 32 chars).

        ``kind`` separates the key spaces of patients, studies and series.
        """
        msg = f"{kind}:{identifier.strip()}".encode()
        return hmac.new(self._salt, msg, hashlib.sha256).hexdigest()[:32]

    # queries ---------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """What the catalogue holds: ``{"items": {modality: N}, "failed": N, ...}``.

        ``items`` counts distinct content (duplicates are reported apart).
        """
        with self.session() as s:
            rows = s.execute(
                select(Item.modality, func.count())
                .where(Item.duplicate_of_id.is_(None))
                .group_by(Item.modality)
            ).all()
            dups = s.scalar(select(func.count()).select_from(Item)
                            .where(Item.duplicate_of_id.is_not(None)))
            failed = s.scalar(select(func.count()).select_from(Failure))
            patients = s.scalar(select(func.count()).select_from(Patient))
            models = s.execute(select(Embedding.model_key, func.count())
                               .group_by(Embedding.model_key)).all()
        items = {(m or "unknown"): int(n) for m, n in sorted(rows, key=lambda r: r[0] or "~")}
        return {"items": items, "failed": int(failed or 0), "duplicates": int(dups or 0),
                "patients": int(patients or 0),
                "embeddings": {k: int(n) for k, n in models}}

    def embedding_state(self, modality: str, model_key: str) -> tuple[int, int]:
        """``(count, sum of ids)`` of the embeddings of one index — the FAISS staleness check."""
        return self.embedding_states(model_key, modality).get(modality, (0, 0))

    def embedding_states(self, model_key: str, modality: str | None = None) -> dict[str, tuple[int, int]]:
        """:meth:`embedding_state` of every modality (or only ``modality``) that has embeddings
        of ``model_key``, in one query (an indexing run checks all six indices before it starts)."""
        query = (select(Embedding.modality, func.count(Embedding.id), func.coalesce(func.sum(Embedding.id), 0))
                 .where(Embedding.model_key == model_key))
        if modality is not None:
            query = query.where(Embedding.modality == modality)
        with self.session() as s:
            rows = s.execute(query.group_by(Embedding.modality)).all()
        return {m: (int(n), int(total)) for m, n, total in rows}

    def load_vectors(self, modality: str, model_key: str,
                     item_ids: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Vectors ``[N, D]`` float32 and their embedding ids ``[N]`` int64 of one index."""
        q = select(Embedding.id, Embedding.vector).where(
            Embedding.model_key == model_key, Embedding.modality == modality)
        if item_ids is not None:
            q = q.where(Embedding.item_id.in_(item_ids))
        ids: list[int] = []
        vecs: list[np.ndarray] = []
        with self.session() as s:
            for eid, blob in s.execute(q.order_by(Embedding.id)):
                ids.append(eid)
                vecs.append(np.frombuffer(blob, dtype=np.float32))
        if not vecs:
            return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
        return np.stack(vecs).astype(np.float32, copy=False), np.asarray(ids, np.int64)

    def model_keys(self) -> list[str]:
        """Model keys that have embeddings in this catalogue."""
        with self.session() as s:
            return list(s.scalars(select(Embedding.model_key).distinct()))

    def index_path(self, modality: str, model_key: str) -> Path:
        """File of the FAISS index of one modality and model version."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_key)
        return self.index_dir / f"{modality}--{safe}.m3idx"

    def vector_index(self, modality: str, model_key: str, *, rebuild: bool = False,
                     state: tuple[int, int] | None = None):
        """The FAISS index of one modality and model, rebuilt from the catalogue when stale.

        The file records the ``(count, id sum)`` of the embeddings it holds; when these differ
        from the catalogue's (an indexer killed between its commit and its index write, a file
        deleted or copied from elsewhere) the index is rebuilt from the stored vectors and
        written back atomically. Crossing the size threshold rebuilds it as an approximate index.
        ``state`` is the catalogue's :meth:`embedding_state`, when the caller has just read it.
        """
        from m3bind.index import VectorIndex, choose_kind

        path = self.index_path(modality, model_key)
        state = self.embedding_state(modality, model_key) if state is None else state
        key = (modality, model_key)
        cached = self._loaded_indices.get(key)
        if not rebuild and cached is not None and cached[:2] == (_file_stamp(path), state):
            return cached[2]
        index = None
        if not rebuild and path.exists():
            try:
                index = VectorIndex.load(path)
            except Exception as e:  # noqa: BLE001 - a damaged cache is rebuilt
                log.warning("rebuilding unreadable index %s: %s", path, e)
                index = None
            if index is not None and (
                    (len(index), index.id_sum) != state or index.kind != choose_kind(state[0])):
                log.info("index %s is stale (%s vs catalogue %s); rebuilding",
                         path.name, (len(index), index.id_sum), state)
                index = None
        if index is None:  # (no embeddings: nothing to read, load_vectors' empty arrays)
            vectors, ids = (self.load_vectors(modality, model_key) if state[0] else
                            (np.zeros((0, 0), np.float32), np.zeros(0, np.int64)))
            index = VectorIndex.build(vectors, ids)
            if state[0]:
                self.index_dir.mkdir(parents=True, exist_ok=True)
                index.save(path)
            else:
                path.unlink(missing_ok=True)
        self._loaded_indices[key] = (_file_stamp(path), state, index)
        return index


def chunks(seq: Sequence, n: int = 500) -> Iterator[Sequence]:
    """``seq`` in pieces of at most ``n`` items (keeps ``IN (...)`` lists bounded)."""
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def insert_ids(s: Session, table, rows: list[dict[str, Any]], key: str) -> dict[Any, int]:
    """Insert ``rows`` into ``table`` and return their new ``id`` keyed by the column ``key``,
    whose values must differ between the rows.

    One batched ``INSERT … RETURNING id, key`` (SQLAlchemy's "insertmanyvalues": a few hundred
    rows a statement). The returned rows are matched to the input by ``key``, not by order:
    asked to return them in the rows' order (``sort_by_parameter_order``), SQLAlchemy runs
    SQLite one INSERT per row, as SQLite cannot tie new ROWIDs to parameter sets.

    Raises:
        ValueError: When two rows share a ``key`` value (before anything is inserted).
    """
    if not rows:
        return {}
    if len({r[key] for r in rows}) != len(rows):
        raise ValueError(f"insert_ids: {table.name}.{key} repeats among the rows")
    stmt = insert(table).returning(table.c.id, table.c[key])
    return {k: i for i, k in s.execute(stmt, rows)}


def put_failures(s, failures: list[tuple[str, str, int, float]], now: dt.datetime) -> None:
    """Insert or update the failure rows ``(path, error, size, mtime)``, each logged: a
    lookup per 500 paths, then one executemany INSERT and one UPDATE (not one row at a time)."""
    if not failures:
        return
    have: dict[str, int] = {}
    for part in chunks([f[0] for f in failures]):
        have.update((p, i) for p, i in s.execute(
            select(Failure.path, Failure.id).where(Failure.path.in_(part))))
    rows = {rel: {"path": rel, "error": err, "size": size, "mtime": mtime, "failed_at": now}
            for rel, err, size, mtime in failures}  # the last word on a path wins
    upd = [{"id": have[rel], **row} for rel, row in rows.items() if rel in have]
    if upd:
        s.execute(update(Failure), upd)
    new = [row for rel, row in rows.items() if rel not in have]
    if new:
        s.execute(insert(Failure.__table__), new)
    for rel, err, _, _ in failures:
        log.info("failed: %s: %s", rel, err)


def _file_stamp(path: Path) -> tuple:
    """``(size, mtime_ns, inode)`` of a file, or ``()`` when it does not exist."""
    try:
        st = path.stat()
    except OSError:
        return ()
    return (st.st_size, st.st_mtime_ns, st.st_ino)
