"""COVIDx CXR (COVID-Net): COVID-19 chest radiographs assembled from several sources.

Citation: Wang L, Lin ZQ, Wong A. COVID-Net: a tailored deep convolutional neural network
design for detection of COVID-19 cases from chest X-ray images. Sci Rep 10, 19549 (2020).

Layout (Kaggle / COVID-Net releases)::

    root/train.txt, root/val.txt (CXR-4), root/test.txt   space-separated: patient_id filename class source
    root/train/<filename>, root/val/<filename>, root/test/<filename>
    class: positive / negative (COVIDx CXR-2 and later) or COVID-19 / pneumonia / normal (earlier)
"""

from __future__ import annotations

from .base import DATASETS, MedicalDataset, Record

_CLASSES = {"positive": {"COVID-19": 1.0}, "negative": {"COVID-19": 0.0},
            "covid-19": {"COVID-19": 1.0, "pneumonia": 0.0, "normal": 0.0},
            "pneumonia": {"COVID-19": 0.0, "pneumonia": 1.0, "normal": 0.0},
            "normal": {"COVID-19": 0.0, "pneumonia": 0.0, "normal": 1.0}}


@DATASETS.register("covidx")
class COVIDx(MedicalDataset):
    """COVIDx with its official split files; binary releases leave ``pneumonia``/``normal`` NaN."""

    name, modality, labels = "covidx", "cxr", ("COVID-19", "pneumonia", "normal")
    citation = "Wang, Lin & Wong, COVID-Net, Sci Rep 2020"
    url = "https://www.kaggle.com/datasets/andyczhao/covidx-cxr2"

    def _scan(self):
        self._require("train.txt", "test.txt")
        for fname, split in (("train.txt", "train"), ("val.txt", "val"), ("test.txt", "test")):
            p = self.root / fname
            if not p.exists():
                continue
            for line in p.read_text().splitlines():
                parts = line.split()
                if len(parts) < 3:
                    continue
                pid, filename, cls = parts[0], parts[1], parts[2].lower()
                yield Record(path=self.root / split / filename, patient=pid, split=split,
                             labels=self._vector(_CLASSES.get(cls, {})),
                             meta={"class": parts[2], "source": parts[3] if len(parts) > 3 else ""})
