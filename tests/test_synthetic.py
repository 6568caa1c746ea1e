"""The simulated cohort: splits, manifest contract, labels, determinism, read-back."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from data_registry.synthetic import (
    MANIFEST_COLUMNS,
    chance_levels,
    cohort,
    generate,
    primary_condition,
    read_manifest,
    same_condition,
)
from data_registry.synthetic.generate import CohortConfig, _annotate
from m3bind.modalities import MODALITIES, SPECS


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    generate(out, patients=24, seed=3, progress=False, test_fraction=0.25, val_fraction=0.15,
             paired_fraction=0.2)
    return out


@pytest.fixture(scope="module")
def rows(cohort_dir):
    return read_manifest(cohort_dir)


def test_manifest_columns_and_values(cohort_dir, rows):
    header = (cohort_dir / "manifest.csv").read_text().splitlines()[0].split(",")
    assert tuple(header) == MANIFEST_COLUMNS
    assert rows
    for r in rows:
        assert r["modality"] in MODALITIES
        assert r["label"] in SPECS[r["modality"]].labels
        assert r["item_id"] == f"{r['patient']}_{r['modality']}"
        assert r["split"] in ("train", "val", "test")
        assert (cohort_dir / r["path"]).exists(), r["path"]
        assert not Path(r["path"]).is_absolute()
        f = json.loads(r["findings"])
        assert set(f) == set(cohort.FINDINGS[r["modality"]]) and set(f.values()) <= {0, 1}
        conds = r["condition"].split(";")
        assert conds == ["healthy"] or set(conds) <= set(cohort.CONDITIONS)
        assert len(r["report"]) > 10
        assert len(r["study_date"]) == 10 and r["study_date"][4] == "-"


def test_train_val_modalities_never_share_a_patient(rows):
    mods = defaultdict(set)
    for r in rows:
        if r["split"] in ("train", "val") and not r["pair_id"]:
            mods[r["patient"]].add(r["modality"])
    assert mods and all(len(m) == 1 for m in mods.values())
    # a patient is in exactly one split
    splits = defaultdict(set)
    for r in rows:
        splits[r["patient"]].add(r["split"])
    assert all(len(s) == 1 for s in splits.values())


def test_linked_test_patients_carry_every_modality(rows):
    test = defaultdict(set)
    for r in rows:
        if r["split"] == "test":
            test[r["patient"]].add(r["modality"])
    assert len(test) == 6  # 25% of 24 patients
    assert all(m == set(MODALITIES) for m in test.values())


def test_paired_subset_is_cxr_and_ecg_of_one_train_patient(rows):
    pairs = defaultdict(list)
    for r in rows:
        if r["pair_id"]:
            pairs[r["pair_id"]].append(r)
    assert pairs  # 20% of the train patients
    for items in pairs.values():
        assert sorted(i["modality"] for i in items) == ["cxr", "ecg"]
        assert len({i["patient"] for i in items}) == 1
        assert {i["split"] for i in items} == {"train"}
        assert len({i["study_date"] for i in items}) == 1


def test_no_pairs_by_default():
    ps = cohort.build_patients(50, 0)
    assert not any(p.pair_id for p in ps)
    assert all(len(p.modalities) == 1 for p in ps if p.split != "test")


def digest(root) -> str:
    """SHA-256 over every file of a cohort folder (names and bytes), ``cohort.json`` (timings) aside."""
    h = hashlib.sha256()
    for f in sorted(Path(root).rglob("*")):
        if f.is_file() and f.name != "cohort.json":
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def test_determinism_per_seed(tmp_path):
    kw = {"patients": 6, "progress": False, "modalities": ("cxr", "ecg", "retina"), "test_fraction": 0.34}
    a = generate(tmp_path / "a", seed=7, **kw).parent
    b = generate(tmp_path / "b", seed=7, **kw).parent
    c = generate(tmp_path / "c", seed=8, **kw).parent
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)


def test_relevance_rule_by_hand():
    assert same_condition("heart_failure;hypertension", "hypertension")
    assert same_condition("healthy", "healthy")
    assert not same_condition("healthy", "diabetes")
    assert not same_condition("pneumonia", "lung_cancer;stroke")
    assert primary_condition("diabetes;lung_cancer") == "lung_cancer"
    assert primary_condition("healthy") == "healthy"


def test_label_priority_by_hand():
    assert cohort.label_for("cxr", {"cardiomegaly": 1, "pleural effusion": 1}, {}) == "cardiomegaly"
    assert cohort.label_for("cxr", {"cardiomegaly": 1, "lung mass": 1}, {}) == "lung mass"
    assert cohort.label_for("cxr", {}, {}) == "no finding"
    assert cohort.label_for("ecg", {"atrial fibrillation": 1, "left ventricular hypertrophy": 1}, {}) \
        == "atrial fibrillation"
    assert cohort.label_for("retina", {"arteriolar narrowing": 1}, {"dr_grade": 2}) == "moderate diabetic retinopathy"
    assert cohort.label_for("retina", {"arteriolar narrowing": 1}, {"dr_grade": 0}) == "hypertensive retinopathy"
    assert cohort.label_for("pathology", {"tumor": 1, "high grade": 0}, {}) == "low grade tumor"


@pytest.mark.parametrize("modality", MODALITIES)
def test_every_label_is_reachable(modality):
    rng = np.random.default_rng(0)
    for label in SPECS[modality].labels:
        f, a = cohort.canonical_findings(modality, label, rng)
        assert cohort.label_for(modality, f, a) == label


def test_conditions_show_in_their_organs():
    ps = cohort.build_patients(600, 1)
    hf = [p for p in ps if "heart_failure" in p.conditions]
    healthy = [p for p in ps if not p.conditions]
    assert len(healthy) > 60 and len(hf) > 20
    assert np.mean([p.findings["cxr"]["cardiomegaly"] for p in hf]) > 0.6
    assert np.mean([p.findings["ecg"]["left ventricular hypertrophy"] for p in hf]) > 0.5
    assert all(not any(v for m in MODALITIES for v in p.findings[m].values() if m != "mri") for p in healthy)


def test_label_noise_changes_annotation_only():
    ps = cohort.build_patients(30, 2)
    cfg = CohortConfig(patients=30, label_noise=1.0)
    for p in ps:
        for m in MODALITIES:
            true = cohort.label_for(m, p.findings[m], p.attrs[m])
            label, f, a = _annotate(m, p, cfg, np.random.default_rng(p.index))
            assert label != true and cohort.label_for(m, f, a) == label


def test_cross_modal_chance_by_hand():
    from data_registry.synthetic import cross_modal_chance

    rows = [{"split": "test", "modality": m, "condition": c} for m, c in
            (("cxr", "heart_failure"), ("cxr", "healthy"), ("ecg", "heart_failure;diabetes"), ("ecg", "healthy"),
             ("ecg", "pneumonia"), ("ecg", "healthy"))]
    # query 1 (heart failure): 1 of 4 ECGs relevant; query 2 (healthy): 2 of 4 -> mean 0.375
    assert cross_modal_chance(rows, "cxr", "ecg") == pytest.approx(0.375)


def test_chance_levels_by_hand():
    rows = [{"modality": "ct", "label": lab} for lab in ("normal", "normal", "normal", "lung nodule")]
    assert chance_levels(rows) == {"ct": {"uniform": 0.25, "majority": 0.75}}


def test_bad_config_raises():
    with pytest.raises(ValueError):
        CohortConfig(size="huge")
    with pytest.raises(ValueError):
        cohort.build_patients(10, 0, val_fraction=0.6, test_fraction=0.5)


def test_cli_writes_manifest(tmp_path, capsys):
    from data_registry.synthetic.__main__ import main

    assert main(["--out", str(tmp_path), "--patients", "3", "--seed", "1", "--quiet", "--modalities", "ecg"]) == 0
    assert Path(capsys.readouterr().out.strip()) == tmp_path / "manifest.csv"
    assert main(["--out", str(tmp_path), "--modalities", "xray"]) == 2


def test_items_read_back_with_m3bind_io(cohort_dir, rows):
    io = pytest.importorskip("m3bind.io")
    seen = {}
    for r in rows:
        if r["modality"] not in seen:
            seen[r["modality"]] = io.load(cohort_dir / r["path"], r["modality"])
    assert set(seen) == set(MODALITIES)
    cxr, ct, ecg, mri = seen["cxr"], seen["ct"], seen["ecg"], seen["mri"]
    assert cxr.array.ndim == 2 and cxr.array.shape == (128, 128)
    assert ct.array.shape == (24, 64, 64)
    assert ct.array.min() < -900 and -100 < np.median(ct.array[ct.array > -500]) < 200  # air and soft tissue in HU
    assert ecg.array.shape == (12, 5000) and ecg.sampling_rate == 500.0
    assert list(ecg.lead_names) == ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
    assert np.abs(ecg.array).max() < 10  # millivolts
    assert mri.array.shape[0] == 4 and sorted(mri.channel_names) == ["dwi", "flair", "t1", "t2"]
    assert seen["retina"].array.shape == (128, 128, 3) and seen["retina"].array.dtype == np.uint8
    assert seen["pathology"].tiles is not None and seen["pathology"].tiles.shape[-1] == 3


def test_dicom_and_wfdb_tags(cohort_dir, rows):
    import pydicom
    import wfdb

    r = next(r for r in rows if r["modality"] == "cxr")
    ds = pydicom.dcmread(cohort_dir / r["path"])
    assert ds.PatientID == r["patient"] and ds.Modality == "DX"
    assert ds.StudyDate == r["study_date"].replace("-", "")
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert pydicom.uid.UID(ds.StudyInstanceUID).is_valid and len(ds.PixelSpacing) == 2
    r = next(r for r in rows if r["modality"] == "ct")
    files = sorted((cohort_dir / r["path"]).glob("*.dcm"))
    dss = [pydicom.dcmread(f) for f in files]
    assert len({d.SeriesInstanceUID for d in dss}) == 1 and len({d.SOPInstanceUID for d in dss}) == len(dss)
    z = [float(d.ImagePositionPatient[2]) for d in dss]
    assert np.allclose(np.diff(z), float(dss[0].SliceThickness))
    r = next(r for r in rows if r["modality"] == "ecg")
    rec = wfdb.rdrecord(str(cohort_dir / r["path"])[:-4])
    assert rec.fs == 500 and rec.units == ["mV"] * 12
    assert any(c.startswith("Patient: " + r["patient"]) for c in rec.comments)


def test_wfdb_writer_matches_wfdb_wrsamp_byte_for_byte(tmp_path):
    import datetime as dt

    import wfdb

    from data_registry.synthetic.writers import write_ecg_wfdb

    names = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
    for fs, n in ((500.0, 5000), (62.5, 300)):
        x = np.random.default_rng(int(fs)).normal(0, 1.5, (12, n))
        x[3, 7] = np.nan  # a missing sample
        write_ecg_wfdb(tmp_path / "ours" / "rec", x, fs, names, patient_id="SIM1", age=61, sex="F",
                       date=dt.date(2019, 3, 4), report="sinus  rhythm.\nnormal ecg")
        (tmp_path / "ref").mkdir(exist_ok=True)
        wfdb.wrsamp("rec", fs=fs, units=["mV"] * 12, sig_name=names, p_signal=x.T, fmt=["16"] * 12,
                    adc_gain=[1000.0] * 12, baseline=[0] * 12, write_dir=str(tmp_path / "ref"),
                    comments=["Age: 61", "Sex: Female", "Patient: SIM1", "Date: 2019-03-04",
                              "Dx: sinus rhythm. normal ecg"],
                    base_date=dt.date(2019, 3, 4), base_time=dt.time(9, 0, 0))
        for ext in (".hea", ".dat"):
            assert (tmp_path / "ours" / f"rec{ext}").read_bytes() == (tmp_path / "ref" / f"rec{ext}").read_bytes()


def test_ct_slices_are_what_pydicom_writes(tmp_path):
    """The fast slice encoder gives, for every slice, the bytes pydicom writes for that slice."""
    import datetime as dt
    import io

    import pydicom

    from data_registry.synthetic.writers import write_ct_series

    vol = np.random.default_rng(0).normal(-500, 300, (12, 16, 16)).astype(np.float32)
    write_ct_series(tmp_path / "ct", vol, (20.0, 7.5, 7.5), patient_id="SIM00012", age=60, sex="M",
                    date=dt.date(2020, 1, 1), item_id="SIM00012_ct")
    files = sorted((tmp_path / "ct").glob("*.dcm"))
    assert len(files) == 12
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        assert ds.InstanceNumber == k + 1 and ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        np.testing.assert_array_equal(ds.pixel_array.astype(np.int32) - 1024,
                                      np.round(vol[k]).clip(-1024, 3071).astype(np.int32))
        # rebuilt from the decoded values and encoded from scratch by pydicom: the same bytes
        fresh = pydicom.Dataset()
        for elem in ds:
            fresh.add(pydicom.DataElement(elem.tag, elem.VR, elem.value))
        fresh.file_meta = pydicom.dataset.FileMetaDataset()
        for elem in ds.file_meta:
            fresh.file_meta.add(pydicom.DataElement(elem.tag, elem.VR, elem.value))
        buf = io.BytesIO()
        fresh.save_as(buf, enforce_file_format=True)
        assert buf.getvalue() == f.read_bytes(), f.name


def test_tiny_preset_and_workers_give_the_same_bytes(tmp_path):
    kw = {"patients": 4, "seed": 5, "size": "tiny", "progress": False, "test_fraction": 0.5,
          "modalities": ("ct", "ecg")}
    a = generate(tmp_path / "a", **kw).parent
    b = generate(tmp_path / "b", workers=2, **kw).parent
    assert digest(a) == digest(b)
    info = json.loads((b / "cohort.json").read_text())
    assert info["config"]["size"] == "tiny" and info["workers"] == 2
    io = pytest.importorskip("m3bind.io")
    r = next(r for r in read_manifest(a) if r["modality"] == "ct")
    assert io.load(a / r["path"], "ct").array.shape == (12, 48, 48)
    with pytest.raises(ValueError):
        CohortConfig(workers=-1)
