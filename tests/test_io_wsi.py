"""Whole-slide images through OpenSlide: levels, magnification, tissue detection, tiling."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from m3bind.io import detect, load
from m3bind.io.wsi import tissue_mask


def test_aperio_slide_levels_magnification_and_tiles(sample_file):
    path = sample_file("slide")
    assert detect(path) == ("wsi", "pathology")
    s = load(path)
    m = s.meta
    with openslide.OpenSlide(str(path)) as ref:
        assert m["level_count"] == ref.level_count == 1
        assert m["dimensions"] == list(ref.dimensions) == [2220, 2967]
        assert m["objective_power"] == 20.0 and not m["objective_power_derived"]
        assert m["mpp"] == pytest.approx([0.499, 0.499])
        assert m["vendor"] == "aperio"
        grid = m["tile_grid"]
        assert grid["magnification"] == 20.0 and grid["tile_size_level0"] == 224
        assert (grid["rows"], grid["cols"]) == (2967 // 224, 2220 // 224)
        assert 10 <= len(s.tiles) == grid["n_tiles"] <= 64 and s.tiles.shape[1:] == (224, 224, 3)
        # each tile is exactly the level-0 region at its coordinates (20x scan, 20x target)
        for k in (0, len(s.tiles) - 1):
            x, y = grid["coords"][k]
            ref_tile = np.asarray(ref.read_region((x, y), 0, (224, 224)).convert("RGB"))
            np.testing.assert_array_equal(s.tiles[k], ref_tile)
    assert grid["tissue"] == sorted(grid["tissue"], reverse=True) and min(grid["tissue"]) >= 0.5
    assert s.tiles.mean(axis=(1, 2, 3)).max() < 225, "tissue tiles, not glass"
    assert s.array.dtype == np.uint8 and max(s.array.shape[:2]) == 1024  # the thumbnail
    assert s.spacing == pytest.approx((0.499 * 2967 / 1024 / 1000,) * 2, rel=0.01)


def test_tiling_at_10x_reads_twice_the_field(sample_file):
    path = sample_file("slide")
    s = load(path, magnification=10.0, max_tiles=3)
    grid = s.meta["tile_grid"]
    assert grid["tile_size_level0"] == 448 and len(s.tiles) == 3
    x, y = grid["coords"][0]
    with openslide.OpenSlide(str(path)) as ref:
        region = ref.read_region((x, y), 0, (448, 448)).convert("RGB")
    expected = np.asarray(region.resize((224, 224), Image.Resampling.LANCZOS))
    assert np.abs(s.tiles[0].astype(int) - expected).mean() < 1.0


def test_generic_tiled_tiff_pyramid(tmp_path):
    img = np.full((1024, 1536, 3), 240, np.uint8)
    img[224:672, 448:1120] = (200, 120, 180)  # tissue exactly covering grid cells rows 1-2, cols 2-4
    path = tmp_path / "slide.tif"
    with tifffile.TiffWriter(path) as tw:
        for step, sub in ((1, 0), (4, 1)):
            tw.write(np.ascontiguousarray(img[::step, ::step]), tile=(256, 256), photometric="rgb",
                     resolution=(1e4 / (0.5 * step),) * 2, resolutionunit="CENTIMETER", subfiletype=sub)
    assert detect(path) == ("wsi", "pathology")
    s = load(path)
    assert s.meta["level_count"] == 2 and s.meta["mpp"] == pytest.approx([0.5, 0.5])
    assert s.meta["objective_power"] == 20.0 and s.meta["objective_power_derived"]
    coords = sorted(map(tuple, s.meta["tile_grid"]["coords"]))
    assert coords == [(c * 224, r * 224) for c in (2, 3, 4) for r in (1, 2)]
    assert (s.tiles == np.array([200, 120, 180], np.uint8)).all()


def test_tissue_mask_otsu_on_saturation():
    img = np.full((100, 100, 3), 245, np.uint8)
    img[20:60, 30:90] = (190, 110, 170)
    mask, thr = tissue_mask(img)
    assert 0.05 <= thr < 0.4
    expected = np.zeros((100, 100), bool)
    expected[20:60, 30:90] = True
    np.testing.assert_array_equal(mask, expected)
    blank, _ = tissue_mask(np.full((50, 50, 3), 250, np.uint8))
    assert not blank.any()
