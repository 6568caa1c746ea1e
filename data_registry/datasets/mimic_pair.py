"""MIMIC-PAIR: chest X-rays paired with ECGs of the same patient, by MEDBind's rule.

Citation: Gao Y, Kim S, Austin DE, McIntosh C. MEDBind: Unifying Language and Multimodal Medical
Data Embeddings. MICCAI 2024 (arXiv:2403.12894). Built from MIMIC-CXR-JPG (Johnson et al. 2019)
and MIMIC-IV-ECG (Gow et al. 2023); admissions from MIMIC-IV (Johnson et al., Sci Data 2023).

Rule: a CXR image and an ECG are paired when both fall within the same hospital admission
(``hadm_id``, from MIMIC-IV ``hosp/admissions.csv(.gz)``: admittime <= time <= dischtime);
otherwise when they belong to the same subject and are at most 24 h apart. Each CXR image is
paired with the closest qualifying ECG (same-admission candidates first).

Layout::

    root/mimic-cxr-jpg/    (the MIMIC-CXR-JPG layout, see ``mimic_cxr``)
    root/mimic-iv-ecg/     (the MIMIC-IV-ECG layout, see ``mimic_iv_ecg``)
    root/mimic-iv/hosp/admissions.csv(.gz)   subject_id, hadm_id, admittime, dischtime (optional)
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict

from .base import DATASETS, MedicalDataset, Record, read_rows
from .mimic_cxr import CHEXPERT_LABELS, MIMICCXR
from .mimic_ecg import MIMICIVECG

MAX_GAP = dt.timedelta(hours=24)


def cxr_time(study_date: str, study_time: str) -> dt.datetime:
    """MIMIC-CXR ``StudyDate`` (YYYYMMDD) and ``StudyTime`` (HHMMSS[.fff]) as a datetime."""
    t = f"{float(study_time or 0):09.2f}"[:6] if study_time else "000000"
    return dt.datetime.strptime(str(study_date)[:8] + t, "%Y%m%d%H%M%S")


def find_admission(admissions: list[tuple[dt.datetime, dt.datetime, str]], when: dt.datetime) -> str | None:
    """The ``hadm_id`` whose [admittime, dischtime] holds ``when`` (None when none does)."""
    for start, end, hadm in admissions:
        if start <= when <= end:
            return hadm
    return None


def pair(cxr: list[dict], ecg: list[dict], admissions: dict[str, list]) -> list[tuple[dict, dict, str]]:
    """Apply MEDBind's rule. ``cxr``/``ecg`` items need ``subject`` and ``time`` (datetime).

    Returns:
        ``(cxr_item, ecg_item, rule)`` with rule ``"hadm"`` or ``"24h"``, one per pairable CXR.
    """
    by_subject = defaultdict(list)
    for e in ecg:
        by_subject[e["subject"]].append(e)
    out = []
    for c in cxr:
        cands = by_subject.get(c["subject"], [])
        if not cands:
            continue
        adm = admissions.get(c["subject"], [])
        c_hadm = find_admission(adm, c["time"])
        same = [e for e in cands if c_hadm is not None and find_admission(adm, e["time"]) == c_hadm]
        if same:
            out.append((c, min(same, key=lambda e: abs(e["time"] - c["time"])), "hadm"))
            continue
        near = [e for e in cands if abs(e["time"] - c["time"]) <= MAX_GAP]
        if near:
            out.append((c, min(near, key=lambda e: abs(e["time"] - c["time"])), "24h"))
    return out


@DATASETS.register("mimic_pair")
class MIMICPair(MedicalDataset):
    """Paired CXR-ECG items: records are the CXR images (labels = CheXpert labels, report = CXR
    report) with the paired ECG in ``meta`` (``ecg_path``, ``ecg_report``, ``rule``); patient hash split."""

    name, modality, labels, has_reports = "mimic_pair", "cxr", CHEXPERT_LABELS, True
    citation = "Gao et al., MEDBind, MICCAI 2024; MIMIC-CXR-JPG; MIMIC-IV-ECG; MIMIC-IV"
    url = "https://physionet.org/"

    def _scan(self):
        cxr_ds = MIMICCXR(self._require("mimic-cxr-jpg"), "all", seed=self.seed)
        ecg_ds = MIMICIVECG(self._require("mimic-iv-ecg"), "all", seed=self.seed)
        admissions: dict[str, list] = defaultdict(list)
        for name in ("mimic-iv/hosp/admissions.csv.gz", "mimic-iv/hosp/admissions.csv"):
            p = self.root / name
            if p.exists():
                for r in read_rows(p):
                    if r.get("admittime") and r.get("dischtime"):
                        admissions[r["subject_id"]].append((dt.datetime.fromisoformat(r["admittime"]),
                                                            dt.datetime.fromisoformat(r["dischtime"]), r["hadm_id"]))
                break
        cxr = [{"subject": r.patient, "time": cxr_time(r.meta["study_date"], r.meta["study_time"]), "rec": r}
               for r in cxr_ds if r.meta.get("study_date")]
        ecg = [{"subject": r.patient, "time": dt.datetime.fromisoformat(r.meta["ecg_time"]), "rec": r}
               for r in ecg_ds if r.meta.get("ecg_time")]
        for c, e, rule in pair(cxr, ecg, admissions):
            cr, er = c["rec"], e["rec"]
            yield Record(path=cr.path, patient=cr.patient, labels=cr.labels, report=cr.report, study=cr.study,
                         meta={**cr.meta, "ecg_path": str(er.path), "ecg_study": er.study, "ecg_report": er.report,
                               "ecg_labels": er.labels.tolist(), "rule": rule,
                               "gap_hours": abs((e["time"] - c["time"]).total_seconds()) / 3600})

    def load_pair(self, i: int):
        """``(cxr_sample, ecg_sample)`` of pair ``i``."""
        from m3bind.io import load

        rec = self.records[i]
        return load(rec.path, "cxr"), load(rec.meta["ecg_path"], "ecg")
