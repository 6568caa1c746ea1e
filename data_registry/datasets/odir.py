"""ODIR-5K: Ocular Disease Intelligent Recognition, fundus photographs of both eyes of 5,000 patients.

Citation: Peking University International Competition on Ocular Disease Intelligent Recognition
(ODIR-2019); Li N, Li T, Hu C, et al. A Benchmark of Ocular Disease Intelligent Recognition:
One Shot for Multi-disease Detection. Bench 2020, LNCS 12614 (2021).

Layout::

    root/ODIR-5K_Training_Annotations(Updated)_V2.xlsx  (or a CSV export, or Kaggle's full_df.csv)
        ID, Patient Age, Patient Sex, Left-Fundus, Right-Fundus, Left-Diagnostic Keywords,
        Right-Diagnostic Keywords, N, D, G, C, A, H, M, O
    root/ODIR-5K_Training_Dataset/<ID>_left.jpg   (or root/Training Images/, root/preprocessed_images/)

Labels are the patient-level letters as given; the eye's diagnostic keywords are its text.
"""

from __future__ import annotations

from .base import DATASETS, MedicalDataset, Record, read_rows

ODIR_LABELS = ("normal", "diabetes", "glaucoma", "cataract", "age-related macular degeneration",
               "hypertension", "pathological myopia", "other")
_LETTERS = ("N", "D", "G", "C", "A", "H", "M", "O")


@DATASETS.register("odir")
class ODIR(MedicalDataset):
    """ODIR-5K: one record per eye, patient-level labels, keywords as report; patient hash split."""

    name, modality, labels, has_reports = "odir", "retina", ODIR_LABELS, True
    citation = "Li et al., A Benchmark of Ocular Disease Intelligent Recognition, Bench 2020 (ODIR-5K)"
    url = "https://odir2019.grand-challenge.org/"

    def _table(self) -> list[dict[str, str]]:
        for name in ("ODIR-5K_Training_Annotations(Updated)_V2.csv", "full_df.csv", "data.csv"):
            if (self.root / name).exists():
                return read_rows(self.root / name)
        xlsx = sorted(self.root.glob("ODIR-5K_Training_Annotations*.xlsx"))
        if xlsx:
            return read_rows(xlsx[0])
        self._require("ODIR-5K_Training_Annotations(Updated)_V2.xlsx", "full_df.csv")

    def _scan(self):
        rows = self._table()
        img_dir = next((self.root / d for d in ("ODIR-5K_Training_Dataset", "Training Images", "preprocessed_images",
                                                "ODIR-5K/Training Images") if (self.root / d).is_dir()), self.root)
        seen = set()
        for r in rows:
            pid = str(int(float(r["ID"])))
            if pid in seen:  # Kaggle's full_df.csv repeats the patient row per eye
                continue
            seen.add(pid)
            vec = self._vector({lab: float(r[k] not in ("", "0", "0.0")) for lab, k in zip(ODIR_LABELS, _LETTERS)})
            for eye in ("Left", "Right"):
                fname = r.get(f"{eye}-Fundus", "")
                if fname:
                    yield Record(path=img_dir / fname, patient=pid, labels=vec,
                                 report=r.get(f"{eye}-Diagnostic Keywords") or None,
                                 meta={"eye": eye.lower(), "age": r.get("Patient Age", ""),
                                       "sex": r.get("Patient Sex", "")})
