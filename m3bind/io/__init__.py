"""Read any supported medical file or folder into a :class:`Sample`.

:func:`load` detects the format from the content (:func:`detect`), dispatches to the reader
registered for it in :data:`READERS` and returns a :class:`Sample` in physical units. Every
failure a file can cause is an :class:`~m3bind.errors.M3BindError` subclass with a one-line
message: :class:`~m3bind.errors.UnsupportedFormat`, :class:`~m3bind.errors.CorruptFile`
(empty, truncated, damaged, unreadable, signal file missing) or
:class:`~m3bind.errors.TooLarge` (size limits in :data:`LIMITS`, checked before decoding).

Example:
    >>> s = load("waveform_ecg.dcm")          # doctest: +SKIP
    >>> s.modality, s.array.shape, s.sampling_rate
    ('ecg', (12, 10000), 1000.0)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

from m3bind.errors import CorruptFile, M3BindError, UnsupportedFormat
from m3bind.io.detect import detect, nifti_sequence_files
from m3bind.io.limits import LIMITS, Limits
from m3bind.io.sample import Sample
from m3bind.modalities import MODALITIES
from m3bind.registry import Registry

log = logging.getLogger(__name__)

#: Readers by format: ``reader(path, modality, keep_phi=..., **options) -> Sample``.
READERS: Registry[Callable[..., Sample]] = Registry("reader")

__all__ = ["LIMITS", "Limits", "READERS", "Sample", "detect", "load"]


@READERS.register("dicom")
def _read_dicom(path: Path, modality: str | None, *, keep_phi: bool = False, series: str | None = None,
                **_: object) -> Sample:
    from m3bind.io import dicom

    if path.is_dir():
        return dicom.read_series(path, modality, keep_phi=keep_phi, series=series)
    return dicom.read_file(path, modality, keep_phi=keep_phi)


@READERS.register("nifti")
def _read_nifti(path: Path, modality: str | None, **_: object) -> Sample:
    from m3bind.io import nifti

    if path.is_dir():
        return nifti.read_mri_study(path, nifti_sequence_files(path))
    return nifti.read_nifti(path, modality)


@READERS.register("wfdb")
def _read_wfdb(path: Path, modality: str | None, *, keep_phi: bool = False, **_: object) -> Sample:
    from m3bind.io.wfdb_reader import read_wfdb

    return read_wfdb(path, keep_phi=keep_phi)


def _read_photo(path: Path, modality: str | None, *, fmt: str, **_: object) -> Sample:
    from m3bind.io.photo import read_photo

    return read_photo(path, fmt, modality)


for _fmt in ("png", "jpeg", "tiff"):
    READERS.register(_fmt)(lambda path, modality, _f=_fmt, **kw: _read_photo(path, modality, fmt=_f, **kw))


@READERS.register("wsi")
def _read_wsi(path: Path, modality: str | None, *, magnification: float = 20.0, tile_size: int = 224,
              max_tiles: int | None = 64, **_: object) -> Sample:
    from m3bind.io.wsi import read_slide

    return read_slide(path, magnification=magnification, tile_size=tile_size, max_tiles=max_tiles)


#: Modalities each format can hold (DICOM: any, from its header or the caller).
FORMAT_MODALITIES: dict[str, tuple[str, ...]] = {
    "nifti": ("ct", "mri"), "wfdb": ("ecg",), "wsi": ("pathology",),
    **{f: ("cxr", "retina", "pathology") for f in ("png", "jpeg", "tiff")},
}


def _finite(sample: Sample) -> None:
    """Replace NaN/inf in a float array by 0 (noted in ``meta["nonfinite_values"]``).

    Damaged headers (a rescale intercept of 1e308, an overflowing gain) turn finite stored
    values into inf; preprocessing, windows and models need finite numbers.
    """
    import numpy as np

    a = sample.array
    if isinstance(a, np.ndarray) and a.dtype.kind == "f":
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        if bad:
            log.warning("%d non-finite values replaced by 0 (%s)", bad, sample.path)
            sample.array = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
            sample.meta["nonfinite_values"] = sample.meta.get("nonfinite_values", 0) + bad


def load(path: str | os.PathLike, modality: str | None = None, *, keep_phi: bool = False,
         detected: tuple[str, str | None] | None = None, **options: object) -> Sample:
    """Read a file or folder into a :class:`Sample`.

    Args:
        path: A DICOM file or series folder, a NIfTI file or MRI study folder
            (``t1/t2/flair/dwi.nii.gz``), a WFDB record (``.hea``, record path or folder),
            a PNG/JPEG/TIFF photograph or a whole-slide image.
        modality: The modality, for formats that carry none (PNG, JPEG, TIFF, NIfTI) or to
            override the file's; otherwise detected (or guessed, ``Sample.modality_guess``).
        keep_phi: Keep patient identifiers, under ``meta["phi"]`` (DICOM).
        detected: What :func:`detect` said of ``path``, when the caller has just asked it
            (the indexer does, for the modality): skips a second detection of the same file.
        **options: Reader options: ``series`` (DICOM SeriesInstanceUID to read from a folder
            of several), ``magnification``/``tile_size``/``max_tiles`` (whole-slide tiling).

    Returns:
        The :class:`Sample`.

    Raises:
        UnsupportedFormat, CorruptFile, TooLarge: One-line errors for bad input.
    """
    if modality is not None and modality not in MODALITIES:
        raise UnsupportedFormat(f"unknown modality {modality!r} (known: {', '.join(MODALITIES)})", path)
    p = Path(path)
    try:
        fmt, found = detect(p) if detected is None else detected
        if modality is not None and modality not in FORMAT_MODALITIES.get(fmt, MODALITIES):
            raise UnsupportedFormat(f"a {fmt} file cannot hold {modality} data", path)
        sample = READERS.get(fmt)(p, modality, keep_phi=keep_phi, **options)
    except M3BindError:
        raise
    except PermissionError:
        raise CorruptFile("permission denied, cannot read file", path) from None
    except MemoryError:
        raise CorruptFile("not enough memory to decode", path) from None
    except (OSError, ValueError, EOFError) as e:
        raise CorruptFile(f"cannot read: {type(e).__name__}: {e}", path) from None
    if modality is not None:  # the caller's word wins, whatever the reader guessed
        sample.modality, sample.modality_guess = modality, False
    elif found is not None and sample.modality is None:
        sample.modality = found
    _finite(sample)
    log.debug("loaded %s: %s %s %s", p, sample.format, sample.modality, sample.shape)
    return sample
