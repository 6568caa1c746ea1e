"""RSNA Pneumonia Detection Challenge (2018, stage 2).

Citation: Shih G, Wu CC, Halabi SS, et al. Augmenting the National Institutes of Health Chest
Radiograph Dataset with Expert Annotations of Possible Pneumonia. Radiol Artif Intell 2019.

Layout (Kaggle)::

    root/stage_2_train_labels.csv          patientId, x, y, width, height, Target (one row per box)
    root/stage_2_detailed_class_info.csv   patientId, class (Lung Opacity / Normal / No Lung Opacity / Not Normal)
    root/stage_2_train_images/<patientId>.dcm
"""

from __future__ import annotations

from .base import DATASETS, MedicalDataset, Record, read_csv


@DATASETS.register("rsna_pneumonia")
class RSNAPneumonia(MedicalDataset):
    """RSNA Pneumonia: one DICOM per ``patientId``; label ``pneumonia`` (any box), boxes in meta.
    The challenge's test labels are not public, so splits are a patient hash of the training set."""

    name, modality, labels = "rsna_pneumonia", "cxr", ("pneumonia",)
    citation = "Shih et al., Radiol Artif Intell 2019 (RSNA Pneumonia Detection Challenge)"
    url = "https://www.kaggle.com/c/rsna-pneumonia-detection-challenge"

    def _scan(self):
        lab = read_csv(self._require("stage_2_train_labels.csv"), dtype={"patientId": str})
        info_p = self.root / "stage_2_detailed_class_info.csv"
        info = dict(read_csv(info_p, dtype=str).drop_duplicates("patientId").values) if info_p.exists() else {}
        for pid, g in lab.groupby("patientId", sort=True):
            boxes = [[float(v) for v in row] for row in g[["x", "y", "width", "height"]].dropna().values]
            target = float(g["Target"].max())
            yield Record(path=self.root / "stage_2_train_images" / f"{pid}.dcm", patient=str(pid),
                         labels=self._vector({"pneumonia": target}),
                         meta={"boxes": boxes, "class": info.get(pid, "")})
