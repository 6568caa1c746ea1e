"""DICOM reader (pydicom 3): single files, series folders, enhanced multi-frame, 12-lead ECG.

Conventions (see :class:`~m3bind.io.sample.Sample`):

* CR/DX -> ``cxr`` ``[H, W]`` float32 in ``[0, 1]``, display-ready: modality LUT (rescale),
  then the VOI LUT or the first window of the file (else a 0.5-99.5 percentile window), then
  MONOCHROME1 inverted, so higher is always brighter.
* CT -> ``ct`` ``[Z, Y, X]`` float32 in Hounsfield units (rescale slope/intercept applied per
  slice or per frame); MR -> ``mri`` ``[Z, Y, X]`` float32 (modality LUT applied).
  Slices are sorted by ImagePositionPatient projected on the slice normal (else
  InstanceNumber); ``spacing`` is ``(slice spacing, row spacing, column spacing)`` in mm. For
  axial acquisitions this is LPS index order: axis 0 inferior->superior, axis 1
  anterior->posterior, axis 2 right->left, so ``array[z]`` displays radiologically as is.
* OP -> ``retina`` ``[H, W, 3]`` uint8; SM -> ``pathology`` ``[H, W, 3]`` uint8 (frames as tiles).
* 12-lead ECG Waveform Storage -> ``ecg`` ``[12, T]`` float32 in mV, standard lead order.

Privacy: names, birth dates and identifiers never enter ``meta``; with ``keep_phi=True`` they
are put under ``meta["phi"]``. ``meta["patient_ref"]`` is a salted SHA-256 pseudonym of
PatientID (salt from the environment variable ``M3BIND_PATIENT_SALT``) so that an archive can
link a patient's studies without storing the identifier; study and series instance UIDs are
kept (``study_uid``, ``series_uid``) because linking needs them. Error messages never quote
element values (:func:`error_text`), and pydicom does not warn about invalid values
(:func:`quiet_pydicom`): either could carry a damaged name or ID.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from m3bind.errors import CorruptFile, M3BindError, UnsupportedFormat
from m3bind.io.leads import STANDARD_LEADS, map_leads
from m3bind.io.limits import LIMITS, check_file, check_pixels, check_signal
from m3bind.io.limits import ClampedFile as _ClampedFile
from m3bind.io.sample import Sample
from m3bind.modalities import CT, CXR, ECG, MODALITIES, MRI, PATHOLOGY, RETINA

log = logging.getLogger(__name__)

#: DICOM (0008,0060) Modality -> m3bind modality.
DICOM_MODALITIES = {"CR": CXR, "DX": CXR, "CT": CT, "MR": MRI, "OP": RETINA, "SM": PATHOLOGY, "ECG": ECG}
#: SOP Class UID prefixes -> m3bind modality, for files whose Modality is missing or generic.
SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": CXR,            # CR, DX (and .1.1, .1.1.1)
    "1.2.840.10008.5.1.4.1.1.2": CT,             # CT, enhanced CT
    "1.2.840.10008.5.1.4.1.1.4": MRI,            # MR, enhanced MR
    "1.2.840.10008.5.1.4.1.1.77.1.5": RETINA,    # ophthalmic photography 8/16 bit
    "1.2.840.10008.5.1.4.1.1.77.1.6": PATHOLOGY, # VL whole slide microscopy
    "1.2.840.10008.5.1.4.1.1.9.1": ECG,          # 12-lead and general ECG waveforms
}
_CHEST_PARTS = {"CHEST", "THORAX", "LUNG", "CHEST_LAT", "TORAX", ""}
_UNITS_TO_MV = {"uv": 1e-3, "µv": 1e-3, "mv": 1.0, "v": 1e3, "nv": 1e-6}
_PHI_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs",
                 "AccessionNumber", "InstitutionName", "ReferringPhysicianName")


# ---------------------------------------------------------------------------- header helpers
_QUOTED = re.compile(r"b?'(?:[^'\\\n]|\\.)*'" + r'|b?"(?:[^"\\\n]|\\.)*"')


def error_text(e: BaseException) -> str:
    """``Type: message`` of a pydicom error, one line, without the values it quotes.

    pydicom quotes the raw bytes or the text of an element it cannot convert (``received
    b'Doe^Jane'``, ``Invalid value for VR IS: '...'``), and the element may be a patient's
    name or ID; the message reaches logs, the catalogue's failure rows and the app, so every
    quoted value becomes ``'…'`` and the chained traceback pydicom appends is dropped.
    """
    msg = str(e).split("Traceback (most recent call last)")[0]
    return f"{type(e).__name__}: {' '.join(_QUOTED.sub(chr(39) + '…' + chr(39), msg).split())}"


def quiet_pydicom():
    """pydicom, set not to warn about invalid values while reading (each warning quotes the
    value, which may identify the patient); m3bind reads such values as they are."""
    import pydicom
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    return pydicom


def read_header(path: str | os.PathLike, *, pixels: bool = False):
    """Parse a DICOM file (without pixel data unless ``pixels``); one-line errors on junk."""
    from pydicom.errors import InvalidDicomError

    pydicom = quiet_pydicom()

    size = check_file(path)
    try:
        with open(path, "rb") as f:
            ds = pydicom.dcmread(_ClampedFile(f, size), stop_before_pixels=not pixels)
        return _converted(ds, path)
    except M3BindError:
        raise
    except InvalidDicomError:
        try:  # no preamble / file meta: accept only if it parses into something with a SOP class
            with open(path, "rb") as f:
                ds = pydicom.dcmread(_ClampedFile(f, size), stop_before_pixels=not pixels, force=True)
        except Exception as e:  # noqa: BLE001
            raise CorruptFile(f"not a readable DICOM file: {error_text(e)}", path) from None
        if "SOPClassUID" not in ds and "Modality" not in ds:
            raise UnsupportedFormat("not a DICOM file", path)
        return _converted(ds, path)
    except PermissionError:
        raise CorruptFile("permission denied, cannot read file", path) from None
    except Exception as e:  # noqa: BLE001 - pydicom raises many types on damaged files
        raise CorruptFile(f"damaged DICOM file: {error_text(e)}", path) from None


def _converted(ds, path):
    """Convert every raw element now (pydicom converts lazily, on first access).

    A damaged VR or value then fails here, as one CorruptFile, instead of as a
    NotImplementedError or ValueError wherever the element is first read (found by fuzzing:
    a VR of ``U\\x1f`` in SeriesInstanceUID).
    """
    try:
        ds.walk(lambda _ds, _elem: None)
    except Exception as e:  # noqa: BLE001 - pydicom's converters raise many types
        raise CorruptFile(f"damaged DICOM element: {error_text(e)}", path) from None
    return ds


def modality_of(ds) -> str | None:
    """The m3bind modality of a dataset, from Modality, else the SOP Class UID; ``None`` if neither maps."""
    m = DICOM_MODALITIES.get(str(ds.get("Modality", "")).upper())
    if m is not None:
        return m
    sop = str(ds.get("SOPClassUID", ""))
    for prefix, mod in SOP_CLASSES.items():
        if sop == prefix or sop.startswith(prefix + "."):
            return mod
    return None


def patient_ref(patient_id: str | None) -> str | None:
    """Salted pseudonym of a PatientID for linking studies (never the identifier itself)."""
    if not patient_id:
        return None
    salt = os.environ.get("M3BIND_PATIENT_SALT", "m3bind")
    return "p-" + hashlib.sha256(f"{salt}:{patient_id}".encode()).hexdigest()[:16]


def _str(v: Any) -> str | None:
    return None if v is None or str(v) == "" else str(v)


def _meta(ds, keep_phi: bool) -> dict[str, Any]:
    """Key non-identifying tags; identifiers only under ``phi`` when ``keep_phi``."""
    sop = ds.get("SOPClassUID")
    meta: dict[str, Any] = {
        "dicom_modality": _str(ds.get("Modality")),
        "sop_class": getattr(sop, "name", _str(sop)),
        "body_part": _str(ds.get("BodyPartExamined")),
        "study_date": _str(ds.get("StudyDate")),
        "study_description": _str(ds.get("StudyDescription")),
        "series_description": _str(ds.get("SeriesDescription")),
        "manufacturer": _str(ds.get("Manufacturer")),
        "model": _str(ds.get("ManufacturerModelName")),
        "view_position": _str(ds.get("ViewPosition")),
        "patient_sex": _str(ds.get("PatientSex")),
        "patient_age": _str(ds.get("PatientAge")),
        "study_uid": _str(ds.get("StudyInstanceUID")),
        "series_uid": _str(ds.get("SeriesInstanceUID")),
        "patient_ref": patient_ref(_str(ds.get("PatientID"))),
        "transfer_syntax": getattr(getattr(ds, "file_meta", {}).get("TransferSyntaxUID"), "name", None),
        "burned_in_annotation": _str(ds.get("BurnedInAnnotation")),
    }
    for k, name in (("Rows", "rows"), ("Columns", "columns"), ("NumberOfFrames", "frames"), ("BitsStored", "bits_stored")):
        v = _first(ds.get(k)) if k in ds else None
        if v is not None:
            meta[name] = int(v)
    if ds.get("PhotometricInterpretation"):
        meta["photometric"] = str(ds.PhotometricInterpretation)
    if keep_phi:
        meta["phi"] = {k: _str(ds.get(k)) for k in _PHI_KEYWORDS if k in ds}
    return {k: v for k, v in meta.items() if v is not None}


def _floats(v, n: int) -> list[float] | None:
    """At least ``n`` floats from a (multi-valued) element value, else ``None``."""
    if v is None:
        return None
    values = [v] if isinstance(v, (str, int, float)) else list(v)
    try:
        out = [float(x) for x in values]
    except (TypeError, ValueError):
        return None
    return out if len(out) >= n else None


def _pixel_spacing(ds) -> tuple[float, float] | None:
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        sp = _floats(ds.get(key), 2) if key in ds else None
        if sp and sp[0] > 0 and sp[1] > 0:
            return sp[0], sp[1]
    return None


def _first(v) -> float | None:
    if v is None:
        return None
    try:
        return float(v[0]) if hasattr(v, "__len__") and not isinstance(v, str) else float(v)
    except (TypeError, ValueError, IndexError):
        return None


def _count(ds, name: str, default: int, path) -> int:
    """A non-negative whole-number attribute (``Rows``, ``NumberOfFrames``, ...): its first
    value, ``default`` when absent, :class:`CorruptFile` when it is no count at all."""
    v = _first(ds.get(name))
    if v is None:
        return default
    if not np.isfinite(v) or v < 0 or v != int(v):
        raise CorruptFile(f"DICOM {name} is not a count ({v})", path)
    return int(v)


def _window(ds) -> tuple[float, float] | None:
    c, w = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    return (c, w) if c is not None and w is not None and w > 0 else None


def _decode(ds, path) -> np.ndarray:
    """Decode pixel data after checking its decoded size; codec failures become CorruptFile."""
    rows, cols = _count(ds, "Rows", 0, path), _count(ds, "Columns", 0, path)
    frames = _count(ds, "NumberOfFrames", 1, path) or 1
    spp = _count(ds, "SamplesPerPixel", 1, path) or 1
    if rows <= 0 or cols <= 0:
        raise CorruptFile("DICOM image without Rows/Columns", path)
    check_pixels(rows * cols * frames * spp, path, "DICOM pixel data")
    try:
        return np.asarray(ds.pixel_array)
    except MemoryError:
        raise CorruptFile("pixel data too large to decode", path) from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - codec errors are many; Rust codecs panic with a BaseException (fuzzing)
        ts = getattr(getattr(ds, "file_meta", {}).get("TransferSyntaxUID"), "name", "unknown syntax")
        raise CorruptFile(f"cannot decode pixel data ({ts}): {e}", path) from None


# ---------------------------------------------------------------------------- images
def _display_grey(arr: np.ndarray, ds) -> tuple[np.ndarray, str]:
    """Modality LUT -> VOI (LUT, window or percentile) -> [0, 1], MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    m = apply_modality_lut(arr, ds)
    x = m.astype(np.float64)
    win = _window(ds)
    if "VOILUTSequence" in ds:
        xi = m if m.dtype.kind in "iu" else np.rint(m).astype(np.int64)  # LUTs index stored values
        y = apply_voi_lut(xi, ds, prefer_lut=True).astype(np.float64)
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])  # the LUT's output range is 0 .. 2**bits - 1
        y = np.clip(y / float(2**bits - 1), 0.0, 1.0)
        how = "VOI LUT"
    elif win is not None:
        c, w = win
        fn = str(ds.get("VOILUTFunction", "LINEAR")).upper()
        if fn == "SIGMOID":
            y = 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
        else:  # LINEAR (PS3.3 C.11.2.1.2.1)
            y = np.clip(((x - (c - 0.5)) / (w - 1.0)) + 0.5, 0.0, 1.0) if w > 1 else (x >= c).astype(float)
        how = f"window {c:g}/{w:g}"
    else:
        lo, hi = np.percentile(x, [0.5, 99.5])
        y = np.clip((x - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(x)
        how = "percentile 0.5-99.5"
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        y = 1.0 - y
        how += ", MONOCHROME1 inverted"
    return y.astype(np.float32), how


def _rgb_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.dtype != np.uint8:
        a = arr.astype(np.float64)
        hi = float(a.max()) or 1.0
        arr = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return arr[..., :3]


def _frame_value(fg, seq: str, attr: str):
    if fg is None or seq not in fg or not fg.get(seq):
        return None
    item = fg.get(seq)[0]
    return item.get(attr)


def _enhanced_frames(ds) -> list[dict[str, Any]]:
    """Per-frame position, orientation, spacing, rescale and window of an enhanced multi-frame object."""
    shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else None
    out = []
    for fg in ds.PerFrameFunctionalGroupsSequence:
        def get(seq, attr, fg=fg):
            v = _frame_value(fg, seq, attr)
            return v if v is not None else _frame_value(shared, seq, attr)
        out.append({
            "ipp": _floats(get("PlanePositionSequence", "ImagePositionPatient"), 3),
            "iop": _floats(get("PlaneOrientationSequence", "ImageOrientationPatient"), 6),
            "spacing": _floats(get("PixelMeasuresSequence", "PixelSpacing"), 2),
            "thickness": _first(get("PixelMeasuresSequence", "SliceThickness")),
            "slope": _first(get("PixelValueTransformationSequence", "RescaleSlope")),
            "intercept": _first(get("PixelValueTransformationSequence", "RescaleIntercept")),
            "window": (_first(get("FrameVOILUTSequence", "WindowCenter")),
                       _first(get("FrameVOILUTSequence", "WindowWidth"))),
        })
    return out


def sort_slices(ipps: list[list[float] | None], iop: list[float] | None,
                instance_numbers: list[float | None]) -> tuple[list[int], float | None]:
    """Order slices and estimate the slice spacing.

    Slices are sorted by their ImagePositionPatient projected on the slice normal (the cross
    product of the row and column direction cosines) when every slice has a position, else
    by InstanceNumber.

    Returns:
        The sort order and the median distance between consecutive positions (``None``
        without positions).
    """
    n = len(ipps)
    if iop and all(p is not None for p in ipps):
        normal = np.cross(np.asarray(iop[:3]), np.asarray(iop[3:6]))
        normal *= np.sign(normal[np.argmax(np.abs(normal))]) or 1.0  # towards +L, +P or +S
        d = np.asarray(ipps, dtype=float) @ normal
        order = list(np.argsort(d, kind="stable"))
        gaps = np.diff(d[order])
        return order, (float(np.median(gaps)) if n > 1 and np.median(gaps) > 0 else None)
    keys = [(x if x is not None else i) for i, x in enumerate(instance_numbers)]
    return list(np.argsort(keys, kind="stable")), None


def _volume(frames: np.ndarray, ds, path, enhanced: list[dict] | None) -> tuple[np.ndarray, tuple, tuple | None]:
    """Stack frames of one object into ``[Z,Y,X]`` with per-frame rescale; return array, spacing, window."""
    from pydicom.pixels import apply_modality_lut

    if frames.ndim == 2:
        frames = frames[None]
    if enhanced:
        vol = np.empty(frames.shape, np.float32)
        for i, f in enumerate(enhanced):
            slope = f["slope"] if f["slope"] is not None else 1.0
            icpt = f["intercept"] if f["intercept"] is not None else 0.0
            vol[i] = frames[i].astype(np.float32) * slope + icpt
        order, dz = sort_slices([f["ipp"] for f in enhanced], enhanced[0]["iop"], [None] * len(enhanced))
        vol = vol[order]
        ps = enhanced[0]["spacing"] or _pixel_spacing(ds)
        dz = dz or enhanced[0]["thickness"]
        c, w = enhanced[0]["window"]
        win = (c, w) if c is not None and w else _window(ds)
    else:
        vol = apply_modality_lut(frames, ds).astype(np.float32)
        ps = _pixel_spacing(ds)
        dz = _first(ds.get("SpacingBetweenSlices")) or _first(ds.get("SliceThickness"))
        win = _window(ds)
    vol, _ = to_lps_index_order(vol, enhanced[0]["iop"] if enhanced else _floats(ds.get("ImageOrientationPatient"), 6))
    spacing = (float(dz or 1.0), float(ps[0]) if ps else 1.0, float(ps[1]) if ps else 1.0)
    return vol, spacing, win


def to_lps_index_order(vol: np.ndarray, iop: list[float] | None) -> tuple[np.ndarray, list[str]]:
    """Flip the in-plane axes of ``[Z, Y, X]`` so columns run towards +L/+P/+S and rows likewise.

    Slices are already ordered along the normal's dominant positive direction
    (:func:`sort_slices`); with this, an axial volume is in LPS index order whatever the
    scanner's row/column directions, and ``array[z]`` displays radiologically.
    """
    flips = []
    if iop:
        row, col = np.asarray(iop[:3]), np.asarray(iop[3:6])
        if row[np.argmax(np.abs(row))] < 0:
            vol, flips = vol[..., ::-1], flips + ["x"]
        if col[np.argmax(np.abs(col))] < 0:
            vol, flips = vol[..., ::-1, :], flips + ["y"]
    return np.ascontiguousarray(vol), flips


def _plane(iop: list[float] | None) -> str | None:
    """``axial``, ``coronal`` or ``sagittal`` from ImageOrientationPatient (the normal's main axis)."""
    if not iop:
        return None
    normal = np.abs(np.cross(np.asarray(iop[:3]), np.asarray(iop[3:6])))
    return ("sagittal", "coronal", "axial")[int(np.argmax(normal))]


def _mri_sequence(ds) -> str | None:
    text = " ".join(str(ds.get(k, "")) for k in ("SeriesDescription", "ProtocolName", "SequenceName")).lower()
    for key, names in (("flair", ("flair", "tirm")), ("dwi", ("dwi", "diffusion", "trace", "ep2d_diff")),
                       ("t2", ("t2",)), ("t1", ("t1", "mprage", "spgr"))):
        if any(n in text for n in names):
            return key
    return None


def _image_sample(ds, path, modality: str, keep_phi: bool) -> Sample:
    arr = _decode(ds, path)
    meta = _meta(ds, keep_phi)
    frames = _count(ds, "NumberOfFrames", 1, path) or 1
    spp = _count(ds, "SamplesPerPixel", 1, path) or 1
    if modality == CXR:
        img = arr[0] if frames > 1 else arr
        if spp > 1:
            img = img[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        grey, how = _display_grey(img, ds)
        meta["voi"] = how
        part = str(ds.get("BodyPartExamined", "")).upper()
        guess = part not in _CHEST_PARTS
        if guess:
            log.warning("radiograph of body part %s read as cxr (%s)", part, path)
        return Sample(grey, CXR, "dicom", str(path), spacing=_pixel_spacing(ds), window=(0.5, 1.0),
                      meta=meta, modality_guess=guess)
    if modality in (CT, MRI):
        if spp > 1:
            raise UnsupportedFormat(f"colour {modality.upper()} images are not supported", path)
        enhanced = _enhanced_frames(ds) if ds.get("PerFrameFunctionalGroupsSequence") else None
        vol, spacing, win = _volume(arr, ds, path, enhanced)
        if modality == MRI and _mri_sequence(ds):
            meta["sequence"] = _mri_sequence(ds)
        meta["enhanced"] = bool(enhanced)
        plane = _plane(enhanced[0]["iop"] if enhanced else _floats(ds.get("ImageOrientationPatient"), 6))
        if plane:
            meta["plane"] = plane
        return Sample(vol, modality, "dicom", str(path), spacing=spacing, window=win, meta=meta)
    if modality in (RETINA, PATHOLOGY):
        rgb = _rgb_uint8(arr if frames == 1 else arr[0])
        tiles = None
        if frames > 1:  # e.g. the tiles of a slide-microscopy frame matrix
            tiles = np.stack([_rgb_uint8(f) for f in arr[: LIMITS.max_tiles]])
        return Sample(rgb, modality, "dicom", str(path), spacing=_pixel_spacing(ds), meta=meta, tiles=tiles)
    raise UnsupportedFormat(f"DICOM image cannot be read as {modality}", path)


# ---------------------------------------------------------------------------- ECG waveforms
def _ecg_sample(ds, path, keep_phi: bool) -> Sample:
    """The rhythm multiplex group (the longest one) as ``[12, T]`` mV in standard lead order."""
    groups = list(ds.WaveformSequence)
    if not groups:
        raise CorruptFile("ECG without waveform data", path)

    def size(i):
        g = groups[i]
        label = str(g.get("MultiplexGroupLabel", "")).upper()
        return ("MEDIAN" not in label, int(g.get("NumberOfWaveformSamples", 0)) * int(g.get("NumberOfWaveformChannels", 0)))

    idx = max(range(len(groups)), key=size)
    g = groups[idx]
    n_ch, n_s = int(g.get("NumberOfWaveformChannels", 0)), int(g.get("NumberOfWaveformSamples", 0))
    check_signal(n_ch * n_s, path)
    try:
        data = ds.waveform_array(idx)  # (samples, channels), channel sensitivity applied
    except Exception as e:  # noqa: BLE001
        raise CorruptFile(f"cannot decode waveform data: {e}", path) from None
    if data.size == 0:  # NumberOfWaveformSamples = 0 gave an empty Sample (found by fuzzing)
        raise CorruptFile("ECG waveform without samples", path)
    names, scale = [], []
    for ch in g.ChannelDefinitionSequence:
        src = ch.get("ChannelSourceSequence")
        names.append(str(src[0].get("CodeMeaning", "")) if src else str(ch.get("ChannelLabel", "")))
        units = ch.get("ChannelSensitivityUnitsSequence")
        unit = str(units[0].get("CodeValue", "uV")) if units else "uV"
        factor = _UNITS_TO_MV.get(unit.lower())
        if factor is None:
            raise UnsupportedFormat(f"ECG channel unit {unit!r} is not a voltage", path)
        scale.append(factor)
    fs = float(g.get("SamplingFrequency", 0) or 0)
    if fs <= 0:
        raise CorruptFile("ECG without a sampling frequency", path)
    data = data.T * np.asarray(scale)[:, None]
    sig, mask, mapping = to_standard_leads(data, names)
    meta = _meta(ds, keep_phi)
    meta.update({
        "lead_mask": mask, "source_leads": names, "multiplex_group": str(g.get("MultiplexGroupLabel", "")),
        "duration_s": n_s / fs, "units": "mV",
    })
    return Sample(sig, ECG, "dicom", str(path), sampling_rate=fs, lead_names=list(STANDARD_LEADS), meta=meta)


def to_standard_leads(data: np.ndarray, names: list[str]) -> tuple[np.ndarray, list[bool], dict[str, int]]:
    """Reorder ``[channels, T]`` onto the standard 12 leads; missing leads zero-filled.

    Returns:
        ``([12, T] float32, mask of present leads, standard name -> source index)``.
    """
    mapping = map_leads(names)
    out = np.zeros((len(STANDARD_LEADS), data.shape[1]), np.float32)
    for i, lead in enumerate(STANDARD_LEADS):
        if lead in mapping:
            out[i] = data[mapping[lead]]
    out = np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
    return out, [lead in mapping for lead in STANDARD_LEADS], mapping


# ---------------------------------------------------------------------------- entry points
def read_file(path: str | os.PathLike, modality: str | None = None, *, keep_phi: bool = False) -> Sample:
    """Read one DICOM file (image, multi-frame or ECG waveform).

    Args:
        path: The file.
        modality: Read as this modality, whatever the file says (needed for modalities such
            as secondary captures that map to none of the six).
        keep_phi: Put patient identifiers under ``meta["phi"]``.

    Raises:
        UnsupportedFormat: Neither image nor waveform, or a modality outside the six.
        CorruptFile, TooLarge: Damaged or oversized data.
    """
    ds = read_header(path, pixels=True)
    if len(ds) == 0:
        raise CorruptFile("truncated or damaged DICOM file (no data elements could be read)", path)
    if "SOPClassUID" not in ds and "Modality" not in ds:
        raise CorruptFile("damaged DICOM file (neither SOP Class UID nor Modality)", path)
    found = modality_of(ds)
    mod = modality or found
    if mod is None:
        sop = getattr(ds.get("SOPClassUID"), "name", ds.get("SOPClassUID", "unknown SOP class"))
        raise UnsupportedFormat(
            f"DICOM modality {ds.get('Modality', '?')} ({sop}) is none of {', '.join(MODALITIES)};"
            " pass a modality to read it anyway", path)
    if modality and found and modality != found:
        log.warning("reading DICOM %s as %s as asked, the file says %s", path, modality, found)
    if mod == ECG:
        if "WaveformSequence" not in ds:
            raise UnsupportedFormat("DICOM object without waveform data read as ecg", path)
        return _ecg_sample(ds, path, keep_phi)
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise UnsupportedFormat("DICOM object without pixel data", path)
    return _image_sample(ds, path, mod, keep_phi)


def _candidate_files(folder: Path) -> list[Path]:
    files = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR":
            files.append(p)
            if len(files) > LIMITS.max_files:
                raise M3BindError(f"folder holds more than {LIMITS.max_files} files", folder)
    return files


def list_series(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The DICOM series in ``folder`` (searched recursively), one dict per SeriesInstanceUID.

    Files that are not DICOM are skipped. Each dict holds ``series_uid``, ``study_uid``,
    ``modality`` (m3bind name or ``None``), ``dicom_modality``, ``description``, ``n_files``
    and ``files`` (paths as strings, unsorted).
    """
    series: dict[str, dict[str, Any]] = {}
    for p in _candidate_files(Path(folder)):
        try:
            with open(p, "rb") as f:
                head = f.read(132)
            if head[128:132] != b"DICM":
                continue
            ds = read_header(p)
        except M3BindError as e:
            log.debug("skipping %s: %s", p, e)
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or f"no-uid:{p.parent}")
        s = series.setdefault(uid, {
            "series_uid": uid, "study_uid": _str(ds.get("StudyInstanceUID")),
            "modality": modality_of(ds), "dicom_modality": _str(ds.get("Modality")),
            "description": _str(ds.get("SeriesDescription")) or "", "n_files": 0, "files": [],
        })
        s["n_files"] += 1
        s["files"].append(str(p))
    return list(series.values())


def _describe(s: dict) -> str:
    return f"{s['series_uid']} ({s['dicom_modality']}, '{s['description']}', {s['n_files']} files)"


def read_series(folder: str | os.PathLike, modality: str | None = None, *, keep_phi: bool = False,
                series: str | None = None) -> Sample:
    """Read one DICOM series from a folder into a volume (CT/MR) or an image.

    A folder holding several series is split by SeriesInstanceUID; the series read is the
    one named by ``series``, else the only one of a supported modality (matching
    ``modality`` when given); otherwise an error lists the series.

    Raises:
        UnsupportedFormat: No series, or several and none chosen.
        CorruptFile: Slices that disagree in size, damaged slices.
    """
    folder = Path(folder)
    all_series = list_series(folder)
    if not all_series:
        raise UnsupportedFormat("folder holds no DICOM files", folder)
    if series is not None:
        chosen = [s for s in all_series if s["series_uid"] == series]
        if not chosen:
            raise UnsupportedFormat(f"series {series} not in folder", folder)
    else:
        chosen = [s for s in all_series if s["modality"] is not None and (modality is None or s["modality"] == modality)]
        if len(chosen) != 1:
            listing = "; ".join(_describe(s) for s in all_series)
            raise UnsupportedFormat(f"folder holds {len(all_series)} DICOM series, cannot choose one: {listing}", folder)
    s = chosen[0]
    mod = modality or s["modality"]
    files = s["files"]
    if len(files) == 1 or mod not in (CT, MRI):
        headers = [read_header(f) for f in files]
        order, _ = sort_slices([None] * len(files), None, [_first(h.get("InstanceNumber")) for h in headers])
        sample = read_file(files[order[0]], mod, keep_phi=keep_phi)
        sample.path = str(folder)
        sample.meta["n_images"] = len(files)
        return sample
    return _read_volume_series(folder, [Path(f) for f in files], mod, keep_phi)


def _read_volume_series(folder: Path, files: list[Path], modality: str, keep_phi: bool) -> Sample:
    from pydicom.pixels import apply_modality_lut

    headers = [read_header(f) for f in files]
    shapes = {(int(h.get("Rows") or 0), int(h.get("Columns") or 0)) for h in headers}
    if len(shapes) != 1:
        raise CorruptFile(f"slices of one series differ in size: {sorted(shapes)}", folder)
    rows, cols = shapes.pop()
    check_pixels(rows * cols * len(files), folder, "DICOM series")
    ipps = [_floats(h.get("ImagePositionPatient"), 3) for h in headers]
    iop = _floats(headers[0].get("ImageOrientationPatient"), 6)
    order, dz = sort_slices(ipps, iop, [_first(h.get("InstanceNumber")) for h in headers])
    vol = np.empty((len(files), rows, cols), np.float32)
    for z, i in enumerate(order):
        ds = read_header(files[i], pixels=True)
        arr = _decode(ds, files[i])
        if arr.ndim != 2:
            raise CorruptFile("multi-frame or colour slice inside a series", files[i])
        vol[z] = apply_modality_lut(arr, ds)
    first = headers[order[0]]
    vol, _ = to_lps_index_order(vol, iop)
    ps = _pixel_spacing(first)
    dz = dz or _first(first.get("SpacingBetweenSlices")) or _first(first.get("SliceThickness")) or 1.0
    meta = _meta(first, keep_phi)
    meta["n_images"] = len(files)
    if dz and all(p is not None for p in ipps) and iop:
        normal = np.cross(np.asarray(iop[:3]), np.asarray(iop[3:6]))
        gaps = np.abs(np.diff(np.sort(np.asarray(ipps) @ normal)))
        if len(gaps) and float(np.ptp(gaps)) > 0.01 * dz + 1e-3:
            meta["uneven_slice_spacing"] = True
            log.warning("uneven slice spacing in %s (%.3g-%.3g mm)", folder, gaps.min(), gaps.max())
    if modality == MRI and _mri_sequence(first):
        meta["sequence"] = _mri_sequence(first)
    if _plane(iop):
        meta["plane"] = _plane(iop)
    spacing = (float(dz), float(ps[0]) if ps else 1.0, float(ps[1]) if ps else 1.0)
    return Sample(vol, modality, "dicom", str(folder), spacing=spacing, window=_window(first), meta=meta)
