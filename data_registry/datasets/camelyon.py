"""Camelyon16 whole-slide images and PatchCamelyon (PCam) patches.

Citations: Ehteshami Bejnordi B, Veta M, et al. Diagnostic Assessment of Deep Learning
Algorithms for Detection of Lymph Node Metastases in Women With Breast Cancer. JAMA 318(22),
2199-2210 (2017). Veeling BS, Linmans J, Winkens J, Cohen T, Welling M. Rotation Equivariant
CNNs for Digital Pathology. MICCAI 2018 (PCam).

Camelyon16 layout::

    root/training/normal/normal_001.tif, root/training/tumor/tumor_001.tif
    root/testing/images/test_001.tif, root/testing/reference.csv (no header: name, Tumor|Normal, ...)

PCam layout::

    root/camelyonpatch_level_2_split_{train,valid,test}_x.h5 (dataset ``x``: [N, 96, 96, 3] uint8)
    root/camelyonpatch_level_2_split_{train,valid,test}_y.h5 (dataset ``y``: [N, 1, 1, 1])
    root/camelyonpatch_level_2_split_{train,valid,test}_meta.csv (optional; column ``wsi``)
"""

from __future__ import annotations

import csv

import numpy as np

from .base import DATASETS, MedicalDataset, Record, normalise_split


@DATASETS.register("camelyon16")
class Camelyon16(MedicalDataset):
    """Camelyon16 slides, slide-level ``tumor`` label; official training/testing split (one slide per
    patient)."""

    name, modality, labels = "camelyon16", "pathology", ("tumor",)
    citation = "Ehteshami Bejnordi et al., JAMA 2017 (CAMELYON16)"
    url = "https://camelyon16.grand-challenge.org/"

    def _scan(self):
        self._require("training", "testing")
        for cls in ("normal", "tumor"):
            for p in sorted((self.root / "training" / cls).glob("*.tif")):
                yield Record(path=p, patient=p.stem, labels=self._vector({"tumor": float(cls == "tumor")}), split="train")
        ref = self.root / "testing" / "reference.csv"
        truth = {}
        if ref.exists():
            with open(ref, newline="") as fh:
                for row in csv.reader(fh):
                    if row and row[0].strip().lower() != "image":
                        truth[row[0].strip().replace(".tif", "")] = row[1].strip().lower() == "tumor"
        for p in sorted((self.root / "testing" / "images").glob("*.tif")):
            lab = {"tumor": float(truth[p.stem])} if p.stem in truth else {}
            yield Record(path=p, patient=p.stem, labels=self._vector(lab), split="test")


@DATASETS.register("pcam")
class PCam(MedicalDataset):
    """PatchCamelyon 96x96 patches from HDF5, official train/valid/test split (patient-disjoint by
    construction); :meth:`load` reads one patch into a Sample."""

    name, modality, labels = "pcam", "pathology", ("tumor",)
    citation = "Veeling et al., Rotation Equivariant CNNs for Digital Pathology, MICCAI 2018 (PCam)"
    url = "https://github.com/basveeling/pcam"

    def _scan(self):
        import h5py

        prefix = "camelyonpatch_level_2_split_"
        found = False
        for part in ("train", "valid", "test"):
            xp, yp = self.root / f"{prefix}{part}_x.h5", self.root / f"{prefix}{part}_y.h5"
            if not xp.exists():
                continue
            found = True
            with h5py.File(yp, "r") as f:
                y = np.asarray(f["y"]).reshape(-1)
            wsi = []
            mp = self.root / f"{prefix}{part}_meta.csv"
            if mp.exists():
                with open(mp, newline="") as fh:
                    wsi = [r.get("wsi", "") for r in csv.DictReader(fh)]
            for i, lab in enumerate(y):
                slide = wsi[i] if i < len(wsi) and wsi[i] else f"{part}_{i}"
                yield Record(path=xp, patient=slide, labels=self._vector({"tumor": float(lab)}),
                             split=normalise_split(part), meta={"index": i})
        if not found:
            self._require(f"{prefix}train_x.h5")

    def load(self, i: int):
        """One patch as an RGB uint8 Sample (``format="hdf5"``)."""
        import h5py

        from m3bind.io.sample import Sample

        rec = self.records[i]
        with h5py.File(rec.path, "r") as f:
            arr = np.asarray(f["x"][rec.meta["index"]], dtype=np.uint8)
        return Sample(array=arr, modality="pathology", format="hdf5", path=str(rec.path))
