"""End to end: the app in headless Chromium (Debian's ``/usr/bin/chromium`` driven by Playwright).

Uploads a real chest radiograph and a real 12-lead ECG, checks the viewer and metadata, reads
the zero-shot scores and the cross-modal search results back from the page and compares them
with the library's own answer. Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed"),
]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    pytest.importorskip("playwright.sync_api")
    from samples import sample_path

    from app.web.state import Services
    from app.web.testing import build_archive, start_server, synthetic_cxr, tiny_model_dir
    from data_registry.indexer import index_archive

    ECG, CT, RETINA = sample_path("ecg_dicom"), sample_path("ct_dicom"), sample_path("retina")
    if ECG is None:
        pytest.skip("pydicom's waveform_ecg.dcm is not installed")

    tmp = tmp_path_factory.mktemp("app_browser")
    model_dir = tiny_model_dir(tmp_path_factory.getbasetemp())
    cxr = sample_path("cxr_dicom") or synthetic_cxr(tmp / "cohort")
    files = {"cxr": [cxr], "ecg": [ECG], "ct": [CT], "retina": [RETINA]}
    archive = build_archive(tmp / "archive", {m: p for m, p in files.items() if p[0] is not None})
    url = f"sqlite:///{tmp / 'catalog.db'}"
    index_archive(archive, url, str(model_dir), workers=0, progress=False)
    services = Services(model_dir, url, archive, prompt_dir=tmp / "prompts", work_dir=tmp / "work",
                        index_workers=0)
    demo, app_url = start_server(services)
    yield {"url": app_url, "services": services, "cxr": cxr, "ecg": ECG}
    demo.close()


@pytest.fixture(scope="module")
def page(app_url):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"])
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(30_000)
        external = []
        pg.on("request", lambda r: external.append(r.url)
              if not r.url.startswith(("http://127.0.0.1", "data:", "blob:")) else None)
        pg.goto(app_url["url"])
        pg.wait_for_selector("#viewer")
        yield pg
        browser.close()
        assert external == [], f"the page fetched from the internet: {external[:3]}"


def _tab(pg, name: str) -> None:
    pg.get_by_role("tab", name=name).click()


def _upload(pg, path: Path) -> None:
    """Upload ``path`` in Explore and wait until it is open (the header names it as uploaded)."""
    pg.locator("#upload input[type=file]").set_input_files(str(path))
    pg.wait_for_function(
        "(n) => { const t = document.querySelector('#item').innerText;"
        " return t.includes(n) && t.includes('uploaded'); }", arg=path.name)
    pg.locator("#viewer img").wait_for()


def _scores(pg) -> dict[str, float]:
    """The zero-shot label scores shown by the Label component (label -> fraction)."""
    text = pg.locator("#zs-out").inner_text()
    pairs = re.findall(r"^(.+?)\s*\n?\s*(\d+(?:\.\d+)?)%\s*$", text, flags=re.MULTILINE)
    return {lbl.strip(): float(v) / 100 for lbl, v in pairs}


def test_cxr_upload_view_zeroshot_and_search(page, app_url):
    import numpy as np

    from m3bind.io import load
    from m3bind.modalities import SPECS
    from m3bind.zeroshot import classify

    services = app_url["services"]
    _upload(page, app_url["cxr"])
    page.get_by_text("Chest X-ray").first.wait_for()
    meta = page.locator("#meta").inner_text()
    assert "dicom" in meta and "Chest X-ray" in meta
    assert page.locator("#wl-centre").is_visible() and page.locator("#wl-width").is_visible()
    page.screenshot(path=str(ARTIFACTS / "01_explore_cxr.png"), full_page=True)

    _tab(page, "Zero-shot")
    assert page.locator("#zs-labels textarea").input_value() == ", ".join(SPECS["cxr"].labels)
    page.locator("#zs-run").click()
    page.wait_for_function("() => /%/.test(document.querySelector('#zs-out').innerText)")
    shown = _scores(page)
    expected = classify(services.model, load(app_url["cxr"]))
    assert set(shown) == set(SPECS["cxr"].labels)
    for label, score in expected:
        assert shown[label] == pytest.approx(score, abs=0.01)
    page.screenshot(path=str(ARTIFACTS / "02_zeroshot_cxr.png"), full_page=True)

    _tab(page, "Search")
    page.locator("#s-target").get_by_text("12-lead ECG").click()
    page.locator("#s-similar").click()
    page.wait_for_function("() => document.querySelector('#s-table').innerText.includes('waveform_ecg')")
    table = page.locator("#s-table").inner_text()
    cosine = float(np.dot(*services.model.embed([load(app_url["cxr"]), load(app_url["ecg"])])))
    assert f"{round(cosine, 4):g}" in table
    assert page.locator("#s-gallery img").count() >= 1
    page.screenshot(path=str(ARTIFACTS / "03_search_cxr_to_ecg.png"), full_page=True)

    # open the result in Explore: the ECG grid replaces the radiograph
    page.locator("#s-table [role=gridcell]").filter(has_text="waveform_ecg").first.click()
    page.wait_for_function("() => document.body.innerText.includes('Selected #1')")
    page.locator("#s-open").click()
    page.wait_for_function("() => document.querySelector('#item').innerText.includes('archive: ecg/')")
    assert page.get_by_role("tab", name="Explore").get_attribute("aria-selected") == "true"


def test_ecg_upload_zeroshot_with_edited_labels(page, app_url):
    from m3bind.modalities import SPECS

    _tab(page, "Explore")
    _upload(page, app_url["ecg"])
    assert "12-lead ECG" in page.locator("#item").inner_text()
    meta = page.locator("#meta").inner_text()
    assert "V6" in meta and "Hz" in meta
    page.screenshot(path=str(ARTIFACTS / "04_explore_ecg.png"), full_page=True)

    _tab(page, "Zero-shot")
    assert page.locator("#zs-labels textarea").input_value() == ", ".join(SPECS["ecg"].labels)
    page.locator("#zs-labels textarea").fill("atrial fibrillation, normal sinus rhythm")
    page.locator("#zs-run").click()
    page.wait_for_function(
        "() => { const t = document.querySelector('#zs-out').innerText;"
        " return /%/.test(t) && !/cardiomegaly/.test(t); }")
    shown = _scores(page)
    assert set(shown) == {"atrial fibrillation", "normal sinus rhythm"}
    assert sum(shown.values()) == pytest.approx(1.0, abs=0.02)
    page.screenshot(path=str(ARTIFACTS / "05_zeroshot_ecg.png"), full_page=True)

    # the edited labels saved as a prompt set, replaced by the defaults, then loaded back
    page.locator("#ps").get_by_text("Prompt sets").click()
    page.locator("#ps-name input, #ps-name textarea").first.fill("af vs sinus")
    page.locator("#ps-save").click()
    page.wait_for_function("() => /af vs sinus/.test(document.querySelector('#ps-pick').innerText"
                           " + document.querySelector('#ps-pick input').value)")
    page.locator("#zs-reset").click()
    labels = page.locator("#zs-labels textarea")
    page.wait_for_function("() => document.querySelector('#zs-labels textarea').value.includes('tachycardia')")
    page.locator("#ps-load").click()
    page.wait_for_function("() => !document.querySelector('#zs-labels textarea').value.includes('tachycardia')")
    assert labels.input_value() == "atrial fibrillation, normal sinus rhythm"
    saved = app_url["services"].prompt_sets()["af vs sinus"]
    assert saved["modality"] == "ecg" and saved["labels"] == ["atrial fibrillation", "normal sinus rhythm"]


def test_archive_browse_and_embedding_map(page, app_url):
    _tab(page, "Archive")
    page.wait_for_function("() => /4 items, 0 failures/.test(document.body.innerText)")
    page.locator("#a-index").click()  # incremental: nothing changed since the fixture indexed
    page.wait_for_function("() => /0 added, 4 unchanged, 0 failed/.test(document.body.innerText)")
    page.locator("#a-patient input").click()
    page.locator("#a-patient [role=option]").filter(has_text="ecg").first.click()
    page.wait_for_function("() => document.querySelector('#a-items').innerText.includes('waveform_ecg')")
    page.screenshot(path=str(ARTIFACTS / "06_archive.png"), full_page=True)

    _tab(page, "Embedding map")
    page.locator("#m-draw").click()
    page.wait_for_function("() => /4 items, PCA/.test(document.body.innerText)")
    page.locator("#m-plot img").first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "07_embedding_map.png"), full_page=True)


def test_bad_upload_shows_message_not_crash(page, app_url, tmp_path):
    _tab(page, "Explore")
    bad = tmp_path / "truncated.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    page.locator("#upload input[type=file]").set_input_files(str(bad))
    toast = page.get_by_text(re.compile(r"\(truncated\.dcm\)"))  # the one-line error, in a toast
    toast.first.wait_for()
    assert "Traceback" not in page.locator("body").inner_text()
    page.screenshot(path=str(ARTIFACTS / "08_error_message.png"), full_page=True)
    assert page.locator("#viewer").is_visible()  # the page still works
