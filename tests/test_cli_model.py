"""``m3bind embed`` and ``m3bind zeroshot`` end to end on a tiny model directory."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from app.cli import main
from m3bind.io import load
from m3bind.model import load_model
from m3bind.testing import build_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("cli") / "tiny", modalities=["cxr", "retina", "ecg"])


@pytest.fixture(scope="module")
def cxr_png(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("img") / "chest.png"
    Image.fromarray(rng.integers(0, 255, (64, 56), dtype=np.uint8)).save(path)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_embed_json_matches_library(capsys, model_dir, cxr_png):
    code, out, err = run(capsys, "embed", cxr_png, "--model", model_dir, "--modality", "cxr", "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["modality"] == "cxr" and payload["dim"] == 32 and len(payload["vector"]) == 32
    want = load_model(model_dir).embed([load(cxr_png, "cxr")])[0]
    assert np.allclose(payload["vector"], want, atol=1e-6)
    code, out, _ = run(capsys, "embed", cxr_png, "--model", model_dir, "--modality", "cxr")
    assert code == 0 and out.startswith("cxr embedding (dim 32, model tiny-")


def test_zeroshot_json_best_first(capsys, model_dir, cxr_png, tmp_path):
    code, out, err = run(capsys, "zeroshot", cxr_png, "--model", model_dir, "--modality", "cxr",
                         "--labels", "cardiomegaly, pleural effusion,no finding", "--json")
    assert code == 0, err
    payload = json.loads(out)
    scores = [x["score"] for x in payload["labels"]]
    assert payload["modality"] == "cxr" and scores == sorted(scores, reverse=True)
    assert {x["label"] for x in payload["labels"]} == {"cardiomegaly", "pleural effusion", "no finding"}
    assert sum(scores) == pytest.approx(1.0, abs=1e-5)
    prompts = tmp_path / "p.yaml"
    prompts.write_text("big heart: [enlarged cardiac silhouette]\nclear: [clear lungs]\n")
    code, out, err = run(capsys, "zeroshot", cxr_png, "--model", model_dir, "--modality", "cxr",
                         "--prompts", prompts, "--mode", "expert", "--json")
    assert code == 0, err
    assert {x["label"] for x in json.loads(out)["labels"]} == {"big heart", "clear"}


@pytest.mark.parametrize("command", ["embed", "zeroshot"])
def test_clear_errors_for_bad_model_dirs(capsys, tmp_path, cxr_png, model_dir, command):
    code, out, err = run(capsys, command, cxr_png, "--model", tmp_path / "missing", "--modality", "cxr")
    assert code == 2 and err.strip() == f"error: model directory not found ({tmp_path / 'missing'})"
    (tmp_path / "notamodel").mkdir()
    code, out, err = run(capsys, command, cxr_png, "--model", tmp_path / "notamodel", "--modality", "cxr")
    assert code == 2 and "config.json missing" in err and len(err.strip().splitlines()) == 1
    code, out, err = run(capsys, command, cxr_png, "--model", model_dir, "--modality", "pathology")
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
