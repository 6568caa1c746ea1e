"""The worker side of indexing: content hashes and decoding of one archive item.

Kept light on purpose: spawned decoder processes import this module (to unpickle
:func:`decode_task`) and, through :func:`m3bind.io.load`, the readers, but not SQLAlchemy,
FAISS or torch, so a worker starts in a fraction of the time an import of
:mod:`data_registry.indexer` takes.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import re
from collections.abc import Callable
from typing import Any

from data_registry.scan import Candidate
from m3bind import io as m3io
from m3bind.errors import M3BindError, UnsupportedFormat
from m3bind.io import load as _library_load
from m3bind.io.confine import check_confined, opens_only_itself
from m3bind.io.sample import json_meta
from m3bind.modalities import MODALITIES

#: The reader, as ``module:function`` so that spawned workers can import it.
DEFAULT_LOADER = "m3bind.io:load"
_CHUNK = 1 << 20


# ---------------------------------------------------------------------------------------------
def content_hash(root: str, kind: str, rel: str, members: list[str]) -> str:
    """SHA-256 of an item's bytes. A file hashes its bytes alone; a multi-file item also its
    member names relative to the item's folder, so copies elsewhere match."""
    h = hashlib.sha256()
    base = rel if kind in ("dicom_series", "mri_study") else os.path.dirname(rel)
    for m in sorted(members):
        if kind != "file":
            h.update(os.path.relpath(m, base or ".").encode() + b"\0")
        with open(os.path.join(root, m), "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        h.update(b"\1")
    return h.hexdigest()


def hash_task(root: str, kind: str, rel: str,
               members: list[str]) -> tuple[str, str | None, str | None]:
    try:
        return rel, content_hash(root, kind, rel, members), None
    except OSError as e:
        return rel, None, f"cannot read: {e.strerror or e}"


_COMMENT = re.compile(r"^\s*#?\s*([A-Za-z_ ]+?)\s*[:=]\s*(.+?)\s*$")
_WFDB_KEYS = {"patient": "patient", "patient_id": "patient", "subject": "patient",
              "study": "study", "study_id": "study", "study_date": "date", "date": "date",
              "name": "name", "patient_name": "name", "birth_date": "birth_date",
              "dob": "birth_date"}


def wfdb_links(header_path: str) -> dict[str, str]:
    """Study links from the ``key: value`` comment lines of a WFDB header."""
    out: dict[str, str] = {}
    with open(header_path, encoding="latin-1") as f:
        for line in f:
            if not line.lstrip().startswith("#"):
                continue
            m = _COMMENT.match(line)
            if m:
                key = _WFDB_KEYS.get(m.group(1).strip().lower().replace(" ", "_"))
                if key and key not in out:
                    out[key] = m.group(2)
    return out


def dicom_links(path: str) -> dict[str, str]:
    """Patient/study/series identifiers and study date of a DICOM file's header."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    pairs = {"patient": "PatientID", "name": "PatientName", "birth_date": "PatientBirthDate",
             "study": "StudyInstanceUID", "series": "SeriesInstanceUID", "date": "StudyDate"}
    return {k: str(ds.get(tag)) for k, tag in pairs.items() if ds.get(tag) not in (None, "")}


def _dicom_meta_links(meta: dict[str, Any]) -> dict[str, str]:
    """The links of :func:`dicom_links` from a DICOM Sample's ``meta`` (read with ``keep_phi``)."""
    phi = meta.get("phi") or {}
    pairs = {"patient": phi.get("PatientID"), "name": phi.get("PatientName"),
             "birth_date": phi.get("PatientBirthDate"), "study": meta.get("study_uid"),
             "series": meta.get("series_uid"), "date": meta.get("study_date")}
    return {k: str(v) for k, v in pairs.items() if v not in (None, "")}


#: The archive root's real path, resolved once a process rather than once an item (a root
#: replaced by a link mid-run only makes the check refuse: the items then resolve elsewhere).
_real_root = functools.lru_cache(maxsize=16)(os.path.realpath)


def _resolve(spec: str) -> Callable:
    mod, _, fn = spec.partition(":")
    return getattr(importlib.import_module(mod), fn)


#: Reader metadata keys never stored without the PHI opt-in (at any depth): identifiers,
#: names, birth dates, free-text comments (WFDB comments carry the study links), UIDs.
PHI_META = ("comment", "patient", "name", "birth", "address", "uid", "accession", "study_id")


@functools.lru_cache(maxsize=4096)
def _is_phi_key(key: str) -> bool:
    """Whether a metadata key names PHI (readers use a few dozen keys: the answer is cached)."""
    low = key.lower()
    return any(w in low for w in PHI_META) or low in ("study", "series", "subject")


def decode_task(root: str, cand: Candidate, default_modality: str | None,
                 loader: str, keep_phi: bool = False) -> dict[str, Any]:
    """Read one item: its Sample, study links (from the file, then the sidecar) and metadata."""
    path = os.path.join(root, cand.rel)
    try:
        # every file the read opens resolves inside the archive (a .dat or series member may be a
        # link out of it); the refusal becomes the item's failure row. A single file that opens
        # nothing else was resolved inside the root by the walk that found it.
        if cand.kind != "file" or not opens_only_itself(path):
            check_confined(path, [_real_root(root)], roots_resolved=True)
        links: dict[str, str] = {}
        fallback = cand.hints.get("modality") or default_modality
        dicom = cand.kind == "dicom_series" or cand.members[0].lower().endswith(".dcm") or (
            cand.kind == "file" and _looks_dicom(path))
        if dicom and loader == DEFAULT_LOADER:
            # one parse of the headers: the reader detects the modality itself and, asked to
            # keep identifiers, hands back the links (dropped from the stored metadata below)
            read = _resolve(loader)
            try:
                sample = read(path, None, keep_phi=True)
            except UnsupportedFormat:  # a DICOM modality outside the six: the fallback's word
                if not fallback:
                    raise
                sample = None
            if fallback and (sample is None or sample.modality not in MODALITIES
                             or sample.modality_guess):
                sample = read(path, fallback, keep_phi=True)
            links = _dicom_meta_links(sample.meta)
        else:
            if cand.kind == "wfdb":
                links = wfdb_links(path)
            elif dicom:
                links = dicom_links(os.path.join(root, min(cand.members)))
            read, detected = _resolve(loader), m3io.detect(path)  # looked up per call (patchable)
            if read is _library_load:  # the library reader need not detect the format again
                sample = read(path, detected[1] or fallback, detected=detected)
            else:
                sample = read(path, detected[1] or fallback)
        for k, v in cand.hints.items():
            links.setdefault(k, v)
        sample.meta.pop("phi", None)
        if sample.modality not in MODALITIES:
            return {"rel": cand.rel, "error": "cannot tell the modality (give --modality, a "
                    "sidecar or a modality folder name)"}
        meta = json_meta({"shape": list(sample.shape), "format": sample.format,
                          "spacing": sample.spacing, "sampling_rate": sample.sampling_rate,
                          "channel_names": sample.channel_names,
                          "modality_guess": sample.modality_guess})
        meta["reader"] = json_meta(dict(sample.meta), None if keep_phi else _is_phi_key)
        return {"rel": cand.rel, "sample": sample, "links": links, "meta": meta}
    except M3BindError as e:
        return {"rel": cand.rel, "error": e.what}
    except MemoryError:
        return {"rel": cand.rel, "error": "out of memory while decoding"}
    except Exception as e:  # noqa: BLE001 - junk must never crash the run
        return {"rel": cand.rel, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}


def _looks_dicom(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


