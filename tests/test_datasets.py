"""Public data-set adapters, each on a tiny fixture in its distributor's layout made here."""

from __future__ import annotations

import gzip
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

import data_registry
from data_registry.datasets import DATASETS, DatasetLayoutError, hash_split
from data_registry.datasets.base import to_label


def _w(path: Path, text: str, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


def _csv(path: Path, header: list[str], rows: list[list], gz: bool = False) -> Path:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return _w(path, buf.getvalue(), gz)


# --------------------------------------------------------------------------- fixtures per layout

CHX = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
       "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
       "Pneumothorax", "Support Devices"]


def make_mimic_cxr(root: Path):
    _csv(root / "mimic-cxr-2.0.0-metadata.csv.gz",
         ["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime"],
         [["d1", "10000032", "50414267", "PA", "21800506", "213014.531"],
          ["d2", "10000032", "50414267", "LATERAL", "21800506", "213014.531"],
          ["d3", "10000764", "57375967", "AP", "21320607", "083512.0"]], gz=True)
    lab = {c: "" for c in CHX}
    r1 = [lab | {"Cardiomegaly": "1.0", "Edema": "-1.0", "No Finding": ""}]
    r2 = [lab | {"No Finding": "1.0"}]
    _csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id"] + CHX,
         [["10000032", "50414267"] + [r1[0][c] for c in CHX], ["10000764", "57375967"] + [r2[0][c] for c in CHX]],
         gz=True)
    _csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"],
         [["d1", "50414267", "10000032", "train"], ["d2", "50414267", "10000032", "train"],
          ["d3", "57375967", "10000764", "validate"]], gz=True)
    _w(root / "files/p10/p10000032/s50414267.txt",
       "                 FINAL REPORT\n INDICATION: dyspnea.\n FINDINGS: Heart is enlarged.\n\n IMPRESSION: Cardiomegaly.\n")


def check_mimic_cxr(ds):
    assert len(ds) == 2  # the lateral view is dropped
    r = next(r for r in ds if r.patient == "10000032")
    lab = dict(zip(ds.labels, r.labels))
    assert lab["Cardiomegaly"] == 1 and math.isnan(lab["Edema"]) and math.isnan(lab["Fracture"])
    assert r.report == "Findings: Heart is enlarged. Impression: Cardiomegaly."
    assert r.path.as_posix().endswith("files/p10/p10000032/s50414267/d1.jpg")
    assert {x.split for x in ds} == {"train", "val"}


def make_chexpert(root: Path):
    cols = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
            "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
            "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]

    def row(p, fl, **lab):
        return [f"CheXpert-v1.0-small/{p}", "Male", "60", fl, "AP"] + [lab.get(c.replace(" ", "_"), "") for c in cols[5:]]

    train = [row("train/patient00001/study1/view1_frontal.jpg", "Frontal", Cardiomegaly="1.0"),
             row("train/patient00001/study1/view2_lateral.jpg", "Lateral", Cardiomegaly="1.0"),
             row("train/patient00002/study1/view1_frontal.jpg", "Frontal", Edema="1.0", Atelectasis="0.0"),
             row("train/patient00003/study1/view1_frontal.jpg", "Frontal", Edema="1.0", Pleural_Effusion="1.0"),
             row("train/patient00004/study1/view1_frontal.jpg", "Frontal", Atelectasis="-1.0", Edema="1.0")]
    _csv(root / "train.csv", cols, train)
    _csv(root / "valid.csv", cols, [row("valid/patient64541/study1/view1_frontal.jpg", "Frontal", No_Finding="1.0")])


def check_chexpert(ds):
    assert len(ds) == 5 and {r.split for r in ds} == {"train", "val"}
    r = ds[0]
    assert r.patient == "patient00001" and dict(zip(ds.labels, r.labels))["Cardiomegaly"] == 1
    assert r.path.as_posix().endswith("train/patient00001/study1/view1_frontal.jpg")


def check_chexpert5x200(ds):
    # patient00002: only Edema among the five -> kept; 00003 two positives, 00004 uncertain -> dropped
    assert [r.patient for r in ds] == ["patient00001", "patient00002"]
    assert ds.label_matrix().sum(1).tolist() == [1.0, 1.0] and {r.split for r in ds} == {"test"}


def make_rsna(root: Path):
    _csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"],
         [["aaa", "", "", "", "", "0"], ["bbb", "264", "152", "213", "379", "1"], ["bbb", "562", "152", "256", "453", "1"]])
    _csv(root / "stage_2_detailed_class_info.csv", ["patientId", "class"],
         [["aaa", "Normal"], ["bbb", "Lung Opacity"], ["bbb", "Lung Opacity"]])


def check_rsna(ds):
    assert [r.patient for r in sorted(ds, key=lambda r: r.patient)] == ["aaa", "bbb"]
    b = next(r for r in ds if r.patient == "bbb")
    assert b.labels.tolist() == [1.0] and len(b.meta["boxes"]) == 2 and b.meta["class"] == "Lung Opacity"
    assert b.path.name == "bbb.dcm"


def make_covidx(root: Path):
    _w(root / "train.txt", "p1 a.png positive cohen\np2 b.png negative rsna\n")
    _w(root / "test.txt", "p3 c.png COVID-19 sirm\n")


def check_covidx(ds):
    lab = {r.patient: r.labels for r in ds}
    assert lab["p1"][0] == 1 and math.isnan(lab["p1"][1]) and lab["p2"][0] == 0
    assert lab["p3"].tolist() == [1, 0, 0] and next(r for r in ds if r.patient == "p3").path.parent.name == "test"


def make_padchest(root: Path):
    _csv(root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz",
         ["ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "Projection", "Labels"],
         [["i1.png", "0", "20090101", "s1", "P1", "PA", "['cardiomegaly', ' pleural effusion']"],
          ["i2.png", "1", "20090101", "s2", "P2", "L", "['normal']"],
          ["i3.png", "1", "20090101", "s3", "P3", "AP", "['normal']"]], gz=True)


def check_padchest(ds):
    assert len(ds) == 2 and not ds.has_reports
    r = next(r for r in ds if r.patient == "P1")
    lab = dict(zip(ds.labels, r.labels))
    assert lab["cardiomegaly"] == 1 and lab["pleural effusion"] == 1 and lab["normal"] == 0
    assert r.path.as_posix().endswith("0/i1.png")
    assert ds.prompt(ds.records.index(r)) == "findings: cardiomegaly, pleural effusion."


def make_mimic_ecg(root: Path):
    _csv(root / "record_list.csv", ["subject_id", "study_id", "file_name", "ecg_time", "path"],
         [["10000032", "40689238", "40689238", "2180-05-06 20:00:00", "files/p1000/p10000032/s40689238/40689238"],
          ["10000764", "41111111", "41111111", "2132-06-07 09:00:00", "files/p1000/p10000764/s41111111/41111111"]])
    rep = [f"report_{k}" for k in range(18)]
    _csv(root / "machine_measurements.csv", ["subject_id", "study_id", "cart_id", "ecg_time"] + rep,
         [["10000032", "40689238", "6848296", "2180-05-06 20:00:00", "Atrial fibrillation",
           "Possible anterior infarct - age undetermined", "Abnormal ECG"] + [""] * 15,
          ["10000764", "41111111", "6848296", "2132-06-07 09:00:00", "Sinus rhythm", "Normal ECG"] + [""] * 16])


def check_mimic_ecg(ds):
    a = next(r for r in ds if r.patient == "10000032")
    assert a.report == "Atrial fibrillation. Possible anterior infarct - age undetermined. Abnormal ECG."
    lab = dict(zip(ds.labels, a.labels))
    assert lab["atrial fibrillation"] == 1 and lab["myocardial infarction"] == 0 and lab["normal sinus rhythm"] == 0
    b = next(r for r in ds if r.patient == "10000764")
    assert dict(zip(ds.labels, b.labels))["normal sinus rhythm"] == 1
    assert a.path.as_posix().endswith("s40689238/40689238.hea")


def make_ptbxl(root: Path):
    _csv(root / "ptbxl_database.csv",
         ["ecg_id", "patient_id", "age", "sex", "report", "scp_codes", "strat_fold", "filename_lr", "filename_hr"],
         [["1", "15709.0", "56", "1", "sinusrhythmus", "{'NORM': 100.0, 'SR': 0.0}", "3",
           "records100/00000/00001_lr", "records500/00000/00001_hr"],
          ["2", "13243.0", "19", "0", "lvh", "{'LVH': 50.0, 'IMI': 15.0}", "10",
           "records100/00000/00002_lr", "records500/00000/00002_hr"],
          ["3", "13243.0", "19", "0", "", "{'NDT': 100.0}", "10", "records100/00000/00003_lr",
           "records500/00000/00003_hr"]])
    _csv(root / "scp_statements.csv", ["", "description", "diagnostic", "form", "rhythm", "diagnostic_class"],
         [["NORM", "normal ECG", "1.0", "", "", "NORM"], ["SR", "sinus rhythm", "", "", "1.0", ""],
          ["LVH", "left ventricular hypertrophy", "1.0", "", "", "HYP"], ["IMI", "inferior MI", "1.0", "", "", "MI"],
          ["NDT", "non-diagnostic T abnormalities", "1.0", "1.0", "", "STTC"]])


def check_ptbxl(ds):
    by = {r.study: r for r in ds}
    assert by["1"].labels.tolist() == [1, 0, 0, 0, 0] and by["1"].split == "train"
    assert by["2"].labels.tolist() == [0, 1, 0, 0, 1] and by["2"].split == "test"  # MI and HYP, any likelihood
    assert by["3"].labels.tolist() == [0, 0, 1, 0, 0] and by["1"].patient == "15709"
    assert by["1"].path.as_posix().endswith("records500/00000/00001_hr.hea")


def make_cpsc(root: Path):
    _csv(root / "REFERENCE.csv", ["Recording", "First_label", "Second_label", "Third_label"],
         [["A0001", "5", "", ""], ["A0002", "1", "", ""], ["A0003", "2", "9", ""]])
    _w(root / "Training_WFDB/A0001.hea", "A0001 12 500 7500\n")


def check_cpsc(ds):
    by = {r.patient: r for r in ds}
    assert dict(zip(ds.labels, by["A0001"].labels))["right bundle branch block"] == 1
    assert by["A0003"].labels.sum() == 2 and by["A0002"].labels[0] == 1
    assert by["A0001"].path.parent.name == "Training_WFDB"


def make_messidor(root: Path):
    _csv(root / "messidor_data.csv", ["image_id", "adjudicated_dr_grade", "adjudicated_dme", "adjudicated_gradable"],
         [["20051020_43808_0100_PP.png", "0", "0", "1"], ["IM002385.JPG", "3", "1", "1"], ["IM9.JPG", "", "", "0"]])
    (root / "IMAGES").mkdir()


def check_messidor(ds):
    assert len(ds) == 2
    r = next(r for r in ds if r.patient == "IM002385.JPG")
    assert r.labels.tolist() == [0, 0, 0, 1, 0, 1] and r.path.parent.name == "IMAGES"


def make_odir(root: Path):
    _csv(root / "full_df.csv", ["ID", "Patient Age", "Patient Sex", "Left-Fundus", "Right-Fundus",
                                "Left-Diagnostic Keywords", "Right-Diagnostic Keywords", "N", "D", "G", "C", "A",
                                "H", "M", "O", "filepath"],
         [["0", "69", "Female", "0_left.jpg", "0_right.jpg", "cataract", "normal fundus", "0", "0", "0", "1", "0", "0",
           "0", "0", "x"],
          ["0", "69", "Female", "0_left.jpg", "0_right.jpg", "cataract", "normal fundus", "0", "0", "0", "1", "0", "0",
           "0", "0", "y"],
          ["1", "57", "Male", "1_left.jpg", "1_right.jpg", "normal fundus", "normal fundus", "1", "0", "0", "0", "0",
           "0", "0", "0", "z"]])
    (root / "preprocessed_images").mkdir()


def check_odir(ds):
    assert len(ds) == 4 and ds.patients() <= {"0", "1"}
    r = next(r for r in ds if r.patient == "0" and r.meta["eye"] == "left")
    assert r.report == "cataract" and dict(zip(ds.labels, r.labels))["cataract"] == 1
    assert r.path.as_posix().endswith("preprocessed_images/0_left.jpg")


CT_RATE_COLS = ["VolumeName", "Medical material", "Arterial wall calcification", "Cardiomegaly",
                "Pericardial effusion", "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy",
                "Emphysema", "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela",
                "Pleural effusion", "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation",
                "Bronchiectasis", "Interlobular septal thickening"]


def make_ct_rate(root: Path):
    d = root / "dataset"
    rep = ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
    _csv(d / "radiology_text_reports/train_reports.csv", rep,
         [["train_1_a_1.nii.gz", "cough", "axial", "Nodule in right upper lobe.", "Lung nodule."],
          ["train_1_a_2.nii.gz", "cough", "axial", "Nodule in right upper lobe.", "Lung nodule."]])
    _csv(d / "radiology_text_reports/validation_reports.csv", rep,
         [["valid_7_b_1.nii.gz", "", "", "Normal.", "No findings."]])
    z = ["0"] * 18
    nod = list(z)
    nod[CT_RATE_COLS.index("Lung nodule") - 1] = "1"
    _csv(d / "multi_abnormality_labels/train_predicted_labels.csv", CT_RATE_COLS,
         [["train_1_a_1.nii.gz"] + nod, ["train_1_a_2.nii.gz"] + nod])
    _csv(d / "multi_abnormality_labels/valid_predicted_labels.csv", CT_RATE_COLS, [["valid_7_b_1.nii.gz"] + z])


def check_ct_rate(ds):
    assert len(ds) == 3 and {r.patient for r in ds} == {"train_1", "valid_7"}
    r = ds[0]
    assert r.report == "Findings: Nodule in right upper lobe. Impression: Lung nodule."
    assert dict(zip(ds.labels, r.labels))["Lung nodule"] == 1 and r.split == "train"
    assert r.path.as_posix().endswith("dataset/train/train_1/train_1_a/train_1_a_1.nii.gz")
    assert next(r for r in ds if r.patient == "valid_7").split == "test"


def make_rad_chestct(root: Path):
    _csv(root / "imgtrain_Abnormality_and_Location_Labels.csv",
         ["", "nodule*right_lung", "nodule*left_lung", "cardiomegaly*heart"],
         [["trn00001", "0", "1", "0"], ["trn00002", "0", "0", "1"]])
    _csv(root / "imgtest_Abnormality_and_Location_Labels.csv",
         ["", "nodule*right_lung", "nodule*left_lung", "cardiomegaly*heart"], [["tst00001", "0", "0", "0"]])
    (root / "vols").mkdir()
    np.savez_compressed(root / "vols/trn00001.npz", ct=np.full((4, 5, 6), -1000, np.int16))


def check_rad_chestct(ds):
    assert tuple(ds.labels) == ("cardiomegaly", "nodule")
    by = {r.patient: r for r in ds}
    assert by["trn00001"].labels.tolist() == [0, 1] and by["tst00001"].split == "test"
    i = ds.records.index(by["trn00001"])
    s = ds.load(i)
    assert s.array.shape == (4, 5, 6) and s.array.min() == -1000 and s.modality == "ct"


def make_camelyon(root: Path):
    for p in ("training/normal/normal_001.tif", "training/tumor/tumor_001.tif", "testing/images/test_001.tif",
              "testing/images/test_002.tif"):
        _w(root / p, "")
    _w(root / "testing/reference.csv", "test_001,Tumor,Macro,2\ntest_002,Normal\n")


def check_camelyon(ds):
    by = {r.patient: r for r in ds}
    assert by["tumor_001"].labels.tolist() == [1] and by["normal_001"].labels.tolist() == [0]
    assert by["test_001"].labels.tolist() == [1] and by["test_002"].split == "test"


def make_pcam(root: Path):
    import h5py

    root.mkdir(parents=True, exist_ok=True)
    for part, n in (("train", 3), ("valid", 1), ("test", 2)):
        with h5py.File(root / f"camelyonpatch_level_2_split_{part}_x.h5", "w") as f:
            f["x"] = np.arange(n * 96 * 96 * 3, dtype=np.uint32).reshape(n, 96, 96, 3).astype(np.uint8)
        with h5py.File(root / f"camelyonpatch_level_2_split_{part}_y.h5", "w") as f:
            f["y"] = (np.arange(n) % 2).astype(np.uint8).reshape(n, 1, 1, 1)
    _csv(root / "camelyonpatch_level_2_split_train_meta.csv", ["coord_y", "coord_x", "tumor_patch",
                                                                "center_tumor_patch", "wsi"],
         [[1, 1, False, False, "camelyon16_train_normal_001"]] * 3)


def check_pcam(ds):
    assert len(ds) == 6 and [r.split for r in ds].count("val") == 1
    assert ds[1].labels.tolist() == [1] and ds[0].patient == "camelyon16_train_normal_001"
    s = ds.load(1)
    assert s.array.shape == (96, 96, 3) and s.array.dtype == np.uint8


def make_sicap(root: Path):
    import pandas as pd

    (root / "partition/Test").mkdir(parents=True)
    pd.DataFrame({"image_name": ["16B0001851_Block_Region_1_0_0_xini_6827_yini_59786.jpg",
                                 "16B0001851_Block_Region_1_0_1_xini_7000_yini_59786.jpg"],
                  "NC": [1, 0], "G3": [0, 1], "G4": [0, 0], "G5": [0, 0], "G4C": [0, 0]}).to_excel(
        root / "partition/Test/Train.xlsx", index=False)
    pd.DataFrame({"image_name": ["18B0006169_Block_Region_3_2_5_xini_1_yini_2.jpg"], "NC": [0], "G3": [0],
                  "G4": [0], "G5": [1], "G4C": [0]}).to_excel(root / "partition/Test/Test.xlsx", index=False)


def check_sicap(ds):
    assert len(ds) == 3 and ds.patients() == {"16B0001851", "18B0006169"}
    t = next(r for r in ds if r.split == "test")
    assert dict(zip(ds.labels, t.labels))["gleason pattern 5"] == 1


def make_skin(root: Path):
    _csv(root / "tiles-v2.csv", ["file", "class", "set", "slide_id"],
         [["data/tiles/s1/t1.png", "tumor_skin_naevus_naevus", "train", "s1"],
          ["data/tiles/s2/t2.png", "nontumor_skin_necrosis_necrosis", "test", "s2"],
          ["data/tiles/s2/t3.png", "nontumor_skin_sebaceousglands_sebaceousglands", "test", "s2"]])


def check_skin(ds):
    by = {r.path.name: r for r in ds}
    assert dict(zip(ds.labels, by["t1.png"].labels))["naevus"] == 1 and by["t2.png"].split == "test"
    assert by["t2.png"].labels.sum() == 1 and dict(zip(ds.labels, by["t2.png"].labels))["necrosis"] == 1


def make_quilt(root: Path):
    _csv(root / "quilt_1M_lookup.csv", ["caption", "image_path", "subset", "split", "pathology", "magnification"],
         [["H&E of a colon adenocarcinoma", "abc.jpg", "openpath", "train", "['GI']", "20"]])
    (root / "quilt_1m").mkdir()


def check_quilt(ds):
    assert len(ds) == 1 and ds[0].report == "H&E of a colon adenocarcinoma" and ds[0].labels.shape == (0,)
    assert ds[0].path.as_posix().endswith("quilt_1m/abc.jpg")


def make_brats(root: Path):
    for case, sufs, sep in (("BraTS2021_00000", ("t1", "t1ce", "t2", "flair", "seg"), "_"),
                            ("BraTS-GLI-00001-000", ("t1n", "t1c", "t2w", "t2f", "seg"), "-")):
        for s in sufs:
            _w(root / case / f"{case}{sep}{s}.nii.gz", "")


def check_brats(ds):
    assert len(ds) == 2 and ds.patients() == {"BraTS2021_00000", "BraTS-GLI-00001"}
    assert all(set(r.meta["files"]) == {"t1", "t1ce", "t2", "flair", "seg"} for r in ds)


def make_mimic_pair(root: Path):
    make_mimic_cxr(root / "mimic-cxr-jpg")
    make_mimic_ecg(root / "mimic-iv-ecg")
    # subject 10000032: CXR 2180-05-06 21:30, ECG 20:00 same day -> paired within an admission
    # subject 10000764: CXR 2132-06-07 08:35, ECG 09:00 -> no admission row -> 24 h rule
    _csv(root / "mimic-iv/hosp/admissions.csv.gz", ["subject_id", "hadm_id", "admittime", "dischtime"],
         [["10000032", "22595853", "2180-05-06 19:00:00", "2180-05-07 17:15:00"]], gz=True)


def check_mimic_pair(ds):
    by = {r.patient: r for r in ds}
    assert by["10000032"].meta["rule"] == "hadm" and by["10000764"].meta["rule"] == "24h"
    assert by["10000032"].meta["ecg_path"].endswith("40689238.hea")
    assert by["10000032"].meta["ecg_report"].startswith("Atrial fibrillation")


CASES = {
    "mimic_cxr": (make_mimic_cxr, check_mimic_cxr),
    "chexpert": (make_chexpert, check_chexpert),
    "chexpert5x200": (make_chexpert, check_chexpert5x200),
    "rsna_pneumonia": (make_rsna, check_rsna),
    "covidx": (make_covidx, check_covidx),
    "padchest": (make_padchest, check_padchest),
    "mimic_iv_ecg": (make_mimic_ecg, check_mimic_ecg),
    "ptbxl": (make_ptbxl, check_ptbxl),
    "cpsc2018": (make_cpsc, check_cpsc),
    "icbeb": (make_cpsc, check_cpsc),
    "messidor": (make_messidor, check_messidor),
    "odir": (make_odir, check_odir),
    "ct_rate": (make_ct_rate, check_ct_rate),
    "rad_chestct": (make_rad_chestct, check_rad_chestct),
    "camelyon16": (make_camelyon, check_camelyon),
    "pcam": (make_pcam, check_pcam),
    "sicapv2": (make_sicap, check_sicap),
    "skincancer": (make_skin, check_skin),
    "quilt1m": (make_quilt, check_quilt),
    "brats": (make_brats, check_brats),
    "mimic_pair": (make_mimic_pair, check_mimic_pair),
}


def test_every_registered_adapter_has_a_fixture():
    assert set(CASES) == set(data_registry.list_datasets())


@pytest.mark.parametrize("name", sorted(CASES))
def test_adapter_reads_its_layout(name, tmp_path):
    make, check = CASES[name]
    make(tmp_path)
    ds = data_registry.get(name, root=tmp_path)
    assert len(ds) > 0
    cls = DATASETS.get(name)
    assert cls.citation and cls.modality in ("cxr", "ct", "retina", "ecg", "pathology", "mri")
    assert cls.__doc__ and (cls.__module__ and __import__(cls.__module__, fromlist=["x"]).__doc__)
    m = ds.label_matrix()
    assert m.shape == (len(ds), len(ds.labels)) and m.dtype == np.float32
    assert set(np.unique(m[~np.isnan(m)])) <= {0.0, 1.0}
    # patient-level splits: a patient is in exactly one split
    splits = defaultdict(set)
    for r in ds:
        assert r.split in ("train", "val", "test")
        splits[r.patient].add(r.split)
    assert all(len(s) == 1 for s in splits.values())
    # selecting a split keeps exactly those records
    for s in ("train", "val", "test"):
        sub = data_registry.get(name, root=tmp_path, split=s)
        assert len(sub) == sum(r.split == s for r in ds)
    check(ds)


@pytest.mark.parametrize("name", sorted(CASES))
def test_missing_layout_is_a_clear_error(name, tmp_path):
    with pytest.raises(DatasetLayoutError):
        data_registry.get(name, root=tmp_path)
    with pytest.raises(DatasetLayoutError):
        data_registry.get(name, root=tmp_path / "nowhere")


def test_hash_split_is_stable_and_patient_level():
    a = [hash_split(f"p{i}", seed=1) for i in range(2000)]
    assert a == [hash_split(f"p{i}", seed=1) for i in range(2000)]
    assert a != [hash_split(f"p{i}", seed=2) for i in range(2000)]
    frac = {s: a.count(s) / len(a) for s in ("train", "val", "test")}
    assert abs(frac["test"] - 0.2) < 0.03 and abs(frac["val"] - 0.1) < 0.03


def test_to_label_conventions():
    assert to_label("1.0") == 1 and to_label("0") == 0 and math.isnan(to_label("")) and math.isnan(to_label(None))
    assert math.isnan(to_label("-1.0")) and to_label("-1.0", uncertain=1.0) == 1 and to_label(-1, 0.0) == 0


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz", ".xlsx"])
def test_read_rows_keeps_cells_as_strings(suffix, tmp_path):
    import pandas as pd

    from data_registry.datasets.base import read_rows

    path = tmp_path / f"table{suffix}"
    df = pd.DataFrame({"ID": ["007", "12"], "label": ["1", None], "text": ["a, b", "c"]})
    if suffix == ".xlsx":
        df.to_excel(path, index=False)
    else:
        df.to_csv(path, index=False)
    # leading zeros survive (strings, not numbers) and the blank cell is "" (not NaN)
    assert read_rows(path) == [{"ID": "007", "label": "1", "text": "a, b"}, {"ID": "12", "label": "", "text": "c"}]


def test_unknown_dataset_names_the_known_ones(tmp_path):
    with pytest.raises(KeyError, match="ptbxl"):
        data_registry.get("nope", root=tmp_path)


def test_ptbxl_record_loads_with_m3bind_io(tmp_path):
    """A PTB-XL-layout record written as WFDB reads back through the adapter."""
    pytest.importorskip("m3bind.io")
    import datetime

    from data_registry.synthetic.ecg import LEAD_NAMES, render_ecg
    from data_registry.synthetic.writers import write_ecg_wfdb

    make_ptbxl(tmp_path)
    sig, _ = render_ecg({}, {"hr": 60}, np.random.default_rng(0))
    write_ecg_wfdb(tmp_path / "records500/00000/00001_hr", sig, 500.0, LEAD_NAMES, patient_id="15709", age=56,
                   sex="M", date=datetime.date(1984, 11, 9))
    ds = data_registry.get("ptbxl", root=tmp_path, split="train")
    s = ds.load(0)
    assert s.array.shape == (12, 5000) and s.modality == "ecg"
    assert np.allclose(s.array, sig, atol=2e-3)  # 16-bit at 1 uV resolution


def test_cli_lists_datasets(capsys):
    from data_registry.__main__ import main

    assert main(["list"]) == 0
    assert "ptbxl" in capsys.readouterr().out.split()


def test_package_import_is_light():
    import subprocess
    import sys

    code = ("import sys, data_registry; heavy=[m for m in ('pandas','torch','pydicom','wfdb','h5py') "
            "if m in sys.modules]; print(json.dumps(heavy))")
    out = subprocess.run([sys.executable, "-c", "import json;" + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
