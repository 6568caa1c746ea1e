"""Base class and registry of the public data-set adapters.

Every adapter reads the on-disk layout its distributor documents (CSV names and columns as
downloaded), yields one :class:`Record` per item and is registered by name::

    @DATASETS.register("ptbxl")
    class PTBXL(MedicalDataset): ...

    ds = data_registry.get("ptbxl", root="/data/ptb-xl", split="train")
    rec = ds[0]                  # Record(path, patient, labels, report, ...)
    sample = ds.load(0)          # m3bind.io.load(...) -> Sample

Conventions (as torchxrayvision's, without its habits): labels are a float32 vector over
:attr:`MedicalDataset.labels` with 1 (present), 0 (absent) and NaN (unknown/uncertain);
splits are patient-level (the distributor's official split when it has one, otherwise a
stable hash of the patient identifier and the seed); no global random state is touched and
no argument has a mutable default.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from m3bind.errors import M3BindError
from m3bind.registry import Registry

#: The registry of data-set adapters (name -> class).
DATASETS: Registry = Registry("dataset")

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validate": "val",
                  "validation": "val", "dev": "val", "test": "test", "testing": "test"}


class DatasetLayoutError(M3BindError):
    """A data-set root does not hold the files its distributor's layout names."""


@dataclass(frozen=True)
class Record:
    """One item of a public data set.

    Attributes:
        path: File or folder to read (a DICOM series folder, a WFDB record's ``.hea``, ...).
        patient: Patient identifier (the unit of splitting).
        labels: ``float32 [L]`` over the data set's :attr:`~MedicalDataset.labels`: 1, 0 or NaN.
        report: Report text, when the data set has one.
        study: Study / visit identifier, when there is one.
        split: ``train``, ``val`` or ``test``.
        meta: Further per-item fields (dates, view position, source row ...).
    """

    path: Path
    patient: str
    labels: np.ndarray
    report: str | None = None
    study: str | None = None
    split: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)


def hash_split(patient: str, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2) -> str:
    """A stable patient-level split from a hash of ``seed`` and the patient id.

    The same patient always lands in the same split for a given seed, whatever else is in
    the data set, and no random state is used.
    """
    h = hashlib.sha256(f"{seed}:{patient}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2.0 ** 64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def normalise_split(name: str) -> str:
    """Map a distributor's split name (``validate``, ``valid``, ``training`` ...) to train/val/test."""
    try:
        return _SPLIT_ALIASES[str(name).strip().lower()]
    except KeyError:
        raise ValueError(f"unknown split {name!r}") from None


def to_label(value, uncertain: float = math.nan) -> float:
    """Convert a CheXpert-style label cell to 1/0/NaN (``-1`` -> ``uncertain``, blank -> NaN)."""
    if value is None:
        return math.nan
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return math.nan
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    if math.isnan(v):
        return math.nan
    if v == -1:
        return uncertain
    return 1.0 if v > 0 else 0.0


class MedicalDataset(Sequence[Record]):
    """Base class of all adapters.

    Class attributes (set by each adapter):
        name: Registry name.
        modality: m3bind modality of the items.
        labels: Label names, the columns of :meth:`label_matrix`.
        has_reports: Whether records carry report text.
        citation: How to cite the data set.
        url: Where it is distributed.

    Args:
        root: Folder holding the data set as downloaded.
        split: ``train``, ``val``, ``test`` or ``all``.
        seed: Seed of the hash split (data sets without an official split).
        val_fraction: Fraction of patients in ``val`` for the hash split.
        test_fraction: Fraction of patients in ``test`` for the hash split.
    """

    name: ClassVar[str] = ""
    modality: ClassVar[str] = ""
    labels: Sequence[str] = ()
    has_reports: ClassVar[bool] = False
    citation: ClassVar[str] = ""
    url: ClassVar[str] = ""

    def __init__(self, root, split: str = "all", *, seed: int = 0, val_fraction: float = 0.1,
                 test_fraction: float = 0.2):
        self.root = Path(root)
        if not self.root.exists():
            raise DatasetLayoutError(f"{self.name}: data set root does not exist", str(self.root))
        if split != "all":
            split = normalise_split(split)
        self.split = split
        self.seed, self.val_fraction, self.test_fraction = seed, val_fraction, test_fraction
        records = []
        for rec in self._scan():
            s = rec.split or hash_split(rec.patient, seed, val_fraction, test_fraction)
            if rec.split != s:
                rec = Record(rec.path, rec.patient, rec.labels, rec.report, rec.study, s, rec.meta)
            if split == "all" or s == split:
                records.append(rec)
        self.records: list[Record] = records

    # -- to implement
    def _scan(self) -> Iterable[Record]:
        """Yield every record of the data set (all splits)."""
        raise NotImplementedError

    # -- helpers for adapters
    def _require(self, *candidates: str) -> Path:
        """The first existing file among ``candidates`` (relative to root), else a layout error."""
        for c in candidates:
            p = self.root / c
            if p.exists():
                return p
        raise DatasetLayoutError(f"{self.name}: expected one of {', '.join(candidates)}", str(self.root))

    def _vector(self, values: Mapping[str, float]) -> np.ndarray:
        return np.array([values.get(lab, math.nan) for lab in self.labels], dtype=np.float32)

    # -- Sequence protocol and conveniences
    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):  # type: ignore[override]
        return self.records[i]

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def label_matrix(self) -> np.ndarray:
        """``float32 [N, L]`` labels (1/0/NaN) of the selected split."""
        if not self.records:
            return np.zeros((0, len(self.labels)), np.float32)
        return np.stack([r.labels for r in self.records]).astype(np.float32)

    def patients(self) -> set[str]:
        """Patient identifiers of the selected split."""
        return {r.patient for r in self.records}

    def texts(self) -> list[str | None]:
        """Report text per record (None where there is none)."""
        return [r.report for r in self.records]

    def prompt(self, i: int) -> str:
        """A disease prompt for record ``i`` from its positive labels (for image-only data, as
        MMCLIP turns labels into text)."""
        pos = [lab for lab, v in zip(self.labels, self.records[i].labels) if v == 1]
        return f"findings: {', '.join(pos)}." if pos else "no finding."

    def load(self, i: int):
        """Read record ``i`` with :func:`m3bind.io.load` (returns a :class:`~m3bind.io.sample.Sample`)."""
        from m3bind.io import load

        return load(self.records[i].path, self.modality)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"


def read_csv(path: Path, **kw):
    """Read a (possibly gzipped) CSV with pandas, strings kept as strings."""
    import pandas as pd

    return pd.read_csv(path, **kw)


def read_rows(path: Path, **kw) -> list[dict[str, str]]:
    """The rows of a distributor's table as dicts, every cell a string and blank cells ``""``.

    ``.xlsx``/``.xls`` files are read with :func:`pandas.read_excel`, anything else (CSV,
    gzipped CSV) with :func:`read_csv`; ``kw`` goes to the pandas reader.
    """
    import pandas as pd

    reader = pd.read_excel if Path(path).suffix.lower() in (".xlsx", ".xls") else read_csv
    return reader(path, dtype=str, **kw).fillna("").to_dict("records")


def find_file(root: Path, name: str) -> Path | None:
    """The first file called ``name`` below ``root`` (sorted walk), or None."""
    hits = sorted(root.rglob(name))
    return hits[0] if hits else None
