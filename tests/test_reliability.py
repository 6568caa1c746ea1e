"""Reliability and security: a regression test for each fuzzing finding, no pickle loading,
tampered model directories refused, archive paths confined to the root, size limits.

The fuzzing findings (``fuzz/fuzz_readers.py``, figures in ``docs/reliability.md``) are
rebuilt here from the real sample files with the one field the fuzzer changed, so each test
fails on the reader code before its fix.
"""

from __future__ import annotations

import ast
import os
import shutil
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import m3bind.io
from m3bind.errors import CorruptFile, M3BindError, ModelDirError, TooLarge

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ DICOM findings
def test_dicom_huge_element_length_does_not_allocate_it(sample_file, tmp_path):
    """Finding: pydicom read ``fp.read(length)`` with a damaged 4 GiB length; CPython allocated it."""
    data = bytearray(sample_file("ct_dicom").read_bytes())
    i = data.find(b"\xe0\x7f\x10\x00OW\x00\x00")  # (7FE0,0010) PixelData, explicit VR LE
    assert i > 0
    data[i + 8:i + 12] = struct.pack("<I", 0xFFFFFFF0)
    p = tmp_path / "huge_length.dcm"
    p.write_bytes(bytes(data))
    m3bind.io.load(sample_file("ct_dicom"))  # imports and codec set-up happen outside the trace
    tracemalloc.start()
    try:
        try:  # the clamped read gets the rest of the file: a one-line error or the image itself
            m3bind.io.load(p)
        except M3BindError as e:
            assert not isinstance(e.__context__, MemoryError), e
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"peak allocation {peak / 2**20:.0f} MiB for a {len(data)} byte file"


def test_dicom_rescale_overflow_gives_finite_volume(sample_file, tmp_path):
    """Finding: RescaleIntercept = 1e308 turned the CT volume into inf (NaN downstream)."""
    import pydicom

    ds = pydicom.dcmread(sample_file("ct_dicom"))
    ds.RescaleIntercept = "1e308"
    ds.RescaleSlope = "1e308"
    p = tmp_path / "overflow.dcm"
    ds.save_as(p, enforce_file_format=False)
    s = m3bind.io.load(p)
    assert np.isfinite(s.array).all()
    assert s.meta["nonfinite_values"] > 0


def test_rle_codec_panic_is_a_corrupt_file(sample_file, tmp_path):
    """Finding: the Rust RLE decoder panics (a BaseException, not an Exception) on damaged segments."""
    data = bytearray(sample_file("mr_rle").read_bytes())
    bot = data.find(b"\xfe\xff\x00\xe0", data.find(b"\xe0\x7f\x10\x00"))  # basic offset table item
    frag = data.find(b"\xfe\xff\x00\xe0", bot + 8) + 8  # the first fragment: the RLE header
    assert frag > 8 and struct.unpack("<I", data[frag:frag + 4])[0] == 2  # RLE header: 2 segments
    i = frag + 324  # inside the first segment's run-length codes: the 32-bit value the fuzzer spliced in
    data[i:i + 4] = bytes([234, 254, 193, 185])
    p = tmp_path / "rle.dcm"
    p.write_bytes(bytes(data))
    with pytest.raises(M3BindError):
        m3bind.io.load(p)


def test_dicom_damaged_vr_is_a_corrupt_file(sample_file, tmp_path):
    """Finding: a VR of ``U\\x1f`` in (0020,000E) raised NotImplementedError on first access."""
    data = bytearray(sample_file("mr_jpegls").read_bytes())
    i = data.find(b"\x20\x00\x0e\x00UI")  # SeriesInstanceUID, explicit VR
    assert i > 0
    data[i + 5] = 0x1F
    p = tmp_path / "vr.dcm"
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptFile, match="damaged DICOM element"):
        m3bind.io.load(p)


# ------------------------------------------------------------------------------ photo findings
def test_png_huge_chunk_length_does_not_allocate_it(sample_file, tmp_path):
    """Finding: Pillow's PNG plugin read ``fp.read(length)`` of a damaged IDAT length (MemoryError)."""
    data = bytearray(sample_file("grey_png").read_bytes())
    i = data.find(b"IDAT") - 4
    data[i:i + 4] = struct.pack(">I", 0xFFFFFFF0)
    p = tmp_path / "chunk.png"
    p.write_bytes(bytes(data))
    m3bind.io.load(sample_file("grey_png"), "cxr")  # imports outside the trace
    tracemalloc.start()
    try:
        try:
            m3bind.io.load(p, "cxr")
        except M3BindError as e:
            assert not isinstance(e.__context__, MemoryError), e
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"peak allocation {peak / 2**20:.0f} MiB"


def test_tiff_single_sample_axis_reads_as_grey(tmp_path):
    """Finding: a TIFF whose SamplesPerPixel count is damaged (Pillow refuses it) came back from
    tifffile as ``[H, W, 1]`` and crashed the modality guess with IndexError."""
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 255, size=(64, 64, 3), dtype=np.uint8)
    p = tmp_path / "one.tif"
    Image.fromarray(rgb).save(p, format="TIFF")
    data = bytearray(p.read_bytes())
    sys.path.insert(0, str(REPO))
    from fuzz.mutators import tiff_entries

    e = next(e for e in tiff_entries(bytes(data)) if e[1] == 277)  # SamplesPerPixel
    data[e[0] + 4:e[0] + 8] = struct.pack(e[4] + "I", 8)  # count 8: Pillow gives up, tifffile reads
    p.write_bytes(bytes(data))
    s = m3bind.io.load(p)
    # tifffile falls back to one sample per pixel: the first H*W interleaved bytes, as grey
    grey = rgb.reshape(-1)[:64 * 64].reshape(64, 64)
    assert s.modality == "cxr" and s.array.shape == (64, 64)
    np.testing.assert_allclose(s.array, grey / 255.0, atol=1e-6)


# ------------------------------------------------------------------------------ NIfTI findings
def _nifti_with(sample_file, tmp_path, offset: int, fmt: str, value) -> Path:
    data = bytearray(sample_file("nifti_anat").read_bytes())
    bo = "<" if struct.unpack("<i", data[:4])[0] == 348 else ">"
    data[offset:offset + struct.calcsize(fmt)] = struct.pack(bo + fmt, value)
    p = tmp_path / "mutated.nii"
    p.write_bytes(bytes(data))
    return p


@pytest.mark.parametrize("offset,fmt,value", [
    (280 + 4 * 6, "f", 1e30),           # srow_y[2]: an affine nibabel cannot reorient (OrientationError)
    (280 + 4 * 11, "f", -float("inf")),  # srow_z[3]: non-finite affine (HeaderDataError)
])
def test_nifti_degenerate_affine_is_corrupt(sample_file, tmp_path, offset, fmt, value):
    p = _nifti_with(sample_file, tmp_path, offset, fmt, value)
    with pytest.raises(CorruptFile):
        m3bind.io.load(p)


def test_nifti_unknown_units_code_still_reads(sample_file, tmp_path):
    """Finding: xyzt_units = 160 made nibabel's get_xyzt_units raise KeyError."""
    p = _nifti_with(sample_file, tmp_path, 123, "B", 160)
    s = m3bind.io.load(p)
    ref = m3bind.io.load(sample_file("nifti_anat"))
    np.testing.assert_array_equal(s.array, ref.array)


# ------------------------------------------------------------------------------ slide findings
def _small_tiled_tiff(path: Path, tile_length: int | None = None, app_mag: str = "20",
                      mpp: str = "0.5") -> Path:
    import tifffile

    rgb = np.random.default_rng(0).integers(0, 255, size=(256, 256, 3), dtype=np.uint8)
    desc = f"Aperio Image Library v10.0.50\r\n256x256 [0,0 256x256] (128x128) RAW|AppMag = {app_mag}|MPP = {mpp}"
    tifffile.imwrite(path, rgb, tile=(128, 128), photometric="rgb", description=desc)
    if tile_length is not None:
        sys.path.insert(0, str(REPO))
        from fuzz.mutators import tiff_entries

        data = bytearray(path.read_bytes())
        e = next(e for e in tiff_entries(bytes(data)) if e[1] == 323)  # TileLength
        fmt = "H" if e[2] == 3 else "I"
        data[e[0] + 8:e[0] + 8 + struct.calcsize(fmt)] = struct.pack(e[4] + fmt, tile_length)
        path.write_bytes(bytes(data))
    return path


def test_slide_with_huge_tile_is_refused_not_aborted(tmp_path):
    """Finding: TileLength = 2e9 made OpenSlide's g_malloc abort the whole process (SIGABRT).

    Run in a child process so that a regression kills the child, not the test session.
    """
    p = _small_tiled_tiff(tmp_path / "tile.svs", tile_length=65535 if False else 0x77653F30)
    code = ("import m3bind.io, sys\n"
            "try:\n    m3bind.io.load(sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__)\n")
    r = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 0, r.stderr[-500:]
    assert r.stdout.strip() in ("CorruptFile", "TooLarge", "UnsupportedFormat")


@pytest.mark.parametrize("app_mag,mpp", [("inf", "0.5"), ("nan", "0.5"), ("inf", "5e-324"), ("1e400", "inf")])
def test_slide_with_infinite_magnification_reads_or_is_refused(tmp_path, app_mag, mpp):
    """Finding (harness 2, slide case 29217): ``AppMag = inf`` in the Aperio description made the
    tile side at level 0 infinite and ``int()`` raised OverflowError out of the reader. A
    magnification or mpp that is not a finite positive number is now ignored (then derived from
    the mpp, or assumed), so the slide reads like one that states none."""
    s = m3bind.io.load(_small_tiled_tiff(tmp_path / "mag.svs", app_mag=app_mag, mpp=mpp))
    assert s.format == "wsi" and s.tiles is not None
    power = s.meta.get("objective_power")
    assert power is None or 0 < power < float("inf")


def test_valid_small_slide_still_reads(tmp_path):
    s = m3bind.io.load(_small_tiled_tiff(tmp_path / "ok.svs"))
    assert s.format == "wsi" and s.tiles is not None


def test_tissue_fractions_match_the_slow_loop():
    """The vectorised grid (no Python loop over millions of cells) equals the obvious loop."""
    from m3bind.io.wsi import _cell_fractions

    rng = np.random.default_rng(1)
    mask = rng.random((97, 131)) > 0.6
    for rows, cols, cy, cx in ((7, 9, 13.7, 14.2), (40, 50, 2.4, 2.6), (300, 400, 0.31, 0.32)):
        fast = _cell_fractions(mask, rows, cols, cy, cx)
        for r in range(0, rows, max(1, rows // 13)):
            for c in range(0, cols, max(1, cols // 11)):
                y0, x0 = int(r * cy), int(c * cx)
                y1, x1 = max(y0 + 1, int((r + 1) * cy)), max(x0 + 1, int((c + 1) * cx))
                assert fast[r, c] == pytest.approx(float(mask[y0:y1, x0:x1].mean()))


# ------------------------------------------------------------------------------ WFDB findings
def _wfdb_record(folder: Path, comments: list[str] | None = None) -> Path:
    import wfdb

    folder.mkdir(parents=True, exist_ok=True)
    sig = np.sin(np.linspace(0, 20, 1000))[:, None].repeat(2, 1)
    wfdb.wrsamp("rec", fs=500, units=["mV", "mV"], sig_name=["I", "II"], p_signal=sig, fmt=["16", "16"],
                write_dir=str(folder), comments=comments or [])
    return folder / "rec.hea"


@pytest.mark.parametrize("name", ["../outside.dat", "/etc/hostname", "sub/../../outside.dat"])
def test_wfdb_signal_file_outside_record_folder_refused(tmp_path, name):
    """A header naming ``../x.dat`` or an absolute path is refused (wfdb's header syntax rejects
    ``/`` today; :func:`~m3bind.io.wfdb_reader._confined` refuses it whatever wfdb accepts)."""
    from m3bind.io.wfdb_reader import _confined

    hea = _wfdb_record(tmp_path / "rec")
    shutil.copy(tmp_path / "rec" / "rec.dat", tmp_path / "outside.dat")
    hea.write_text(hea.read_text().replace("rec.dat", name))
    with pytest.raises(CorruptFile):
        m3bind.io.load(hea)
    with pytest.raises(CorruptFile, match="outside the record folder"):
        _confined(name, hea)
    _confined("rec.dat", hea)  # a plain name in the record's folder is fine


def test_wfdb_declared_signal_count_must_match_its_lines(tmp_path):
    """Finding (a hang): ``n_sig = 99999999`` with 2 signal lines and ``sig_len = 0`` kept wfdb
    busy for minutes; the header is now refused at once."""
    import time

    hea = _wfdb_record(tmp_path / "rec")
    lines = hea.read_text().splitlines()
    f = lines[0].split()
    f[1], f[3] = "99999999", "0"
    hea.write_text("\n".join([" ".join(f)] + lines[1:]) + "\n")
    t0 = time.perf_counter()
    with pytest.raises(CorruptFile, match="declares 99999999 signals"):
        m3bind.io.load(hea)
    assert time.perf_counter() - t0 < 5


def test_wfdb_comments_are_not_metadata_without_keep_phi(tmp_path):
    hea = _wfdb_record(tmp_path / "rec", ["Age: 63", "Sex: F", "Name: Zyxwvut^Quintessa", "Patient: ID-99311"])
    s = m3bind.io.load(hea)
    assert "Zyxwvut" not in repr(s.meta) and "99311" not in repr(s.meta)
    assert s.meta["header"] == {"age": "63", "sex": "F"}
    kept = m3bind.io.load(hea, keep_phi=True)
    assert "Name: Zyxwvut^Quintessa" in kept.meta["phi"]["comments"]


# ------------------------------------------------------------------------------ size limits
def test_file_size_limit(sample_file, monkeypatch):
    monkeypatch.setattr(m3bind.io.LIMITS, "max_file_bytes", 1000)
    with pytest.raises(TooLarge):
        m3bind.io.load(sample_file("ct_dicom"))


def test_decoded_size_limit_checked_before_decoding(sample_file, monkeypatch):
    monkeypatch.setattr(m3bind.io.LIMITS, "max_pixels", 100)
    for name in ("ct_dicom", "nifti_anat", "grey_png"):
        with pytest.raises(TooLarge):
            m3bind.io.load(sample_file(name), "cxr" if name == "grey_png" else None)


def test_png_decompression_bomb_refused_before_decoding(sample_file, tmp_path):
    """A PNG whose IHDR claims 40000 x 40000 pixels (1.6e9 values) is refused from the header."""
    import zlib

    data = bytearray(sample_file("grey_png").read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", 40000, 40000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    p = tmp_path / "bomb.png"
    p.write_bytes(bytes(data))
    tracemalloc.start()
    try:
        with pytest.raises(TooLarge):
            m3bind.io.load(p, "cxr")
        assert tracemalloc.get_traced_memory()[1] < 64 * 2**20
    finally:
        tracemalloc.stop()


def test_nifti_gzip_bomb_refused_from_header(tmp_path):
    """A 2 KB .nii.gz whose header claims 2048^3 voxels is refused before any voxel is inflated."""
    import gzip

    import nibabel as nib

    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    raw = bytearray(img.header.binaryblock + b"\x00" * 4 + np.zeros(64, np.float32).tobytes())
    raw[40:56] = struct.pack("<8h", 3, 2048, 2048, 2048, 1, 1, 1, 1)
    p = tmp_path / "bomb.nii.gz"
    p.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(TooLarge):
        m3bind.io.load(p)


# ------------------------------------------------------------------------------ no pickle
#: (module alias, function) -> why calling it on a user path is unsafe.
UNSAFE_CALLS = {("pickle", "load"): "pickle", ("pickle", "loads"): "pickle", ("joblib", "load"): "pickle",
                ("dill", "load"): "pickle", ("cloudpickle", "load"): "pickle", ("pd", "read_pickle"): "pickle",
                ("pandas", "read_pickle"): "pickle", ("yaml", "unsafe_load"): "code execution"}


def unsafe_loads(source: str) -> list[tuple[int, str]]:
    """Lines calling a pickle loader: pickle/joblib/dill, ``torch.load`` without
    ``weights_only=True``, ``np.load(..., allow_pickle=True)``, ``yaml.load`` without a safe loader."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        base = node.func.value
        name = base.id if isinstance(base, ast.Name) else getattr(base, "attr", "")
        fn = node.func.attr
        kw = {k.arg: k.value for k in node.keywords}

        def const(k: str, kw: dict = kw):
            return isinstance(kw.get(k), ast.Constant) and kw[k].value

        if (name, fn) in UNSAFE_CALLS:
            out.append((node.lineno, f"{name}.{fn}"))
        elif name == "torch" and fn == "load" and const("weights_only") is not True:
            out.append((node.lineno, "torch.load without weights_only=True"))
        elif name in ("np", "numpy") and fn == "load" and "allow_pickle" in kw and const("allow_pickle") is not False:
            out.append((node.lineno, "np.load with allow_pickle"))
        elif name == "yaml" and fn == "load" and "Safe" not in ast.unparse(kw.get("Loader", ast.Constant(""))) \
                and not any("Safe" in ast.unparse(a) for a in node.args[1:]):
            out.append((node.lineno, "yaml.load without SafeLoader"))
    return out


def test_unsafe_load_detector_catches_each_form():
    src = ("import pickle, torch, numpy as np, joblib, yaml\n"
           "pickle.load(f)\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
           "np.load(p, allow_pickle=True)\njoblib.load(p)\nyaml.load(t)\n"
           "torch.load(p, map_location='cpu',\n           weights_only=True)\nnp.load(p)\nyaml.safe_load(t)\n"
           "yaml.load(t, Loader=yaml.SafeLoader)\n")
    assert [ln for ln, _ in unsafe_loads(src)] == [2, 3, 4, 5, 6, 7]


def test_no_pickle_loading_in_the_code():
    files = [p for d in ("m3bind", "data_registry", "app", "train", "benchmarks", "fuzz")
             for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 20
    bad = [f"{p.relative_to(REPO)}:{ln}: {why}" for p in files for ln, why in unsafe_loads(p.read_text())]
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------------------ model directories
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from app.web.testing import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.getbasetemp())  # built once per session, shared with test_phi


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_model_dir_loads_untampered(tiny_model):
    from m3bind.model import load_model

    assert load_model(tiny_model).dim > 0


def test_model_dir_with_tampered_weights_refused(tiny_model, tmp_path):
    from m3bind.model import load_model

    d = _copy(tiny_model, tmp_path / "m")
    st = min(d.rglob("*.safetensors"))
    data = bytearray(st.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    st.write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match="sha256"):
        load_model(d)


def test_model_dir_with_pickle_refused(tiny_model, tmp_path):
    import pickle

    from m3bind.model import load_model

    d = _copy(tiny_model, tmp_path / "m")
    (d / "extra.pt").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ModelDirError, match="pickle"):
        load_model(d, verify=False)
    (d / "extra.pt").unlink()
    st = min(d.rglob("*.safetensors"))
    st.write_bytes(pickle.dumps(os.getcwd))  # a pickle under a safetensors name
    with pytest.raises(ModelDirError):
        load_model(d, verify=False)


def test_model_dir_with_unlisted_file_or_symlink_refused(tiny_model, tmp_path):
    from m3bind.model import load_model

    d = _copy(tiny_model, tmp_path / "m")
    (d / "notes.safetensors").write_bytes(b"x")
    with pytest.raises(ModelDirError, match="not in the manifest"):
        load_model(d)
    (d / "notes.safetensors").unlink()
    st = min(d.rglob("*.safetensors"))
    target = tmp_path / "elsewhere.safetensors"
    shutil.move(st, target)
    st.symlink_to(target)
    with pytest.raises(ModelDirError, match="symbolic link"):
        load_model(d)


# ------------------------------------------------------------------------------ archive root confinement
def test_scan_refuses_symlinks_and_sidecar_paths_out_of_root(sample_file, tmp_path):
    from data_registry.scan import scan

    root, outside = tmp_path / "archive", tmp_path / "outside"
    (root / "cxr").mkdir(parents=True)
    outside.mkdir()
    shutil.copy(sample_file("grey_png"), root / "cxr" / "in.png")
    shutil.copy(sample_file("grey_png"), outside / "secret.png")
    (root / "cxr" / "link.png").symlink_to(outside / "secret.png")
    (root / "linkdir").symlink_to(outside)
    (root / "m3bind_sidecar.csv").write_text("path,patient,modality\n../outside/secret.png,P1,cxr\n"
                                            "cxr/in.png,P2,cxr\n")
    cands, failures = scan(root)
    rels = [c.rel for c in cands]
    assert "cxr/in.png" in rels
    assert all("secret" not in r and not r.startswith("..") for r in rels)
    assert all(os.path.realpath(root / r).startswith(str(root.resolve())) for r in rels)
    failed = dict(failures)
    assert "outside" in failed["cxr/link.png"] and "outside" in failed["linkdir"]


def test_wfdb_signal_file_indexed_before_its_header_leaves_no_stale_failure(tmp_path):
    """Seen in the concurrency run: a ``.dat`` copied in before its ``.hea`` fails ("unrecognised
    file format"); once the header arrives the record is indexed and that failure must go."""
    sys.path.insert(0, str(REPO / "tests"))
    from archive_support import FakeModel, write_wfdb

    from data_registry.catalog import Catalog
    from data_registry.indexer import index_archive

    staging, root = tmp_path / "staging", tmp_path / "archive"
    write_wfdb(staging, "rec1", 0, ["age: 60"])
    (root / "ecg").mkdir(parents=True)
    shutil.copy2(staging / "rec1.dat", root / "ecg" / "rec1.dat")  # the signal file first
    cat = Catalog(tmp_path / "c.db", index_dir=tmp_path / "idx")
    model = FakeModel()
    first = index_archive(root, cat, model, workers=0)
    assert (first["added"], first["failed"]) == (0, 1)
    assert cat.stats()["failed"] == 1
    shutil.copy2(staging / "rec1.hea", root / "ecg" / "rec1.hea")  # then its header
    second = index_archive(root, cat, model, workers=0)
    assert (second["added"], second["failed"]) == (1, 0)
    assert cat.stats()["failed"] == 0 and cat.stats()["items"] == {"ecg": 1}
    (root / "junk.bin").write_bytes(b"\x00" * 64)  # a failure of a path still offered stays
    third = index_archive(root, cat, model, workers=0)
    assert (third["skipped"], third["failed"]) == (1, 1) and cat.stats()["failed"] == 1


def test_tiff_segment_count_past_the_end_does_not_allocate_it(sample_file, tmp_path):
    """Finding (slide fuzzing, a cut of the Aperio slide that OpenSlide refused and Pillow could
    not decode): tifffile read a tile with ``fh.read(bytecount)`` and a damaged TileByteCounts
    of 1.9e9 allocated that much for a 64 KB file. Rebuilt from the real fundus photograph."""
    import io

    import tifffile
    from PIL import Image

    from m3bind.io import photo

    rgb = np.asarray(Image.open(sample_file("retina")).convert("RGB").resize((512, 512)))
    buf = io.BytesIO()
    tifffile.imwrite(buf, rgb, tile=(256, 256), photometric="rgb")  # 196608-byte tiles: LONG counts
    data = bytearray(buf.getvalue())
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        tag = tif.pages[0].tags["TileByteCounts"]
        assert tag.dtype == 4 and tag.count == 4
    data[tag.valueoffset:tag.valueoffset + 4] = struct.pack("<I", 0x20000000)  # 512 MiB, file ~800 KB
    p = tmp_path / "damaged_counts.tif"
    p.write_bytes(bytes(data))
    tracemalloc.start()
    try:
        with pytest.raises(CorruptFile, match="beyond the end"):
            photo._read_tifffile(p)  # the decoder the reader falls back to when Pillow fails
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20


def test_dicom_ecg_without_samples_is_refused(sample_file, tmp_path):
    """Finding (harness 2, DICOM case 27868): the real 12-lead ECG with NumberOfWaveformSamples
    set to 0 read as an empty Sample instead of an error."""
    import pydicom

    ds = pydicom.dcmread(sample_file("ecg_dicom"))
    for g in ds.WaveformSequence:
        g.NumberOfWaveformSamples = 0
    p = tmp_path / "ecg_no_samples.dcm"
    ds.save_as(p, enforce_file_format=False)
    with pytest.raises(CorruptFile, match="without samples"):
        m3bind.io.load(p)


@pytest.mark.parametrize("name,value", [("Rows", [64, 64]), ("Columns", [64, 3]),
                                        ("SamplesPerPixel", [3, 1]), ("NumberOfFrames", [2, 1])])
def test_dicom_multivalued_or_nan_counts_are_handled(sample_file, tmp_path, name, value):
    """Finding (harness 2, DICOM case 47577, seed rgb_rle, modality retina): flipped bytes made
    an image attribute multi-valued and ``int()`` of it raised TypeError out of the reader. A
    count attribute with several values is read by its first value; one that is no number is a
    corrupt file. Either way the answer is a Sample or an M3BindError, never another exception."""
    import pydicom

    ds = pydicom.dcmread(sample_file("rgb_rle"))
    setattr(ds, name, value)
    p = tmp_path / f"bad_{name}.dcm"
    ds.save_as(p, enforce_file_format=False)
    try:
        sample = m3bind.io.load(p, "retina")
    except M3BindError:
        pass
    else:
        assert sample.array.size > 0 and np.isfinite(sample.array).all()


def test_dicom_count_attributes():
    """``_count``: first value of a multi-valued count, the default when absent, and a corrupt
    file for NaN, negative or fractional values."""
    from m3bind.io.dicom import _count

    assert _count({"Rows": [5, 6]}, "Rows", 0, "x") == 5
    assert _count({}, "NumberOfFrames", 1, "x") == 1
    assert _count({"Rows": 512}, "Rows", 0, "x") == 512
    for bad in (float("nan"), -1, 2.5, float("inf")):
        with pytest.raises(CorruptFile, match="not a count"):
            _count({"Rows": bad}, "Rows", 0, "x")
