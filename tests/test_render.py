"""Previews: geometry of the ECG sheet, windows, orientation, tiling overlay, no identifiers."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from m3bind.io import load
from m3bind.io.sample import Sample
from m3bind.render import WINDOW_PRESETS, preview, render_ecg, render_volume, save_preview, window_array


def test_window_presets_and_mapping():
    assert WINDOW_PRESETS["lung"] == (-600.0, 1500.0) and WINDOW_PRESETS["brain"] == (40.0, 80.0)
    np.testing.assert_allclose(window_array(np.array([-1350.0, -600.0, 150.0]), -600, 1500), [0, 0.5, 1])


def test_ct_slice_window_and_orientation():
    vol = np.full((3, 40, 60), -1000.0, np.float32)
    vol[1, :, 30:] = 40.0  # soft tissue in the patient's left half (array right) of the middle slice
    s = Sample(vol, "ct", "dicom", "v", spacing=(5.0, 1.0, 1.0), meta={"plane": "axial"})
    img, lines = render_volume(s, window="mediastinum")
    assert img.dtype == np.uint8 and img.ndim == 3
    h, w = img.shape[:2]
    assert w / h == pytest.approx(60 / 40, rel=0.02)  # square millimetres
    # window 40/400: air black, 40 HU mid-grey; viewer's right = array right
    assert img[h // 2, w // 8].max() < 5 and abs(int(img[h // 2, 7 * w // 8, 0]) - 128) <= 2
    assert "slice 2/3" in lines[0] and "40/400" in lines[0]
    img_lung, _ = render_volume(s, window="lung", slice=0)
    # slice 0 is all air: -1000 HU in the lung window reads (−1000 − (−1350)) / 1500 of full scale
    assert abs(int(img_lung[h // 2, 7 * w // 8, 0]) - round(255 * 350 / 1500)) <= 1


def test_ecg_sheet_is_25_mm_per_s_and_10_mm_per_mv():
    fs = 500.0
    t = np.arange(int(10 * fs)) / fs
    sig = np.zeros((12, len(t)), np.float32)
    sig[1] = np.where((t % 1.0) < 0.02, 1.0, 0.0)  # 1 mV square pulses once a second in lead II
    s = Sample(sig, "ecg", "wfdb", "r", sampling_rate=fs, lead_names=["I", "II", "III", "aVR", "aVL", "aVF",
                                                                        "V1", "V2", "V3", "V4", "V5", "V6"])
    dpi = 127  # 5 px per mm
    img, _ = render_ecg(s, dpi=dpi, display_band=None)
    px_per_mm = dpi / 25.4
    assert img.shape[1] == pytest.approx((12 + 250 + 4) * px_per_mm, abs=2)
    dark = (img.max(axis=-1) < 80)
    H = img.shape[0]
    base_mm = (12 + 4 * 35 + 4) - 12 - 3 * 35 - 35 / 2  # rhythm-strip baseline, mm from the bottom

    def row(mm):  # image row of a height in mm above the bottom edge
        return int(round(H - mm * px_per_mm))

    # rhythm strip (lead II): the pulse tops (6-11 mm above baseline) recur every 25 mm
    band = dark[row(base_mm + 11):row(base_mm + 6)]
    cols = np.nonzero(band.any(axis=0))[0]
    cols = cols[cols > 14 * px_per_mm]  # skip the calibration pulse
    starts = cols[np.r_[True, np.diff(cols) > 20]]
    gaps = np.diff(starts) / px_per_mm
    assert len(gaps) >= 8 and np.median(gaps) == pytest.approx(25.0, abs=0.6)
    # pulse height: 1 mV = 10 mm
    col = starts[2] + 1
    rows = np.nonzero(dark[row(base_mm + 15):row(base_mm - 3), col - 1:col + 2].any(axis=1))[0]
    assert (rows.max() - rows.min()) / px_per_mm == pytest.approx(10.0, abs=0.5)
    # red millimetre grid present
    r, g = img[..., 0].astype(int), img[..., 1].astype(int)
    assert ((r > 200) & (g < 220) & (g > 90)).mean() > 0.05


def test_missing_leads_labelled(sample_file):
    s = load(sample_file("ecg_dicom"))
    s.meta["lead_mask"] = [True] * 11 + [False]
    img = preview(s)
    assert img.shape[2] == 3


def test_slide_thumbnail_outlines_tiles(sample_file):
    s = load(sample_file("slide"))
    img = preview(s, caption=False)
    green = (img[..., 1] > 150) & (img[..., 0] < 40) & (img[..., 2] < 40)
    assert green.sum() > 1000
    x, y = s.meta["tile_grid"]["coords"][0]
    sy, sx = s.meta["thumbnail_scale"]
    assert green[int(y * sy), int(x * sx) + 5: int(x * sx) + 40].any()


def test_previews_of_every_real_sample_carry_no_identifiers(sample_files, tmp_path):
    names = ["ecg_dicom", "ct_dicom", "cxr_dicom", "enhanced_mr", "retina", "nifti_4d", "mni_t1", "slide", "ct_512"]
    for name in names:
        if name not in sample_files:
            continue
        s = load(sample_files[name])
        out = save_preview(s, tmp_path / f"{name}.png")
        from PIL import Image

        im = np.asarray(Image.open(out))
        assert im.ndim == 3 and im.shape[2] == 3 and min(im.shape[:2]) >= 100, name
        assert im.std() > 10, name
    # the caption is built from non-identifying fields only
    ds = pydicom.dcmread(sample_files["ecg_dicom"], stop_before_pixels=True)
    s = load(sample_files["ecg_dicom"], keep_phi=True)
    from m3bind import render

    captured = []
    orig = render._with_caption
    render._with_caption = lambda img, lines, **kw: captured.extend(lines) or orig(img, lines, **kw)
    try:
        preview(s)
    finally:
        render._with_caption = orig
    text = " ".join(captured)
    assert str(ds.PatientName) not in text and str(ds.PatientID) not in text
