"""PHI in a *damaged* DICOM file stays out of error messages, warnings, logs and the catalogue.

``tests/test_phi.py`` checks files that read. This file checks the error path: when the
patient-name or patient-ID element of a real CT slice (with planted identifiers) is damaged so
that pydicom cannot convert it, pydicom's exception text quotes the element's raw bytes
(``received b'Zyxwvut^Quintessa '``) and its validation warnings quote the value (``Invalid
value for VR IS: '...'``). Before the fix both reached the one-line error (hence the logs, the
indexer's failure rows in the catalogue and the app's toast) and the warnings.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import pytest
from samples import require
from test_phi import GIVEN, MRN, NAME, found, plant_dicom

#: VRs that make the element unconvertible (an error) or invalid (a validation warning).
ERROR_VRS = (b"SL", b"FD", b"XX")
WARNING_VRS = (b"IS", b"UI", b"DS")


def damaged(src: Path, dst: Path, tag: bytes, vr: bytes) -> Path:
    """``src`` with the VR of the element ``tag`` (explicit VR little endian bytes) replaced."""
    b = src.read_bytes()
    i = b.find(tag)
    assert i > 0 and b[i + 4:i + 6] in (b"PN", b"LO"), "planted element not found"
    dst.write_bytes(b[:i + 4] + vr + b[i + 6:])
    return dst


PATIENT_NAME, PATIENT_ID = b"\x10\x00\x10\x00", b"\x10\x00\x20\x00"


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("phi_errors")
    src = plant_dicom(require("ct_dicom"), tmp / "planted.dcm")
    files = {}
    for tag_name, tag in (("name", PATIENT_NAME), ("id", PATIENT_ID)):
        for vr in ERROR_VRS + WARNING_VRS:
            files[(tag_name, vr)] = damaged(src, tmp / f"{tag_name}_{vr.hex()}.dcm", tag, vr)
    return files


def test_pydicom_itself_quotes_the_identifiers(planted):
    """The positive control: the raw pydicom error and warning do carry the identifiers."""
    import pydicom
    import pydicom.config

    ds = pydicom.dcmread(planted[("name", b"SL")])
    with pytest.raises(Exception) as ei:
        ds.walk(lambda *_: None)
    assert NAME in str(ei.value)
    mode = pydicom.config.settings.reading_validation_mode
    try:
        pydicom.config.settings.reading_validation_mode = pydicom.config.WARN
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pydicom.dcmread(planted[("id", b"IS")]).walk(lambda *_: None)
        assert any(MRN in str(w.message) for w in caught)
    finally:
        pydicom.config.settings.reading_validation_mode = mode


def test_error_text_drops_quoted_values_and_tracebacks():
    from m3bind.io.dicom import error_text

    e = ValueError("received b'Doe^Jane ' and 'O\\'Brien' or \"it's\" in tag (0010,0010). "
                   "Traceback (most recent call last): File x, line 1")
    text = error_text(e)
    assert text == "ValueError: received '…' and '…' or '…' in tag (0010,0010)."
    assert error_text(KeyError("x")) == "KeyError: '…'"


@pytest.mark.parametrize("vr", ERROR_VRS + WARNING_VRS, ids=lambda v: v.decode("latin-1"))
@pytest.mark.parametrize("tag_name", ["name", "id"])
def test_damaged_identifier_element_leaks_nowhere(planted, tag_name, vr, caplog):
    import m3bind.io
    from m3bind.errors import M3BindError

    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            sample = m3bind.io.load(planted[(tag_name, vr)])
            shown = repr(sample.meta)
        except M3BindError as e:
            assert vr in ERROR_VRS, e
            shown = e.line()
            assert "(0010,00" in shown  # the message still says which element is damaged
    assert not found(shown), shown
    assert not found(caplog.text)
    assert not [str(w.message) for w in caught if found(str(w.message))]


def test_indexer_failure_rows_and_app_error_lines_hold_no_phi(planted, tmp_path, caplog):
    pytest.importorskip("gradio")
    from archive_support import FakeModel

    from app.web.state import Services
    from data_registry.catalog import Catalog
    from data_registry.indexer import index_archive
    from m3bind.errors import M3BindError

    caplog.set_level(logging.DEBUG)
    root = tmp_path / "archive" / "ct"
    for f in planted.values():  # a folder each: one single-file series per damaged file
        (root / f.stem).mkdir(parents=True)
        shutil.copyfile(f, root / f.stem / f.name)
    cat = Catalog(tmp_path / "c.db", index_dir=tmp_path / "idx")
    res = index_archive(tmp_path / "archive", cat, FakeModel(), workers=0)
    assert res["failed"] == 2 * len(ERROR_VRS), res
    cat.close()
    leaks = {p.name: found(p.read_bytes()) for p in tmp_path.rglob("*")
             if p.is_file() and "archive" not in p.parts and found(p.read_bytes())}
    assert not leaks
    services = Services(tmp_path / "no-model", None, tmp_path / "archive", work_dir=tmp_path / "work")
    for vr in ERROR_VRS:
        with pytest.raises(M3BindError) as ei:
            services.load(f"ct/name_{vr.hex()}/name_{vr.hex()}.dcm")
        assert not found(ei.value.line())
    assert not found(caplog.text)
    assert GIVEN not in caplog.text
