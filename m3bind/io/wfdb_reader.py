"""WFDB reader (``wfdb.rdrecord``): any sampling rate and lead count, leads onto the standard 12.

A record is named by its ``.hea`` file, its record path without extension, one of its
signal files, or a folder holding exactly one header. Signals come back as ``[12, T]``
float32 in mV in the order I, II, III, aVR, aVL, aVF, V1-V6; leads the record lacks are
zero-filled and flagged in ``meta["lead_mask"]``; channels outside the twelve are listed in
``meta["extra_leads"]`` and dropped. Header comments (``Age: 63``, ``<sex>: female``,
``Dx: ...``) are parsed into ``meta``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np

from m3bind.errors import CorruptFile, UnsupportedFormat
from m3bind.io.dicom import to_standard_leads
from m3bind.io.leads import STANDARD_LEADS, canonical_lead
from m3bind.io.limits import check_file, check_signal
from m3bind.io.sample import Sample
from m3bind.modalities import ECG

log = logging.getLogger(__name__)

#: Most channels a record may declare (12-lead ECGs have 12-15; polysomnograms a few dozen).
MAX_SIGNALS = 1024
_UNITS_TO_MV = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "v": 1e3, "nv": 1e-6}
_COMMENT_KV = re.compile(r"<?([A-Za-z][\w ]*?)>?\s*:\s*(.*?)(?=\s*<?[A-Za-z][\w ]*>?\s*:|$)")
_COMMENT_KEYS = {"age": "age", "sex": "sex", "gender": "sex", "dx": "diagnosis", "diagnosis": "diagnosis",
                 "diagnoses": "diagnosis", "reason for admission": "diagnosis"}


def record_base(path: str | os.PathLike) -> Path:
    """The record path without extension for a ``.hea``/signal file, record path or folder."""
    p = Path(path)
    if p.is_dir():
        heas = sorted(p.glob("*.hea"))
        if len(heas) != 1:
            raise UnsupportedFormat(f"folder holds {len(heas)} WFDB headers, name one", p)
        p = heas[0]
    if p.suffix.lower() in (".hea", ".dat", ".mat"):
        p = p.with_suffix("")
    if not p.with_name(p.name + ".hea").exists():
        raise UnsupportedFormat("no WFDB header (.hea) for this record", path)
    return p


def parse_comments(comments: list[str]) -> dict[str, str]:
    """``key: value`` pairs found in WFDB header comments, keys lower-cased."""
    out: dict[str, str] = {}
    for line in comments:
        for k, v in _COMMENT_KV.findall(line.strip()):
            k = k.strip().lower()
            if k and v.strip() and k not in out:
                out[k] = v.strip()
    return out


def _confined(name: str, hea: Path) -> None:
    """Refuse a file name from a header that would resolve outside the record's folder."""
    if not name or "/" in name or "\\" in name or name in (".", "..") or os.path.isabs(name):
        raise CorruptFile(f"WFDB header names a file outside the record folder: {name!r}", hea)


def _check_signal_files(header, base: Path) -> None:
    names = getattr(header, "file_name", None) or []
    hea = base.with_name(base.name + ".hea")
    for n in sorted(set(names)):
        _confined(str(n), hea)
        f = base.parent / n
        if not f.exists():
            raise CorruptFile(f"WFDB signal file {n} is missing", base.with_name(base.name + ".hea"))
        check_file(f)


def read_wfdb(path: str | os.PathLike, *, keep_phi: bool = False) -> Sample:
    """Read a WFDB record as a 12-lead ECG :class:`Sample` in mV.

    Header comments are free text that often carries identifiers (``Patient: ...``,
    ``Name: ...``): only the age, sex and diagnosis parsed from them enter ``meta``, unless
    ``keep_phi``, which keeps the raw comments and every parsed key under ``meta["phi"]``.
    Signal file names are confined to the record's folder (no ``../`` or absolute names).

    Raises:
        UnsupportedFormat: No header, or no channel that is one of the 12 leads.
        CorruptFile: Unparseable header, missing or truncated signal file.
        TooLarge: More than :attr:`m3bind.io.LIMITS.max_signal_values` values.
    """
    import wfdb

    base = record_base(path)
    hea = base.with_name(base.name + ".hea")
    check_file(hea)
    try:
        header = wfdb.rdheader(str(base))
    except Exception as e:  # noqa: BLE001 - wfdb raises bare Exceptions on bad headers
        raise CorruptFile(f"unreadable WFDB header: {e}", hea) from None
    if isinstance(header, wfdb.MultiRecord):
        for seg in header.seg_name or []:
            if seg != "~":
                _confined(str(seg), hea)
            if seg != "~" and not (base.parent / f"{seg}.hea").exists():
                raise CorruptFile(f"WFDB segment header {seg}.hea is missing", hea)
    else:
        _check_signal_files(header, base)
    n_sig = int(header.n_sig or 0)
    if n_sig == 0:
        raise UnsupportedFormat("WFDB record without signals", hea)
    described = len(getattr(header, "file_name", None) or getattr(header, "seg_name", None) or [])
    if n_sig > MAX_SIGNALS or (not isinstance(header, wfdb.MultiRecord) and described != n_sig):
        # found by fuzzing: n_sig = 99999999 with two signal lines made wfdb loop for minutes
        raise CorruptFile(f"WFDB header declares {n_sig} signals but describes {described}", hea)
    if not header.fs or header.fs <= 0:
        raise CorruptFile("WFDB header without a sampling frequency", hea)
    sig_len = header.sig_len
    if not sig_len:  # unknown (or 0: read to the end): bound it by the signal files' sizes (>= 1 byte/value)
        sig_len = sum((base.parent / n).stat().st_size for n in set(getattr(header, "file_name", []) or []))
    check_signal(n_sig * int(sig_len), hea)
    try:
        rec = wfdb.rdrecord(str(base), physical=True, m2s=True)
    except Exception as e:  # noqa: BLE001
        raise CorruptFile(f"unreadable WFDB signal data: {type(e).__name__}: {e}", hea) from None
    sig = rec.p_signal
    if sig is None or sig.size == 0:
        raise CorruptFile("WFDB record holds no samples", hea)
    if header.sig_len and sig.shape[0] < header.sig_len:
        raise CorruptFile(f"WFDB signal truncated ({sig.shape[0]} of {header.sig_len} samples)", hea)
    names = [str(n) for n in rec.sig_name]
    units = [str(u or "mV") for u in (rec.units or ["mV"] * len(names))]
    data = sig.T.astype(np.float64)
    unit_notes = []
    for i, u in enumerate(units):
        factor = _UNITS_TO_MV.get(u.strip().lower())
        if factor is None:
            if canonical_lead(names[i]) is not None:
                unit_notes.append(f"{names[i]}: unit {u!r} assumed mV")
            factor = 1.0
        data[i] *= factor
    if not any(canonical_lead(n) for n in names):
        raise UnsupportedFormat(f"WFDB record has none of the 12 standard leads (channels: {', '.join(names)})", hea)
    nan_count = int(np.isnan(data).sum())
    out, mask, mapping = to_standard_leads(data, names)
    comments = list(rec.comments or [])
    parsed = parse_comments(comments)
    meta = {
        "record": base.name, "lead_mask": mask, "source_leads": names, "units": "mV",
        "source_units": units, "extra_leads": [n for n in names if canonical_lead(n) is None],
        "duration_s": out.shape[1] / float(rec.fs),
        "header": {k: v for k, v in parsed.items() if k in _COMMENT_KEYS},
        "n_comments": len(comments),
    }
    if keep_phi:
        meta["phi"] = {"comments": comments, "header": parsed}
    for k, v in parsed.items():
        if k in _COMMENT_KEYS:
            meta.setdefault(_COMMENT_KEYS[k], v)
    if nan_count:
        meta["missing_samples"] = nan_count
    if unit_notes:
        meta["unit_warnings"] = unit_notes
    if getattr(rec, "base_date", None):
        meta["study_date"] = rec.base_date.isoformat()
    return Sample(out, ECG, "wfdb", str(path), sampling_rate=float(rec.fs),
                  lead_names=list(STANDARD_LEADS), meta=meta)


__all__ = ["read_wfdb", "record_base", "parse_comments"]
