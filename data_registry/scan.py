"""Walking an archive root into indexable items (the first step of :mod:`data_registry.indexer`).

One *item* is what :func:`m3bind.io.load` reads as one sample: a file, a DICOM series folder,
a WFDB record (named by its ``.hea``; its ``.dat``/``.mat`` signal files are members) or an
MRI study folder of ``t1/t2/flair/dwi`` NIfTI files. The walk never follows a symbolic link out
of the root or round a loop; such links, special files and unreadable folders become failures.
Study links for files that carry none come from sidecar CSVs (``m3bind_sidecar.csv`` with
columns ``path, patient, study, date, modality``, or a ``manifest.csv`` of the simulated cohort
with ``path, patient, modality, study_date``), paths relative to the CSV's folder.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from m3bind.modalities import MODALITIES

log = logging.getLogger(__name__)

SIDECAR = "m3bind_sidecar.csv"
MANIFEST = "manifest.csv"
MRI_SEQUENCES = ("t1", "t2", "flair", "dwi")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
WFDB_SIGNAL_SUFFIXES = (".dat", ".mat")
#: Files that are never items (documents, tables, catalogue files).
IGNORED_SUFFIXES = (".csv", ".json", ".md", ".txt", ".yaml", ".yml", ".log", ".db", ".sqlite",
                    ".sqlite3", "-wal", "-shm", "-journal", ".lock", ".m3idx", ".tmp", ".html", ".py")
#: Folder names that hint at a modality, for formats that carry none (PNG, JPEG, TIFF, NIfTI).
FOLDER_HINTS: dict[str, str] = {m: m for m in MODALITIES}
FOLDER_HINTS.update({"chest": "cxr", "xray": "cxr", "x-ray": "cxr", "fundus": "retina",
                     "ekg": "ecg", "histology": "pathology", "histopathology": "pathology",
                     "slides": "pathology", "wsi": "pathology", "brain": "mri", "mr": "mri"})


@dataclass
class Candidate:
    """One item found by the walk.

    Attributes:
        rel: Path relative to the root (POSIX separators); a folder for series/studies.
        kind: ``file``, ``dicom_series``, ``wfdb`` or ``mri_study``.
        members: Relative paths of the files whose bytes make up the item.
        size: Total bytes of the members.
        mtime: Newest member modification time.
        fingerprint: SHA-256 over the members' names, sizes and mtimes (cheap change check).
        hints: Study links and modality from sidecars and folder names.
    """

    rel: str
    kind: str
    members: list[str]
    size: int = 0
    mtime: float = 0.0
    fingerprint: str = ""
    hints: dict[str, str] = field(default_factory=dict)


def _suffix(name: str) -> str:
    """``Path(name).suffix`` of a bare file name, without building a Path."""
    i = name.rfind(".")
    return name[i:] if 0 < i < len(name) - 1 else ""


def _stem(name: str) -> str:
    """``Path(name).stem`` of a bare file name."""
    i = name.rfind(".")
    return name[:i] if 0 < i < len(name) - 1 else name


def _stat_members(root: Path, cand: Candidate, stats: dict[str, os.stat_result]) -> None:
    """Size, newest mtime and fingerprint of ``cand`` from the walk's ``stats`` (relative path
    -> the ``stat`` it took), stat-ing a member only when the walk has none."""
    h = hashlib.sha256()
    size, mtime = 0, 0.0
    for rel in sorted(cand.members):
        st = stats.get(rel) or os.stat(root / rel)
        size += st.st_size
        mtime = max(mtime, st.st_mtime)
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    cand.size, cand.mtime, cand.fingerprint = size, mtime, h.hexdigest()


def _is_dicom(path: str) -> bool:
    suffix = _suffix(os.path.basename(path))
    if suffix.lower() == ".dcm":
        return True
    if suffix:
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _series_uid(path: Path) -> str | None:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        return str(ds.get("SeriesInstanceUID", "")) or None
    except Exception:  # noqa: BLE001 - a damaged file is reported when it is decoded
        return None


def _nifti_stem(name: str) -> str | None:
    low = name.lower()
    for suf in NIFTI_SUFFIXES:
        if low.endswith(suf):
            return low[: -len(suf)]
    return None


def folder_hint(rel: str) -> str | None:
    """Modality suggested by the folder names of ``rel`` (innermost first), or None."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]  # Path(rel).parts, POSIX ``rel``
    for part in reversed(parts[:-1] or parts):
        hit = FOLDER_HINTS.get(part.lower())
        if hit:
            return hit
    return None


def read_sidecar(csv_path: Path, root: Path) -> dict[str, dict[str, str]]:
    """Study links from a sidecar or cohort manifest, keyed by path relative to ``root``.

    ``root`` and ``csv_path`` are absolute and normalised, ``csv_path`` under ``root`` (as the
    walk gives them); rows naming paths outside ``root`` are ignored.
    """
    out: dict[str, dict[str, str]] = {}
    base, root_s = str(csv_path.parent), str(root)
    inside = root_s if root_s.endswith(os.sep) else root_s + os.sep
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                return out
            if csv_path.name == MANIFEST and "patient" not in reader.fieldnames:
                return out
            for row in reader:
                p = (row.get("path") or "").strip()
                if not p:
                    continue
                # relative to the root by string (both normalised; os.path.relpath cost more
                # than the rest of the row): a path outside the root, or the root, is no item
                target = os.path.normpath(os.path.join(base, p))
                if not target.startswith(inside):
                    continue
                rel = target[len(inside):]
                info = {
                    "patient": (row.get("patient") or "").strip(),
                    "study": (row.get("study") or "").strip(),
                    "date": (row.get("date") or row.get("study_date") or "").strip(),
                    "modality": (row.get("modality") or "").strip().lower(),
                }
                out[rel.replace(os.sep, "/")] = {k: v for k, v in info.items() if v}
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        log.warning("ignoring unreadable sidecar %s: %s", csv_path, e)
    return out


def _group_folder(folder: str, rel_dir: str, names: list[str],
                  failures: list[tuple[str, str]]) -> list[Candidate]:
    """Items of one folder's regular files (``names``, in name order); ``rel_dir`` is the
    folder relative to the root (``""`` for the root itself)."""
    rel = (lambda n: f"{rel_dir}/{n}") if rel_dir else (lambda n: n)
    out: list[Candidate] = []
    used: set[str] = set()
    # WFDB records: the header names the item, its signal files are members
    for hea in (n for n in names if _suffix(n).lower() == ".hea"):
        stem = _stem(hea)
        members = [hea] + [n for n in names if n != hea and _stem(n) == stem
                           and _suffix(n).lower() in WFDB_SIGNAL_SUFFIXES]
        used.update(members)
        out.append(Candidate(rel(hea), "wfdb", [rel(m) for m in members]))
    # MRI study folder: t1/t2/flair/dwi NIfTI files
    seqs = [n for n in names if _nifti_stem(n) in MRI_SEQUENCES]
    if seqs and rel_dir:
        used.update(seqs)
        out.append(Candidate(rel_dir, "mri_study", [rel(n) for n in seqs]))
    # DICOM: a folder holding one multi-file series is one item; single-file series are files
    dicoms = [n for n in names if n not in used and _is_dicom(os.path.join(folder, n))]
    if len(dicoms) > 1:
        groups: dict[str | None, list[str]] = {}
        for n in dicoms:
            groups.setdefault(_series_uid(os.path.join(folder, n)), []).append(n)
        multi = [g for uid, g in groups.items() if uid is not None and len(g) > 1]
        if len(groups) == 1 and multi and rel_dir:
            used.update(dicoms)
            out.append(Candidate(rel_dir, "dicom_series", [rel(n) for n in dicoms]))
        elif multi:
            for g in multi:
                used.update(g)
                failures.append((rel(g[0]), ("folder holds several multi-file DICOM series; "
                                             "put each series in its own folder")))
    for n in names:
        if n in used:
            continue
        low = n.lower()
        if low in (SIDECAR, MANIFEST) or low.endswith(IGNORED_SUFFIXES):
            continue
        if (_suffix(n).lower() in WFDB_SIGNAL_SUFFIXES
                and Path(folder, n).with_suffix(".hea").exists()):
            continue
        out.append(Candidate(rel(n), "file", [rel(n)]))
    return out


def scan(root: str | os.PathLike, exclude: tuple[Path, ...] = ()) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """Walk ``root`` into candidates and failures.

    Hidden entries are skipped, as are the paths in ``exclude`` (the catalogue's own files).
    Symbolic links are followed only inside the root and never twice into the same folder.

    The walk works on strings and on what :func:`os.scandir` already knows: the resolved path
    of an entry that is not a link is its folder's resolved path plus its name, so only links
    are resolved (an excluded path reached through a link, broken or not, is still skipped);
    the ``stat`` that tells files from folders also gives the members' sizes and mtimes.

    Returns:
        ``(candidates, failures)``; a failure is ``(relative path, one-line error)``.
    """
    root = Path(root).resolve()
    root_s = str(root)
    excluded = {str(Path(p).resolve()) for p in exclude}
    candidates: list[Candidate] = []
    failures: list[tuple[str, str]] = []
    sidecars: dict[str, dict[str, str]] = {}
    stats: dict[str, os.stat_result] = {}
    visited: set[tuple[int, int]] = set()
    # (path, path relative to the root, resolved path, its stat when already taken)
    stack: list[tuple[str, str, str, os.stat_result | None]] = [(root_s, "", root_s, None)]
    while stack:
        folder, rel_dir, real, st = stack.pop()
        try:
            st = st or os.stat(folder)
            if (st.st_dev, st.st_ino) in visited:
                failures.append((rel_dir or ".", "symbolic link loop (folder visited twice)"))
                continue
            visited.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            failures.append((rel_dir or ".", f"cannot read folder: {e.strerror or e}"))
            continue
        real_base = real if real.endswith(os.sep) else real + os.sep
        names: list[str] = []
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            path = entry.path
            relp = f"{rel_dir}/{name}" if rel_dir else name
            try:
                link = entry.is_symlink()
            except OSError as e:
                if os.path.realpath(path) not in excluded:
                    failures.append((relp, f"cannot stat: {e.strerror or e}"))
                continue
            # the resolved path (Path.resolve's, without a syscall for an entry that is no link)
            real_s = os.path.realpath(path) if link else real_base + name
            if real_s in excluded:
                continue
            try:
                if link:
                    target = Path(real_s)
                    if not target.exists():  # a missing target, or a loop of links
                        failures.append((relp, "broken symbolic link"))
                        continue
                    if target != root and root not in target.parents:
                        failures.append((relp, "symbolic link points outside the archive root"))
                        continue
                    est = os.stat(path)
                else:
                    est = entry.stat()
            except OSError as e:
                failures.append((relp, f"cannot stat: {e.strerror or e}"))
                continue
            mode = est.st_mode
            if stat.S_ISDIR(mode):
                stack.append((path, relp, real_s, est))
            elif stat.S_ISREG(mode):
                if name in (SIDECAR, MANIFEST):
                    sidecars.update(read_sidecar(Path(path), root))
                names.append(name)
                stats[relp] = est
            else:
                failures.append((relp, "not a regular file"))
        candidates.extend(_group_folder(folder, rel_dir, names, failures))
    kept = []
    hint_of: dict[str, str | None] = {}  # the folder hint depends on the folder alone
    for cand in candidates:
        try:
            _stat_members(root, cand, stats)
        except OSError as e:
            failures.append((cand.rel, f"cannot stat: {e.strerror or e}"))
            continue
        hints = dict(sidecars.get(cand.rel, {}))
        folder_key = cand.rel.rpartition("/")[0] or cand.rel
        if folder_key not in hint_of:
            hint_of[folder_key] = folder_hint(cand.rel)
        hint = hint_of[folder_key]
        if "modality" not in hints and hint:
            hints["modality"] = hint
        if hints.get("modality") not in MODALITIES:
            hints.pop("modality", None)
        cand.hints = hints
        kept.append(cand)
    kept.sort(key=lambda c: c.rel)
    return kept, failures
