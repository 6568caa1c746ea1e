"""BraTS: multi-parametric brain MRI of gliomas (T1, T1-Gd, T2, T2-FLAIR) with tumour segmentations.

Citation: Baid U, Ghodasara S, Mohan S, et al. The RSNA-ASNR-MICCAI BraTS 2021 Benchmark on
Brain Tumor Segmentation and Radiogenomic Classification. arXiv:2107.02314 (2021); Menze BH et
al., IEEE TMI 34(10), 2015.

Layouts::

    BraTS 2021:  root/BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz
    BraTS 2023:  root/BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz

:meth:`load` returns the m3bind MRI channels (t1, t2, flair; dwi absent -> zeros downstream).
Every case has a tumour: label ``brain tumor`` = 1 (and ``enhancing tumor`` from the seg, when read).
"""

from __future__ import annotations

import re

import numpy as np

from .base import DATASETS, MedicalDataset, Record

#: m3bind sequence name -> file suffixes (2021, 2023).
SEQUENCE_FILES = {"t1": ("t1", "t1n"), "t1ce": ("t1ce", "t1c"), "t2": ("t2", "t2w"), "flair": ("flair", "t2f"),
                  "seg": ("seg",)}


@DATASETS.register("brats")
class BraTS(MedicalDataset):
    """BraTS cases (one folder per patient); patient hash split (validation labels are not public)."""

    name, modality, labels = "brats", "mri", ("brain tumor",)
    citation = "Baid et al., BraTS 2021, arXiv:2107.02314; Menze et al., IEEE TMI 2015"
    url = "https://www.synapse.org/brats"

    def _scan(self):
        cases = [d for d in sorted(self.root.iterdir()) if d.is_dir() and re.match(r"BraTS", d.name)]
        if not cases:
            self._require("BraTS2021_00000")
        for d in cases:
            files = {}
            for seq, sufs in SEQUENCE_FILES.items():
                for s in sufs:
                    for sep in ("_", "-"):
                        p = d / f"{d.name}{sep}{s}.nii.gz"
                        if p.exists():
                            files[seq] = p
            if not files:
                continue
            patient = re.sub(r"-\d{3}$", "", d.name)  # BraTS-GLI-00000-000: timepoint suffix
            yield Record(path=d, patient=patient, labels=self._vector({"brain tumor": 1.0}),
                         meta={"files": {k: str(v) for k, v in files.items()}})

    def load(self, i: int):
        """Read t1/t2/flair (and t1ce) of case ``i`` into one ``[C, Z, Y, X]`` Sample."""
        from m3bind.io import load
        from m3bind.io.sample import Sample

        rec = self.records[i]
        chans, names, spacing = [], [], None
        for seq in ("t1", "t1ce", "t2", "flair"):
            p = rec.meta["files"].get(seq)
            if p:
                s = load(p, "mri")
                arr = s.array if s.array.ndim == 3 else s.array[0]
                chans.append(arr.astype(np.float32))
                names.append(seq)
                spacing = spacing or s.spacing
        return Sample(array=np.stack(chans), modality="mri", format="nifti", path=str(rec.path),
                      spacing=spacing, channel_names=names)
