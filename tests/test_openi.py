"""OpenI report reader: XML parsing, archive reading, MeSH mapping, missing package."""

from __future__ import annotations

import io
import tarfile

import pytest

from data_registry import openi
from m3bind.errors import CorruptFile, M3BindError

XML = b"""<?xml version="1.0" encoding="utf-8"?>
<eCitation><uId id="CXR42"/>
 <MedlineCitation><Article><Abstract>
  <AbstractText Label="COMPARISON">None.</AbstractText>
  <AbstractText Label="INDICATION">XXXX-year-old male,   dyspnea.</AbstractText>
  <AbstractText Label="FINDINGS">Heart is enlarged.
     Small right pleural effusion.</AbstractText>
  <AbstractText Label="IMPRESSION">Cardiomegaly with effusion.</AbstractText>
 </Abstract></Article></MedlineCitation>
 <MeSH><major>Cardiomegaly/severe</major><major>Pleural Effusion/right/small</major>
  <automatic>effusion</automatic></MeSH>
 <parentImage id="CXR42_IM-1"><caption>PA</caption></parentImage>
</eCitation>"""


def _tgz(tmp_path, members: dict[str, bytes]):
    p = tmp_path / "reports.tgz"
    with tarfile.open(p, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return p


def test_parse_report_sections_and_mesh():
    r = openi.parse_report(XML)
    assert r.uid == "CXR42"
    assert r.findings == "Heart is enlarged. Small right pleural effusion."
    assert r.impression == "Cardiomegaly with effusion."
    assert r.indication == "XXXX-year-old male, dyspnea."
    assert r.mesh == ["Cardiomegaly/severe", "Pleural Effusion/right/small"]
    assert r.mesh_terms == {"cardiomegaly", "pleural effusion"}
    assert r.mesh_automatic == ["effusion"] and r.image_ids == ["CXR42_IM-1"]
    assert r.text == "Findings: Heart is enlarged. Small right pleural effusion. Impression: Cardiomegaly with effusion."
    assert openi.cxr_label(r) is None  # two labels: ambiguous


def test_cxr_label_single():
    r = openi.OpenIReport("CXR1", "", "Normal.", mesh=["normal"])
    assert openi.cxr_label(r) == "no finding"
    assert openi.cxr_label(openi.OpenIReport("CXR2", "", "", mesh=["Pneumonia/left"])) == "consolidation"


def test_load_reports_from_archive_sorted_and_filtered(tmp_path):
    empty = XML.replace(b"Heart is enlarged.\n     Small right pleural effusion.", b"").replace(
        b"Cardiomegaly with effusion.", b"").replace(b"CXR42", b"CXR7")
    p = _tgz(tmp_path, {"ecgen-radiology/42.xml": XML, "ecgen-radiology/3.xml": XML.replace(b"CXR42", b"CXR3"),
                        "ecgen-radiology/7.xml": empty, "ecgen-radiology/readme.txt": b"x"})
    assert [r.uid for r in openi.load_reports(p)] == ["CXR3", "CXR42"]
    assert [r.uid for r in openi.load_reports(p, require_text=False)] == ["CXR3", "CXR7", "CXR42"]


def test_corrupt_inputs(tmp_path):
    with pytest.raises(CorruptFile):
        openi.parse_report(b"<eCitation><uId", "bad.xml")
    bad = tmp_path / "bad.tgz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(CorruptFile):
        openi.load_reports(bad)


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(openi.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(M3BindError, match="torchxrayvision"):
        openi.load_reports()


def test_real_archive_from_torchxrayvision():
    try:
        path = openi.archive_path()
    except M3BindError:
        pytest.skip("torchxrayvision not installed")
    reports = openi.load_reports(path)
    assert len(reports) > 3800  # 3,955 reports, a few without findings or impression
    assert reports[0].uid == "CXR1" and all(r.findings or r.impression for r in reports)
    assert sum(openi.cxr_label(r) == "cardiomegaly" for r in reports) > 100
    assert reports is not openi.load_reports(path)  # callers get their own list
