"""The items an evaluation runs on: a cohort's ``manifest.csv`` or a public data-set adapter.

Also the cross-modal relevance rule of the simulated cohort (patients sharing a condition,
``data_registry.synthetic.cohort.same_condition``) and simulated-data detection.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from m3bind.errors import M3BindError
from m3bind.modalities import MODALITIES, SPECS

log = logging.getLogger(__name__)

MANIFEST_MAX_BYTES = 512 * 1024 * 1024


@dataclass
class Item:
    """One manifest row (see ``data_registry.synthetic`` for the columns).

    Attributes:
        item_id: Unique item identifier.
        patient: Patient identifier (links a test patient's modalities).
        modality: One of :data:`m3bind.modalities.MODALITIES`.
        path: File or folder, relative to the cohort root (or absolute).
        label: Zero-shot label (one of ``SPECS[modality].labels``; '' when none applies).
        findings: Finding -> 0/1 (multi-label; unknown findings absent).
        condition: Patient conditions, ';'-joined ('' when the source has none).
        report: Report text ('' when none).
        split: ``train``, ``val`` or ``test``.
    """

    item_id: str
    patient: str
    modality: str
    path: str
    label: str
    findings: dict[str, int]
    condition: str
    report: str
    split: str


def read_items(root: str | Path) -> list[Item]:
    """The items of ``root/manifest.csv`` (columns as written by ``data_registry.synthetic``).

    Raises:
        M3BindError: the manifest is missing, too large or lacks a required column.
    """
    path = Path(root) / "manifest.csv"
    if not path.is_file():
        raise M3BindError("no manifest.csv in the cohort folder", str(root))
    if path.stat().st_size > MANIFEST_MAX_BYTES:
        raise M3BindError("manifest.csv is too large", str(path))
    need = {"item_id", "patient", "modality", "path", "label", "condition", "report", "split"}
    items = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = need - set(reader.fieldnames or ())
        if missing:
            raise M3BindError(f"manifest.csv lacks columns {sorted(missing)}", str(path))
        for row in reader:
            if row["modality"] not in MODALITIES:
                log.warning("skipping item %s of unknown modality %r", row["item_id"], row["modality"])
                continue
            try:
                findings = {k: int(v) for k, v in json.loads(row.get("findings") or "{}").items()}
            except (ValueError, TypeError, AttributeError):
                findings = {}
            items.append(Item(row["item_id"], row["patient"], row["modality"], row["path"],
                              row["label"], findings, row["condition"] or "healthy",
                              row["report"] or "", row["split"]))
    return items


def items_from_dataset(name: str, root: str | Path, **kw: Any) -> list[Item]:
    """The items of a public data-set adapter (``data_registry.get(name, root)``) as manifest items.

    The adapter's label vector becomes ``findings`` (unknown labels left out, so that they are
    not scored); an item whose single positive label is one of the modality's zero-shot
    labels gets it as ``label`` (others take part in the per-finding and report tasks only).
    Adapters carry no systemic conditions, so cross-modal class-level tasks are skipped.
    """
    import data_registry

    ds = data_registry.get(name, root=root, **kw)
    spec_labels = set(SPECS[ds.modality].labels)
    items = []
    for i, rec in enumerate(ds):
        findings = {lab: int(v) for lab, v in zip(ds.labels, rec.labels) if not np.isnan(v)}
        pos = [lab for lab, v in findings.items() if v == 1]
        label = pos[0] if len(pos) == 1 and pos[0] in spec_labels else ""
        items.append(Item(f"{name}-{i}", str(rec.patient), ds.modality, str(rec.path), label,
                          findings, "", rec.report or "", rec.split or "test"))
    return items


def condition_set(condition: str) -> frozenset[str]:
    """Conditions of a manifest ``condition`` string (';'-joined; ``healthy`` is one)."""
    from data_registry.synthetic.cohort import condition_set as _cs

    return _cs(condition)


def primary_condition(condition: str) -> str:
    """The single highest-priority condition of a manifest ``condition`` string."""
    from data_registry.synthetic.cohort import primary_condition as _pc

    return _pc(condition)


def relevance_matrix(cond_q: list[str], cond_g: list[str], rule: str) -> np.ndarray:
    """Class-level cross-modal relevance ``[Q, G]``: patients sharing a condition (``overlap``,
    the simulated cohort's documented rule) or the same primary condition (``primary``)."""
    if rule == "primary":
        pq = np.array([primary_condition(c) for c in cond_q])
        pg = np.array([primary_condition(c) for c in cond_g])
        return pq[:, None] == pg[None, :]
    sq = [condition_set(c) for c in cond_q]
    sg = [condition_set(c) for c in cond_g]
    return np.array([[bool(a & b) for b in sg] for a in sq], dtype=bool).reshape(len(sq), len(sg))


def detect_simulated(root: Path, items: list[Item]) -> bool:
    """True when the cohort is the simulated one (its description says so, or every patient
    id has the simulator's ``SIM`` form)."""
    for name in ("README.md", "cohort.json", "SIMULATED"):
        p = root / name
        if p.is_file() and p.stat().st_size < 1_000_000 and "simulat" in p.read_text(
                errors="ignore").lower():
            return True
    return bool(items) and all(it.patient.startswith("SIM") for it in items)
