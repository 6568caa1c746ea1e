"""PHI never leaves the readers unless asked for: logs, CLI JSON, previews, the catalogue, search, app API.

Distinctive identifiers (a patient name, a birth date, a medical record number) are planted
in a real DICOM CT slice and a WFDB record written from the real DICOM ECG. Everything a
user or an operator can see is then searched for them, with logging captured at DEBUG:
``m3bind inspect --json``, ``m3bind.render.preview``/``save_preview`` (pixels and file
bytes), the indexer's SQLite catalogue and FAISS files (bytes), ``m3bind search --json``,
``m3bind archive stats --json`` and the app's ``/zeroshot`` and ``/search`` payloads. The
same checks with ``keep_phi`` opted in do find the identifiers, so the greps can fail.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

NAME, GIVEN, BIRTH, MRN = "Zyxwvut", "Quintessa", "19370415", "MRN8841927"
#: What must never appear (birth date in both DICOM and ISO spellings).
NEEDLES = (NAME, GIVEN, BIRTH, "1937-04-15", MRN)


def found(text: str | bytes) -> list[str]:
    """Planted identifiers present in ``text`` (case-insensitive)."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    low = text.lower()
    return [n for n in NEEDLES if n.lower() in low]


def plant_dicom(src: Path, dst: Path) -> Path:
    import pydicom

    ds = pydicom.dcmread(src)
    ds.PatientName = f"{NAME}^{GIVEN}"
    ds.PatientBirthDate = BIRTH
    ds.PatientID = MRN
    ds.OtherPatientIDs = MRN + "-B"
    ds.AccessionNumber = "A" + MRN[3:]
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=False)
    return dst


def plant_wfdb(ecg_dicom: Path, folder: Path) -> Path:
    import wfdb

    import m3bind.io

    ecg = m3bind.io.load(ecg_dicom)
    folder.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp("ecg001", fs=500, units=["mV"] * 12, sig_name=list(ecg.lead_names),
                p_signal=ecg.array[:, ::2][:, :2500].T.astype(np.float64), fmt=["16"] * 12,
                write_dir=str(folder),
                comments=["Age: 63", "Sex: F", f"Name: {NAME}^{GIVEN}", "DOB: 1937-04-15", f"Patient: {MRN}"])
    return folder / "ecg001.hea"


@pytest.fixture(scope="module")
def phi_archive(tmp_path_factory):
    """An archive with the planted CT slice and ECG record, indexed into SQLite with the tiny model."""
    from samples import require

    from app.web.testing import tiny_model_dir

    tmp = tmp_path_factory.mktemp("phi")
    root = tmp / "archive"
    ct = plant_dicom(require("ct_dicom"), root / "ct" / "slice.dcm")
    hea = plant_wfdb(require("ecg_dicom"), root / "ecg")
    model_dir = tiny_model_dir(tmp_path_factory.getbasetemp())
    return {"root": root, "ct": ct, "hea": hea, "model": model_dir, "catalog": tmp / "catalog.db", "tmp": tmp}


@pytest.fixture
def debug_logs(caplog):
    caplog.set_level(logging.DEBUG)
    return caplog


def _cli(capsys, *argv: str) -> tuple[int, str]:
    from app.cli import main

    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_planted_files_hold_the_phi(phi_archive):
    """The positive control: the identifiers really are in the files."""
    assert set(found(phi_archive["ct"].read_bytes())) >= {NAME, GIVEN, BIRTH, MRN}
    assert set(found(phi_archive["hea"].read_text())) >= {NAME, "1937-04-15", MRN}


@pytest.mark.parametrize("which", ["ct", "hea"])
def test_inspect_json_and_logs_are_free_of_phi(phi_archive, which, capsys, debug_logs):
    rc, out = _cli(capsys, "inspect", str(phi_archive[which]), "--json")
    assert rc == 0, out
    payload = json.loads(out)
    assert payload["modality"] in ("ct", "ecg")
    assert not found(out), out
    assert not found(debug_logs.text)
    rc, out = _cli(capsys, "inspect", str(phi_archive[which]), "--json", "--keep-phi")
    assert rc == 0 and MRN in out  # opted in: the identifiers are shown


@pytest.mark.parametrize("which", ["ct", "hea"])
def test_previews_are_free_of_phi(phi_archive, which, tmp_path, debug_logs):
    """Preview pixels equal those of the same file with other identifiers; the PNG holds none."""
    from samples import require

    import m3bind.io
    from m3bind.render import preview, save_preview

    s = m3bind.io.load(phi_archive[which])
    if which == "ct":
        other = m3bind.io.load(require("ct_dicom"))
    else:  # the same record with neutral comments
        import wfdb

        rec = wfdb.rdrecord(str(phi_archive["hea"].with_suffix("")))
        wfdb.wrsamp("ecg001", fs=rec.fs, units=rec.units, sig_name=rec.sig_name, p_signal=rec.p_signal,
                    fmt=rec.fmt, adc_gain=rec.adc_gain, baseline=rec.baseline, write_dir=str(tmp_path),
                    comments=["Age: 63", "Sex: F", "Name: Other^Person", "DOB: 1950-01-01", "Patient: X1"])
        other = m3bind.io.load(tmp_path / "ecg001.hea")
    np.testing.assert_array_equal(preview(s), preview(other))
    out = save_preview(s, tmp_path / "p.png")
    assert not found(Path(out).read_bytes())
    assert not found(debug_logs.text)


@pytest.fixture(scope="module")
def indexed(phi_archive):
    from data_registry.indexer import index_archive

    res = index_archive(phi_archive["root"], str(phi_archive["catalog"]), str(phi_archive["model"]),
                        workers=0, progress=False)
    assert res["failed"] == 0 and res["added"] == 2, res
    return phi_archive


def test_catalogue_and_index_files_are_free_of_phi(indexed):
    files = [p for p in indexed["tmp"].rglob("*") if p.is_file() and "archive" not in p.parts]
    assert any(p.name.startswith("catalog.db") for p in files)
    leaks = {str(p): found(p.read_bytes()) for p in files if found(p.read_bytes())}
    assert not leaks


def test_indexing_logs_are_free_of_phi(indexed, tmp_path, debug_logs):
    from data_registry.indexer import index_archive

    root = tmp_path / "again"
    shutil.copytree(indexed["root"], root)
    res = index_archive(root, str(tmp_path / "c.db"), str(indexed["model"]), workers=0, progress=False)
    assert res["added"] == 2
    assert not found(debug_logs.text)


def test_search_and_stats_json_are_free_of_phi(indexed, capsys, debug_logs):
    cat = str(indexed["catalog"])
    for target in ("ct", "ecg"):
        rc, out = _cli(capsys, "search", "text:normal study", "--catalog", cat, "--model", str(indexed["model"]),
                       "--target", target, "-k", "5", "--json")
        assert rc == 0, out
        assert json.loads(out)["results"], out
        assert not found(out), out
        rc, out = _cli(capsys, "search", str(indexed["ct"]), "--catalog", cat, "--model", str(indexed["model"]),
                       "--target", target, "-k", "5", "--json")
        assert rc == 0 and not found(out), out
    rc, out = _cli(capsys, "archive", "stats", "--catalog", cat, "--json")
    assert rc == 0 and not found(out), out
    assert not found(debug_logs.text)


def test_app_api_payloads_are_free_of_phi(indexed, tmp_path, debug_logs):
    pytest.importorskip("gradio")
    from app.web.api import search_json, zeroshot_json
    from app.web.state import Services
    from app.web.views import metadata_html, metadata_rows

    services = Services(indexed["model"], f"sqlite:///{indexed['catalog']}", indexed["root"],
                        prompt_dir=tmp_path / "prompts", work_dir=tmp_path / "work", index_workers=0)
    for which in ("ct", "hea"):
        z = zeroshot_json(services, str(indexed[which]), "")
        assert z["labels"] and not found(json.dumps(z))
        s = search_json(services, str(indexed[which]), "", "ct", 5)
        assert s["results"] and not found(json.dumps(s))
        sample = services.load(indexed[which])
        shown = json.dumps(metadata_rows(sample)) + metadata_html(sample)
        assert not found(shown), shown
    assert not found(json.dumps(search_json(services, None, "normal", "ecg", 5)))
    assert not found(debug_logs.text)
