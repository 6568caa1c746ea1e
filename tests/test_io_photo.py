"""Photographs: fundus field of view, pathology tiles, grey radiographs, TIFF, modality guessing."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from m3bind.errors import UnsupportedFormat
from m3bind.io import detect, load
from m3bind.io.photo import fov_geometry, fov_mask


def test_retina_guessed_with_whole_field_of_view(sample_file):
    path = sample_file("retina")
    assert detect(path) == ("jpeg", None)
    s = load(path)
    assert (s.modality, s.modality_guess, s.format) == ("retina", True, "jpeg")
    raw = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(s.array, raw)  # never cropped by the reader
    # independent FOV: pixels brighter than 20 in any channel
    ys, xs = np.nonzero(raw.max(axis=-1) > 20)
    fov = s.meta["fov"]
    y0, x0, y1, x1 = fov["bbox"]
    assert abs(y0 - ys.min()) <= 12 and abs(x0 - xs.min()) <= 12
    assert abs(y1 - ys.max() - 1) <= 12 and abs(x1 - xs.max() - 1) <= 12
    assert fov["radius"] == pytest.approx(np.sqrt(len(ys) / np.pi), rel=0.03)
    assert not load(path, "retina").modality_guess


def test_fov_geometry_of_a_drawn_disc():
    img = np.zeros((200, 300, 3), np.uint8)
    yy, xx = np.mgrid[:200, :300]
    disc = (yy - 100) ** 2 + (xx - 140) ** 2 <= 80 ** 2
    img[disc] = (180, 90, 40)
    g = fov_geometry(fov_mask(img))
    assert g["center"] == pytest.approx([100, 140], abs=0.5)
    assert g["radius"] == pytest.approx(80, rel=0.02)
    assert g["bbox"] == [20, 60, 181, 221]


def test_grey_png_is_a_radiograph(sample_file, tmp_path):
    path = sample_file("grey_png")
    s = load(path)
    assert (s.modality, s.modality_guess) == ("cxr", True)
    np.testing.assert_allclose(s.array, np.asarray(Image.open(path), np.float32) / 255.0)
    x16 = (np.arange(64 * 32, dtype=np.uint16).reshape(64, 32) * 31).astype(np.uint16)
    Image.fromarray(x16).save(tmp_path / "g16.png")
    s16 = load(tmp_path / "g16.png")
    np.testing.assert_allclose(s16.array, x16 / 65535.0, atol=1e-6)


def _he_tile(size=128, seed=0):
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 240, np.uint8)  # glass
    yy, xx = np.mgrid[:size, :size]
    tissue = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 2.5) ** 2
    img[tissue] = (200, 120, 180)  # eosin pink
    nuclei = tissue & (rng.random((size, size)) < 0.15)
    img[nuclei] = (90, 60, 150)  # haematoxylin purple
    return img


def test_he_tile_guessed_pathology(tmp_path):
    Image.fromarray(_he_tile()).save(tmp_path / "tile.png")
    s = load(tmp_path / "tile.png")
    assert (s.modality, s.modality_guess) == ("pathology", True)
    assert s.tiles.shape == (1, 128, 128, 3)


def test_tiff_photo(tmp_path):
    tile = _he_tile(96)
    tifffile.imwrite(tmp_path / "tile.tif", tile)
    assert detect(tmp_path / "tile.tif") == ("tiff", None)
    s = load(tmp_path / "tile.tif", "pathology")
    np.testing.assert_array_equal(s.array, tile)


def test_wrong_or_unknown_modality(tmp_path):
    Image.fromarray(_he_tile()).save(tmp_path / "tile.png")
    with pytest.raises(UnsupportedFormat, match="cannot hold ct"):
        load(tmp_path / "tile.png", "ct")
    green = np.zeros((64, 64, 3), np.uint8)
    green[..., 1] = 200
    green[::2, ::2, 0] = 60
    Image.fromarray(green).save(tmp_path / "lawn.jpg")
    with pytest.raises(UnsupportedFormat, match="pass a modality"):
        load(tmp_path / "lawn.jpg")
    assert load(tmp_path / "lawn.jpg", "retina").array.shape == (64, 64, 3)
