"""MESSIDOR and MESSIDOR-2: diabetic retinopathy grading of fundus photographs.

Citation: Decencière E, Zhang X, Cazuguel G, et al. Feedback on a publicly distributed image
database: the Messidor database. Image Anal Stereol 33(3), 231-234 (2014). MESSIDOR-2
adjudicated grades: Krause J et al., Ophthalmology 125(8), 2018.

Layouts::

    MESSIDOR-2:  root/messidor_data.csv (image_id, adjudicated_dr_grade 0-4, adjudicated_dme, adjudicated_gradable)
                 root/IMAGES/<image_id>  (or root/images/, root/messidor-2/preprocess/)
    MESSIDOR:    root/Base11/Annotation_Base11.csv|.xls ... (Image name, Ophthalmologic department,
                 Retinopathy grade 0-3, Risk of macular edema 0-2), images beside the annotation file

Neither release names patients, so the unit of splitting is the image (MESSIDOR-2) or the
image's examination stem; say so when reporting.
"""

from __future__ import annotations

from .base import DATASETS, MedicalDataset, Record, read_csv, read_rows

DR_LABELS = ("no diabetic retinopathy", "mild diabetic retinopathy", "moderate diabetic retinopathy",
             "severe diabetic retinopathy", "proliferative diabetic retinopathy", "macular edema")


@DATASETS.register("messidor")
class Messidor(MedicalDataset):
    """MESSIDOR(-2) DR grade (one-hot over grades) plus macular oedema; ungradable images dropped."""

    name, modality, labels = "messidor", "retina", DR_LABELS
    citation = "Decencière et al., Image Anal Stereol 2014 (MESSIDOR); Krause et al., Ophthalmology 2018 (grades)"
    url = "https://www.adcis.net/en/third-party/messidor2/"

    def _vec(self, grade: int, dme: float):
        v = {lab: 0.0 for lab in DR_LABELS[:5]}
        v[DR_LABELS[min(max(grade, 0), 4)]] = 1.0
        v["macular edema"] = dme
        return self._vector(v)

    def _scan(self):
        m2 = self.root / "messidor_data.csv"
        if m2.exists():
            img_dir = next((self.root / d for d in ("IMAGES", "images", "messidor-2/preprocess")
                            if (self.root / d).is_dir()), self.root)
            for r in read_rows(m2):
                if r.get("adjudicated_gradable", "1") in ("0", "0.0") or not r.get("adjudicated_dr_grade"):
                    continue
                dme = float(r["adjudicated_dme"]) if r.get("adjudicated_dme") else float("nan")
                yield Record(path=img_dir / r["image_id"], patient=r["image_id"],
                             labels=self._vec(int(float(r["adjudicated_dr_grade"])), dme))
            return
        annots = sorted(self.root.rglob("Annotation_Base*.csv")) + sorted(self.root.rglob("Annotation_Base*.xls*"))
        if not annots:
            self._require("messidor_data.csv", "Annotation_Base11.csv")
        for a in annots:
            if a.suffix == ".csv":
                df = read_csv(a, dtype=str)
            else:
                import pandas as pd

                df = pd.read_excel(a, dtype=str)
            df.columns = [c.strip() for c in df.columns]
            for r in df.fillna("").to_dict("records"):
                grade = int(float(r["Retinopathy grade"]))
                # MESSIDOR's 0-3 scale: 3 is its most severe grade
                dme = float(float(r.get("Risk of macular edema", "0") or 0) > 0)
                name = r["Image name"]
                yield Record(path=a.parent / name, patient=name.rsplit(".", 1)[0],
                             labels=self._vec(grade, dme), meta={"department": r.get("Ophthalmologic department", "")})
