"""Incremental, resumable indexing of a study archive into a :class:`~data_registry.catalog.Catalog`.

The run, for one archive root and one model:

1. :func:`data_registry.scan.scan` walks the root into items (files, DICOM series folders,
   WFDB records, MRI study folders) and failures (symlink loops, special files ...).
2. Items whose path, size, mtime (a fingerprint of the member files) match the catalogue and
   that have an embedding under this model are skipped; so are unchanged failures.
3. The rest are hashed in threads; an item whose content hash is unchanged only has its
   fingerprint refreshed; identical content already indexed under another path is recorded
   as a duplicate of it (no second embedding).
4. The others are decoded (:mod:`data_registry.decode`, inline or in ``spawn`` worker
   processes that import only the readers) with :func:`m3bind.io.load` and embedded in
   batches with ``model.embed``. The embedded items are committed about once a second
   (:data:`COMMIT_EVERY_S`), each commit one transaction with their patient/study/series
   links, written with a few Core statements (batched ``INSERT … RETURNING``, executemany
   updates), not one ORM object per row.
5. After each commit the FAISS index of each touched modality is updated (and written
   atomically now and then). The catalogue is the truth: an index whose (count, id sum)
   disagrees with it — after a kill between a commit and an index write — is rebuilt on open.

The zero-shot label embeddings of a modality (a text encoder forward over every prompt) are
kept in the index folder under a digest of the model's weights and the prompts' token ids
(:func:`label_vectors`), so a re-run with the same model does not embed them again.

A kill at any point loses at most the items embedded since the last commit (about a second of
work), which the next run redoes: no row is duplicated (paths are unique; each commit is one
transaction).
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import functools
import gc
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import bindparam, delete, insert, select, update

from data_registry.catalog import (
    Catalog,
    Embedding,
    Failure,
    Item,
    Patient,
    Series,
    Study,
    ZeroShotLabel,
    chunks,
    insert_ids,
    put_failures,
)
from data_registry.decode import (  # noqa: F401 - dicom_links, _dicom_meta_links: re-exported
    DEFAULT_LOADER,
    _dicom_meta_links,
    content_hash,
    decode_task,
    dicom_links,
    hash_task,
    wfdb_links,
)
from data_registry.scan import Candidate, scan
from m3bind.atomic import atomic_write_bytes
from m3bind.errors import M3BindError
from m3bind.index import choose_kind
from m3bind.modalities import MODALITIES

log = logging.getLogger(__name__)

#: Seconds between FAISS writes during a run (the index is always written at the end).
SAVE_EVERY_S = 10.0
#: Embedded items are committed together once this many seconds have passed since the last
#: commit (or :data:`COMMIT_MAX_ITEMS` wait): a transaction's fixed cost (a dozen statements,
#: 5-6 ms) is then paid about once a second instead of once per embedding batch, which on
#: small images was a third of the catalogue's share of the run. A kill loses about a second.
COMMIT_EVERY_S = 1.0
COMMIT_MAX_ITEMS = 500
#: Fewer items than this to decode are decoded inline: starting spawn workers (each imports
#: the readers) costs seconds, more than decoding a handful of files.
POOL_MIN_ITEMS = 16


#: The two date spellings, as strptime formats and as patterns of their all-digit form.
_DATE_FORMS = ((re.compile(r"(\d{4})(\d{2})(\d{2})"), "%Y%m%d", 8),
               (re.compile(r"(\d{4})-(\d{2})-(\d{2})"), "%Y-%m-%d", 10))


def _parse_date(text: str | None) -> str | None:
    """ISO date from ``YYYYMMDD`` or ``YYYY-MM-DD[...]``; None when unparseable."""
    if not text:
        return None
    t = str(text).strip()
    for pattern, fmt, n in _DATE_FORMS:
        if m := pattern.fullmatch(t[:n]):  # the usual spelling, without strptime's pure Python
            try:  # (the date strptime gives for these digits; an invalid one fails both ways)
                return dt.date(*map(int, m.groups())).isoformat()
            except ValueError:
                continue
        try:
            return dt.datetime.strptime(t[:n], fmt).date().isoformat()
        except ValueError:
            continue
    return None


#: Bumped when what a cached label embedding file holds changes.
LABEL_CACHE_VERSION = 1


def _label_digest(model, modality: str, labels: list[str]) -> str | None:
    """SHA-256 of everything the zero-shot label embeddings of ``labels`` depend on: the
    model's weights (``model_id``), the prompt texts, their token ids, the text encoder and the
    device and precision it runs at. None when the model cannot say (no text encoders)."""
    try:
        from m3bind.zeroshot import label_prompts

        per_label = label_prompts(modality, labels)
        flat = [t for label in labels for t in per_label[label]]
        key = model.text_key(modality)
        enc = model.text_encoders[key]
        tokens = enc.tokenize(flat)
        param = next(iter(enc.parameters()), None)
        device = None if param is None else str(param.device)
    except Exception as e:  # noqa: BLE001 - then the labels are embedded every run, as before
        log.debug("zero-shot label embeddings of %s not cached: %s", modality, e)
        return None
    h = hashlib.sha256(json.dumps([LABEL_CACHE_VERSION, str(model.model_id), modality, key,
                                   labels, flat, device, str(getattr(model, "compute_dtype", None))
                                   ]).encode())
    for name in sorted(tokens):
        t = np.ascontiguousarray(np.asarray(tokens[name]))
        h.update(f"{name}{t.shape}{t.dtype}".encode())
        h.update(t.tobytes())
    return h.hexdigest()


def label_vectors(model, modality: str, labels: list[str], folder: Path) -> np.ndarray:
    """The zero-shot label embeddings ``[L, D]`` of :func:`m3bind.zeroshot.label_embeddings`,
    cached in ``folder`` (the catalogue's index folder) under :func:`_label_digest`.

    A text encoder forward over every prompt (0.20-0.23 CPU-s a modality for the demo's MiniLM
    text encoder) is thus paid once per model and prompt list, not once per indexing run; a changed
    model, prompt or tokenizer gives another digest and is embedded afresh. An unreadable or
    malformed cache file is recomputed; one that cannot be written is only logged.
    """
    from m3bind.zeroshot import label_embeddings

    digest = _label_digest(model, modality, labels)
    path = None if digest is None else folder / f"labels--{modality}--{digest[:40]}.npy"
    if path is not None and path.exists():
        try:
            vec = np.load(path, allow_pickle=False)
            if (vec.dtype == np.float32 and vec.ndim == 2 and vec.shape[0] == len(labels)
                    and np.isfinite(vec).all()):
                return vec
        except (OSError, ValueError, EOFError) as e:
            log.debug("label cache %s unreadable (%s): recomputed", path, e)
    vec = np.asarray(label_embeddings(model, modality, labels), np.float32)
    if path is not None:
        buf = io.BytesIO()
        np.save(buf, vec)
        try:  # atomic: a concurrent reader sees the old file or the new
            atomic_write_bytes(path, buf.getvalue())
        except OSError as e:
            log.debug("label cache %s not written: %s", path, e)
    return vec


# ---------------------------------------------------------------------------------------------
# main process
# ---------------------------------------------------------------------------------------------
def _pool_map(fn: Callable, args: Iterable[tuple], workers: int, window: int,
              on_crash: Callable[[tuple], Any]) -> Iterator[Any]:
    """``fn(*a)`` for each ``a``, in a spawn-context process pool (inline when ``workers`` ≤ 1).

    At most ``window`` tasks are in flight, so memory stays bounded on a large archive, and
    results come back in completion order. A decoder that kills its worker (a segfault in a
    codec) breaks the pool: the pool is restarted and the tasks that were in flight are rerun
    one at a time, so only the culprit gets ``on_crash(a)`` as its result.
    """
    if workers <= 1:
        for a in args:
            yield fn(*a)
        return
    ctx = multiprocessing.get_context("spawn")
    it = iter(args)
    suspects: list[tuple] = []
    ex = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    try:
        pending: dict[cf.Future, tuple] = {}
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < window:
                try:
                    a = next(it)
                except StopIteration:
                    exhausted = True
                    break
                pending[ex.submit(fn, *a)] = a
            if not pending:
                break
            done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            broken = False
            for f in done:
                a = pending.pop(f)
                try:
                    yield f.result()
                except cf.process.BrokenProcessPool:
                    suspects.append(a)
                    broken = True
            if broken:
                suspects.extend(pending.values())
                pending.clear()
                ex.shutdown(wait=False, cancel_futures=True)
                log.warning("a decoder process died; rerunning %d tasks one by one", len(suspects))
                for a in suspects:
                    with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as solo:
                        try:
                            yield solo.submit(fn, *a).result()
                        except cf.process.BrokenProcessPool:
                            yield on_crash(a)
                suspects = []
                ex = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


class _Run:
    """State of one indexing run (catalogue, model, in-memory FAISS indices, counters)."""

    def __init__(self, catalog: Catalog, root: Path, model, batch_size: int,
                 zeroshot: bool, progress):
        self.cat, self.root, self.model = catalog, root, model
        self.model_key = str(model.model_id)
        self.batch_size = batch_size
        self.zeroshot = zeroshot
        self.bar = progress
        self.counts = {"added": 0, "skipped": 0, "failed": 0, "duplicates": 0, "removed": 0}
        self.indices: dict[str, Any] = {}
        self.dirty: set[str] = set()
        self.last_save = time.monotonic()
        self._label_cache: dict[str, tuple[list[str], np.ndarray] | None] = {}
        #: Embedded items ``(candidate, hash, record, vector)`` and embedding errors not yet
        #: committed; the record keeps the sample's modality and format, not its pixels.
        self.pending: list[tuple[Candidate, str, dict, np.ndarray]] = []
        self.pending_errors: list[tuple[Candidate, str]] = []
        self.last_commit = time.monotonic()

    # FAISS ------------------------------------------------------------------------------------
    def index(self, modality: str):
        if modality not in self.indices:
            self.indices[modality] = self.cat.vector_index(modality, self.model_key)
        return self.indices[modality]

    def load_indices(self) -> None:
        """Every modality's index (rebuilt when stale), the six states read in one query."""
        states = self.cat.embedding_states(self.model_key)
        for m in MODALITIES:
            if m not in self.indices:
                self.indices[m] = self.cat.vector_index(m, self.model_key,
                                                        state=states.get(m, (0, 0)))

    def save_indices(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.last_save < SAVE_EVERY_S:
            return
        for m in sorted(self.dirty):
            self.cat.index_dir.mkdir(parents=True, exist_ok=True)
            self.indices[m].save(self.cat.index_path(m, self.model_key))
        self.dirty.clear()
        self.last_save = time.monotonic()

    def drop_vectors(self, removed: list[tuple[int, str]]) -> None:
        """Remove embedding ids (of this model) from the in-memory indices."""
        by_mod: dict[str, list[int]] = {}
        for eid, m in removed:
            by_mod.setdefault(m, []).append(eid)
        for m, ids in by_mod.items():
            self.index(m).remove(np.asarray(ids, np.int64))
            self.dirty.add(m)

    # catalogue helpers --------------------------------------------------------------------------
    def _get_or_create(self, s, model, wanted: dict[str, dict]) -> dict[str, int]:
        """Ids of the rows of ``model`` keyed ``wanted`` (key -> fields), one query for all:
        missing rows are inserted in one statement, existing ones get their empty fields filled."""
        if not wanted:
            return {}
        t = model.__table__
        names = sorted({n for f in wanted.values() for n in f})
        ids: dict[str, int] = {}
        for row in s.execute(_where_in(t, "key", ("id", "key", *names)), {"keys": list(wanted)}):
            ids[row.key] = row.id
            fill = {n: v for n, v in wanted[row.key].items()
                    if v is not None and getattr(row, n) in (None, "")}
            if fill:  # rare: a later item knows what the first one lacked
                s.execute(update(t).where(t.c.id == row.id).values(**fill))
        new = [{"key": k, **{n: f.get(n) for n in names}} for k, f in wanted.items() if k not in ids]
        ids.update(insert_ids(s, t, new, "key"))
        return {key: ids[key] for key in wanted}

    def _links(self, s, rows: list[tuple[dict[str, str], str, Any]]) -> list[tuple]:
        """``(patient_id, study_id, series_id)`` for each ``(links, modality, study date)``,
        creating patients, then studies, then series (one query and one INSERT per table)."""
        keep = self.cat.keep_phi
        pkey = [self.cat.pseudonym(lk["patient"], "patient") if lk.get("patient") else None
                for lk, _, _ in rows]
        skey = [self.cat.pseudonym(lk["study"], "study") if lk.get("study") else None
                for lk, _, _ in rows]
        rkey = [self.cat.pseudonym(lk["series"], "series") if lk.get("series") else None
                for lk, _, _ in rows]

        def want(keys: list, fields: list[dict]) -> dict[str, dict]:
            out: dict[str, dict] = {}
            for k, f in zip(keys, fields):
                if k is None:
                    continue
                have = out.setdefault(k, dict(f))
                for name, v in f.items():  # a later item fills what an earlier one lacked
                    if have.get(name) in (None, ""):
                        have[name] = v
            return out

        pid = self._get_or_create(s, Patient, want(pkey, [
            {"name": lk.get("name"), "birth_date": lk.get("birth_date")} if keep else {}
            for lk, _, _ in rows]))
        sid = self._get_or_create(s, Study, want(skey, [
            {"patient_id": pid.get(p), "study_date": d, "uid": lk["study"] if keep else None}
            for (lk, _, d), p in zip(rows, pkey)]))
        rid = self._get_or_create(s, Series, want(rkey, [
            {"study_id": sid.get(k), "modality": m} for (_, m, _), k in zip(rows, skey)]))
        return [(pid.get(p), sid.get(k), rid.get(r)) for p, k, r in zip(pkey, skey, rkey)]

    def release_item(self, s, item_id: int) -> list[tuple[int, str]]:
        """Detach an item's content before it changes or goes: promote a duplicate to hold its
        embeddings, else delete them. Returns removed ``(embedding id, modality)`` of this model."""
        dups = list(s.scalars(select(Item.id).where(Item.duplicate_of_id == item_id)
                              .order_by(Item.id)))
        if dups:
            heir = dups[0]
            s.execute(update(Item).where(Item.id == heir).values(duplicate_of_id=None))
            if len(dups) > 1:
                s.execute(update(Item).where(Item.id.in_(dups[1:])).values(duplicate_of_id=heir))
            s.execute(update(Embedding).where(Embedding.item_id == item_id).values(item_id=heir))
            s.execute(update(ZeroShotLabel).where(ZeroShotLabel.item_id == item_id)
                      .values(item_id=heir))
            return []
        removed = [(eid, m) for eid, m in s.execute(
            select(Embedding.id, Embedding.modality).where(Embedding.item_id == item_id,
                                                           Embedding.model_key == self.model_key))]
        s.execute(delete(ZeroShotLabel).where(ZeroShotLabel.item_id == item_id))
        s.execute(delete(Embedding).where(Embedding.item_id == item_id))
        return removed

    # zero-shot -----------------------------------------------------------------------------------
    def _labels(self, modality: str) -> tuple[list[str], np.ndarray] | None:
        if modality not in self._label_cache:
            try:
                from m3bind.modalities import get_spec

                labels = list(get_spec(modality).labels)
                self._label_cache[modality] = (
                    labels, label_vectors(self.model, modality, labels, self.cat.index_dir))
            except Exception as e:  # noqa: BLE001 - labels are optional extras
                log.warning("no zero-shot labels for %s: %s", modality, e)
                self._label_cache[modality] = None
        return self._label_cache[modality]

    # batches ----------------------------------------------------------------------------------------
    def embed_decoded(self, batch: list[tuple[Candidate, str, dict]]) -> None:
        """Embed a batch of decoded items; their rows wait in :attr:`pending` (without the
        pixels) for :meth:`commit`, which this calls once :data:`COMMIT_EVERY_S` have passed
        since the last commit or :data:`COMMIT_MAX_ITEMS` wait."""
        samples = [r["sample"] for _, _, r in batch]
        try:
            vectors = np.asarray(self.model.embed(samples, batch_size=self.batch_size), np.float32)
            ok = [(c, h, r, v) for (c, h, r), v in zip(batch, vectors)]
        except Exception as e:  # noqa: BLE001 - one bad sample must not sink the batch
            log.debug("batch embed failed (%s); embedding one by one", e)
            ok = []
            for c, h, r in batch:
                try:
                    ok.append((c, h, r, np.asarray(self.model.embed([r["sample"]]), np.float32)[0]))
                except Exception as e1:  # noqa: BLE001
                    self.pending_errors.append((c, f"cannot embed: {type(e1).__name__}: {e1}"))
        for c, h, r, vec in ok:
            sample = r["sample"]
            self.pending.append((c, h, {"modality": sample.modality, "format": sample.format,
                                        "links": r["links"], "meta": r["meta"]}, vec))
        self.bar.update(len(batch))
        if (len(self.pending) >= COMMIT_MAX_ITEMS
                or time.monotonic() - self.last_commit >= COMMIT_EVERY_S):
            self.commit()

    def commit(self) -> None:
        """Write the embedded items waiting in :attr:`pending` (and their embedding errors) in
        one transaction, then add their vectors to the FAISS indices."""
        ok, errors = self.pending, self.pending_errors
        self.pending, self.pending_errors = [], []
        self.last_commit = time.monotonic()
        if not ok and not errors:
            return
        added: dict[str, list[tuple[int, np.ndarray]]] = {}
        removed: list[tuple[int, str]] = []
        now = _utcnow()
        with self.cat.session() as s:
            # Core statements, one per table and step for the whole batch (no ORM objects)
            rels = [c.rel for c, _, _, _ in ok]
            old = {p: (i, h) for i, p, h in s.execute(
                _where_in(Item.__table__, "path", ("id", "path", "content_hash")),
                {"keys": rels})} if rels else {}
            if rels:
                s.execute(_where_in(Failure.__table__, "path"), {"keys": rels})
            dates = []
            for _, _, r, _ in ok:
                iso = _parse_date(r["links"].get("date"))
                dates.append(dt.date.fromisoformat(iso) if iso else None)
            ids = self._links(s, [(r["links"], r["modality"], d)
                                  for (_, _, r, _), d in zip(ok, dates)])
            rows = []
            for (c, h, r, _), d, (patient_id, study_id, series_id) in zip(ok, dates, ids):
                if c.rel in old and old[c.rel][1] != h:  # same content: keep other models'
                    removed += self.release_item(s, old[c.rel][0])
                rows.append(_item_row(c, h, now, modality=r["modality"], format=r["format"],
                                      meta=r["meta"], study_date=d, patient_id=patient_id,
                                      study_id=study_id, series_id=series_id,
                                      duplicate_of_id=None))
            item_ids = _put_items(s, rows, {p: v[0] for p, v in old.items()})
            emb_rows = [{"item_id": iid, "model_key": self.model_key,
                         "modality": r["modality"], "dim": int(vec.shape[0]),
                         "vector": np.ascontiguousarray(vec, np.float32).tobytes()}
                        for iid, (_, _, r, vec) in zip(item_ids, ok)]
            emb_id = insert_ids(s, Embedding.__table__, emb_rows, "item_id")  # one model
            emb_ids = [emb_id[iid] for iid in item_ids]
            labels: list[dict] = []
            for iid, eid, (_, _, r, vec) in zip(item_ids, emb_ids, ok):
                added.setdefault(r["modality"], []).append((eid, vec))
            if self.zeroshot:
                by_mod: dict[str, list[int]] = {}
                for k, (_, _, r, _) in enumerate(ok):
                    by_mod.setdefault(r["modality"], []).append(k)
                for modality, ks in by_mod.items():
                    if (lab := self._labels(modality)) is None:
                        continue
                    names, lvec = lab
                    scale = float(getattr(self.model, "logit_scale", 100.0))
                    logits = scale * (np.stack([ok[k][3] for k in ks]) @ lvec.T)
                    p = np.exp(logits - logits.max(axis=1, keepdims=True))
                    p /= p.sum(axis=1, keepdims=True)
                    labels += [{"item_id": item_ids[k], "model_key": self.model_key,
                                "label": name, "score": float(score)}
                               for k, row in zip(ks, p) for name, score in zip(names, row)]
            if labels:
                s.execute(insert(ZeroShotLabel.__table__), labels)
            put_failures(s, [(c.rel, err, c.size, c.mtime) for c, err in errors], now)
        self.drop_vectors(removed)
        for m, pairs in added.items():
            self.index(m).add(np.stack([v for _, v in pairs]), np.asarray([i for i, _ in pairs]))
            self.dirty.add(m)
        self.counts["added"] += len(ok)
        self.counts["failed"] += len(errors)
        self.save_indices()

    def record_failures(self, failures: list[tuple[str, str, int, float]]) -> None:
        """Record ``(path, error, size, mtime)`` failures; an indexed item at such a path (a
        file that became unreadable) is forgotten."""
        if not failures:
            return
        removed: list[tuple[int, str]] = []
        with self.cat.session() as s:
            for part in chunks([f[0] for f in failures]):
                for iid in list(s.scalars(select(Item.id).where(Item.path.in_(part)))):
                    removed += self.release_item(s, iid)
                    s.execute(delete(Item).where(Item.id == iid))
            put_failures(s, failures, _utcnow())
        self.drop_vectors(removed)
        self.counts["failed"] += len(failures)
        self.bar.update(len(failures))


@functools.lru_cache(maxsize=64)
def _where_in(table, key: str, columns: tuple[str, ...] = ()):
    """``SELECT columns FROM table WHERE key IN :keys`` (a ``DELETE`` without columns), built
    once with an expanding bound parameter ``keys``. Built per batch around its list of values,
    such a statement cost 0.3-0.5 ms more each time (construction, a cache key over every value)."""
    where = table.c[key].in_(bindparam("keys", expanding=True))
    if not columns:
        return delete(table).where(where)
    return select(*(table.c[c] for c in columns)).where(where)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def _put_items(s, rows: list[dict], old_ids: dict[str, int]) -> list[int]:
    """Write item rows (``path`` and the other columns): one INSERT … RETURNING for the new
    paths, one UPDATE by primary key for those in ``old_ids`` (path -> id). Ids in order."""
    ids = {r["path"]: old_ids[r["path"]] for r in rows if r["path"] in old_ids}
    upd = [{"id": ids[r["path"]], **r} for r in rows if r["path"] in ids]
    if upd:
        s.execute(update(Item), upd)
    new = [r for r in rows if r["path"] not in ids]
    ids.update(insert_ids(s, Item.__table__, new, "path"))
    return [ids[r["path"]] for r in rows]


def _item_row(cand: Candidate, chash: str, now: dt.datetime, **fields) -> dict[str, Any]:
    """The column values of ``cand``'s item row."""
    return dict(path=cand.rel, kind=cand.kind, size=cand.size, mtime=cand.mtime,
                fingerprint=cand.fingerprint, content_hash=chash, indexed_at=now, **fields)


def _open_model(model):
    if isinstance(model, (str, os.PathLike)):
        from m3bind.model import load_model

        return load_model(model)
    return model


def index_archive(root: str | os.PathLike, catalog: str | Catalog, model, *,
                  workers: int | None = None, batch_size: int = 32,
                  modality: str | None = None, keep_phi: bool | None = None,
                  zeroshot: bool = True, progress: bool | None = None,
                  loader: str = DEFAULT_LOADER) -> dict[str, int]:
    """Index (or re-index incrementally) the archive under ``root``.

    Args:
        root: The archive folder.
        catalog: A :class:`Catalog`, a SQLAlchemy URL or a SQLite file path.
        model: A loaded model (``.embed``, ``.model_id``) or a model directory.
        workers: Decoder processes (default ``min(4, cpu count)``; ≤ 1 decodes inline, as
            do runs with fewer than :data:`POOL_MIN_ITEMS` items to decode).
        batch_size: Items embedded and committed together.
        modality: Modality of formats that carry none, when no sidecar or folder name says.
        keep_phi: Store patient names and birth dates (only when the catalogue is created).
        zeroshot: Store zero-shot label scores of each item (default labels of its modality).
        progress: Show a tqdm bar (default: when stderr is a terminal).
        loader: Reader as ``module:function`` (default :func:`m3bind.io.load`).

    Returns:
        ``{"added", "skipped", "failed", "total"}`` for this run (``total`` is their sum;
        ``skipped`` includes ``duplicates``, identical content already indexed under another
        path), plus ``duplicates`` and ``removed`` (items whose files are gone).
    """
    from tqdm.auto import tqdm

    if not Path(root).is_dir():
        raise M3BindError("archive root is not a folder", str(root))
    cat = catalog if isinstance(catalog, Catalog) else Catalog(catalog, keep_phi=keep_phi)
    root = cat.bind_root(root)
    model = _open_model(model)
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    candidates, walk_failures = scan(root, exclude=(cat.index_dir,) + _catalog_files(cat))
    by_rel = {c.rel: c for c in candidates}
    total = len(candidates) + len(walk_failures)
    bar = tqdm(total=total, unit="item", desc="indexing", dynamic_ncols=True,
               disable=(not _isatty()) if progress is None else not progress)
    run = _Run(cat, root, model, batch_size, zeroshot, bar)
    frozen = _freeze_long_lived()
    try:
        run.load_indices()  # loaded (or rebuilt when stale) before anything is committed
        _remove_vanished(run, {c.rel for c in candidates} | {rel for rel, _ in walk_failures})
        run.record_failures([(rel, err, -1, -1.0) for rel, err in walk_failures])
        known = _known_state(cat, run.model_key)
        to_hash: list[Candidate] = []
        for c in candidates:
            state = known["items"].get(c.rel)
            fail = known["failures"].get(c.rel)
            if state and state[0] == c.fingerprint and state[1]:
                run.counts["skipped"] += 1
                bar.update(1)
            elif fail and fail == (c.size, c.mtime):
                run.counts["failed"] += 1
                bar.update(1)
            else:
                to_hash.append(c)
        hashes: dict[str, str] = {}
        hash_fail = []
        # hashlib releases the GIL on large buffers: threads hash in parallel without spawning;
        # an inline run hashes in this thread (a one-thread pool only adds hand-overs of the GIL)
        def hash_one(c: Candidate) -> tuple[str, str | None, str | None]:
            return hash_task(str(root), c.kind, c.rel, c.members)

        with cf.ThreadPoolExecutor(max_workers=max(workers, 1)) as tp:
            jobs = tp.map(hash_one, to_hash) if workers > 1 else map(hash_one, to_hash)
            for rel, h, err in jobs:
                if err:
                    c = by_rel[rel]
                    hash_fail.append((rel, err, c.size, c.mtime))
                else:
                    hashes[rel] = h
        run.record_failures(hash_fail)
        to_decode, deferred = _settle_hashed(run, [c for c in to_hash if c.rel in hashes],
                                             hashes, known)
        batch: list[tuple[Candidate, str, dict]] = []
        run.last_commit = time.monotonic()
        fails: list[tuple[str, str, int, float]] = []
        tasks = ((str(root), c, modality, loader, cat.keep_phi) for c in to_decode)
        pool = workers if len(to_decode) >= POOL_MIN_ITEMS else 0
        crashed = lambda a: {"rel": a[1].rel, "error": "reader process crashed"}
        for r in _pool_map(decode_task, tasks, pool, 4 * max(pool, 1), crashed):
            c = by_rel[r["rel"]]
            if "error" in r:
                fails.append((c.rel, r["error"], c.size, c.mtime))
                if len(fails) >= batch_size:
                    run.record_failures(fails)
                    fails = []
                continue
            batch.append((c, hashes[c.rel], r))
            if len(batch) >= batch_size:
                run.embed_decoded(batch)
                batch = []
        if batch:
            run.embed_decoded(batch)
        run.commit()
        run.record_failures(fails)
        # identical copies found in this run, now that their originals are committed
        _settle_hashed(run, deferred, hashes, _known_state(cat, run.model_key), final=True)
        run.save_indices(force=True)
        for m, idx in list(run.indices.items()):  # exact -> approximate past the size threshold
            if choose_kind(len(idx)) != idx.kind:  # (the others are current: skip their reload)
                cat.vector_index(m, run.model_key)
    finally:
        bar.close()
        if frozen:
            gc.unfreeze()
    c = run.counts
    result = {"added": c["added"], "skipped": c["skipped"], "failed": c["failed"]}
    result["total"] = sum(result.values())
    result.update(duplicates=c["duplicates"], removed=c["removed"])
    log.info("indexed %s: %s", root, result)
    return result


def _freeze_long_lived() -> bool:
    """Leave the objects that exist before a run out of the garbage collector's collections
    until :func:`gc.unfreeze` (whether this froze them is returned).

    A process that has loaded a model holds some 500 000 objects the collector tracks (torch,
    transformers, timm, SQLAlchemy, the model's modules). The rows, results and metadata a run
    creates set off a full collection over all of them every few runs: 0.48 CPU-s on the
    benchmark machine, 0.6 ms an item of an 800-item run, freeing nothing. Objects made during
    the run are collected as usual. A process that froze objects itself (a server after fork,
    a concurrent run) is left as it is.
    """
    if gc.get_freeze_count():
        return False
    gc.freeze()
    return True


def _isatty() -> bool:
    import sys

    return sys.stderr.isatty()


def _catalog_files(cat: Catalog) -> tuple[Path, ...]:
    from sqlalchemy.engine import make_url

    u = make_url(cat.url)
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        db = Path(u.database)
        return tuple(Path(f"{db}{suffix}") for suffix in ("", "-wal", "-shm", "-journal", ".lock"))
    return ()


def _known_state(cat: Catalog, model_key: str) -> dict[str, dict]:
    """Fingerprints of catalogued items (and whether their content has this model's vector),
    and ``(size, mtime)`` of recorded failures, keyed by relative path."""
    with cat.session() as s:
        has = set(s.scalars(select(Embedding.item_id).where(Embedding.model_key == model_key)))
        items = {}
        canon_by_hash = {}
        for iid, path, fp, chash, dup in s.execute(
                select(Item.id, Item.path, Item.fingerprint, Item.content_hash, Item.duplicate_of_id)):
            owner = dup if dup is not None else iid
            items[path] = (fp, owner in has, chash, iid)
            if dup is None and iid in has:
                canon_by_hash.setdefault(chash, iid)
        failures = {p: (sz, mt) for p, sz, mt in s.execute(
            select(Failure.path, Failure.size, Failure.mtime))}
    return {"items": items, "failures": failures, "canon": canon_by_hash}


def _settle_hashed(run: _Run, cands: list[Candidate], hashes: dict[str, str],
                   known: dict[str, dict],
                   final: bool = False) -> tuple[list[Candidate], list[Candidate]]:
    """Handle hashed items that need no decoding; return ``(to decode, deferred copies)``.

    Same path and content: refresh the fingerprint (skipped). Content already indexed under
    another path: record a duplicate (skipped). Several new copies of one content: decode the
    first, settle the rest after it is committed (``final``). One transaction, a few
    statements per batch of paths (not per item).
    """
    to_decode: list[Candidate] = []
    deferred: list[Candidate] = []
    first_of: dict[str, str] = {}
    refresh: list[dict] = []
    dups: list[tuple[Candidate, str, int]] = []
    failed: list[tuple[str, str, int, float]] = []
    for c in cands:
        h = hashes[c.rel]
        state = known["items"].get(c.rel)
        canon = known["canon"].get(h)
        if state and state[2] == h and state[1]:
            refresh.append({"id": state[3], "size": c.size, "mtime": c.mtime,
                            "fingerprint": c.fingerprint})
        elif canon is not None and (state is None or canon != state[3]):
            dups.append((c, h, canon))
            run.counts["duplicates"] += 1
        elif final:
            failed.append((c.rel, "identical to an item that could not be indexed",
                           c.size, c.mtime))
            continue
        elif h in first_of:
            deferred.append(c)  # a second new copy: settled after the first is committed
            continue
        else:
            first_of[h] = c.rel
            to_decode.append(c)
            continue
        run.counts["skipped"] += 1
        run.bar.update(1)
    removed: list[tuple[int, str]] = []
    if refresh or dups:
        with run.cat.session() as s:
            if refresh:
                s.execute(update(Item), refresh)
            for part in chunks(dups):
                removed += _write_duplicates(run, s, part)
    run.drop_vectors(removed)
    run.record_failures(failed)
    return to_decode, deferred


def _write_duplicates(run: _Run, s, dups: list[tuple[Candidate, str, int]]) -> list[tuple[int, str]]:
    """Item rows of ``(candidate, hash, canonical id)`` copies, with the canonical item's
    fields; a path that held other content is released first. Returns removed vectors."""
    rels = [c.rel for c, _, _ in dups]
    old = dict(s.execute(select(Item.path, Item.id).where(Item.path.in_(rels))).tuples().all())
    removed: list[tuple[int, str]] = []
    for iid in old.values():
        removed += run.release_item(s, iid)
    cols = ("modality", "format", "meta", "study_date", "patient_id", "study_id", "series_id")
    canon = {r.id: r for r in s.execute(
        select(Item.id, *(getattr(Item, k) for k in cols))
        .where(Item.id.in_(sorted({d[2] for d in dups}))))}
    now = _utcnow()
    rows = [_item_row(c, h, now, duplicate_of_id=cid, **{k: getattr(canon[cid], k) for k in cols})
            for c, h, cid in dups]
    _put_items(s, rows, old)
    s.execute(delete(Failure).where(Failure.path.in_(rels)))
    return removed


def _remove_vanished(run: _Run, live: set[str]) -> None:
    """Forget items and failures whose files no longer exist under the root, and failures of
    paths this scan no longer offers as items of their own (``live``): a WFDB ``.dat`` that
    arrived, and failed, before its ``.hea`` is a member of the record once the header is there.
    A path the scan just offered (``live``) is not looked up again."""
    removed: list[tuple[int, str]] = []
    with run.cat.session() as s:
        gone = [iid for iid, path in s.execute(  # copies first: an original then has no heirs
                select(Item.id, Item.path).order_by(Item.duplicate_of_id.is_(None)))
                if path not in live and not os.path.lexists(run.root / path)]
        for iid in gone:
            removed += run.release_item(s, iid)
            s.execute(delete(Item).where(Item.id == iid))
            run.counts["removed"] += 1
        stale = [fid for fid, path in s.execute(select(Failure.id, Failure.path))
                 if path not in live]  # gone, or now a member of another item
        for part in chunks(stale):
            s.execute(delete(Failure).where(Failure.id.in_(part)))
    run.drop_vectors(removed)
