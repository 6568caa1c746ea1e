"""Every class of bad input gives one M3BindError line (exit 2 on the CLI), quickly, without a traceback."""

from __future__ import annotations

import os
import shutil
import struct
import zlib

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

import m3bind.io.limits
from app.cli import main
from m3bind.errors import CorruptFile, M3BindError, TooLarge, UnsupportedFormat
from m3bind.io import load

pytestmark = pytest.mark.timeout(60)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(path, side=200_000):
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
                     + _png_chunk(b"IEND", b""))
    return path


def _cases(tmp_path, sample_file):
    """(name, path, expected error class) for each bad-input class."""
    cases = []
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    cases.append(("empty", empty, CorruptFile))

    ct = sample_file("ct_dicom").read_bytes()
    cut = tmp_path / "truncated.dcm"
    cut.write_bytes(ct[: len(ct) // 2])
    cases.append(("truncated dicom", cut, CorruptFile))

    png = tmp_path / "ok.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(png)
    cut_png = tmp_path / "truncated.png"
    cut_png.write_bytes(png.read_bytes()[:200])
    cases.append(("truncated png", cut_png, CorruptFile))

    jpg = sample_file("retina").read_bytes()
    cut_jpg = tmp_path / "truncated.jpg"
    cut_jpg.write_bytes(jpg[: len(jpg) // 3])
    cases.append(("truncated jpeg", cut_jpg, CorruptFile))

    nii = tmp_path / "ok.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((16, 16, 16)).astype(np.float32), np.eye(4)), str(nii))
    cut_nii = tmp_path / "truncated.nii.gz"
    cut_nii.write_bytes(nii.read_bytes()[:400])
    cases.append(("truncated nifti", cut_nii, CorruptFile))

    junk_dicom = tmp_path / "junk.dcm"
    junk_dicom.write_bytes(b"\x00" * 128 + b"DICM" + np.random.default_rng(1).bytes(2000))
    cases.append(("corrupt dicom", junk_dicom, CorruptFile))

    junk_gz = tmp_path / "junk.nii.gz"
    junk_gz.write_bytes(b"\x1f\x8b" + np.random.default_rng(2).bytes(500))
    cases.append(("corrupt gzip", junk_gz, CorruptFile))

    text = tmp_path / "notes.txt"
    text.write_text("a clinical note, not an image\n")
    cases.append(("unsupported text", text, UnsupportedFormat))

    zipped = tmp_path / "archive.zip"
    shutil.make_archive(str(tmp_path / "archive"), "zip", root_dir=tmp_path, base_dir="notes.txt")
    cases.append(("unsupported zip", zipped, UnsupportedFormat))

    cases.append(("missing path", tmp_path / "nope.dcm", UnsupportedFormat))

    cases.append(("png bomb", _bomb_png(tmp_path / "bomb.png"), TooLarge))

    ds = pydicom.dcmread(sample_file("ct_dicom"))
    ds.Rows, ds.Columns, ds.NumberOfFrames = 65535, 65535, 1000
    bomb_dcm = tmp_path / "bomb.dcm"
    ds.save_as(bomb_dcm)
    cases.append(("dicom bomb", bomb_dcm, TooLarge))

    hdr = nib.Nifti1Header()
    hdr.set_data_shape((30000, 30000, 30000))
    hdr.set_data_dtype(np.uint8)
    bomb_nii = tmp_path / "bomb.nii"
    bomb_nii.write_bytes(hdr.binaryblock + b"\x00" * 4 + b"\x00" * 1000)
    cases.append(("nifti bomb", bomb_nii, TooLarge))

    hea = tmp_path / "rec.hea"
    hea.write_text("rec 1 500 5000\nrec.dat 16 200 16 0 0 0 0 II\n")
    cases.append(("wfdb without signal file", hea, CorruptFile))

    series = tmp_path / "mixed"
    series.mkdir()
    shutil.copy(sample_file("ct_dicom"), series / "ct.dcm")
    shutil.copy(sample_file("mr_dicom"), series / "mr.dcm")
    cases.append(("mixed series", series, UnsupportedFormat))
    return cases


def test_every_bad_input_class_raises_one_line(tmp_path, sample_file):
    for name, path, err in _cases(tmp_path, sample_file):
        with pytest.raises(err) as e:
            load(path)
        msg = str(e.value)
        assert "\n" not in msg and msg.endswith(f"({path})"), (name, msg)


def test_cli_exit_2_one_line(tmp_path, sample_file, capsys):
    for name, path, _ in _cases(tmp_path, sample_file):
        rc = main(["inspect", str(path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, name
        assert len(err) >= 1 and err[-1].startswith("error: ") and err[-1].endswith(f"({path})"), (name, err)
        assert "Traceback" not in "\n".join(err)


def test_file_size_limit(tmp_path, monkeypatch):
    p = tmp_path / "big.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(p)
    monkeypatch.setattr(m3bind.io.limits.LIMITS, "max_file_bytes", 10)
    with pytest.raises(TooLarge, match="exceeds the limit"):
        load(p)


def test_unreadable_file(tmp_path, monkeypatch):
    p = tmp_path / "locked.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(p)
    if os.geteuid() != 0:
        p.chmod(0)
        try:
            with pytest.raises(CorruptFile, match="permission denied"):
                load(p)
        finally:
            p.chmod(0o644)
    real_open = open

    def guarded(file, *a, **kw):
        if str(file) == str(p):
            raise PermissionError(13, "Permission denied")
        return real_open(file, *a, **kw)

    monkeypatch.setattr(m3bind.io.limits, "open", guarded, raising=False)
    with pytest.raises(CorruptFile, match="permission denied"):
        load(p)


def test_ecg_length_limit(sample_file, monkeypatch):
    monkeypatch.setattr(m3bind.io.limits.LIMITS, "max_signal_values", 1000)
    with pytest.raises(TooLarge, match="signal of 120000 values"):
        load(sample_file("ecg_dicom"))


def test_format_cannot_hold_modality(sample_file):
    with pytest.raises(UnsupportedFormat, match="cannot hold ecg"):
        load(sample_file("mni_t1"), "ecg")
    with pytest.raises(UnsupportedFormat, match="cannot hold mri"):
        load(sample_file("slide"), "mri")


def test_errors_are_m3bind_errors():
    assert issubclass(CorruptFile, M3BindError) and issubclass(TooLarge, M3BindError)


def test_mutated_files_never_escape_as_other_exceptions(tmp_path, sample_file):
    """Random truncations and byte flips of valid files: a Sample or an M3BindError, nothing else."""
    import time

    import wfdb

    rng = np.random.default_rng(0)
    png = tmp_path / "src.png"
    Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(png)
    nii = tmp_path / "src.nii.gz"
    nib.save(nib.Nifti1Image(rng.random((8, 8, 8)).astype(np.float32), np.eye(4)), str(nii))
    wfdb.wrsamp("src", fs=500, units=["mV"] * 2, sig_name=["I", "II"], p_signal=rng.random((500, 2)),
                fmt=["16"] * 2, adc_gain=[200.0] * 2, baseline=[0] * 2, write_dir=str(tmp_path))
    sources = [sample_file("ct_dicom"), sample_file("ecg_dicom"), png, nii, tmp_path / "src.hea"]
    for k, src in enumerate(sources):
        data = bytearray(src.read_bytes())
        for trial in range(12):
            mutated = bytearray(data)
            if trial % 3 == 0:
                mutated = mutated[: int(rng.integers(1, len(mutated)))]
            else:
                for pos in rng.integers(0, len(mutated), size=int(rng.integers(1, 20))):
                    mutated[pos] = int(rng.integers(0, 256))
            target = tmp_path / f"m{k}_{trial}{''.join(src.suffixes)}"
            target.write_bytes(bytes(mutated))
            if src.suffix == ".hea":
                (tmp_path / f"m{k}_{trial}.dat").write_bytes((tmp_path / "src.dat").read_bytes())
            t0 = time.perf_counter()
            try:
                load(target)
            except M3BindError as e:
                assert "\n" not in str(e)
            assert time.perf_counter() - t0 < 10, target
