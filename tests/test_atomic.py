"""Atomic file writes (m3bind.atomic), the one writer behind checkpoints, FAISS files, label
caches and the app's prompt sets."""

from __future__ import annotations

import os

import pytest

from m3bind.atomic import atomic_write_bytes, atomic_write_text


def test_writes_creates_the_folder_and_replaces_whole(tmp_path):
    path = tmp_path / "new" / "f.bin"
    atomic_write_bytes(path, b"first")
    assert path.read_bytes() == b"first"
    atomic_write_text(path, "zweite Fassung ✓")
    assert path.read_text(encoding="utf-8") == "zweite Fassung ✓"
    assert sorted(os.listdir(path.parent)) == ["f.bin"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]
