"""CheXpert (v1.0 and v1.0-small) and the CheXpert 5x200 zero-shot benchmark.

Citation: Irvin J, Rajpurkar P, Ko M, et al. CheXpert: A Large Chest Radiograph Dataset with
Uncertainty Labels and Expert Comparison. AAAI 2019. 5x200: Huang SC et al., GLoRIA, ICCV 2021
(200 frontal images for each of five findings, exactly one positive among the five).

Layout (as distributed)::

    root/train.csv, root/valid.csv (, root/test.csv)
        Path, Sex, Age, Frontal/Lateral, AP/PA, No Finding, ..., Support Devices (1.0, 0.0, -1.0, blank)
    Path = CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg (relative to root's parent)
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from .base import DATASETS, MedicalDataset, Record, read_rows, to_label

CHEXPERT_LABELS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                   "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                   "Pleural Other", "Fracture", "Support Devices")
COMPETITION = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


def _resolve(root: Path, rel: str) -> Path:
    """CheXpert's Path column starts with the archive folder name; accept either base."""
    p = root.parent / rel
    if p.exists():
        return p
    parts = Path(rel).parts
    return root.joinpath(*parts[1:]) if len(parts) > 1 else root / rel


def _rows(ds: MedicalDataset):
    for fname, split in (("train.csv", "train"), ("valid.csv", "val"), ("test.csv", "test")):
        p = ds.root / fname
        if p.exists():
            for r in read_rows(p):
                yield r, split


@DATASETS.register("chexpert")
class CheXpert(MedicalDataset):
    """CheXpert with the distributor's train/valid(/test) split (patient-disjoint).

    Args:
        root: Folder with ``train.csv`` and ``valid.csv``.
        split: ``train`` | ``val`` | ``test`` | ``all``.
        frontal_only: Keep frontal views only.
        uncertain: Value for uncertain (-1) labels (NaN default; 1.0 U-ones; 0.0 U-zeros).
    """

    name, modality, labels = "chexpert", "cxr", CHEXPERT_LABELS
    citation = "Irvin et al., CheXpert, AAAI 2019"
    url = "https://stanfordmlgroup.github.io/competitions/chexpert/"

    def __init__(self, root, split: str = "all", *, frontal_only: bool = True, uncertain: float = math.nan, **kw):
        self.frontal_only, self.uncertain = frontal_only, uncertain
        super().__init__(root, split, **kw)

    def _scan(self):
        self._require("train.csv", "valid.csv")
        for r, split in _rows(self):
            if self.frontal_only and r.get("Frontal/Lateral", "Frontal") != "Frontal":
                continue
            m = re.search(r"(patient\d+)/(study\d+)", r["Path"])
            patient, study = (m.group(1), m.group(2)) if m else (r["Path"], None)
            yield Record(path=_resolve(self.root, r["Path"]), patient=patient, study=study, split=split,
                         labels=self._vector({k: to_label(r.get(k), self.uncertain) for k in self.labels}),
                         meta={"sex": r.get("Sex", ""), "age": r.get("Age", ""), "view": r.get("AP/PA", "")})


@DATASETS.register("chexpert5x200")
class CheXpert5x200(MedicalDataset):
    """CheXpert 5x200: ``per_class`` frontal training images per competition finding with exactly
    one certain positive among the five (all ``test``; drawn with ``np.random.default_rng(seed)``)."""

    name, modality, labels = "chexpert5x200", "cxr", COMPETITION
    citation = "Irvin et al., CheXpert, AAAI 2019; 5x200 as in Huang et al., GLoRIA, ICCV 2021"
    url = "https://stanfordmlgroup.github.io/competitions/chexpert/"

    def __init__(self, root, split: str = "all", *, per_class: int = 200, **kw):
        self.per_class = per_class
        super().__init__(root, split, **kw)

    def _scan(self):
        self._require("train.csv")
        by_class: dict[str, list[dict]] = {c: [] for c in COMPETITION}
        for r, split in _rows(self):
            if split != "train" or r.get("Frontal/Lateral", "Frontal") != "Frontal":
                continue
            vals = [to_label(r.get(c), uncertain=-1.0) for c in COMPETITION]
            if sum(v == 1 for v in vals) == 1 and not any(v == -1 for v in vals):
                by_class[COMPETITION[vals.index(1.0)]].append(r)
        rng = np.random.default_rng(self.seed)
        for k, c in enumerate(COMPETITION):
            rows = by_class[c]
            take = rng.permutation(len(rows))[: self.per_class]
            for i in sorted(take):
                r = rows[i]
                m = re.search(r"(patient\d+)", r["Path"])
                vec = np.zeros(len(COMPETITION), np.float32)
                vec[k] = 1
                yield Record(path=_resolve(self.root, r["Path"]), patient=m.group(1) if m else r["Path"],
                             labels=vec, split="test", meta={"class": c})
