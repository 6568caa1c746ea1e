"""The app's API endpoints (``/zeroshot``, ``/search``) through ``gradio_client``, and its safety rules.

A tiny random model and a four-item archive of real sample files are built once; the expected
numbers are computed independently with the library (``m3bind.io.load`` + ``model.embed`` +
``m3bind.zeroshot.classify``; search scores as plain cosine similarities).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from samples import sample_path

from app.web.state import Services
from app.web.testing import synthetic_cxr, tiny_model_dir

ECG = sample_path("ecg_dicom")
CT = sample_path("ct_dicom")
RETINA = sample_path("retina")


def cxr_sample_path(tmp: Path) -> Path:
    """pydicom-data's chest radiograph, else a synthetic DICOM CXR from the simulated cohort."""
    return sample_path("cxr_dicom") or synthetic_cxr(tmp / "cohort")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``(services, url, model_dir, archive)`` of a running app over an indexed archive."""
    from app.web.testing import build_archive, start_server
    from data_registry.indexer import index_archive

    tmp = tmp_path_factory.mktemp("app_api")
    model_dir = tiny_model_dir(tmp_path_factory.getbasetemp())
    if ECG is None or CT is None:
        pytest.skip("pydicom's test files are not installed")
    files = {"cxr": [cxr_sample_path(tmp)], "ecg": [ECG], "ct": [CT], "retina": [RETINA]}
    archive = build_archive(tmp / "archive", {m: p for m, p in files.items() if p[0] is not None})
    url = f"sqlite:///{tmp / 'catalog.db'}"
    res = index_archive(archive, url, str(model_dir), workers=0, progress=False)
    assert res["failed"] == 0, res
    services = Services(model_dir, url, archive, prompt_dir=tmp / "prompts", work_dir=tmp / "work",
                        index_workers=0)
    demo, app_url = start_server(services)
    yield services, app_url, Path(model_dir), archive
    demo.close()


class JsonClient:
    """``gradio_client.Client`` whose ``predict`` parses the endpoints' JSON text."""

    def __init__(self, url: str):
        from gradio_client import Client

        self.client = Client(url, verbose=False)

    def predict(self, **kw):
        import json

        return json.loads(self.client.predict(**kw))


@pytest.fixture(scope="module")
def client(served):
    return JsonClient(served[1])


def test_zeroshot_endpoint_matches_library(served, client):
    from gradio_client import handle_file

    from m3bind import load_model
    from m3bind.io import load
    from m3bind.zeroshot import classify

    _, _, model_dir, _ = served
    labels = ["normal sinus rhythm", "atrial fibrillation", "sinus tachycardia"]
    out = client.predict(file=handle_file(str(ECG)), labels=", ".join(labels), api_name="/zeroshot")
    assert set(out) == {"modality", "labels"}
    assert out["modality"] == "ecg"
    assert [set(x) for x in out["labels"]] == [{"label", "score"}] * 3
    scores = [x["score"] for x in out["labels"]]
    assert scores == sorted(scores, reverse=True)
    assert sum(scores) == pytest.approx(1.0, abs=1e-5)

    model = load_model(model_dir)
    expected = classify(model, load(ECG), labels=labels)
    assert [x["label"] for x in out["labels"]] == [lbl for lbl, _ in expected]
    assert scores == pytest.approx([s for _, s in expected], abs=1e-5)


def test_zeroshot_endpoint_default_labels(client):
    from gradio_client import handle_file

    from m3bind.modalities import SPECS

    out = client.predict(file=handle_file(str(CT)), labels="", api_name="/zeroshot")
    assert out["modality"] == "ct"
    assert sorted(x["label"] for x in out["labels"]) == sorted(SPECS["ct"].labels)


def test_zeroshot_endpoint_matches_cli(served, client, capsys):
    from gradio_client import handle_file

    from app.cli import main

    pytest.importorskip("app.commands.zeroshot")
    _, _, model_dir, _ = served
    labels = "normal sinus rhythm,left ventricular hypertrophy"
    out = client.predict(file=handle_file(str(ECG)), labels=labels, api_name="/zeroshot")
    capsys.readouterr()
    assert main(["zeroshot", str(ECG), "--model", str(model_dir), "--labels", labels, "--json"]) == 0
    import json

    cli = json.loads(capsys.readouterr().out)
    assert cli["modality"] == out["modality"]
    assert [x["label"] for x in cli["labels"]] == [x["label"] for x in out["labels"]]
    assert [x["score"] for x in cli["labels"]] == pytest.approx([x["score"] for x in out["labels"]], abs=1e-5)


def test_search_endpoint_cross_modal_scores_are_cosines(served, client):
    from gradio_client import handle_file

    from m3bind import load_model
    from m3bind.io import load

    _, _, model_dir, archive = served
    cxr = next((archive / "cxr").iterdir())
    out = client.predict(query_file=handle_file(str(cxr)), query_text="", target_modality="ecg",
                         k=5, api_name="/search")
    assert set(out) == {"results"}
    assert len(out["results"]) == 1  # the archive holds one ECG
    hit = out["results"][0]
    assert {"path", "modality", "score", "patient", "study"} <= set(hit)
    assert hit["modality"] == "ecg" and Path(hit["path"]).name == ECG.name

    model = load_model(model_dir)
    q = model.embed([load(cxr)])[0]
    v = model.embed([load(archive / "ecg" / ECG.name)])[0]
    assert hit["score"] == pytest.approx(float(np.dot(q, v)), abs=1e-4)


def test_search_endpoint_text_query_ranks_by_cosine(served, client):
    from m3bind import load_model
    from m3bind.io import load

    _, _, model_dir, archive = served
    out = client.predict(query_file=None, query_text="pleural effusion", target_modality="cxr",
                         k=3, api_name="/search")
    assert [h["modality"] for h in out["results"]] == ["cxr"]
    model = load_model(model_dir)
    t = model.embed_text(["pleural effusion"], modality="cxr")[0]
    v = model.embed([load(next((archive / "cxr").iterdir()))])[0]
    assert out["results"][0]["score"] == pytest.approx(float(np.dot(t, v)), abs=1e-4)


def test_search_endpoint_needs_exactly_one_query(client):
    from gradio_client import handle_file

    with pytest.raises(Exception, match="either query_file or query_text"):
        client.predict(query_file=None, query_text="", target_modality="ecg", k=3, api_name="/search")
    with pytest.raises(Exception, match="either query_file or query_text"):
        client.predict(query_file=handle_file(str(ECG)), query_text="afib", target_modality="ecg",
                       k=3, api_name="/search")


def test_zeroshot_endpoint_bad_file_is_one_line_error(client, tmp_path):
    from gradio_client import handle_file

    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"DICM" + b"\0" * 50)
    with pytest.raises(Exception) as ei:
        client.predict(file=handle_file(str(bad)), labels="a,b", api_name="/zeroshot")
    assert "broken.dcm" in str(ei.value) and "\n" not in str(ei.value).strip()


# ----------------------------------------------------------------------- safety rules
def test_paths_outside_archive_and_uploads_are_refused(served, tmp_path):
    from m3bind.errors import M3BindError

    services, _, _, archive = served
    outside = tmp_path / "secret.dcm"
    shutil.copyfile(ECG, outside)
    for p in (outside, "/etc/passwd", archive / ".." / "catalog.db", "../catalog.db"):
        with pytest.raises(M3BindError, match="outside the archive"):
            services.load(p)
    link = archive / "ecg" / "link.dcm"
    link.symlink_to(outside)
    try:
        with pytest.raises(M3BindError, match="outside the archive"):
            services.load(link)
    finally:
        link.unlink()
    assert services.load(archive / "ecg" / ECG.name).modality == "ecg"
    assert services.load(f"ecg/{ECG.name}").modality == "ecg"  # relative to the archive root


def test_upload_size_limit(served):
    from m3bind.errors import TooLarge

    services, *_ = served
    small = Services(services.model_dir, None, services.archive_root, work_dir=services.work_dir,
                     max_upload_mb=0.001)
    with pytest.raises(TooLarge, match="exceeds the limit"):
        small.assemble([services.archive_root / "ecg" / ECG.name])


def test_serve_refuses_public_binding_without_auth():
    from app.commands.serve import check_binding, is_local, parse_auth
    from m3bind.errors import ConfigError

    assert is_local("127.0.0.1") and is_local("localhost") and is_local("::1")
    assert not is_local("0.0.0.0") and not is_local("192.168.1.5")
    with pytest.raises(ConfigError, match="without --auth"):
        check_binding("0.0.0.0", None)
    check_binding("0.0.0.0", ("u", "p"))
    check_binding("127.0.0.1", None)
    assert parse_auth("doc:s3cret:x") == ("doc", "s3cret:x")
    with pytest.raises(ConfigError):
        parse_auth("nopassword")


def test_app_opens_without_model_or_catalogue(tmp_path):
    services = Services(tmp_path / "no-model", None, tmp_path)
    assert "no trained model" in services.model_notice()
    assert "no catalogue configured" in services.catalog_notice()
    from app.web.app import build_app

    build_app(services)  # builds without raising


def test_prompt_sets_round_trip(tmp_path):
    from m3bind.errors import ConfigError

    s = Services(None, None, tmp_path, prompt_dir=tmp_path / "p")
    s.save_prompt_set("cardiac", "ecg", ["a", "b"], ["ecg with {}."])
    s.save_prompt_set("other", "cxr", ["x", "y"], ["{}"])
    again = Services(None, None, tmp_path, prompt_dir=tmp_path / "p")
    assert again.prompt_sets()["cardiac"] == {"modality": "ecg", "labels": ["a", "b"],
                                              "templates": ["ecg with {}."]}
    assert sorted(again.prompt_sets()) == ["cardiac", "other"]
    with pytest.raises(ConfigError):
        s.save_prompt_set("../evil", "ecg", ["a", "b"], ["{}"])


def test_upload_embedded_once_for_zeroshot_and_search(served, tmp_path, monkeypatch):
    """A file labelled zero-shot and then searched is read and embedded once; the cached
    answers equal the uncached library ones; a changed file is embedded again."""
    import m3bind.io
    from data_registry.search import search as archive_search
    from m3bind.zeroshot import classify

    services, _, _, _ = served
    upload = services.work_dir / "cache_probe"
    upload.mkdir(exist_ok=True)
    query = upload / "retina.png"
    shutil.copyfile(RETINA, query)
    reads = []
    real_load = m3bind.io.load
    monkeypatch.setattr(m3bind.io, "load", lambda *a, **kw: reads.append(a[0]) or real_load(*a, **kw))
    modality, vec = services.embed_file(query)
    scores = services.zeroshot_vector(modality, vec, ["normal", "diabetic retinopathy"])
    hits = services.search(path=query, target="ecg", k=3)
    assert len(reads) == 1
    sample = real_load(query)
    expected = classify(services.model, sample, labels=["normal", "diabetic retinopathy"])
    assert [lbl for lbl, _ in scores] == [lbl for lbl, _ in expected]
    np.testing.assert_allclose([s for _, s in scores], [s for _, s in expected], atol=1e-5)
    plain = archive_search(services.catalog(), services.model, str(query), "ecg", 3)["results"]
    assert [h["path"] for h in hits] == [h["path"] for h in plain]
    np.testing.assert_allclose([h["score"] for h in hits], [h["score"] for h in plain], atol=1e-5)
    # new content under the same name: read again
    from PIL import Image

    Image.open(RETINA).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(query)
    services.embed_file(query)
    assert len(reads) == 2
