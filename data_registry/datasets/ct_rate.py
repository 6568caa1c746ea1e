"""CT-RATE: 50,188 non-contrast chest CT volumes of 21,304 patients with radiology reports.

Citation: Hamamci IE, Er S, Almas F, et al. Developing Generalist Foundation Models from a
Multimodal Dataset for 3D Computed Tomography. arXiv:2403.17834 (2024).

Layout (Hugging Face ``ibrahimhamamci/CT-RATE``)::

    root/dataset/train/train_1/train_1_a/train_1_a_1.nii.gz, root/dataset/valid/valid_1/valid_1_a/valid_1_a_1.nii.gz
    root/dataset/radiology_text_reports/train_reports.csv, validation_reports.csv
        VolumeName, ClinicalInformation_EN, Technique_EN, Findings_EN, Impressions_EN
    root/dataset/multi_abnormality_labels/train_predicted_labels.csv, valid_predicted_labels.csv
        VolumeName, <18 abnormality columns> (0/1)

Patient = ``train_1`` (one patient may have several scans and reconstructions). The
distributor's train/valid split is patient-disjoint; its ``valid`` is used as ``test``.
"""

from __future__ import annotations

from .base import DATASETS, MedicalDataset, Record, read_rows

CT_RATE_LABELS = ("Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
                  "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema",
                  "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
                  "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
                  "Interlobular septal thickening")


@DATASETS.register("ct_rate")
class CTRATE(MedicalDataset):
    """CT-RATE volumes with findings + impression text and the 18 multi-abnormality labels."""

    name, modality, labels, has_reports = "ct_rate", "ct", CT_RATE_LABELS, True
    citation = "Hamamci et al., CT-RATE, arXiv:2403.17834"
    url = "https://huggingface.co/datasets/ibrahimhamamci/CT-RATE"

    def _scan(self):
        base = self.root / "dataset" if (self.root / "dataset").is_dir() else self.root
        rep_dir, lab_dir = base / "radiology_text_reports", base / "multi_abnormality_labels"
        if not rep_dir.is_dir() and not lab_dir.is_dir():
            self._require("dataset/radiology_text_reports", "dataset/multi_abnormality_labels")
        reports, labels = {}, {}
        for p in sorted(rep_dir.glob("*.csv")) if rep_dir.is_dir() else []:
            for r in read_rows(p):
                text = " ".join(x for x in (f"Findings: {r.get('Findings_EN', '')}" if r.get("Findings_EN") else "",
                                            f"Impression: {r.get('Impressions_EN', '')}" if r.get("Impressions_EN")
                                            else "") if x)
                reports[r["VolumeName"]] = text or None
        for p in sorted(lab_dir.glob("*.csv")) if lab_dir.is_dir() else []:
            for r in read_rows(p):
                labels[r["VolumeName"]] = r
        for vol in sorted(set(reports) | set(labels)):
            stem = vol.replace(".nii.gz", "")
            parts = stem.split("_")  # train_1_a_1
            split_dir, patient = parts[0], "_".join(parts[:2])
            path = base / split_dir / patient / "_".join(parts[:3]) / vol
            lr = labels.get(vol, {})
            vec = self._vector({k: float(lr[k]) for k in self.labels if lr.get(k, "") != ""})
            yield Record(path=path, patient=patient, study="_".join(parts[:3]), report=reports.get(vol),
                         labels=vec, split="train" if split_dir == "train" else "test")
