"""Fuzzing seeds: the real sample files of ``tests/samples.py`` plus small files derived from them.

Large samples (a 7 MB radiograph, a 1.9 MB slide) make every execution slow, so each reader
also gets small derivatives of the real files (a downsampled copy of the real CR radiograph,
a crop of the real fundus photograph, a tiled TIFF cut from the real slide, a WFDB record
written from the real 12-lead ECG). Each seed is ``(name, files)`` with ``files`` a dict of
file name -> bytes; the first file is the one passed to :func:`m3bind.io.load`.
"""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

Seed = tuple[str, dict[str, bytes]]

DICOM_SEEDS = ("ct_dicom", "mr_dicom", "mr_rle", "mr_j2k", "mr_jpegls", "jpeg_lossy", "jpeg2000", "rgb_rle",
               "rgb_jpeg", "ecg_dicom", "enhanced_mr_rle", "enhanced_mr_jpegls", "rgb_2frame", "voi_lut",
               "jpeg_lossless", "ct_512_j2k")


def _samples() -> dict[str, Path]:
    tests = Path(__file__).resolve().parents[1] / "tests"
    if str(tests) not in sys.path:
        sys.path.insert(0, str(tests))
    from samples import available  # tests/samples.py: installed packages only, no download

    return available()


def _small_cxr(path: Path) -> bytes:
    """The real CR chest radiograph downsampled 8x, everything else (VOI, MONOCHROME1) kept."""
    import pydicom

    ds = pydicom.dcmread(path)
    arr = ds.pixel_array[::8, ::8].copy()
    ds.Rows, ds.Columns = arr.shape
    ds.PixelData = arr.astype(arr.dtype).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


def dicom_seeds() -> list[Seed]:
    s = _samples()
    out = [(n, {"case.dcm": s[n].read_bytes()}) for n in DICOM_SEEDS if n in s]
    if "cxr_dicom" in s:
        out.append(("cxr_dicom/8", {"case.dcm": _small_cxr(s["cxr_dicom"])}))
    return out


def _small_nifti(path: Path) -> bytes:
    """The real 4D image with every second row and column (header, affine and datatype kept)."""
    import gzip

    import nibabel as nib

    img = nib.load(path)
    data = np.asanyarray(img.dataobj)[::2, ::2]
    small = nib.Nifti1Image(data, img.affine, img.header)
    return gzip.compress(small.to_bytes(), compresslevel=6, mtime=0)


def nifti_seeds() -> list[Seed]:
    """The real NIfTI-1 files; the 1.2 MB (decompressed) 4D image mostly as a quarter-size copy."""
    s = _samples()
    out = []
    if "nifti_anat" in s:
        out.append(("nifti_anat", {"case.nii": s["nifti_anat"].read_bytes()}))
    if "nifti_4d" in s:
        small = ("nifti_4d/2", {"case.nii.gz": _small_nifti(s["nifti_4d"])})
        out += [small, small, ("nifti_4d", {"case.nii.gz": s["nifti_4d"].read_bytes()})]
    return out


def wfdb_seeds() -> list[Seed]:
    """Records written with ``wfdb.wrsamp`` from the real 12-lead DICOM ECG (fmt 16 and 212)."""
    import tempfile

    import wfdb

    import m3bind.io

    s = _samples()
    ecg = m3bind.io.load(s["ecg_dicom"])
    sig = ecg.array[:, ::2][:, :2500].T.astype(np.float64)  # 500 Hz, 5 s
    out = []
    with tempfile.TemporaryDirectory() as d:
        for fmt, leads in (("16", 12), ("212", 4)):
            rec = f"rec{fmt}"
            wfdb.wrsamp(rec, fs=500, units=["mV"] * leads, sig_name=list(ecg.lead_names[:leads]),
                        p_signal=sig[:, :leads], fmt=[fmt] * leads, adc_gain=[200.0] * leads,
                        baseline=[0] * leads, write_dir=d,
                        comments=["Age: 63", "Sex: F", "Dx: sinus rhythm"])
            hea = (Path(d) / f"{rec}.hea").read_text().replace(rec, "rec")
            out.append((f"ecg_dicom->wfdb{fmt}", {"rec.hea": hea.encode(), "rec.dat": (Path(d) / f"{rec}.dat").read_bytes()}))
    return out


def _photo_bytes(arr: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buf.getvalue()


def photo_seeds() -> list[Seed]:
    """The real grey PNG and fundus JPEG, plus small crops of them as PNG, JPEG and TIFF."""
    from PIL import Image

    s = _samples()
    out: list[Seed] = []
    if "retina" in s:
        rgb = np.asarray(Image.open(s["retina"]).convert("RGB").resize((192, 192)))
        out += [("retina/192.jpg", {"case.jpg": _photo_bytes(rgb, "JPEG")}),
                ("retina/192.png", {"case.png": _photo_bytes(rgb, "PNG")}),
                ("retina/192.tif", {"case.tif": _photo_bytes(rgb, "TIFF")})]
    if "grey_png" in s:
        grey = np.asarray(Image.open(s["grey_png"]).convert("L"))[::4, ::4].copy()
        out += [("camera/4.png", {"case.png": _photo_bytes(grey, "PNG")}),
                ("camera/4.tif", {"case.tif": _photo_bytes(grey, "TIFF")}),
                ("camera.png", {"case.png": s["grey_png"].read_bytes()})]
    return out


def _small_svs(path: Path, side: int = 512) -> bytes:
    """A 2-level tiled TIFF with an Aperio description, cut from the real slide (OpenSlide reads it)."""
    import openslide
    import tifffile

    with openslide.OpenSlide(str(path)) as sl:
        w, h = sl.dimensions
        region = np.asarray(sl.read_region((max(0, w // 2 - side // 2), max(0, h // 2 - side // 2)), 0,
                                           (side, side)).convert("RGB"))
    desc = (f"Aperio Image Library v10.0.50\r\n{side}x{side} [0,0 {side}x{side}] (128x128) JPEG/RGB Q=70"
            "|AppMag = 20|MPP = 0.499")
    half = side // 2
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        tw.write(region, tile=(128, 128), photometric="rgb", compression="jpeg", description=desc)
        tw.write(region[::2, ::2].copy(), tile=(128, 128), photometric="rgb", compression="jpeg",
                 description=f"Aperio Image Library v10.0.50\r\n{half}x{half} -> {half}x{half} - |")
    return buf.getvalue()


def slide_seeds() -> list[Seed]:
    """Tiled TIFFs cut from the real Aperio slide (256 and 512 px) and, in 1 case of 30, the slide.

    The 1.9 MB original takes ~0.6 s of CPU a case (thumbnail, 13 x 9 tile grid, Lanczos
    resizes); the cuts take a few tens of milliseconds and exercise the same code paths.
    """
    s = _samples()
    out: list[Seed] = []
    if "slide" in s:
        s256 = ("slide/256.svs", {"case.svs": _small_svs(s["slide"], 256)})
        s512 = ("slide/512.svs", {"case.svs": _small_svs(s["slide"], 512)})
        out += [s256] * 24 + [s512] * 5 + [("cmu_small_region.svs", {"case.svs": s["slide"].read_bytes()})]
    return out


SEEDS = {"dicom": dicom_seeds, "nifti": nifti_seeds, "wfdb": wfdb_seeds, "photo": photo_seeds,
         "slide": slide_seeds}
