"""Which files a load opens, and whether they all stay inside the allowed folders.

A path inside an archive can still make a reader open files elsewhere: a DICOM series or MRI
study folder holding a symbolic link to a file (or folder) outside the archive, a WFDB header
whose signal file is such a link, an MRXS slide whose data folder is one. The callers that
know the archive root (the app's :class:`~app.web.state.Services`, the indexer) check an item
with :func:`check_confined` before reading it; :func:`m3bind.io.load` itself follows links, as
a command-line user expects.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from m3bind.errors import UnsupportedFormat
from m3bind.io.limits import LIMITS

log = logging.getLogger(__name__)


def _signal_file_names(record: Path) -> list[str] | None:
    """Signal file names of a single-segment WFDB header, matched with wfdb's own record and
    signal line patterns but without :func:`wfdb.rdheader`'s field conversions (pandas lookups,
    about 6 ms a header, more than the rest of an indexed ECG's bookkeeping).

    None when the header is multi-segment, does not match, or this wfdb lacks the patterns:
    :func:`wfdb.rdheader` then decides. Where ``rdheader`` would still fail on a matched header
    (a field it cannot convert), the names are listed all the same, so the check is no weaker.
    """
    try:
        from wfdb.io import _header
        from wfdb.io.header import parse_header_content
    except ImportError:  # pragma: no cover - another wfdb layout
        return None
    rx_record, rx_signal = getattr(_header, "rx_record", None), getattr(_header, "rx_signal", None)
    if rx_record is None or rx_signal is None:  # pragma: no cover
        return None
    try:  # read as rdheader reads it
        with open(record.with_name(record.name + ".hea"), encoding="ascii", errors="ignore") as f:
            lines, _ = parse_header_content(f.read())
    except OSError:
        return None
    rec = rx_record.match(lines[0]) if lines else None
    if rec is None or rec.group("n_seg"):
        return None
    names = []
    for line in lines[1:]:
        m = rx_signal.match(line)
        if m is None:
            return None
        names.append(m.group("file_name") or None)  # rdheader's read default, as it lists it
    return names


def _wfdb_files(path: Path) -> list[Path]:
    """The header, signal files and segment headers (with their signal files) of a record."""
    import wfdb

    from m3bind.io.wfdb_reader import record_base

    base = record_base(path)
    files = [base.with_name(base.name + ".hea")]
    todo, seen = [base], {base.name}
    while todo:
        rec = todo.pop()
        names = _signal_file_names(rec)
        if names is not None:
            files.extend(base.parent / str(name) for name in names)
            continue
        try:
            header = wfdb.rdheader(str(rec))
        except Exception as e:  # noqa: BLE001 - the reader refuses it before any signal is read
            log.debug("WFDB header not parsed while listing its files: %s", type(e).__name__)
            continue
        for name in getattr(header, "file_name", None) or []:
            files.append(base.parent / str(name))
        for seg in getattr(header, "seg_name", None) or []:
            seg = str(seg)
            if seg != "~" and seg not in seen and len(seen) <= LIMITS.max_files:
                seen.add(seg)
                files.append(base.parent / f"{seg}.hea")
                todo.append(base.parent / seg)
    return files


#: Suffixes of files whose load may open other files: WFDB headers and signal files, MRXS slides.
_WFDB_SUFFIXES = (".hea", ".dat", ".mat")
_COMPANION_SUFFIXES = (*_WFDB_SUFFIXES, ".mrxs")


def opens_only_itself(path: str | os.PathLike) -> bool:
    """Whether :func:`item_files` of the file ``path`` is ``[path]`` for certain, told from its
    name alone (no system call): a file with a suffix the readers open no companions for.
    False leaves the question to :func:`item_files` (a WFDB record, an MRXS slide, a file
    without a suffix that may be a WFDB record path)."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    return bool(suffix) and suffix not in _COMPANION_SUFFIXES


def item_files(path: str | os.PathLike) -> list[Path]:
    """The files and folders a :func:`m3bind.io.load` of ``path`` may open, links not resolved.

    A folder gives everything under it; a WFDB header, signal file or record path gives the
    files its header(s) name; an MRXS slide gives itself and its data folder (of the same
    name, beside it); any other file gives itself.
    """
    p = Path(path)
    if p.is_dir():
        out = [p]
        for q in p.rglob("*"):
            out.append(q)
            if len(out) > 4 * LIMITS.max_files:
                break  # the readers refuse such folders before reading them all
        return out
    if p.suffix.lower() in _WFDB_SUFFIXES or (not p.suffix and p.with_name(p.name + ".hea").exists()):
        try:
            return list(dict.fromkeys([p, *_wfdb_files(p)]))
        except UnsupportedFormat:
            return [p]
    out = [p]
    if p.suffix.lower() == ".mrxs" and p.with_suffix("").is_dir():
        out.extend(item_files(p.with_suffix("")))
    return out


def _inside(real: str, roots: list[str]) -> bool:
    """Whether the resolved path ``real`` is one of the resolved ``roots`` or lies under one
    (string prefixes at a separator: both come normalised from :func:`os.path.realpath`)."""
    return any(real == r or real.startswith(r if r.endswith(os.sep) else r + os.sep)
               for r in roots)


def check_confined(path: str | os.PathLike, roots: Iterable[str | os.PathLike], *,
                   roots_resolved: bool = False) -> None:
    """Refuse an item any of whose files resolves (through links or ``..``) outside ``roots``.

    Args:
        path: The item (file or folder).
        roots: The allowed folders.
        roots_resolved: ``roots`` are already :func:`os.path.realpath` results (the indexer
            resolves its root once instead of once an item).

    Raises:
        UnsupportedFormat: Naming the first file outside (relative to the item when it can).
    """
    resolved = [os.fspath(r) for r in roots] if roots_resolved else [os.path.realpath(r) for r in roots]
    p = Path(path)
    for f in item_files(p):
        if not _inside(os.path.realpath(f), resolved):
            try:
                name = f.relative_to(p if p.is_dir() else p.parent).as_posix()
            except ValueError:
                name = f.name
            raise UnsupportedFormat(f"{name} of this item lies outside the archive (symbolic link)", str(path))
