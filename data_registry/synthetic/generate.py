"""Generate the simulated cohort: render every item, write it, write ``manifest.csv``.

Manifest columns (:data:`MANIFEST_COLUMNS`), one row per item:

- ``item_id``: ``<patient>_<modality>``.
- ``patient``: patient identifier (``SIM00042``).
- ``modality``: one of :data:`m3bind.modalities.MODALITIES`.
- ``path``: relative to the cohort root; a file (DICOM CXR, WFDB ``.hea``, PNG, TIFF) or a
  folder (CT DICOM series, MRI study of ``t1/t2/flair/dwi.nii.gz``).
- ``label``: the annotated primary label, one of ``SPECS[modality].labels``.
- ``findings``: JSON object finding -> 1/0 (annotated, like the label).
- ``condition``: the patient's systemic conditions, ';'-joined, ``healthy`` when none.
- ``report``: free-text report.
- ``split``: ``train`` | ``val`` | ``test``.
- ``pair_id``: non-empty for the paired CXR-ECG training subset (same value on both items).
- ``study_date``: ISO date.

With ``label_noise > 0`` a fraction of items is *annotated* wrongly: their label, findings
and report describe another class than the image shows (as a careless reader would).
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from itertools import repeat
from pathlib import Path

import numpy as np

from m3bind.modalities import MODALITIES, SPECS

from . import cohort as _cohort
from .reports import REPORTERS

log = logging.getLogger(__name__)

MANIFEST_COLUMNS: tuple[str, ...] = ("item_id", "patient", "modality", "path", "label", "findings",
                                     "condition", "report", "split", "pair_id", "study_date")

#: Size presets: pixels/voxels per modality. ``small`` is the default; ``tiny`` renders near
#: the CPU demo's training resolution (64-px CXR and fundus, 192-px slides with 32-px tiles,
#: 12x48x48 CT and MRI, ECG at 100 Hz) and is several times faster; ``full`` is for realism checks.
SIZES: dict[str, dict] = {
    "tiny": {"cxr": 64, "ct": (12, 48, 48), "mri": (12, 48, 48), "retina": 64,
             "slide": 192, "tile": 32, "slide_levels": 1, "ecg_fs": 100.0, "ecg_seconds": 10.0},
    "small": {"cxr": 128, "ct": (24, 64, 64), "mri": (16, 64, 64), "retina": 128,
              "slide": 256, "tile": 64, "slide_levels": 2, "ecg_fs": 500.0, "ecg_seconds": 10.0},
    "full": {"cxr": 1024, "ct": (80, 256, 256), "mri": (24, 256, 256), "retina": 512,
             "slide": 2048, "tile": 256, "slide_levels": 3, "ecg_fs": 500.0, "ecg_seconds": 10.0},
}

#: Micrometres per pixel of the simulated slides' full-resolution level (10x).
SLIDE_MPP = 1.0


@dataclass
class CohortConfig:
    """Parameters of a simulated cohort (recorded in ``cohort.json``).

    Attributes:
        patients: Number of patients.
        seed: Random seed; the same seed gives byte-identical pixel data and the same manifest.
        size: ``tiny``, ``small`` or ``full`` (see :data:`SIZES`).
        val_fraction: Fraction of patients in ``val``.
        test_fraction: Fraction of patients in the linked ``test`` split.
        paired_fraction: Fraction of train patients in the paired CXR-ECG subset (0 = none).
        signal: Effect-size multiplier (below 1 makes findings subtler).
        noise: Nuisance multiplier (positioning, exposure, noise, baseline wander).
        label_noise: Fraction of items whose annotation describes another class.
        modalities: Modalities to generate (test patients get all of them).
        slide_format: ``tiff`` (pyramidal tiled TIFF) or ``png`` (one tile image).
        workers: Processes that render and write items in parallel (1 = in this process,
            0 = one per CPU core). The output does not depend on it: every item has its own
            random streams and the manifest keeps the item order.
    """

    patients: int = 1200
    seed: int = 0
    size: str = "small"
    val_fraction: float = 0.1
    test_fraction: float = 0.15
    paired_fraction: float = 0.0
    signal: float = 1.0
    noise: float = 1.0
    label_noise: float = 0.0
    modalities: tuple[str, ...] = field(default_factory=lambda: tuple(MODALITIES))
    slide_format: str = "tiff"
    workers: int = 1

    def __post_init__(self):
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)}, not {self.size!r}")
        if self.slide_format not in ("tiff", "png"):
            raise ValueError("slide_format must be 'tiff' or 'png'")
        if not 0 <= self.label_noise <= 1:
            raise ValueError("label_noise must be in [0, 1]")
        if self.signal <= 0 or self.noise < 0:
            raise ValueError("signal must be > 0 and noise >= 0")
        if self.workers < 0:
            raise ValueError("workers must be >= 0 (0 = one per CPU core)")
        bad = [m for m in self.modalities if m not in MODALITIES]
        if bad:
            raise ValueError(f"unknown modalities {bad}")
        self.modalities = tuple(self.modalities)


def _render_and_write(root: Path, p: _cohort.Patient, m: str, cfg: CohortConfig, findings: dict,
                      attrs: dict, report: str, date, rng: np.random.Generator) -> str:
    """Render item ``m`` of patient ``p`` from its *true* findings and write it; returns the path."""
    from . import writers
    from .ct import render_ct
    from .cxr import render_cxr
    from .ecg import LEAD_NAMES, render_ecg
    from .mri import render_mri
    from .pathology import render_slide
    from .retina import render_retina

    sz = SIZES[cfg.size]
    item_id = f"{p.patient_id}_{m}"
    rel = Path(m) / p.patient_id
    who = {"patient_id": p.patient_id, "age": p.age, "sex": p.sex, "date": date}
    if m == "cxr":
        img, spacing = render_cxr(findings, attrs, rng, size=sz["cxr"], noise=cfg.noise)
        rel = rel / f"{item_id}.dcm"
        writers.write_cxr_dicom(root / rel, img, spacing, item_id=item_id, **who)
    elif m == "ct":
        vol, spacing = render_ct(findings, attrs, rng, shape=sz["ct"], noise=cfg.noise)
        rel = rel / item_id
        writers.write_ct_series(root / rel, vol, spacing, item_id=item_id, **who)
    elif m == "ecg":
        sigl, _hr = render_ecg(findings, attrs, rng, fs=sz["ecg_fs"], seconds=sz["ecg_seconds"], noise=cfg.noise)
        hea = writers.write_ecg_wfdb(root / rel / item_id, sigl, sz["ecg_fs"], LEAD_NAMES, report=report, **who)
        rel = hea.relative_to(root)
    elif m == "retina":
        rgb = render_retina(findings, attrs, rng, size=sz["retina"], noise=cfg.noise)
        rel = rel / f"{item_id}.png"
        writers.write_png(root / rel, rgb)
    elif m == "pathology":
        grade = int(attrs.get("grade", 0))
        if cfg.slide_format == "png":
            from .pathology import render_tissue

            rgb = render_tissue(grade, rng, size=sz["tile"] * 2, noise=cfg.noise,
                                signal=float(attrs.get("signal", 1.0)), mpp=SLIDE_MPP)
            rel = rel / f"{item_id}.png"
            writers.write_png(root / rel, rgb)
        else:
            rgb = render_slide(grade, rng, size=sz["slide"], noise=cfg.noise,
                               signal=float(attrs.get("signal", 1.0)), mpp=SLIDE_MPP)
            rel = rel / f"{item_id}.tiff"
            writers.write_pyramidal_tiff(root / rel, rgb, mpp=SLIDE_MPP, tile=sz["tile"],
                                         levels=sz["slide_levels"], description=f"m3bind simulated H&E {item_id}")
    elif m == "mri":
        vols, spacing = render_mri(findings, attrs, rng, shape=sz["mri"], noise=cfg.noise)
        rel = rel / item_id
        writers.write_mri_nifti(root / rel, vols, spacing)
    else:  # pragma: no cover - guarded by CohortConfig
        raise ValueError(m)
    return rel.as_posix()


def _annotate(m: str, p: _cohort.Patient, cfg: CohortConfig, rng: np.random.Generator) -> tuple[str, dict, dict]:
    """The (label, findings, attrs) an annotator records, with label noise applied."""
    findings, attrs = p.findings[m], p.attrs[m]
    label = _cohort.label_for(m, findings, attrs)
    if cfg.label_noise > 0 and rng.random() < cfg.label_noise:
        others = [lab for lab in SPECS[m].labels if lab != label]
        label = str(others[int(rng.integers(len(others)))])
        f2, a2 = _cohort.canonical_findings(m, label, rng)
        return label, f2, {**attrs, **a2}
    return label, findings, attrs


def _make_item(root: Path, cfg: CohortConfig, p: _cohort.Patient, m: str) -> tuple[dict, float]:
    """Annotate, report, render and write item ``m`` of patient ``p``; returns its manifest row
    and the seconds it took. Depends only on its arguments (picklable, for worker processes)."""
    mi = MODALITIES.index(m)
    t1 = time.perf_counter()
    ann_rng = np.random.default_rng([cfg.seed, p.index, 100 + mi])
    rep_rng = np.random.default_rng([cfg.seed, p.index, 200 + mi])
    img_rng = np.random.default_rng([cfg.seed, p.index, 300 + mi])
    label, ann_findings, ann_attrs = _annotate(m, p, cfg, ann_rng)
    if p.pair_id:
        offset = 0
    elif p.split == "test":
        offset = int(ann_rng.integers(0, 4))
    else:
        offset = int(ann_rng.integers(0, 30))
    date = p.admission + _dt.timedelta(days=offset)
    report = REPORTERS[m](ann_findings, ann_attrs, p.conditions, rep_rng)
    rel = _render_and_write(root, p, m, cfg, p.findings[m], p.attrs[m], report if m == "ecg" else "",
                            date, img_rng)
    row = {"item_id": f"{p.patient_id}_{m}", "patient": p.patient_id, "modality": m, "path": rel,
           "label": label, "findings": json.dumps(ann_findings, sort_keys=True),
           "condition": p.condition, "report": report, "split": p.split, "pair_id": p.pair_id,
           "study_date": date.isoformat()}
    return row, time.perf_counter() - t1


def _children_cpu() -> float:
    """CPU seconds used by finished child processes of this process (worker pools)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def generate(out, patients: int = 1200, seed: int = 0, size: str = "small", *, progress: bool = True,
             **kw) -> Path:
    """Generate the simulated cohort under ``out`` and return the path of ``manifest.csv``.

    Args:
        out: Output folder (created; existing item files are overwritten).
        patients: Number of patients.
        seed: Random seed (deterministic: no global random state is used).
        size: ``tiny`` (near the CPU demo's training resolution, fastest), ``small`` or ``full``.
        progress: Show a tqdm progress bar.
        **kw: Further :class:`CohortConfig` fields (``val_fraction``, ``test_fraction``,
            ``paired_fraction``, ``signal``, ``noise``, ``label_noise``, ``modalities``,
            ``slide_format``, ``workers``).

    Returns:
        Path of the written ``manifest.csv``; ``cohort.json`` beside it records the
        configuration, counts, chance levels and generation speed.
    """
    from tqdm.auto import tqdm

    cfg = CohortConfig(patients=patients, seed=seed, size=size, **kw)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    people = _cohort.build_patients(cfg.patients, cfg.seed, val_fraction=cfg.val_fraction,
                                    test_fraction=cfg.test_fraction, paired_fraction=cfg.paired_fraction,
                                    test_modalities=cfg.modalities, signal=cfg.signal)
    jobs = [(p, m) for p in people for m in p.modalities if m in cfg.modalities]
    rows = []
    t0, c0, cc0 = time.perf_counter(), time.process_time(), _children_cpu()
    per_mod_time = {m: 0.0 for m in cfg.modalities}
    workers = cfg.workers or os.cpu_count() or 1
    bar = tqdm(total=len(jobs), desc="simulated cohort", unit="item", disable=not progress)
    if workers == 1 or len(jobs) < 2:
        results = (_make_item(root, cfg, p, m) for p, m in jobs)
        pool = None
    else:  # items are independent (own random streams); map() keeps the job order
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawned (not forked) workers: safe when the caller has threads (torch) running
        pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"))
        results = pool.map(_make_item, repeat(root), repeat(cfg), *zip(*jobs),
                           chunksize=max(1, min(16, len(jobs) // (4 * workers))))
    try:
        for row, seconds in results:
            per_mod_time[row["modality"]] += seconds
            rows.append(row)
            bar.update()
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0 + _children_cpu() - cc0
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(MANIFEST_COLUMNS))
        w.writeheader()
        w.writerows(rows)
    counts = {m: sum(r["modality"] == m for r in rows) for m in cfg.modalities}
    info = {"config": {**asdict(cfg), "modalities": list(cfg.modalities)},
            "items": len(rows), "counts": counts,
            "splits": {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")},
            "chance": chance_levels(rows),
            "relevance_rule": "two linked test patients are relevant when their ';'-split condition sets "
                              "intersect ('healthy' is a condition); see data_registry.synthetic.same_condition",
            "seconds": round(elapsed, 2), "items_per_second": round(len(rows) / max(elapsed, 1e-9), 2),
            "cpu_seconds": round(cpu, 2), "items_per_cpu_second": round(len(rows) / max(cpu, 1e-9), 2),
            "workers": workers,
            "items_per_second_by_modality": {m: round(counts[m] / per_mod_time[m], 2)
                                             for m in cfg.modalities if per_mod_time[m] > 0},
            "simulated": True}
    (root / "cohort.json").write_text(json.dumps(info, indent=2))
    log.info("wrote %d simulated items (%s) in %.1f s to %s", len(rows), counts, elapsed, root)
    return manifest


def chance_levels(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per modality, the chance accuracy of guessing: ``uniform`` (1/K over SPECS labels) and
    ``majority`` (frequency of the most common annotated label), computed on the rows given."""
    out = {}
    for m in MODALITIES:
        labs = [r["label"] for r in rows if r["modality"] == m]
        if not labs:
            continue
        _, c = np.unique(labs, return_counts=True)
        out[m] = {"uniform": round(1.0 / len(SPECS[m].labels), 4), "majority": round(float(c.max() / c.sum()), 4)}
    return out


def cross_modal_chance(rows: list[dict], query: str, target: str, split: str = "test") -> float:
    """Chance precision of retrieving ``target`` items for ``query`` items of linked patients under
    :func:`~data_registry.synthetic.cohort.same_condition`: the mean over queries of the fraction of
    relevant targets (every target item of the split is a candidate, the query's own patient included)."""
    q = [r["condition"] for r in rows if r["split"] == split and r["modality"] == query]
    t = [r["condition"] for r in rows if r["split"] == split and r["modality"] == target]
    if not q or not t:
        return float("nan")
    return float(np.mean([np.mean([_cohort.same_condition(a, b) for b in t]) for a in q]))


def read_manifest(root) -> list[dict[str, str]]:
    """Read ``manifest.csv`` of a cohort folder (or the CSV path itself).

    Returns:
        One ``dict`` per item with the :data:`MANIFEST_COLUMNS` as keys and **string** values,
        exactly as stored (``findings`` is a JSON string: use ``json.loads``; ``path`` is
        relative to the cohort root).
    """
    path = Path(root)
    if path.is_dir():
        path = path / "manifest.csv"
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if rows and set(MANIFEST_COLUMNS) - set(rows[0]):
        raise ValueError(f"{path} lacks manifest columns {sorted(set(MANIFEST_COLUMNS) - set(rows[0]))}")
    return rows
