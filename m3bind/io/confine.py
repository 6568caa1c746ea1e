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


def _wfdb_files(path: Path) -> list[Path]:
    """The header, signal files and segment headers (with their signal files) of a record."""
    import wfdb

    from m3bind.io.wfdb_reader import record_base

    base = record_base(path)
    files = [base.with_name(base.name + ".hea")]
    todo, seen = [base], {base.name}
    while todo:
        rec = todo.pop()
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
    if p.suffix.lower() in (".hea", ".dat", ".mat") or (not p.suffix and p.with_name(p.name + ".hea").exists()):
        try:
            return list(dict.fromkeys([p, *_wfdb_files(p)]))
        except UnsupportedFormat:
            return [p]
    out = [p]
    if p.suffix.lower() == ".mrxs" and p.with_suffix("").is_dir():
        out.extend(item_files(p.with_suffix("")))
    return out


def _inside(real: Path, roots: list[Path]) -> bool:
    return any(real == r or r in real.parents for r in roots)


def check_confined(path: str | os.PathLike, roots: Iterable[str | os.PathLike]) -> None:
    """Refuse an item any of whose files resolves (through links or ``..``) outside ``roots``.

    Raises:
        UnsupportedFormat: Naming the first file outside (relative to the item when it can).
    """
    resolved = [Path(os.path.realpath(r)) for r in roots]
    p = Path(path)
    for f in item_files(p):
        if not _inside(Path(os.path.realpath(f)), resolved):
            try:
                name = f.relative_to(p if p.is_dir() else p.parent).as_posix()
            except ValueError:
                name = f.name
            raise UnsupportedFormat(f"{name} of this item lies outside the archive (symbolic link)", str(path))
