"""``m3bind index``, ``m3bind search`` and ``m3bind archive stats``: the JSON of DESIGN.md, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from archive_support import make_archive, tiny_model_dir, write_png

from app.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.getbasetemp())


def run_json(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_index_search_stats_json(model_dir, tmp_path, capsys):
    root = make_archive(tmp_path / "a")
    (root / "junk.bin").write_bytes(b"\x00junk")
    db = str(tmp_path / "c.db")
    out = run_json(capsys, ["index", str(root), "--catalog", db, "--model", str(model_dir),
                            "--workers", "0", "--json"])
    assert {k: out[k] for k in ("added", "skipped", "failed", "total")} == \
        {"added": 8, "skipped": 0, "failed": 1, "total": 9}
    stats = run_json(capsys, ["archive", "stats", "--catalog", db, "--json"])
    assert stats["items"] == {"cxr": 3, "ct": 1, "ecg": 2, "mri": 1, "retina": 1}
    assert stats["failed"] == 1
    query = str(root / "cxr" / "p0.png")
    res = run_json(capsys, ["search", "text:pleural effusion", "--catalog",
                            f"sqlite:///{db}", "--model", str(model_dir), "--target", "cxr",
                            "-k", "10", "--json"])["results"]
    assert sorted(Path(r["path"]).name for r in res) == ["p0.png", "p1.png", "p2.png"]
    res = run_json(capsys, ["search", query, "--catalog", db, "--model", str(model_dir),
                            "--target", "ecg", "-k", "1", "--same-patient", "--nearest-in-time",
                            "--json"])["results"]
    assert Path(res[0]["path"]).name == "rec1.hea" and res[0]["days_apart"] == 1
    assert set(res[0]) >= {"path", "modality", "score", "patient", "study"}
    assert res[0]["modality"] == "ecg" and -1.0 <= res[0]["score"] <= 1.0
    # human output
    assert main(["archive", "stats", "--catalog", db]) == 0
    assert "cxr 3" in capsys.readouterr().out


def test_errors_are_one_line_exit_2(model_dir, tmp_path, capsys):
    db = str(tmp_path / "c.db")
    assert main(["archive", "stats", "--catalog", str(tmp_path / "none.db")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: no such catalogue ({tmp_path / 'none.db'})"]
    root = tmp_path / "a"
    write_png(root / "cxr" / "x.png", 0)
    assert main(["index", str(root), "--catalog", db, "--model", str(model_dir),
                 "--workers", "0", "--json"]) == 0
    capsys.readouterr()
    assert main(["search", str(tmp_path / "missing.png"), "--catalog", db, "--model",
                 str(model_dir), "--target", "cxr", "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no such file or folder")
    assert main(["index", str(tmp_path / "nope"), "--catalog", db, "--model", str(model_dir)]) == 2
    assert "archive root is not a folder" in capsys.readouterr().err
    assert main(["index", str(root), "--catalog", db, "--model", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_console_script_archive_stats(tmp_path):
    script = Path(sys.executable).with_name("m3bind")
    if not script.exists():
        pytest.skip("console script not installed (pip install -e .)")
    from data_registry.catalog import Catalog

    Catalog(tmp_path / "c.db")
    out = subprocess.run([str(script), "archive", "stats", "--catalog", str(tmp_path / "c.db"),
                          "--json"], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"items": {}, "failed": 0, "duplicates": 0, "patients": 0,
                                      "embeddings": {}}
