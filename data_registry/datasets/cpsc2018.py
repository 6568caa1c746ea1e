"""ICBEB / CPSC 2018: the China Physiological Signal Challenge 12-lead ECG set (6,877 records).

Citation: Liu F, Liu C, Zhao L, et al. An Open Access Database for Evaluating the Algorithms of
Electrocardiogram Rhythm and Morphology Abnormality Detection. J Med Imaging Health Inform 8(7),
1368-1373 (2018).

Layout: the challenge's ``REFERENCE.csv`` (Recording, First_label, Second_label, Third_label;
classes 1-9) and the records in WFDB format (``A0001.hea`` + ``.mat``/``.dat``, as in the
PhysioNet/CinC 2020 release) anywhere below root. One record per patient.
"""

from __future__ import annotations

from .base import DATASETS, MedicalDataset, Record, read_rows

CPSC_CLASSES = ("normal", "atrial fibrillation", "first-degree atrioventricular block", "left bundle branch block",
                "right bundle branch block", "premature atrial contraction", "premature ventricular contraction",
                "st-segment depression", "st-segment elevation")


@DATASETS.register("cpsc2018")
class CPSC2018(MedicalDataset):
    """CPSC 2018 multi-label rhythm/morphology classes (patient hash split; no public test labels)."""

    name, modality, labels = "cpsc2018", "ecg", CPSC_CLASSES
    citation = "Liu et al., J Med Imaging Health Inform 2018 (CPSC 2018 / ICBEB)"
    url = "http://2018.icbeb.org/Challenge.html"

    def _scan(self):
        ref = read_rows(self._require("REFERENCE.csv", "TrainingSet/REFERENCE.csv"))
        headers = {p.stem: p for p in sorted(self.root.rglob("*.hea"))}
        for r in ref:
            rec = r["Recording"]
            codes = {int(float(r[c])) for c in ("First_label", "Second_label", "Third_label") if r.get(c, "")}
            yield Record(path=headers.get(rec, self.root / f"{rec}.hea"), patient=rec,
                         labels=self._vector({name: float(i + 1 in codes) for i, name in enumerate(CPSC_CLASSES)}))


DATASETS.register("icbeb")(CPSC2018)
