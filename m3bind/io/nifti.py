"""NIfTI reader (nibabel): ``.nii``/``.nii.gz``, 3D and 4D, and multi-sequence MRI study folders.

Axis convention: the image is first reoriented to the closest canonical orientation
(RAS+, :func:`nibabel.as_closest_canonical`), then laid out as ``[Z, Y, X]`` with
axis 0 inferior->superior, axis 1 anterior->posterior and axis 2 right->left. This is the same
index order as an axial DICOM series (LPS), so ``array[z]`` displays in the radiological
convention (anterior up, patient's right on the viewer's left) for both formats.
``spacing`` follows the array axes, in mm. A 4D image becomes ``[C, Z, Y, X]`` (one channel
per volume).
"""

from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path

import numpy as np

from m3bind.errors import CorruptFile, UnsupportedFormat
from m3bind.io.limits import check_file, check_pixels
from m3bind.io.sample import Sample
from m3bind.modalities import CT, MRI

log = logging.getLogger(__name__)

_TO_MM = {"mm": 1.0, "meter": 1000.0, "micron": 1e-3, "unknown": 1.0}


def _load_canonical(path: Path):
    import nibabel as nib

    check_file(path)
    try:
        img = nib.load(str(path))
    except Exception as e:  # noqa: BLE001 - ImageFileError, HeaderDataError, OSError, ...
        raise CorruptFile(f"not a readable NIfTI image: {e}", path) from None
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 3 or len(shape) > 5 or any(s <= 0 for s in shape):
        raise UnsupportedFormat(f"NIfTI image of shape {shape} is not a 3D or 4D volume", path)
    check_pixels(int(np.prod(shape, dtype=np.int64)), path, "NIfTI volume")
    try:
        source_affine = img.affine
        img = nib.as_closest_canonical(img)
        data = np.asarray(img.dataobj, dtype=np.float32)
    except (EOFError, zlib.error, OSError, ValueError) as e:
        raise CorruptFile(f"truncated or damaged NIfTI data: {e}", path) from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - nibabel's HeaderDataError, OrientationError on damaged affines (fuzzing)
        raise CorruptFile(f"damaged NIfTI header: {type(e).__name__}: {' '.join(str(e).split())[:120]}", path) from None
    try:
        unit = img.header.get_xyzt_units()[0] or "unknown"
    except KeyError:  # an xyzt_units code nibabel does not know (fuzzing)
        unit = "unknown"
    zooms = [float(z) * _TO_MM.get(unit, 1.0) for z in img.header.get_zooms()[:3]]
    return img, data, zooms, source_affine


def _axcodes(affine) -> str | None:
    import nibabel as nib

    try:
        return "".join(str(c) for c in nib.aff2axcodes(affine))
    except Exception:  # noqa: BLE001 - a degenerate affine has no orientation
        return None


def _to_zyx(data: np.ndarray) -> np.ndarray:
    """RAS ``[X, Y, Z, ...]`` -> ``[..., Z, Y, X]`` with Y anterior->posterior and X right->left."""
    if data.ndim == 5:  # x, y, z, t, component: fold the last two
        data = data.reshape(data.shape[:3] + (-1,))
    zyx = np.moveaxis(data, (0, 1, 2), (-1, -2, -3))  # [..., Z, Y, X]
    return np.ascontiguousarray(zyx[..., ::-1, ::-1])


def _guess_modality(data: np.ndarray) -> str:
    lo, hi = np.percentile(data, [1, 99])
    return CT if lo <= -900 and hi >= 0 else MRI


def read_nifti(path: str | os.PathLike, modality: str | None = None) -> Sample:
    """Read one NIfTI file.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        modality: ``mri`` or ``ct``; guessed from the intensities (HU-like -> ``ct``) when ``None``.

    Raises:
        CorruptFile: Damaged header or data.
        TooLarge: Volume above :attr:`m3bind.io.LIMITS.max_pixels` (checked from the header).
        UnsupportedFormat: Not a 3D/4D volume.
    """
    path = Path(path)
    img, data, zooms, source_affine = _load_canonical(path)
    arr = _to_zyx(data)
    bad = int(np.count_nonzero(~np.isfinite(arr)))
    if bad:  # NaN-masked maps are common in NIfTI; models and windows need finite values
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    guess = modality is None
    mod = modality or _guess_modality(arr)
    channel_names = [f"vol{i}" for i in range(arr.shape[0])] if arr.ndim == 4 else None

    meta = {
        "source_orientation": _axcodes(source_affine),
        "orientation": "RAS canonical, array [Z(I->S), Y(A->P), X(R->L)]",
        "description": img.header.get("descrip").tobytes().split(b"\x00")[0].decode("latin-1", "replace") or None,
        "shape_xyz": list(data.shape[:3]),
        "plane": "axial",
        "nonfinite_voxels": bad or None,
    }
    return Sample(arr.astype(np.float32), mod, "nifti", str(path), spacing=(zooms[2], zooms[1], zooms[0]),
                  meta={k: v for k, v in meta.items() if v is not None}, modality_guess=guess,
                  channel_names=channel_names)


def read_mri_study(folder: str | os.PathLike, files: dict[str, Path]) -> Sample:
    """Read a study folder of NIfTI sequences (``t1``, ``t2``, ``flair``, ``dwi``) as ``[C, Z, Y, X]``.

    Sequences whose grid differs from the first one's are resampled onto it (linear
    interpolation by array index; the files of one study are expected to be co-registered).
    """
    from scipy.ndimage import zoom

    folder = Path(folder)
    vols, names, spacing = [], [], None
    for name, p in files.items():
        s = read_nifti(p, MRI)
        arr = s.array if s.array.ndim == 3 else s.array[0]
        if vols and arr.shape != vols[0].shape:
            log.warning("sequence %s has shape %s, resampling to %s", name, arr.shape, vols[0].shape)
            factors = [a / b for a, b in zip(vols[0].shape, arr.shape)]
            arr = zoom(arr, factors, order=1)[tuple(slice(0, n) for n in vols[0].shape)]
        vols.append(arr.astype(np.float32))
        names.append(name)
        spacing = spacing or s.spacing
    return Sample(np.stack(vols), MRI, "nifti", str(folder), spacing=spacing, channel_names=names,
                  meta={"sequences": names, "plane": "axial", "orientation": "RAS canonical, array [C, Z(I->S), Y(A->P), X(R->L)]"})
