"""SICAPv2: prostate biopsy patches with Gleason patterns.

Citation: Silva-Rodríguez J, Colomer A, Sales MA, Molina R, Naranjo V. Going deeper through the
Gleason scoring scale: An automatic end-to-end system for histology prostate grading and
cribriform pattern detection. Comput Methods Programs Biomed 195, 105637 (2020).

Layout (Mendeley Data)::

    root/images/<image_name>.jpg
    root/partition/Test/Train.xlsx, root/partition/Test/Test.xlsx   columns image_name, NC, G3, G4, G5 (, G4C)
    (root/partition/Validation/Val1/Train.xlsx, Test.xlsx ... cross-validation folds, not used here)

Patient = the biopsy identifier before ``_Block`` in the image name; the official Test
partition is patient-disjoint from Train (here ``test``/``train``).
"""

from __future__ import annotations

from .base import DATASETS, MedicalDataset, Record, read_rows, to_label

SICAP_LABELS = ("non-cancerous", "gleason pattern 3", "gleason pattern 4", "gleason pattern 5")
_COLS = ("NC", "G3", "G4", "G5")


@DATASETS.register("sicapv2")
class SICAPv2(MedicalDataset):
    """SICAPv2 patches, one-hot over non-cancerous / Gleason 3 / 4 / 5 (the official Test partition)."""

    name, modality, labels = "sicapv2", "pathology", SICAP_LABELS
    citation = "Silva-Rodríguez et al., Comput Methods Programs Biomed 2020 (SICAPv2)"
    url = "https://data.mendeley.com/datasets/9xxm58dvs3/1"

    def _scan(self):
        found = False
        for fname, split in (("Train", "train"), ("Test", "test")):
            for ext in (".xlsx", ".csv"):
                p = self.root / "partition" / "Test" / (fname + ext)
                if not p.exists():
                    continue
                found = True
                for r in read_rows(p):
                    name = r["image_name"]
                    yield Record(path=self.root / "images" / name, patient=name.split("_Block")[0], split=split,
                                 labels=self._vector({lab: to_label(r[c]) for lab, c in zip(SICAP_LABELS, _COLS)}))
                break
        if not found:
            self._require("partition/Test/Train.xlsx")
