"""Shared fixtures: the real sample files that installed pip packages ship (``tests/samples.py``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).parent))

from samples import available, require  # noqa: E402


@pytest.fixture(scope="session")
def sample_files() -> dict[str, Path]:
    """Installed real sample files by name (see ``tests/samples.py``); missing ones are absent."""
    return available()


@pytest.fixture
def sample_file():
    """``sample_file("ecg_dicom")`` -> path, skipping the test when the sample is not installed."""
    return require
