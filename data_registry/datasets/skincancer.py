"""SkinCancer: tiles of skin histopathology in 16 tissue classes (Kriegsmann et al.).

Citation: Kriegsmann K, Lobers F, Zgorzelski C, et al. Deep learning for the detection of
anatomical tissue structures and neoplasms of the skin on scanned histopathological tissue
sections. Front Oncol 12, 1022967 (2022). Used as a zero-shot benchmark by PLIP and QuiltNet.

Layout (heiDATA release)::

    root/tiles-v2.csv   columns file, class, set (train/test), slide_id (optional)
    root/<file>         tile image paths as listed (e.g. data/tiles/<slide>/<tile>.png)

A folder-per-class layout (root/<class>/<tile>.png) is accepted too. Class folder names such
as ``nontumor_skin_necrosis_necrosis`` are mapped to the benchmark's 16 names.
"""

from __future__ import annotations

from pathlib import Path

from .base import DATASETS, MedicalDataset, Record, read_rows

SKIN_LABELS = ("necrosis", "skeletal muscle", "eccrine sweat glands", "vessels", "elastosis", "chondral tissue",
               "hair follicle", "epidermis", "nerves", "subcutis", "dermis", "sebaceous glands",
               "squamous-cell carcinoma", "melanoma in-situ", "basal-cell carcinoma", "naevus")
_KEYS = {"necrosis": "necrosis", "muscle": "skeletal muscle", "sweat": "eccrine sweat glands", "vessel": "vessels",
         "elastosis": "elastosis", "chondral": "chondral tissue", "hair": "hair follicle", "epidermis": "epidermis",
         "nerve": "nerves", "subcutis": "subcutis", "dermis": "dermis", "sebaceous": "sebaceous glands",
         "scc": "squamous-cell carcinoma", "squamous": "squamous-cell carcinoma", "melanoma": "melanoma in-situ",
         "bcc": "basal-cell carcinoma", "basal": "basal-cell carcinoma", "naevus": "naevus", "nevus": "naevus"}


def class_name(raw: str) -> str | None:
    """Map a release class name (``tumor_skin_naevus_naevus``) to one of :data:`SKIN_LABELS`."""
    low = raw.lower()
    if low in SKIN_LABELS:
        return low
    tokens = low.replace("-", "_").split("_")
    for t in reversed(tokens):
        if t in _KEYS:
            return _KEYS[t]
    return next((v for k, v in _KEYS.items() if k in low), None)


@DATASETS.register("skincancer")
class SkinCancer(MedicalDataset):
    """Skin histopathology tiles, one-hot over 16 classes; the release's train/test set, slide as patient."""

    name, modality, labels = "skincancer", "pathology", SKIN_LABELS
    citation = "Kriegsmann et al., Front Oncol 2022"
    url = "https://heidata.uni-heidelberg.de/dataset.xhtml?persistentId=doi:10.11588/data/7QCR8S"

    def _scan(self):
        csv = self.root / "tiles-v2.csv"
        if csv.exists():
            for r in read_rows(csv):
                lab = class_name(r["class"])
                if lab is None:
                    continue
                slide = r.get("slide_id") or Path(r["file"]).parent.name
                yield Record(path=self.root / r["file"], patient=slide, labels=self._vector(
                    {k: float(k == lab) for k in self.labels}), split=r.get("set") or None)
            return
        dirs = [d for d in sorted(self.root.iterdir()) if d.is_dir() and class_name(d.name)]
        if not dirs:
            self._require("tiles-v2.csv")
        for d in dirs:
            lab = class_name(d.name)
            for p in sorted(d.rglob("*")):
                if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):
                    yield Record(path=p, patient=p.stem.split("_")[0],
                                 labels=self._vector({k: float(k == lab) for k in self.labels}))
