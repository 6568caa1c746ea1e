"""PadChest: 160,000 chest radiographs from Hospital San Juan (Alicante), images only.

Citation: Bustos A, Pertusa A, Salinas JM, de la Iglesia-Vayá M. PadChest: A large chest x-ray
image dataset with multi-label annotated reports. Med Image Anal 66, 101797 (2020).

Used image-only, as MMCLIP does: labels become disease prompts (:meth:`prompt`); the Spanish
reports are not used. Layout (BIMCV)::

    root/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv(.gz)
        ImageID, ImageDir, StudyDate_DICOM, StudyID, PatientID, Projection, Labels ("['normal', 'cardiomegaly']"), ...
    root/<ImageDir>/<ImageID>     (16-bit PNG)
"""

from __future__ import annotations

import ast

from .base import DATASETS, MedicalDataset, Record, read_csv

PADCHEST_LABELS = ("normal", "cardiomegaly", "pleural effusion", "pneumonia", "consolidation", "nodule",
                   "mass", "atelectasis", "infiltrates", "emphysema", "fibrosis", "pneumothorax",
                   "hiatal hernia", "fracture", "scoliosis", "aortic elongation")


def parse_labels(cell) -> list[str]:
    """PadChest's ``Labels`` cell (a Python list literal) as stripped, lower-case strings."""
    if not isinstance(cell, str) or not cell.strip():
        return []
    try:
        vals = ast.literal_eval(cell)
    except (ValueError, SyntaxError):
        return []
    return [str(v).strip().lower() for v in vals if str(v).strip()]


@DATASETS.register("padchest")
class PadChest(MedicalDataset):
    """PadChest frontal images (PA, AP, AP horizontal) with multi-hot labels; no report text.

    Args:
        root: Data set root.
        split: Patient-hash split (PadChest has no official split).
        projections: Projections to keep (None keeps all).
    """

    name, modality, labels, has_reports = "padchest", "cxr", PADCHEST_LABELS, False
    citation = "Bustos et al., PadChest, Med Image Anal 2020"
    url = "https://bimcv.cipf.es/bimcv-projects/padchest/"

    def __init__(self, root, split: str = "all", *, projections: tuple[str, ...] | None = ("PA", "AP", "AP_horizontal"),
                 **kw):
        self.projections = projections
        super().__init__(root, split, **kw)

    def _scan(self):
        csv = self._require("PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz",
                            "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv")
        df = read_csv(csv, dtype=str, low_memory=False).fillna("")
        for r in df.to_dict("records"):
            if self.projections is not None and r.get("Projection", "") not in self.projections:
                continue
            found = set(parse_labels(r.get("Labels")))
            if not found:
                continue
            ddir = r.get("ImageDir", "")
            ddir = str(int(float(ddir))) if ddir.replace(".", "", 1).isdigit() else ddir
            yield Record(path=self.root / ddir / r["ImageID"], patient=r["PatientID"], study=r.get("StudyID"),
                         labels=self._vector({k: float(k in found) for k in self.labels}),
                         meta={"projection": r.get("Projection", ""), "study_date": r.get("StudyDate_DICOM", ""),
                               "all_labels": sorted(found)})
