"""Archive confinement and app exposure: no file outside the archive is read on a user's behalf.

A path inside the archive can still lead a reader outside it: a WFDB header whose signal file
is a symbolic link to a file elsewhere, a DICOM series folder holding such a link. Before the
fix the app read both (and the indexer indexed the WFDB record whose ``.dat`` the scanner had
just reported as a link out of the root). Also here: the ``serve`` command binds to localhost
by default and refuses another address without ``--auth`` before anything starts.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from samples import require

from m3bind.errors import UnsupportedFormat


def _write_record(folder: Path, name: str = "rec", dat: str | None = None) -> Path:
    """A 12-lead WFDB record written from the real DICOM ECG; returns its ``.hea``."""
    import wfdb

    import m3bind.io

    ecg = m3bind.io.load(require("ecg_dicom"))
    folder.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp(name, fs=500, units=["mV"] * 12, sig_name=list(ecg.lead_names),
                p_signal=ecg.array[:, ::2][:, :2500].T.astype(np.float64), fmt=["16"] * 12,
                write_dir=str(folder))
    if dat:  # the signal file under another name (the header names it)
        (folder / f"{name}.dat").rename(folder / dat)
        hea = folder / f"{name}.hea"
        hea.write_text(hea.read_text().replace(f"{name}.dat", dat))
    return folder / f"{name}.hea"


@pytest.fixture
def linked(tmp_path):
    """An archive whose WFDB record, DICOM series and MRI-style folder link to files outside it."""
    outside, root = tmp_path / "outside", tmp_path / "archive"
    hea_out = _write_record(outside)
    (root / "ecg").mkdir(parents=True)
    shutil.copyfile(hea_out, root / "ecg" / "rec.hea")
    os.symlink(outside / "rec.dat", root / "ecg" / "rec.dat")
    series = root / "ct" / "series"
    series.mkdir(parents=True)
    shutil.copyfile(require("ct_dicom"), outside / "slice.dcm")
    os.symlink(outside / "slice.dcm", series / "slice.dcm")
    study = root / "ct" / "study"
    study.mkdir()
    shutil.copyfile(require("ct_dicom"), study / "a.dcm")
    os.symlink(outside, study / "more")  # a linked folder
    inside = root / "ecg2"  # a link that stays inside the archive is fine
    _write_record(inside, "ok")
    (inside / "ok.dat").rename(root / "shared.dat")
    os.symlink(root / "shared.dat", inside / "ok.dat")
    return {"root": root, "outside": outside, "hea": root / "ecg" / "rec.hea", "series": series,
            "study": study, "inside": inside / "ok.hea"}


def test_item_files_lists_what_the_readers_open(tmp_path):
    from m3bind.io.confine import item_files, opens_only_itself

    hea = _write_record(tmp_path / "r", dat="signals.dat")
    assert {p.name for p in item_files(hea)} == {"rec.hea", "signals.dat"}
    assert {p.name for p in item_files(hea.with_suffix(""))} >= {"rec.hea", "signals.dat"}
    assert {p.name for p in item_files(tmp_path / "r" / "signals.dat")} >= {"signals.dat"}
    (tmp_path / "s" / "sub").mkdir(parents=True)
    (tmp_path / "s" / "sub" / "x.dcm").write_bytes(b"x")
    assert {p.name for p in item_files(tmp_path / "s")} == {"s", "sub", "x.dcm"}
    slide = tmp_path / "w" / "slide.mrxs"
    (tmp_path / "w" / "slide").mkdir(parents=True)
    slide.write_bytes(b"x")
    (tmp_path / "w" / "slide" / "Data0000.dat").write_bytes(b"x")
    assert {p.name for p in item_files(slide)} == {"slide.mrxs", "slide", "Data0000.dat"}
    photo = tmp_path / "w" / "slide.png"  # a folder of the same name is no part of a photo
    photo.write_bytes(b"x")
    assert item_files(photo) == [photo]
    # the name-only shortcut is sure only where item_files lists the file alone
    bare = tmp_path / "w" / "IM0001"
    bare.write_bytes(b"x")
    for f in (hea, hea.with_suffix(""), tmp_path / "r" / "signals.dat", slide, photo, bare,
              tmp_path / "s" / "sub" / "x.dcm"):
        if opens_only_itself(f):
            assert item_files(f) == [f], f
    assert [opens_only_itself(f) for f in (hea, tmp_path / "r" / "signals.dat", slide, photo,
                                           bare, tmp_path / "x.nii.gz")] == [
        False, False, False, True, False, True]


def test_check_confined_refuses_links_out_of_the_root(linked):
    from m3bind.io.confine import check_confined

    root = linked["root"]
    for item in (linked["hea"], linked["hea"].with_suffix(""), linked["series"], linked["study"]):
        with pytest.raises(UnsupportedFormat, match="outside the archive"):
            check_confined(item, [root])
    check_confined(linked["inside"], [root])
    check_confined(linked["hea"], [root, linked["outside"]])  # an allowed second root


def test_app_does_not_read_files_linked_from_outside_the_archive(linked, tmp_path, monkeypatch):
    import m3bind.io
    from app.web.state import Services

    read = []
    real_load = m3bind.io.load
    monkeypatch.setattr(m3bind.io, "load", lambda p, *a, **k: read.append(p) or real_load(p, *a, **k))
    services = Services(tmp_path / "no-model", None, linked["root"], work_dir=tmp_path / "work")
    for item in (linked["hea"], "ecg/rec.hea", linked["series"], "ct/study"):
        with pytest.raises(UnsupportedFormat, match="outside the archive"):
            services.load(item)
        with pytest.raises(UnsupportedFormat, match="outside the archive"):
            services.embed_file(item)
    assert read == []  # refused before any reader opened a file
    assert services.load(linked["inside"]).modality == "ecg"
    assert services.load(linked["study"] / "a.dcm").modality == "ct"


def test_indexer_does_not_index_a_record_whose_signal_file_links_outside(linked, tmp_path):
    from archive_support import FakeModel

    from data_registry.catalog import Catalog
    from data_registry.indexer import index_archive

    shutil.rmtree(linked["study"])
    cat = Catalog(tmp_path / "c.db", index_dir=tmp_path / "idx")
    res = index_archive(linked["root"], cat, FakeModel(), workers=0)
    assert cat.stats()["items"] == {"ecg": 1}, res  # ecg2/ok.hea only, not ecg/rec.hea


# ------------------------------------------------------------------------ serve exposure
@pytest.fixture
def launched(monkeypatch):
    """Calls of ``app.web.app.launch`` (replaced: nothing is served)."""
    import app.web.app

    calls = []
    monkeypatch.setattr(app.web.app, "launch", lambda services, **kw: calls.append(kw))
    monkeypatch.delenv("M3BIND_AUTH", raising=False)
    return calls


def test_serve_binds_localhost_by_default(launched, tmp_path):
    from app.cli import main

    assert main(["serve", "--archive", str(tmp_path), "--model", str(tmp_path / "none")]) == 0
    assert len(launched) == 1 and launched[0]["host"] == "127.0.0.1" and launched[0]["auth"] is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "example.org", ""])
def test_serve_refuses_other_addresses_without_auth_before_starting(launched, tmp_path, host, capsys):
    from app.cli import main

    rc = main(["serve", "--host", host, "--archive", str(tmp_path), "--model", str(tmp_path / "none")])
    assert rc == 2 and launched == []
    assert "without --auth" in capsys.readouterr().err
    assert main(["serve", "--host", host, "--auth", "doc:pw", "--archive", str(tmp_path),
                 "--model", str(tmp_path / "none")]) == 0
    assert launched[0]["host"] == host and launched[0]["auth"] == ("doc", "pw")


def test_launch_serves_localhost_only_with_upload_limit_and_no_raw_archive(monkeypatch, tmp_path):
    """What reaches Gradio: localhost by default, no share link, the upload limit, the archive
    blocked from Gradio's file route (files are read through ``Services`` only)."""
    gr = pytest.importorskip("gradio")
    from app.web.app import launch
    from app.web.state import Services

    seen = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: seen.update(kw) or (None, "http://x", None))
    services = Services(tmp_path / "no-model", None, tmp_path / "archive", work_dir=tmp_path / "work")
    launch(services, block=False, max_upload_mb=3)
    assert seen["server_name"] == "127.0.0.1" and seen["share"] is False and seen["auth"] is None
    assert seen["max_file_size"] == "3mb"
    assert seen["blocked_paths"] == [str((tmp_path / "archive").resolve())]
    assert not seen.get("allowed_paths")


#: Pickle-based loaders that ``test_reliability.unsafe_loads`` (calls through a module name)
#: does not see: imported names, Unpickler objects, shelve, marshal, TorchScript.
OTHER_UNSAFE = ("Unpickler", "shelve.open", "marshal.load", "jit.load", "from pickle import",
                "from joblib import load", "from dill import", "from torch import load",
                "from cloudpickle import", "from numpy import load")


def test_no_other_pickle_loader_in_the_code():
    repo = Path(__file__).resolve().parents[1]
    files = [p for d in ("m3bind", "data_registry", "app", "train", "benchmarks")
             for p in sorted((repo / d).rglob("*.py"))]
    assert len(files) > 20
    bad = [f"{p.relative_to(repo)}:{i}: {s}" for p in files
           for i, line in enumerate(p.read_text().splitlines(), 1) for s in OTHER_UNSAFE
           if s in line and not line.lstrip().startswith("#")]
    assert not bad, "\n".join(bad)


def test_check_confined_compares_whole_path_components(tmp_path):
    """A folder whose name extends the root's (``archive2`` beside ``archive``) is outside it;
    the root's subfolders are inside, and everything is inside the file-system root."""
    from m3bind.io.confine import check_confined

    root, sibling = tmp_path / "archive", tmp_path / "archive2"
    (root / "sub").mkdir(parents=True)
    (root / "ok").mkdir()
    sibling.mkdir()
    (sibling / "f.png").write_bytes(b"x")
    (root / "ok" / "ok.png").write_bytes(b"x")
    os.symlink(sibling / "f.png", root / "sub" / "f.png")
    with pytest.raises(UnsupportedFormat, match="outside the archive"):
        check_confined(root / "sub" / "f.png", [root])
    for ok in (root / "ok" / "ok.png", root / "ok"):
        check_confined(ok, [root])
    check_confined(root / "sub" / "f.png", [root, sibling])
    check_confined(root / "sub" / "f.png", ["/"])
    check_confined(root / "sub" / "f.png", [str(root) + "/../archive2/"])  # realpath'd roots
    real = os.path.realpath(root)  # roots resolved by the caller (the indexer, once a run)
    with pytest.raises(UnsupportedFormat, match="outside the archive"):
        check_confined(root / "sub" / "f.png", [real], roots_resolved=True)
    check_confined(root / "ok" / "ok.png", [real], roots_resolved=True)
    check_confined(root / "sub" / "f.png", [real, os.path.realpath(sibling)], roots_resolved=True)


def test_wfdb_file_listing_without_rdheader_equals_rdheader(tmp_path, monkeypatch):
    """The files a record's header names, matched with wfdb's line patterns, equal those of a
    full :func:`wfdb.rdheader` parse: plain, renamed signal file, comments and blank lines,
    two signal files, and the headers left to ``rdheader`` (multi-segment, unparseable)."""
    import wfdb

    from m3bind.io import confine

    sig = np.random.default_rng(0).normal(size=(200, 2))
    for name in ("plain", "renamed"):
        wfdb.wrsamp(name, fs=100, units=["mV"] * 2, sig_name=["I", "II"], p_signal=sig,
                    fmt=["16"] * 2, write_dir=str(tmp_path))
    (tmp_path / "renamed.dat").rename(tmp_path / "other.dat")
    hea = tmp_path / "renamed.hea"
    hea.write_text(hea.read_text().replace("renamed.dat", "other.dat"))
    (tmp_path / "commented.hea").write_text(
        "# a comment\n\ncommented 2 100 200\r\n  a.dat 16 200/mV 16 0 0 0 0 I\n"
        "# between\nb.dat 16 200/mV 16 0 0 0 0 II\n#patient: P-1\n")
    (tmp_path / "multi.hea").write_text("multi/2 2 100 400\nplain 200\ncommented 200\n")
    (tmp_path / "broken.hea").write_text("broken 1 100 200\nthis is no signal line\n")
    (tmp_path / "nosignals.hea").write_text("nosignals 0 100\n")
    names = ["plain", "renamed", "commented", "multi", "broken", "nosignals"]
    assert confine._signal_file_names(tmp_path / "plain") == ["plain.dat"] * 2  # no rdheader
    assert confine._signal_file_names(tmp_path / "multi") is None  # left to rdheader
    assert confine._signal_file_names(tmp_path / "broken") is None
    fast = {n: confine._wfdb_files(tmp_path / f"{n}.hea") for n in names}
    monkeypatch.setattr(confine, "_signal_file_names", lambda record: None)
    full = {n: confine._wfdb_files(tmp_path / f"{n}.hea") for n in names}
    assert fast == full
    assert {p.name for p in fast["renamed"]} == {"renamed.hea", "other.dat"}
    assert {p.name for p in fast["commented"]} == {"commented.hea", "a.dat", "b.dat"}
    assert {p.name for p in fast["multi"]} >= {"plain.hea", "plain.dat", "a.dat", "b.dat"}
