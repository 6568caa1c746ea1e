"""``m3bind inspect``: JSON contract, previews, modality override, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from app.cli import main


def _run(capsys, *argv):
    rc = main(["inspect", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_json_contract_and_preview(sample_file, tmp_path, capsys):
    path = sample_file("ecg_dicom")
    out_png = tmp_path / "ecg.png"
    rc, out, _ = _run(capsys, path, "--json", "--preview", out_png)
    assert rc == 0
    d = json.loads(out)
    assert {"path", "modality", "format", "shape", "spacing", "meta"} <= set(d)
    assert (d["modality"], d["format"], d["shape"], d["sampling_rate"]) == ("ecg", "dicom", [12, 10000], 1000.0)
    assert d["lead_names"][:3] == ["I", "II", "III"] and "phi" not in d["meta"]
    im = np.asarray(Image.open(out_png))
    assert im.ndim == 3 and im.shape[1] > 1000


def test_human_output_and_window_option(sample_file, tmp_path, capsys):
    out_png = tmp_path / "ct.png"
    rc, out, _ = _run(capsys, sample_file("ct_dicom"), "--preview", out_png, "--window", "lung")
    assert rc == 0 and "modality  ct" in out and "spacing   5 x 0.6615 x 0.6615 mm" in out
    rc, _, _ = _run(capsys, sample_file("ct_dicom"), "--preview", tmp_path / "b.png", "--window=-600/1500")
    assert rc == 0
    a, b = np.asarray(Image.open(out_png)), np.asarray(Image.open(tmp_path / "b.png"))
    np.testing.assert_array_equal(a[:-60], b[:-60])  # same window, only the caption text may differ


def test_modality_option_for_photographs(sample_file, capsys):
    rc, out, _ = _run(capsys, sample_file("grey_png"), "--json")
    d = json.loads(out)
    assert rc == 0 and d["modality"] == "cxr" and d["modality_guess"] is True
    rc, out, _ = _run(capsys, sample_file("retina"), "--json", "--modality", "retina")
    d = json.loads(out)
    assert d["modality"] == "retina" and d["modality_guess"] is False and d["meta"]["fov"]["radius"] > 600


def test_bad_input_one_line(tmp_path, capsys):
    p = tmp_path / "x.dcm"
    p.write_bytes(b"\x00" * 10)
    rc, out, err = _run(capsys, p)
    assert rc == 2 and out == ""
    assert err.strip().splitlines()[-1] == f"error: unrecognised file format ({p})"


@pytest.mark.parametrize("modality", ["ecg", "bogus"])
def test_wrong_modality_for_a_photo(sample_file, capsys, modality):
    rc, _, err = _run(capsys, sample_file("retina"), "--modality", modality)
    assert rc == 2 and err.strip().splitlines()[-1].startswith("error: ")


def test_meta_of_every_real_sample_is_plain_json(sample_files):
    from m3bind.errors import UnsupportedFormat
    from m3bind.io import load

    for name, path in sample_files.items():
        try:
            s = load(path)
        except UnsupportedFormat:
            continue  # secondary captures, RT plans: no modality
        except Exception as e:  # noqa: BLE001
            if name == "mr_truncated":
                continue
            raise AssertionError(f"{name}: {e}") from e
        json.dumps(s.meta)  # no numpy scalars, no datasets: plain JSON without a default
