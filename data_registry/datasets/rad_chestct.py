"""RAD-ChestCT: 35,747 chest CT volumes of 19,661 patients (Duke), with 83 abnormality labels.

Citation: Draelos RL, Dov D, Mazurowski MA, et al. Machine-learning-based multiple abnormality
prediction with large-scale chest computed tomography volumes. Med Image Anal 67, 101857 (2021).

Layout (Zenodo release)::

    root/imgtrain_Abnormality_and_Location_Labels.csv, imgvalid_..., imgtest_...
        first column: volume name (trn00001); then one 0/1 column per "abnormality*location"
    root/**/<volume name>.npz   array ``ct`` [Z, Y, X] in Hounsfield units (0.8 mm isotropic)

Abnormality labels are the maximum over locations. The distributor's split is patient-disjoint.
Volumes are NumPy archives, read here with ``allow_pickle=False``.
"""

from __future__ import annotations

import numpy as np

from .base import DATASETS, MedicalDataset, Record, read_csv

_SPLITS = (("imgtrain", "train"), ("imgvalid", "val"), ("imgtest", "test"))


@DATASETS.register("rad_chestct")
class RADChestCT(MedicalDataset):
    """RAD-ChestCT abnormality labels (collapsed over locations); ``labels`` come from the CSV header."""

    name, modality = "rad_chestct", "ct"
    citation = "Draelos et al., Med Image Anal 2021 (RAD-ChestCT)"
    url = "https://zenodo.org/record/6406114"

    def _scan(self):
        files = [(self.root / f"{pre}_Abnormality_and_Location_Labels.csv", split) for pre, split in _SPLITS]
        files = [(p, s) for p, s in files if p.exists()]
        if not files:
            self._require("imgtrain_Abnormality_and_Location_Labels.csv")
        volumes = {p.stem: p for p in self.root.rglob("*.npz")}
        labels: list[str] = []
        rows = []
        for p, split in files:
            df = read_csv(p, index_col=0)
            abn = sorted({c.split("*")[0] for c in df.columns})
            labels = labels or abn
            for name, r in df.iterrows():
                present = {c.split("*")[0] for c, v in r.items() if v == 1}
                rows.append((str(name), split, present))
        self.labels = tuple(labels)
        for name, split, present in rows:
            stem = name.replace(".npz", "")
            yield Record(path=volumes.get(stem, self.root / f"{stem}.npz"), patient=stem, split=split,
                         labels=self._vector({k: float(k in present) for k in self.labels}))

    def load(self, i: int):
        """Read the ``ct`` array of a volume archive (no pickles) into a Sample in HU."""
        from m3bind.errors import CorruptFile
        from m3bind.io.sample import Sample

        rec = self.records[i]
        try:
            with np.load(rec.path, allow_pickle=False) as z:
                arr = np.asarray(z["ct"] if "ct" in z.files else z[z.files[0]], dtype=np.float32)
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise CorruptFile(f"cannot read RAD-ChestCT volume: {e}", str(rec.path)) from None
        return Sample(array=arr, modality="ct", format="npz", path=str(rec.path), spacing=(0.8, 0.8, 0.8))
