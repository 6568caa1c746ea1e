"""Real chest X-ray report text: the OpenI / Indiana University collection (3,955 reports).

``torchxrayvision`` ships the reports as ``data/NLMCXR_reports.tgz`` (one XML file per report,
CC BY-NC-ND 4.0). They are read from the installed package at run time and never copied
into this repository. Used as a real-text corpus for distillation and text-side evaluation.

Citation: Demner-Fushman D, Kohli MD, Rosenman MB, et al. Preparing a collection of
radiology examinations for distribution and retrieval. J Am Med Inform Assoc. 2016;23(2):304-10.

Example:
    >>> from data_registry.openi import load_reports
    >>> reports = load_reports()                          # doctest: +SKIP
    >>> reports[0].impression                             # doctest: +SKIP
    'No acute cardiopulmonary process.'
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import re
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from m3bind.errors import CorruptFile, M3BindError

log = logging.getLogger(__name__)

_MEMBER_LIMIT = 1 << 20  # one report XML is a few kB; refuse anything above 1 MiB
_ARCHIVE = "NLMCXR_reports.tgz"


@dataclass(frozen=True)
class OpenIReport:
    """One OpenI report.

    Attributes:
        uid: Report identifier (``CXR10``).
        findings: FINDINGS section ('' when absent); de-identification marks ``XXXX`` kept.
        impression: IMPRESSION section ('' when absent).
        mesh: Major MeSH annotations, e.g. ``Calcified Granuloma/lung/upper lobe/right`` or ``normal``.
        indication: INDICATION section.
        comparison: COMPARISON section.
        mesh_automatic: Automatically extracted MeSH terms.
        image_ids: Identifiers of the report's images (``CXR10_IM-0002-1001``).
    """

    uid: str
    findings: str
    impression: str
    mesh: list[str] = field(default_factory=list)
    indication: str = ""
    comparison: str = ""
    mesh_automatic: list[str] = field(default_factory=list)
    image_ids: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        """Findings and impression as one report text."""
        parts = []
        if self.findings:
            parts.append(f"Findings: {self.findings}")
        if self.impression:
            parts.append(f"Impression: {self.impression}")
        return " ".join(parts)

    @property
    def mesh_terms(self) -> set[str]:
        """Lower-cased top-level MeSH headings (the part before the first '/')."""
        return {m.split("/")[0].strip().lower() for m in self.mesh if m.strip()}


def archive_path() -> Path:
    """Where torchxrayvision's ``NLMCXR_reports.tgz`` is installed (without importing the package).

    Raises:
        M3BindError: torchxrayvision is not installed or lacks the archive.
    """
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise M3BindError("OpenI reports need the torchxrayvision package "
                          "(pip install --no-deps torchxrayvision)")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "data" / _ARCHIVE
        if p.is_file():
            return p
    raise M3BindError(f"torchxrayvision is installed but has no data/{_ARCHIVE}")


def _clean(text: str | None) -> str:
    return re.sub(r"\s+", " ", text or "").strip()


def parse_report(xml_bytes: bytes, name: str = "") -> OpenIReport:
    """Parse one OpenI report XML document.

    Raises:
        CorruptFile: the XML cannot be parsed.
    """
    try:
        root = ET.fromstring(xml_bytes)
    except ET.ParseError as e:
        raise CorruptFile(f"OpenI report is not valid XML: {e}", name) from None
    sections = {}
    for el in root.iter("AbstractText"):
        sections[(el.get("Label") or "").upper()] = _clean("".join(el.itertext()))
    uid_el = root.find("uId")
    uid = uid_el.get("id") if uid_el is not None and uid_el.get("id") else Path(name).stem
    mesh = root.find("MeSH")
    major = [_clean(e.text) for e in mesh.findall("major")] if mesh is not None else []
    auto = [_clean(e.text) for e in mesh.findall("automatic")] if mesh is not None else []
    images = [e.get("id") for e in root.findall("parentImage") if e.get("id")]
    return OpenIReport(uid=uid, findings=sections.get("FINDINGS", ""), impression=sections.get("IMPRESSION", ""),
                       mesh=[m for m in major if m], indication=sections.get("INDICATION", ""),
                       comparison=sections.get("COMPARISON", ""), mesh_automatic=[m for m in auto if m],
                       image_ids=images)


@functools.lru_cache(maxsize=4)
def _load(path: str, require_text: bool) -> tuple[OpenIReport, ...]:
    out = []
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                if not member.isfile() or not member.name.endswith(".xml"):
                    continue
                if member.size > _MEMBER_LIMIT:
                    log.warning("skipping oversized OpenI member %s", member.name)
                    continue
                fh = tar.extractfile(member)
                if fh is None:
                    continue
                rep = parse_report(fh.read(), member.name)
                if require_text and not (rep.findings or rep.impression):
                    continue
                out.append(rep)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise CorruptFile(f"cannot read OpenI archive: {e}", path) from None
    out.sort(key=lambda r: int(re.sub(r"\D", "", r.uid) or 0))
    return tuple(out)


def load_reports(path: str | Path | None = None, *, require_text: bool = True) -> list[OpenIReport]:
    """All OpenI reports, sorted by report number.

    Args:
        path: The ``NLMCXR_reports.tgz`` archive; default: the one torchxrayvision installs.
        require_text: Drop reports with neither findings nor impression.

    Returns:
        A new list of :class:`OpenIReport` (the parsed archive is cached per path).
    """
    p = Path(path) if path is not None else archive_path()
    return list(_load(str(p), require_text))


#: MeSH headings mapped to the zero-shot CXR labels of :mod:`m3bind.modalities`.
MESH_TO_CXR_LABEL: dict[str, str] = {
    "normal": "no finding",
    "cardiomegaly": "cardiomegaly",
    "pleural effusion": "pleural effusion",
    "consolidation": "consolidation",
    "pneumonia": "consolidation",
    "mass": "lung mass",
    "lung neoplasms": "lung mass",
    "nodule": "lung mass",
}


def cxr_label(report: OpenIReport) -> str | None:
    """The single CXR zero-shot label a report's MeSH headings map to, or None (none or several)."""
    labels = {MESH_TO_CXR_LABEL[t] for t in report.mesh_terms if t in MESH_TO_CXR_LABEL}
    if len(labels) == 1:
        lab = next(iter(labels))
        if lab == "no finding" and len(report.mesh_terms) > 1:
            return None
        return lab
    return None
