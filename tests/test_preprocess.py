"""Per-modality preprocessing checked against independent computations."""

from __future__ import annotations

import numpy as np
import pytest

from m3bind.errors import ConfigError
from m3bind.io import load
from m3bind.io.sample import Sample
from m3bind.modalities import MODALITIES
from m3bind.preprocess import (PREPROCESSORS, apply_hu_window, bandpass, macenko_normalize, macenko_stains,
                               preprocess, resample_signal, resize_volume)


def test_every_modality_has_a_preprocessor():
    assert sorted(PREPROCESSORS.names()) == sorted(MODALITIES)


def test_unknown_parameter_rejected():
    s = Sample(np.zeros((10, 10), np.float32), "cxr", "png", "x.png")
    with pytest.raises(ConfigError, match="gamma"):
        preprocess(s, gamma=2)


# ---------------------------------------------------------------------------- CXR
def test_cxr_aspect_ratio_preserved_and_padded():
    img = np.zeros((100, 50), np.float32)
    img[20:60, 10:30] = 1.0  # a 40 x 20 bright block
    x = preprocess(Sample(img, "cxr", "png", "x.png"), size=224)
    assert x.shape == (1, 224, 224) and x.dtype == np.float32
    assert x.min() == pytest.approx(-1.0) and x.max() == pytest.approx(1.0, abs=1e-3)
    # the 100x50 image becomes 224x112 centred: columns 56..167 hold the image
    cols = np.nonzero((x[0] > -1 + 1e-3).any(axis=0))[0]
    rows = np.nonzero((x[0] > -1 + 1e-3).any(axis=1))[0]
    bright_h, bright_w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert bright_h / bright_w == pytest.approx(2.0, rel=0.06)
    assert 56 <= cols.min() and cols.max() <= 167


def test_cxr_real_radiograph(sample_file):
    x = preprocess(load(sample_file("cxr_dicom")))
    assert x.shape == (1, 224, 224) and -1 <= x.min() and x.max() <= 1


# ---------------------------------------------------------------------------- fundus
def test_fundus_keeps_its_field_of_view(sample_file):
    s = load(sample_file("retina"))
    x = preprocess(s, size=224)
    assert x.shape == (3, 224, 224)
    bright = ((x + 1) / 2 * 255).max(axis=0) > 20
    ys, xs = np.nonzero(bright)
    # the FOV spans the whole crop in both directions (nothing cut, little margin)
    assert ys.min() <= 3 and xs.min() <= 3 and ys.max() >= 220 and xs.max() >= 220
    # the FOV's share of the crop equals its share of its own bounding square in the original
    raw = s.array.max(axis=-1) > 20
    ry, rx = np.nonzero(raw)
    side = max(np.ptp(ry) + 1, np.ptp(rx) + 1)
    assert bright.mean() == pytest.approx(raw.sum() / side**2, abs=0.02)


def test_fundus_fov_touching_the_edge_is_not_cut():
    img = np.zeros((300, 400, 3), np.uint8)
    yy, xx = np.mgrid[:300, :400]
    disc = (yy - 150) ** 2 + (xx - 200) ** 2 <= 170 ** 2  # taller than the image: clipped top/bottom
    img[disc] = (200, 100, 50)
    x = preprocess(Sample(img, "retina", "png", "f.png"), size=170)
    inside = ((x + 1) / 2).max(axis=0) > 0.1
    # the crop is a 340x340 square around the disc (black bands above/below), scaled by 1/2
    assert inside.sum() == pytest.approx(disc.sum() / 4, rel=0.03)


# ---------------------------------------------------------------------------- CT
def test_hu_window_maps_minus_1000_and_400():
    hu = np.array([-2000, -1000, -300, 400, 3000], np.float32)
    np.testing.assert_allclose(apply_hu_window(hu, -1000, 400), [0, 0, 0.5, 1, 1])
    vol = np.full((4, 8, 8), -1000.0, np.float32)
    vol[:, :, 4:] = 400.0
    s = Sample(vol, "ct", "dicom", "v", spacing=(5.0, 2.5, 2.5))
    x = preprocess(s, grid=(4, 8, 8), spacing=(5.0, 2.5, 2.5), hu_window=(-1000.0, 400.0))
    assert x.shape == (1, 4, 8, 8)
    np.testing.assert_allclose(x[0, :, :, :4], -1.0)
    np.testing.assert_allclose(x[0, :, :, 4:], 1.0)


def test_ct_resampling_to_fixed_spacing_keeps_physical_size():
    z, y, xx = np.meshgrid(np.arange(20), np.arange(40), np.arange(40), indexing="ij")
    hu = (-1000 + 20 * xx).astype(np.float32)  # linear in x: -1000..-220 HU over 40 voxels of 1 mm
    s = Sample(hu, "ct", "dicom", "v", spacing=(2.0, 1.0, 1.0))
    out = preprocess(s, grid=(10, 20, 20), spacing=(4.0, 2.0, 2.0), hu_window=(-1000.0, 0.0))[0]
    assert out.shape == (10, 20, 20)
    # linear functions survive linear interpolation: the new voxel k (centre at 2k+0.5 mm) reads
    # HU = -1000 + 20*(2k+0.5); away from the edge the profile is exact
    k = np.arange(1, 19)
    expected = ((-1000 + 20 * (2 * k + 0.5)) + 1000) / 1000.0 * 2 - 1
    np.testing.assert_allclose(out[5, 10, 1:19], expected, atol=1e-5)


def test_ct_real_slice(sample_file):
    x = preprocess(load(sample_file("ct_dicom")))
    assert x.shape == (1, 64, 128, 128)


# ---------------------------------------------------------------------------- MRI
def test_mri_zscore_within_brain_mask_and_missing_sequences_zero():
    rng = np.random.default_rng(0)
    v = np.zeros((8, 16, 16), np.float32)
    v[2:6, 4:12, 4:12] = 300 + 20 * rng.standard_normal((4, 8, 8))  # all far above the mask threshold
    s = Sample(np.stack([v, 2 * v]), "mri", "nifti", "d", channel_names=["t2", "flair"])
    x = preprocess(s, grid=(8, 16, 16), sequences=("t1", "t2", "flair", "dwi"))
    assert x.shape == (4, 8, 16, 16)
    assert not x[0].any() and not x[3].any()
    inside = v > 0
    for c in (1, 2):
        assert x[c][inside].mean() == pytest.approx(0, abs=1e-4)
        assert x[c][inside].std() == pytest.approx(1, abs=1e-3)
        assert not x[c][~inside].any()
    np.testing.assert_allclose(x[1], x[2], atol=1e-5)  # z-score is scale invariant


def test_mri_single_volume_goes_to_its_sequence_slot(sample_file):
    s = load(sample_file("mni_t1"))
    s.meta["sequence"] = "flair"
    x = preprocess(s, grid=(24, 64, 64))
    assert x.shape == (4, 24, 64, 64) and x[2].any() and not x[0].any()


# ---------------------------------------------------------------------------- ECG
def _peak_hz(x, fs):
    spec = np.abs(np.fft.rfft(x - x.mean()))
    return np.fft.rfftfreq(len(x), 1 / fs)[np.argmax(spec)]


def test_resampling_keeps_frequency():
    fs = 500.0
    t = np.arange(int(10 * fs)) / fs
    x = np.sin(2 * np.pi * 7.0 * t)
    y = resample_signal(x[None], fs, 100.0)[0]
    assert len(y) == 1000
    assert _peak_hz(y, 100.0) == pytest.approx(7.0, abs=0.1)
    np.testing.assert_allclose(y[50:-50], np.sin(2 * np.pi * 7.0 * np.arange(1000) / 100)[50:-50], atol=0.02)


def test_bandpass_removes_baseline_wander():
    fs = 100.0
    t = np.arange(int(20 * fs)) / fs
    wander, qrs_band = 2.0 * np.sin(2 * np.pi * 0.1 * t), 0.5 * np.sin(2 * np.pi * 10 * t)
    y = bandpass((wander + qrs_band)[None], fs, (0.5, 40.0))[0]
    f = np.fft.rfftfreq(len(t), 1 / fs)
    amp = lambda s, hz: 2 * np.abs(np.fft.rfft(s))[np.argmin(np.abs(f - hz))] / len(s)  # noqa: E731
    assert amp(y, 0.1) < 0.02 * 2.0  # wander attenuated > 34 dB
    assert amp(y, 10.0) == pytest.approx(0.5, rel=0.03)  # passband kept


def test_ecg_crop_pad_and_per_lead_normalisation():
    fs = 250.0
    t = np.arange(int(5 * fs)) / fs
    sig = np.zeros((12, len(t)), np.float32)
    sig[1] = np.sin(2 * np.pi * 5 * t)
    sig[7] = 3 * np.sin(2 * np.pi * 3 * t)
    s = Sample(sig, "ecg", "wfdb", "r", sampling_rate=fs)
    x = preprocess(s)
    assert x.shape == (12, 1000)
    assert not x[:, 500:].any(), "5 s record: the last 5 s are zero padding"
    for lead in (1, 7):
        assert x[lead, :500].mean() == pytest.approx(0, abs=1e-5)
        assert x[lead, :500].std() == pytest.approx(1, abs=1e-4)
    assert not x[0].any()  # flat (missing) lead stays zero
    long = Sample(np.tile(sig, 3), "ecg", "wfdb", "r", sampling_rate=fs)  # 15 s: cropped to 10 s
    assert preprocess(long).shape == (12, 1000)


def test_real_ecg(sample_file):
    s = load(sample_file("ecg_dicom"))
    x = preprocess(s)
    assert x.shape == (12, 1000)
    ii = resample_signal(s.array[1][None], 1000.0, 100.0)[0]
    assert np.corrcoef(x[1], ii[:1000])[0, 1] > 0.8  # still lead II


# ---------------------------------------------------------------------------- pathology
def test_macenko_recovers_known_stain_vectors():
    rng = np.random.default_rng(0)
    he = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]])
    he /= np.linalg.norm(he, axis=0)
    conc = np.abs(rng.gamma(2.0, 0.4, size=(2, 4096)))
    conc[:, rng.random(4096) < 0.5] *= np.array([[1.0], [0.05]])  # nuclei-rich and stroma-rich pixels
    rgb = np.clip(240 * np.exp(-(he @ conc)), 0, 255).T.reshape(64, 64, 3).astype(np.uint8)
    stains, _ = macenko_stains(rgb)
    cos = np.sum(stains * he, axis=0)
    assert cos.min() > 0.98
    out = macenko_normalize(rgb)
    assert out.shape == rgb.shape and out.dtype == np.uint8


def test_pathology_tiles_from_slide(sample_file):
    s = load(sample_file("slide"))
    x = preprocess(s, max_tiles=4)
    assert x.shape == (4, 3, 224, 224)
    np.testing.assert_allclose(x[0], np.moveaxis(s.tiles[0] / 255.0, -1, 0) * 2 - 1, atol=1e-6)
    y = preprocess(s, max_tiles=2, stain_norm=True)
    assert y.shape == (2, 3, 224, 224)


def test_pathology_photo_is_one_tile():
    img = np.full((100, 200, 3), 230, np.uint8)
    x = preprocess(Sample(img, "pathology", "png", "t.png", tiles=img[None]), size=64)
    assert x.shape == (1, 3, 64, 64)


def test_resize_volume_shrink_is_slab_mean():
    """Shrinking by whole factors gives the mean of each block (numpy reshape, independent)."""
    rng = np.random.default_rng(3)
    vol = rng.normal(size=(24, 12, 10)).astype(np.float32)
    out = resize_volume(vol, (8, 4, 5))
    expected = vol.reshape(8, 3, 4, 3, 5, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(out, expected, atol=1e-5)
    # A thin bright slab survives the shrink as its share of the block (no slice skipping).
    spike = np.zeros((30, 4, 4), np.float32)
    spike[16] = 30.0
    assert resize_volume(spike, (6, 4, 4))[3].mean() == pytest.approx(6.0, abs=1e-4)


def test_resize_volume_grow_and_mixed_axes():
    """Growing keeps a linear ramp linear (trilinear); a shrunk axis is averaged, a grown one
    interpolated, channels kept."""
    ramp = np.broadcast_to(np.arange(6, dtype=np.float32)[None, :, None], (4, 6, 5)).copy()
    up = resize_volume(ramp, (4, 12, 5))
    # align_corners=False: output y maps to source (y + 0.5) / 2 - 0.5, clamped at the edges.
    src = np.clip((np.arange(12) + 0.5) / 2 - 0.5, 0, 5)
    np.testing.assert_allclose(up[0, :, 0], src, atol=1e-5)
    vol = np.stack([ramp, 2 * ramp])                     # [C=2, Z, Y, X]
    mixed = resize_volume(vol, (2, 12, 5))
    assert mixed.shape == (2, 2, 12, 5)
    np.testing.assert_allclose(mixed[1], 2 * mixed[0], atol=1e-5)
    np.testing.assert_allclose(mixed[0, 0, :, 0], src, atol=1e-5)
