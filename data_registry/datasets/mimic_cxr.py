"""MIMIC-CXR-JPG (v2.0.0) with the free-text reports of MIMIC-CXR.

Citation: Johnson AEW, Pollard TJ, Greenbaum NR, et al. MIMIC-CXR-JPG, a large publicly
available database of labeled chest radiographs. arXiv:1901.07042 (2019); Johnson AEW et al.
MIMIC-CXR, a de-identified publicly available database of chest radiographs with free-text
reports. Sci Data 6, 317 (2019). PhysioNet, credentialed access.

Layout (as distributed)::

    root/mimic-cxr-2.0.0-metadata.csv(.gz)   dicom_id, subject_id, study_id, ViewPosition, StudyDate, StudyTime, ...
    root/mimic-cxr-2.0.0-chexpert.csv(.gz)   subject_id, study_id, <14 CheXpert labels> (1, 0, -1, blank)
    root/mimic-cxr-2.0.0-split.csv(.gz)      dicom_id, study_id, subject_id, split (train/validate/test)
    root/files/p10/p10000032/s50414267/<dicom_id>.jpg
    reports: root/files/p10/p10000032/s50414267.txt (MIMIC-CXR), or under root/mimic-cxr-reports/files/...
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from .base import DATASETS, MedicalDataset, Record, normalise_split, read_csv, to_label

CHEXPERT_LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
                   "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
                   "Pneumonia", "Pneumothorax", "Support Devices")

_SECTION = re.compile(r"^\s*([A-Z][A-Z /]+):", re.MULTILINE)


def report_sections(text: str) -> dict[str, str]:
    """Split a MIMIC-CXR report into its upper-case sections (``FINDINGS``, ``IMPRESSION`` ...)."""
    out: dict[str, str] = {}
    marks = list(_SECTION.finditer(text))
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        out[m.group(1).strip()] = " ".join(text[m.end():end].split())
    return out


def findings_impression(text: str) -> str:
    """``Findings: ... Impression: ...`` of a report (the whole text when it has neither)."""
    s = report_sections(text)
    parts = [f"{k.title()}: {s[k]}" for k in ("FINDINGS", "IMPRESSION") if s.get(k)]
    return " ".join(parts) if parts else " ".join(text.split())


@DATASETS.register("mimic_cxr")
class MIMICCXR(MedicalDataset):
    """MIMIC-CXR-JPG images with CheXpert labels, official split and reports.

    Args:
        root: Data set root (see module docstring).
        split: ``train`` | ``val`` | ``test`` | ``all`` (official split, patient-disjoint).
        views: View positions to keep (default frontal ``PA`` and ``AP``); None keeps all.
        uncertain: Value for uncertain (-1) labels: NaN (default), 1.0 (U-ones) or 0.0 (U-zeros).
        reports: Attach findings + impression text when the report file exists.
    """

    name, modality, labels, has_reports = "mimic_cxr", "cxr", CHEXPERT_LABELS, True
    citation = "Johnson et al., MIMIC-CXR-JPG (arXiv:1901.07042) and MIMIC-CXR (Sci Data 2019)"
    url = "https://physionet.org/content/mimic-cxr-jpg/2.0.0/"

    def __init__(self, root, split: str = "all", *, views: tuple[str, ...] | None = ("PA", "AP"),
                 uncertain: float = math.nan, reports: bool = True, **kw):
        self.views, self.uncertain, self.with_reports = views, uncertain, reports
        super().__init__(root, split, **kw)

    def _report(self, subject: str, study: str) -> str | None:
        rel = Path("files") / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
        for base in (self.root, self.root / "mimic-cxr-reports", self.root / "reports"):
            p = base / rel
            if p.is_file():
                return findings_impression(p.read_text(errors="replace"))
        return None

    def _scan(self):
        meta = read_csv(self._require("mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-metadata.csv"), dtype=str)
        lab = read_csv(self._require("mimic-cxr-2.0.0-chexpert.csv.gz", "mimic-cxr-2.0.0-chexpert.csv"), dtype=str)
        spl = read_csv(self._require("mimic-cxr-2.0.0-split.csv.gz", "mimic-cxr-2.0.0-split.csv"), dtype=str)
        labels = {(r["subject_id"], r["study_id"]): r for r in lab.fillna("").to_dict("records")}
        split_of = dict(zip(spl["dicom_id"], spl["split"]))
        for r in meta.fillna("").to_dict("records"):
            if self.views is not None and r.get("ViewPosition", "") not in self.views:
                continue
            subj, study, dicom = r["subject_id"], r["study_id"], r["dicom_id"]
            lr = labels.get((subj, study), {})
            vec = self._vector({k: to_label(lr.get(k), self.uncertain) for k in self.labels})
            path = self.root / "files" / f"p{subj[:2]}" / f"p{subj}" / f"s{study}" / f"{dicom}.jpg"
            yield Record(path=path, patient=subj, labels=vec, study=study,
                         report=self._report(subj, study) if self.with_reports else None,
                         split=normalise_split(split_of[dicom]) if dicom in split_of else None,
                         meta={"dicom_id": dicom, "view": r.get("ViewPosition", ""),
                               "study_date": r.get("StudyDate", ""), "study_time": r.get("StudyTime", "")})
