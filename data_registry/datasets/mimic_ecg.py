"""MIMIC-IV-ECG (v1.0): diagnostic 12-lead ECGs with the ECG cart's machine statements.

Citation: Gow B, Pollard T, Nathanson LA, et al. MIMIC-IV-ECG: Diagnostic Electrocardiogram
Matched Subset (version 1.0). PhysioNet (2023). https://doi.org/10.13026/4nqg-sb35

Text and labels follow MEDBind's recipe (Gao et al., MEDBind, 2024): the report text is the
cart's machine statements ``report_0 .. report_17`` joined in order into one sentence list
(:func:`machine_report`), and class labels are derived from that text by keyword rules
(:data:`RULES`; our re-implementation, the rule list is ours). Layout::

    root/record_list.csv            subject_id, study_id, file_name, ecg_time, path (files/p1000/p10000032/s40689238/40689238)
    root/machine_measurements.csv   subject_id, study_id, cart_id, ecg_time, report_0 .. report_17, rr_interval, ...
    root/files/p1000/p10000032/s40689238/40689238.hea (+ .dat)
"""

from __future__ import annotations

import re

from .base import DATASETS, MedicalDataset, Record, read_csv, read_rows

#: Rule-based labels: label -> (pattern that sets it, veto pattern, veto scope). A veto in
#: scope "sentence" cancels only a hit in the same statement (hedges such as "possible ...
#: infarct"); in scope "text" it cancels the label for the whole report.
RULES: dict[str, tuple[str, str | None, str]] = {
    "normal sinus rhythm": (r"\bnormal ecg\b|\bnormal sinus rhythm\b", r"\babnormal ecg\b", "text"),
    "atrial fibrillation": (r"atrial fibrillation|\bafib\b", None, "sentence"),
    "left ventricular hypertrophy": (r"left ventricular hypertrophy|\blvh\b", r"\bpossible\b", "sentence"),
    "myocardial infarction": (r"infarct|myocardial infarction|st elevation",
                              r"\bpossible\b|\bconsider\b|cannot rule out|\bold\b|age undetermined", "sentence"),
    "sinus tachycardia": (r"sinus tachycardia", None, "sentence"),
}


def machine_report(row: dict, n: int = 18) -> str:
    """MEDBind's ECG text: the non-empty machine statements ``report_0..report_{n-1}``, in order,
    each ending with a full stop, joined by spaces."""
    parts = []
    for k in range(n):
        s = str(row.get(f"report_{k}", "") or "").strip()
        if s and s.lower() != "nan":
            parts.append(s if s.endswith(".") else s + ".")
    return " ".join(parts)


def rule_labels(text: str) -> dict[str, float]:
    """Labels (1/0) from machine-statement text by :data:`RULES`."""
    t = text.lower()
    sentences = [x.strip() for x in re.split(r"[.;]", t) if x.strip()]
    out = {}
    for label, (pos, veto, scope) in RULES.items():
        if scope == "text":
            hit = re.search(pos, t) is not None and not (veto and re.search(veto, t))
        else:
            hit = any(re.search(pos, x) and not (veto and re.search(veto, x)) for x in sentences)
        out[label] = float(hit)
    return out


@DATASETS.register("mimic_iv_ecg")
class MIMICIVECG(MedicalDataset):
    """MIMIC-IV-ECG records with machine-statement text and rule-based labels (subject hash split)."""

    name, modality, labels, has_reports = "mimic_iv_ecg", "ecg", tuple(RULES), True
    citation = "Gow et al., MIMIC-IV-ECG v1.0, PhysioNet 2023"
    url = "https://physionet.org/content/mimic-iv-ecg/1.0/"

    def _scan(self):
        rec = read_csv(self._require("record_list.csv", "record_list.csv.gz"), dtype=str).fillna("")
        mm_p = self.root / "machine_measurements.csv"
        mm = {}
        if mm_p.exists():
            for r in read_rows(mm_p):
                mm[r["study_id"]] = r
        for r in rec.to_dict("records"):
            text = machine_report(mm.get(r["study_id"], {}))
            yield Record(path=self.root / (r["path"] + ".hea"), patient=r["subject_id"], study=r["study_id"],
                         report=text or None, labels=self._vector(rule_labels(text)) if text else self._vector({}),
                         meta={"ecg_time": r.get("ecg_time", "")})
