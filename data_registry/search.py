"""Cross-modal search of an indexed archive: by file or text, into any modality, with filters.

A query file is read with :func:`m3bind.io.load` and embedded (or, when it is a catalogued
item, its stored vector is used); ``text:...`` is embedded with the model's text encoder for
the target modality. Without metadata filters the target modality's FAISS index answers;
with filters (date range, patient, study, same patient as the query) the matching vectors are
read from the catalogue and ranked exactly. Patients and studies are reported by their
pseudonymous keys only.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import and_, select

from data_registry.catalog import Catalog, Embedding, Item, Patient, Study
from m3bind.errors import M3BindError, ModelDirError, UnsupportedFormat
from m3bind.modalities import MODALITIES

log = logging.getLogger(__name__)

#: Above this many filtered candidates the FAISS index is used with over-fetching.
EXACT_FILTER_MAX = 100_000
TEXT_PREFIX = "text:"


def _as_date(value: str | dt.date | None) -> dt.date | None:
    if value is None or isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value)[:10])
    except ValueError:
        raise M3BindError(f"not an ISO date: {value!r}") from None


def _catalogued_item(cat: Catalog, path: Path) -> Item | None:
    """The catalogue item of a query path: by path under the root, else by content hash."""
    from data_registry.indexer import content_hash

    root = cat.root()
    resolved = path.resolve()
    with cat.session() as s:
        if root is not None and (resolved == root or root in resolved.parents):
            rel = Path(os.path.relpath(resolved, root)).as_posix()
            item = s.scalar(select(Item).where(Item.path == rel))
            if item is not None:
                return item
        if path.is_file():
            h = content_hash(str(path.parent), "file", path.name, [path.name])
            return s.scalar(select(Item).where(Item.content_hash == h, Item.kind == "file")
                            .order_by(Item.duplicate_of_id.is_not(None), Item.id))
    return None


def _stored_vector(cat: Catalog, item: Item, model_key: str) -> np.ndarray | None:
    owner = item.duplicate_of_id or item.id
    with cat.session() as s:
        blob = s.scalar(select(Embedding.vector).where(Embedding.item_id == owner,
                                                       Embedding.model_key == model_key))
    return None if blob is None else np.frombuffer(blob, np.float32).copy()


def embed_query(cat: Catalog, model, query: str | os.PathLike, target: str,
                modality: str | None = None) -> tuple[np.ndarray, Item | None]:
    """The query vector and, for a catalogued file, its item."""
    if isinstance(query, str) and query.startswith(TEXT_PREFIX):
        text = query[len(TEXT_PREFIX):].strip()
        if not text:
            raise M3BindError("empty text query")
        return np.asarray(model.embed_text([text], modality=target), np.float32)[0], None
    path = Path(query)
    if not path.exists() and not path.with_name(path.name + ".hea").exists():
        raise UnsupportedFormat("no such file or folder", str(path))
    item = _catalogued_item(cat, path)
    if item is not None and (vec := _stored_vector(cat, item, str(model.model_id))) is not None:
        return vec, item
    from m3bind.io import load

    sample = load(path, modality)
    if sample.modality not in MODALITIES:
        raise UnsupportedFormat("cannot tell the query's modality (give --modality)", str(path))
    return np.asarray(model.embed([sample]), np.float32)[0], item


def _patient_id(cat: Catalog, s, patient: str) -> int | None:
    pid = s.scalar(select(Patient.id).where(Patient.key == patient))
    if pid is None:
        pid = s.scalar(select(Patient.id).where(Patient.key == cat.pseudonym(patient, "patient")))
    return pid


def search(catalog: str | Catalog, model, query: str | os.PathLike, target: str, k: int = 10, *,
           modality: str | None = None, date_from: str | dt.date | None = None,
           date_to: str | dt.date | None = None, patient: str | None = None,
           study: str | None = None, same_patient: bool = False,
           nearest_in_time: bool = False,
           query_vector: np.ndarray | None = None) -> dict[str, list[dict[str, Any]]]:
    """Search the archive.

    Args:
        catalog: A :class:`Catalog`, a SQLAlchemy URL or a SQLite path.
        model: The model the archive was indexed with (loaded, or a model directory).
        query: A file/folder path, or ``"text:<free text>"``.
        target: Modality searched.
        k: Number of results.
        modality: Modality of a query file whose format carries none.
        date_from, date_to: Inclusive study-date range (ISO).
        patient: Pseudonymous patient key (or the raw patient id, hashed with the archive salt).
        study: Pseudonymous study key (or the raw study identifier).
        same_patient: Only items of the query item's patient (the query must be catalogued).
        nearest_in_time: With ``same_patient``, order by time from the query's study date
            (the ECG of this patient nearest in time to this CXR), ties by score.
        query_vector: The query's embedding when the caller already has it (the app embeds
            an upload once for zero-shot and search); ``query`` then only names the file, for
            same-patient searches.

    Returns:
        ``{"results": [{"path", "modality", "score", "patient", "study", "study_date",
        "days_apart"}]}`` best first; ``days_apart`` only for same-patient searches.

    Raises:
        M3BindError: Unknown target, unreadable query, a same-patient query without a patient.
        ModelDirError: The catalogue holds vectors of other models only.
    """
    if target not in MODALITIES:
        raise M3BindError(f"unknown target modality {target!r} (known: {', '.join(MODALITIES)})")
    if k <= 0:
        raise M3BindError(f"k must be positive, got {k}")
    cat = catalog if isinstance(catalog, Catalog) else Catalog(catalog, create=False)
    if isinstance(model, (str, os.PathLike)):
        from m3bind.model import load_model

        model = load_model(model)
    model_key = str(model.model_id)
    keys = cat.model_keys()
    if keys and model_key not in keys:
        raise ModelDirError(f"the catalogue was indexed with {', '.join(keys)}, not {model_key}; "
                            "index it with this model first")
    if query_vector is None:
        qvec, qitem = embed_query(cat, model, query, target, modality)
    else:
        qvec = np.asarray(query_vector, np.float32).reshape(-1)
        is_text = isinstance(query, str) and query.startswith(TEXT_PREFIX)
        qitem = None if is_text else _catalogued_item(cat, Path(query))
    qvec = qvec / max(float(np.linalg.norm(qvec)), 1e-12)
    conds = [Embedding.model_key == model_key, Embedding.modality == target]
    filtered = False
    d0, d1 = _as_date(date_from), _as_date(date_to)
    if d0 is not None:
        conds.append(Item.study_date >= d0)
    if d1 is not None:
        conds.append(Item.study_date <= d1)
    qdate = None
    with cat.session() as s:
        if patient is not None:
            conds.append(Item.patient_id == _patient_id(cat, s, patient))
        if study is not None:
            sid = s.scalar(select(Study.id).where(Study.key.in_([study, cat.pseudonym(study, "study")])))
            conds.append(Item.study_id == sid)
        if same_patient:
            if qitem is None or qitem.patient_id is None:
                raise M3BindError("same-patient search needs a catalogued query item with a "
                                  "patient link", str(query))
            conds.append(Item.patient_id == qitem.patient_id)
            qdate = qitem.study_date
        filtered = len(conds) > 2
    if filtered:
        ranked = _exact_filtered(cat, conds, qvec, k if not nearest_in_time else None)
    else:
        index = cat.vector_index(target, model_key)
        scores, ids = index.search(qvec[None], k)
        ranked = [(int(i), float(sc)) for i, sc in zip(ids[0], scores[0]) if i >= 0]
    results = _describe(cat, ranked, same_patient, qdate)
    if same_patient and nearest_in_time:
        results.sort(key=lambda r: (r["days_apart"] is None, abs(r["days_apart"] or 0), -r["score"]))
        results = results[:k]
    return {"results": results}


def _exact_filtered(cat: Catalog, conds: list, qvec: np.ndarray,
                    k: int | None) -> list[tuple[int, float]]:
    """Exact top-k among the vectors that pass ``conds`` (all of them when ``k`` is None)."""
    q = select(Embedding.id, Embedding.vector).join(Item, Item.id == Embedding.item_id).where(and_(*conds))
    with cat.session() as s:
        rows = s.execute(q.limit(EXACT_FILTER_MAX + 1)).all()
    if len(rows) > EXACT_FILTER_MAX:
        log.warning("more than %d candidates pass the filters; ranking the first %d",
                    EXACT_FILTER_MAX, EXACT_FILTER_MAX)
        rows = rows[:EXACT_FILTER_MAX]
    if not rows:
        return []
    ids = np.array([r[0] for r in rows], np.int64)
    vecs = np.stack([np.frombuffer(r[1], np.float32) for r in rows])
    scores = vecs @ qvec
    order = np.argsort(-scores, kind="stable")
    if k is not None:
        order = order[:k]
    return [(int(ids[i]), float(scores[i])) for i in order]


def _describe(cat: Catalog, ranked: list[tuple[int, float]], with_days: bool,
              qdate: dt.date | None) -> list[dict[str, Any]]:
    if not ranked:
        return []
    root = cat.root() or Path(".")
    with cat.session() as s:
        rows = s.execute(
            select(Embedding.id, Item.path, Item.modality, Item.study_date, Patient.key, Study.key)
            .join(Item, Item.id == Embedding.item_id)
            .outerjoin(Patient, Patient.id == Item.patient_id)
            .outerjoin(Study, Study.id == Item.study_id)
            .where(Embedding.id.in_([i for i, _ in ranked]))
        ).all()
    info = {r[0]: r[1:] for r in rows}
    out = []
    for eid, score in ranked:
        if eid not in info:  # removed since the index was written
            continue
        path, modality, date, pkey, skey = info[eid]
        row: dict[str, Any] = {"path": str(root / path), "modality": modality,
                               "score": round(score, 6), "patient": pkey, "study": skey,
                               "study_date": date.isoformat() if date else None}
        if with_days:
            row["days_apart"] = (date - qdate).days if date and qdate else None
        out.append(row)
    return out
