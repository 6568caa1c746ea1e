"""The renderers carry their findings in physically sensible ways (independent measurements)."""

from __future__ import annotations

import numpy as np
import pytest

from data_registry.synthetic.ct import render_ct
from data_registry.synthetic.cxr import render_cxr
from data_registry.synthetic.ecg import LEAD_NAMES, project, render_ecg
from data_registry.synthetic.mri import SEQUENCES, render_mri
from data_registry.synthetic.pathology import render_tissue
from data_registry.synthetic.retina import render_retina

RNGS = range(6)


def _r_peaks(x: np.ndarray, fs: float) -> np.ndarray:
    """R peaks of one lead by a slow, obvious detector: local maxima above 60% of the max of a
    band-passed signal, at least 250 ms apart."""
    from scipy.signal import butter, filtfilt, find_peaks

    b, a = butter(2, [5 / (fs / 2), 30 / (fs / 2)], btype="band")
    y = filtfilt(b, a, x)
    y = np.abs(y)
    peaks, _ = find_peaks(y, height=0.5 * np.percentile(y, 99.5), distance=int(0.25 * fs))
    return peaks


def test_projection_obeys_einthoven_and_goldberger():
    d = np.random.default_rng(0).standard_normal((100, 3))
    L = project(d)
    i, ii, iii, avr, avl, avf = L[:6]
    assert np.allclose(iii, ii - i, atol=1e-5)
    assert np.allclose(avr + avl + avf, 0, atol=1e-5)
    assert np.allclose(avr, -(i + ii) / 2, atol=1e-5)
    assert len(LEAD_NAMES) == L.shape[0] == 12


@pytest.mark.parametrize("hr", [60.0, 120.0])
def test_ecg_heart_rate_matches(hr):
    fs = 500.0
    sig, rate = render_ecg({"sinus tachycardia": int(hr > 100)}, {"hr": hr}, np.random.default_rng(1), fs=fs)
    assert sig.shape == (12, 5000)
    peaks = _r_peaks(sig[1], fs)
    measured = 60.0 / np.median(np.diff(peaks) / fs)
    assert abs(measured - hr) / hr < 0.1 and abs(rate - hr) / hr < 0.1


def test_af_rr_is_irregular_and_sinus_is_not():
    fs = 500.0
    cv = {}
    for name, f in (("sinus", {}), ("af", {"atrial fibrillation": 1})):
        vals = []
        for s in RNGS:
            sig, _ = render_ecg(f, {"hr": 75, "af_rate": 75}, np.random.default_rng(s), fs=fs)
            rr = np.diff(_r_peaks(sig[1], fs)) / fs
            vals.append(rr.std() / rr.mean())
        cv[name] = np.mean(vals)
    assert cv["sinus"] < 0.06
    assert cv["af"] > 0.12


def test_lvh_raises_qrs_voltage():
    def sokolow(sig):  # Sokolow-Lyon: S in V1 + R in V5 (max over the record, mV)
        return -sig[6].min() + sig[10].max()

    normal = np.mean([sokolow(render_ecg({}, {"hr": 70}, np.random.default_rng(s))[0]) for s in RNGS])
    lvh = np.mean([sokolow(render_ecg({"left ventricular hypertrophy": 1}, {"hr": 70}, np.random.default_rng(s))[0])
                   for s in RNGS])
    assert lvh > 1.4 * normal


def test_inferior_mi_elevates_st_in_inferior_leads():
    fs = 500.0

    def st_level(sig, lead):  # mean of (J+60 ms) minus the PR segment, over beats
        peaks = _r_peaks(sig[1], fs)
        vals = [sig[lead, p + int(0.08 * fs)] - sig[lead, p - int(0.07 * fs)] for p in peaks[1:-1]]
        return float(np.mean(vals))

    inf = [LEAD_NAMES.index(x) for x in ("II", "III", "aVF")]
    d_mi, d_n = [], []
    for s in RNGS:
        mi, _ = render_ecg({"myocardial infarction": 1}, {"territory": "inferior", "hr": 70}, np.random.default_rng(s))
        n, _ = render_ecg({}, {"hr": 70}, np.random.default_rng(s))
        d_mi.append(np.mean([st_level(mi, k) for k in inf]))
        d_n.append(np.mean([st_level(n, k) for k in inf]))
    assert np.mean(d_mi) - np.mean(d_n) > 0.1  # mV


def _heart_width(img: np.ndarray) -> int:
    """Width of the bright central run on the row through the lower heart (lungs are dark)."""
    row = img[int(img.shape[0] * 0.62)]
    mid = img.shape[1] // 2
    thr = (np.percentile(row, 20) + np.percentile(row, 90)) / 2
    left = mid
    while left > 0 and row[left] > thr:
        left -= 1
    right = mid
    while right < len(row) - 1 and row[right] > thr:
        right += 1
    return right - left


def test_cxr_cardiomegaly_widens_the_heart():
    normal = [_heart_width(render_cxr({}, {"ctr": 0.42}, np.random.default_rng(s), size=128)[0]) for s in RNGS]
    big = [_heart_width(render_cxr({"cardiomegaly": 1}, {"ctr": 0.64}, np.random.default_rng(s), size=128)[0])
           for s in RNGS]
    assert np.mean(big) > 1.25 * np.mean(normal)


def test_cxr_effusion_brightens_the_costophrenic_angle():
    def angle(img):  # image left = patient's right lower lung zone
        h, w = img.shape
        return img[int(h * 0.70):int(h * 0.78), int(w * 0.12):int(w * 0.3)].mean()

    a = [angle(render_cxr({}, {}, np.random.default_rng(s))[0]) for s in RNGS]
    b = [angle(render_cxr({"pleural effusion": 1}, {"effusion_side": "right", "effusion_size": 0.8},
                          np.random.default_rng(s))[0]) for s in RNGS]
    assert np.mean(b) > np.mean(a) + 0.05


def test_ct_hounsfield_units_and_findings():
    vol, spacing = render_ct({}, {}, np.random.default_rng(0))
    assert vol.shape == (24, 64, 64) and len(spacing) == 3
    assert np.percentile(vol, 1) < -900  # air
    assert np.percentile(vol, 99.9) > 300  # bone
    # the same seed gives the same anatomy, so the difference isolates the finding: it must add
    # a visible amount of tissue-dense voxels (at least 200 HU denser than the lung there)
    denser = lambda f, a, s: int(((render_ct(f, a, np.random.default_rng(s))[0]
                                   - render_ct({}, {}, np.random.default_rng(s))[0]) > 200).sum())
    for f, a in (({"lung nodule": 1}, {"nodule_mm": 25}), ({"consolidation": 1}, {}),
                 ({"pleural effusion": 1}, {"effusion_side": "bilateral"})):
        assert np.mean([denser(f, a, s) for s in range(3)]) > 20, f
    # the nodule's core is soft tissue (above -300 HU) even after slab averaging
    nod = render_ct({"lung nodule": 1}, {"nodule_mm": 25}, np.random.default_rng(0))[0]
    assert (nod - render_ct({}, {}, np.random.default_rng(0))[0]).max() > 500


def test_mri_sequence_contrast_and_lesions():
    vols, _ = render_mri({}, {}, np.random.default_rng(0))
    assert set(vols) == set(SEQUENCES)
    t1, t2 = vols["t1"], vols["t2"]
    # ventricles (CSF): dark on T1, bright on T2 -> the brightest T2 voxels are dark on T1
    csf = t2 > np.percentile(t2, 99)
    assert t1[csf].mean() < 0.5 * np.percentile(t1, 95)  # white matter and scalp fat are bright on T1
    stroke, _ = render_mri({"acute ischemic stroke": 1}, {"stroke_side": "left"}, np.random.default_rng(0))
    assert stroke["dwi"].max() > 1.5 * vols["dwi"].max()
    wml, _ = render_mri({"white matter lesions": 1}, {"n_wml": 10}, np.random.default_rng(0))
    assert (wml["flair"] > 850).sum() > (vols["flair"] > 850).sum() + 5


def test_retina_lesions_increase_with_grade():
    def yellow(img):  # hard exudates: bright, red and green high, blue lower
        r, g, b = (img[..., k].astype(int) for k in range(3))
        return int(((r > 190) & (g > 170) & (b < 150)).sum())

    def dark_red(img):  # haemorrhages / microaneurysms
        r, g = (img[..., k].astype(int) for k in range(2))
        return int(((r < 130) & (r > 60) & (g < 40)).sum())

    g0 = [render_retina({}, {"dr_grade": 0}, np.random.default_rng(s)) for s in range(3)]
    f3 = {"microaneurysms": 1, "haemorrhages": 1, "hard exudates": 1, "venous beading": 1}
    g3 = [render_retina(f3, {"dr_grade": 3}, np.random.default_rng(s)) for s in range(3)]
    assert g0[0].shape == (128, 128, 3) and g0[0].dtype == np.uint8
    assert np.mean([yellow(x) for x in g3]) > np.mean([yellow(x) for x in g0]) + 10
    assert np.mean([dark_red(x) for x in g3]) > np.mean([dark_red(x) for x in g0])
    assert g0[0][0, 0].max() == 0  # outside the circular field of view


def test_pathology_grade_increases_nuclear_area():
    def nuclear(img):  # haematoxylin-rich pixels: dark and blue-purple
        return float(((img.mean(-1) < 150) & (img[..., 2] > img[..., 1])).mean())

    frac = {g: np.mean([nuclear(render_tissue(g, np.random.default_rng(s))) for s in range(3)]) for g in (0, 1, 2)}
    assert frac[0] < frac[1] and frac[0] < frac[2]
