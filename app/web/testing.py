"""Helpers to run the app in tests: a small archive of real files and a server on a free port."""

from __future__ import annotations

import csv
import shutil
import socket
from pathlib import Path


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_archive(dest: str | Path, files: dict[str, list[Path]]) -> Path:
    """Copy ``files`` (modality -> paths) into ``dest/<modality>/`` with a sidecar naming them.

    Each file becomes its own patient ``test-<modality>-<i>`` so that browsing shows patients.
    """
    dest = Path(dest)
    rows = []
    for modality, paths in files.items():
        for i, src in enumerate(paths):
            target = dest / modality / Path(src).name
            target.parent.mkdir(parents=True, exist_ok=True)
            if Path(src).is_dir():
                shutil.copytree(src, target, dirs_exist_ok=True)
            else:
                shutil.copyfile(src, target)
            rows.append({"path": f"{modality}/{target.name}", "patient": f"test-{modality}-{i}",
                         "study": f"study-{modality}-{i}", "date": f"2024-01-0{1 + i % 9}",
                         "modality": modality})
    with open(dest / "m3bind_sidecar.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["path", "patient", "study", "date", "modality"])
        w.writeheader()
        w.writerows(rows)
    return dest


def start_server(services, port: int | None = None):
    """Launch the app without blocking; returns ``(demo, url)``. Call ``demo.close()`` after."""
    from app.web.app import launch

    return launch(services, host="127.0.0.1", port=port or free_port(), block=False, quiet=True)


def tiny_model_dir(base: str | Path) -> Path:
    """The tiny random model (:func:`m3bind.testing.build_tiny_model`) in ``base``, built once."""
    from m3bind.testing import build_tiny_model

    path = Path(base) / "app_tiny_model"
    if not (path / "config.json").is_file():
        build_tiny_model(path)
    return path


def synthetic_cxr(dest: str | Path) -> Path:
    """A DICOM chest radiograph of the simulated cohort (when pydicom-data is not installed)."""
    from data_registry.synthetic import generate, read_manifest

    dest = Path(dest)
    generate(dest, 6, 0, size="small")
    rows = read_manifest(dest)
    rows = rows.to_dict("records") if hasattr(rows, "to_dict") else rows
    return dest / next(r["path"] for r in rows if r["modality"] == "cxr")
