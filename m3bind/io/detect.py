"""Format and modality detection from file content (signatures), not from extensions.

=========  =================================================================
format     how it is recognised
=========  =================================================================
dicom      ``DICM`` at byte 128 (Part 10), or a dataset that parses without a
           preamble; the modality comes from (0008,0060) *Modality* or the SOP Class
nifti      NIfTI-1/2 header magic (``n+1``/``ni1``/``n+2``), gzip-compressed too
wfdb       a ``.hea`` header whose first record line parses (or a record path
           whose ``.hea`` exists)
png/jpeg   their signatures
tiff       ``II*\\0``/``MM\\0*`` (BigTIFF too); tiled pyramids that OpenSlide
           recognises become ``wsi``
wsi        :func:`openslide.OpenSlide.detect_format` (SVS, NDPI, MRXS, SCN, ...)
=========  =================================================================
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import struct
import zlib
from pathlib import Path

from m3bind.errors import CorruptFile, UnsupportedFormat
from m3bind.io.limits import check_file

log = logging.getLogger(__name__)

#: MRI sequence names recognised in a study folder of NIfTI files (``t1.nii.gz`` ...).
MRI_SEQUENCE_FILES = ("t1", "t2", "flair", "dwi")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _head(path: Path, n: int = 1024) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _is_nifti_header(h: bytes) -> bool:
    if len(h) >= 348 and h[344:347] in (b"n+1", b"ni1"):
        return struct.unpack("<i", h[:4])[0] == 348 or struct.unpack(">i", h[:4])[0] == 348
    if len(h) >= 12 and h[4:7] == b"n+2":
        return struct.unpack("<i", h[:4])[0] == 540 or struct.unpack(">i", h[:4])[0] == 540
    return False


def _gunzip_head(path: Path, n: int = 600) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read(n)
    except (OSError, EOFError, zlib.error) as e:
        raise CorruptFile(f"damaged gzip stream: {e}", path) from None


_WFDB_RECORD_LINE = re.compile(r"^\s*[\w\-]+(/\d+)?\s+\d+(\s+[\d.eE+\-]+(/[\d.eE+\-]+)?(\([\d.eE+\-]+\))?)?")


def _is_wfdb_header(h: bytes) -> bool:
    try:
        text = h.decode("ascii")
    except UnicodeDecodeError:
        return False
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        return bool(_WFDB_RECORD_LINE.match(line))
    return False


def _looks_like_dicom_without_preamble(h: bytes) -> bool:
    # group 0x0002 (file meta) or 0x0008 (identifying) as the first little-endian tag
    if len(h) < 8:
        return False
    group, _elem = struct.unpack("<HH", h[:4])
    return group in (0x0002, 0x0008) or struct.unpack(">H", h[:2])[0] == 0x0008


def _wsi_format(path: Path) -> str | None:
    try:
        import openslide
    except ImportError:  # pragma: no cover - openslide-bin is a dependency
        return None
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except Exception:  # noqa: BLE001 - detection must not raise on junk
        return None


def _dicom_modality(path: Path, *, part10: bool = False) -> str | None:
    """Modality of a DICOM file.

    A Part 10 file (``part10``: preamble and ``DICM`` seen) is read for its Modality and SOP
    Class UID alone: the reader parses and checks the whole header once, right after, and
    parsing it here too doubled the time of reading a DICOM file (a 12-lead ECG: 2 x 40 ms).
    When those two elements cannot be read, the full parse here raises the one-line error.
    """
    from m3bind.io.dicom import error_text, modality_of, quiet_pydicom, read_header

    if part10:
        from m3bind.io.limits import ClampedFile

        pydicom = quiet_pydicom()

        try:
            size = check_file(path)
            with open(path, "rb") as f:
                ds = pydicom.dcmread(ClampedFile(f, size), specific_tags=["Modality", "SOPClassUID"],
                                     stop_before_pixels=True)
            return modality_of(ds)
        except Exception as e:  # noqa: BLE001 - damaged: the full parse below says how
            log.debug("DICOM modality peek failed (%s); full parse", error_text(e))
    return modality_of(read_header(path))


def nifti_sequence_files(folder: Path) -> dict[str, Path]:
    """Files of a multi-sequence MRI study folder, by sequence name (``t1`` -> ``t1.nii.gz``)."""
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        name = p.name.lower()
        for suf in _NIFTI_SUFFIXES[::-1]:
            if name.endswith(suf) and name[: -len(suf)] in MRI_SEQUENCE_FILES:
                found[name[: -len(suf)]] = p
                break
    return {k: found[k] for k in MRI_SEQUENCE_FILES if k in found}  # conventional order


def detect_file(path: Path) -> tuple[str, str | None]:
    """Format and modality (``None`` when the format carries none) of one file."""
    check_file(path)
    h = _head(path)
    if len(h) >= 132 and h[128:132] == b"DICM":
        return "dicom", _dicom_modality(path, part10=True)
    if h[:8] == b"\x89PNG\r\n\x1a\n":
        return "png", None
    if h[:3] == b"\xff\xd8\xff":
        return "jpeg", None
    if h[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        fmt = _wsi_format(path)
        if fmt is not None:
            return "wsi", "pathology"
        return "tiff", None
    if h[:2] == b"\x1f\x8b":
        if _is_nifti_header(_gunzip_head(path)):
            return "nifti", None
        raise UnsupportedFormat("gzip file that does not hold a NIfTI image", path)
    if _is_nifti_header(h):
        return "nifti", None
    if _is_wfdb_header(h) and path.suffix.lower() == ".hea":
        return "wfdb", "ecg"
    if path.suffix.lower() in (".dat", ".mat") and path.with_suffix(".hea").exists():
        return "wfdb", "ecg"
    fmt = _wsi_format(path)
    if fmt is not None:
        return "wsi", "pathology"
    if _looks_like_dicom_without_preamble(h) or path.suffix.lower() in (".dcm", ".dicom"):
        try:  # a bare dataset without Part 10 preamble: accepted only if it parses with a SOP class
            return "dicom", _dicom_modality(path)
        except (CorruptFile, UnsupportedFormat):
            pass
    raise UnsupportedFormat("unrecognised file format", path)


def detect_folder(path: Path) -> tuple[str, str | None]:
    """Format and modality of a folder: a DICOM series, an MRI study of NIfTI files, a WFDB record."""
    if nifti_sequence_files(path):
        return "nifti", "mri"
    files = [p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")]
    heas = [p for p in files if p.suffix.lower() == ".hea"]
    if len(heas) == 1:
        return "wfdb", "ecg"
    from m3bind.io.dicom import list_series

    series = list_series(path)
    if series:
        mods = {s["modality"] for s in series}
        return "dicom", mods.pop() if len(mods) == 1 else None
    raise UnsupportedFormat("folder holds no DICOM series, MRI sequences or WFDB record", path)


def detect(path: str | os.PathLike) -> tuple[str, str | None]:
    """Detect the format and, where the content says it, the modality of ``path``.

    Args:
        path: A file, a folder (DICOM series, MRI study of ``t1/t2/flair/dwi`` NIfTI files, WFDB
            record) or a WFDB record path without extension.

    Returns:
        ``(format, modality)``; ``modality`` is ``None`` for formats that carry none (PNG, JPEG,
        TIFF, NIfTI) or a DICOM modality outside the six.

    Raises:
        UnsupportedFormat: Unknown format or missing path.
        CorruptFile: Empty, unreadable or damaged file.
        TooLarge: File above the size limit.
    """
    p = Path(path)
    if p.is_dir():
        return detect_folder(p)
    if not p.exists():
        if p.with_name(p.name + ".hea").exists():
            return "wfdb", "ecg"
        raise UnsupportedFormat("no such file or folder", p)
    return detect_file(p)
