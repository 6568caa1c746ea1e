"""Quilt-1M: one million histopathology image-text pairs from educational videos and other sources.

Citation: Ikezogwo WO, Seyfioglu MS, Ghezloo F, et al. Quilt-1M: One Million Image-Text Pairs
for Histopathology. NeurIPS 2023 Datasets and Benchmarks.

Layout (Zenodo / Hugging Face)::

    root/quilt_1M_lookup.csv   caption, image_path, subset, split, pathology, roi_text, noisy_text,
                               corrected_text, med_umls_ids, magnification, height, width
    root/quilt_1m/<image_path>  (or root/images/<image_path>, root/<image_path>)

Quilt has no patients and no labels: the text is the caption; the unit of splitting is the
image (the ``split`` column when present). ``labels`` is empty.
"""

from __future__ import annotations

import numpy as np

from .base import DATASETS, MedicalDataset, Record, read_csv


@DATASETS.register("quilt1m")
class Quilt1M(MedicalDataset):
    """Quilt-1M image-caption pairs (text only supervision; no labels)."""

    name, modality, labels, has_reports = "quilt1m", "pathology", (), True
    citation = "Ikezogwo et al., Quilt-1M, NeurIPS 2023 Datasets and Benchmarks"
    url = "https://quilt1m.github.io/"

    def _scan(self):
        df = read_csv(self._require("quilt_1M_lookup.csv"), dtype=str).fillna("")
        img_dir = next((self.root / d for d in ("quilt_1m", "images") if (self.root / d).is_dir()), self.root)
        for r in df.to_dict("records"):
            split = r.get("split", "")
            yield Record(path=img_dir / r["image_path"], patient=r["image_path"],
                         report=r.get("caption") or r.get("corrected_text") or None,
                         labels=np.zeros(0, np.float32),
                         split={"train": "train", "val": "val", "valid": "val", "test": "test"}.get(split.lower()),
                         meta={"subset": r.get("subset", ""), "magnification": r.get("magnification", ""),
                               "pathology": r.get("pathology", "")})
