"""The app's view of the archive catalogue (engineer E's ``data_registry``).

Browsing (counts, failures, patients, studies, items, stored vectors) reads the catalogue's
tables; searching goes through :func:`data_registry.search.search` and indexing through
:func:`data_registry.indexer.index_archive`. Paths handed to the UI are absolute (the
catalogue stores them relative to its root).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from m3bind.modalities import MODALITIES

log = logging.getLogger(__name__)

#: Most items listed in one browse call.
MAX_ITEMS = 5000


def _root(catalog, root: Path | None) -> Path | None:
    stored = catalog.root()
    return stored if stored is not None else root


def _abs(root: Path | None, rel: str) -> str:
    return str((root / rel) if root is not None else Path(rel))


def short_key(key: str | None) -> str | None:
    """A pseudonymous key shortened for display (8 hex digits are plenty within one archive)."""
    return key[:8] if key else None


def item_count(catalog) -> int:
    """Distinct items in the catalogue."""
    return int(sum(catalog.stats()["items"].values()))


def counts(catalog) -> dict[str, int]:
    """Items per modality, in the canonical modality order."""
    items = catalog.stats()["items"]
    ordered = {m: items[m] for m in MODALITIES if m in items}
    ordered.update({m: n for m, n in items.items() if m not in ordered})
    return ordered


def failures(catalog, limit: int = 200) -> list[dict[str, str]]:
    """The paths that failed to index, with their one-line errors."""
    from sqlalchemy import select

    from data_registry.catalog import Failure

    with catalog.session() as s:
        rows = s.execute(select(Failure.path, Failure.error).order_by(Failure.path).limit(limit)).all()
    return [{"path": p, "error": e} for p, e in rows]


def items(catalog, *, root: Path | None = None, patient: str | None = None,
          modality: str | None = None, limit: int = MAX_ITEMS) -> list[dict[str, Any]]:
    """Catalogue items (duplicates left out) as dicts: ``id, path, modality, patient, study, date``.

    ``patient`` filters by the displayed (shortened) patient key.
    """
    from sqlalchemy import select

    from data_registry.catalog import Item, Patient, Study

    root = _root(catalog, root)
    q = (select(Item.id, Item.path, Item.modality, Item.study_date, Patient.key, Study.key)
         .outerjoin(Patient, Item.patient_id == Patient.id)
         .outerjoin(Study, Item.study_id == Study.id)
         .where(Item.duplicate_of_id.is_(None)))
    if modality:
        q = q.where(Item.modality == modality)
    with catalog.session() as s:
        rows = s.execute(q.order_by(Patient.key, Item.study_date, Item.path).limit(limit)).all()
    out = []
    for iid, path, mod, date, pkey, skey in rows:
        p = short_key(pkey)
        if patient and p != patient:
            continue
        out.append({"id": iid, "path": _abs(root, path), "rel": path, "modality": mod or "unknown",
                    "patient": p, "study": short_key(skey),
                    "date": date.isoformat() if date else None})
    return out


def item_label(item: dict[str, Any]) -> str:
    """How an item is listed in the archive picker."""
    who = f"patient {item['patient']}" if item.get("patient") else "no patient"
    return f"{item['modality']} · {who} · {item['rel']}"


def vectors(catalog, model) -> tuple[list[dict[str, Any]], np.ndarray]:
    """All stored vectors of ``model`` with their items: ``(items, [N, D] float32)``."""
    key = model_key(model)
    by_id = {i["id"]: i for i in items(catalog)}
    from sqlalchemy import select

    from data_registry.catalog import Embedding

    rows_items, vecs = [], []
    with catalog.session() as s:
        for item_id, blob in s.execute(select(Embedding.item_id, Embedding.vector)
                                       .where(Embedding.model_key == key)
                                       .order_by(Embedding.id)):
            if item_id in by_id:
                rows_items.append(by_id[item_id])
                vecs.append(np.frombuffer(blob, dtype=np.float32))
    if not vecs:
        return [], np.zeros((0, getattr(model, "dim", 0)), np.float32)
    return rows_items, np.stack(vecs)


def model_key(model) -> str:
    """The key under which the catalogue stores a model's vectors (the indexer's choice)."""
    return str(model.model_id)


def index(root: Path, catalog_url: str, model, *, workers: int | None = None,
          keep_phi: bool = False) -> dict[str, Any]:
    """Index ``root`` into the catalogue with :func:`data_registry.indexer.index_archive`.

    Its tqdm bar is always on: the terminal shows it, and the app's ``gr.Progress(track_tqdm=True)``
    mirrors it in the page.
    """
    from data_registry.indexer import index_archive

    return index_archive(root, catalog_url, model, workers=workers, keep_phi=keep_phi,
                         progress=True)
