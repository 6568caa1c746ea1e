"""Whole-slide images through OpenSlide (SVS, NDPI, MRXS, SCN, tiled TIFF, DICOM WSI, ...).

A slide is never decoded whole. :func:`read_slide` reads the pyramid's metadata, a thumbnail
(``Sample.array``), finds tissue on the thumbnail (Otsu threshold on HSV saturation: glass is
white and unsaturated, stained tissue is saturated), lays a grid of tiles at the target
magnification over level 0 and decodes only the tissue tiles (``Sample.tiles``), best tissue
coverage first, at most ``max_tiles``.

Magnification: the objective power of level 0 comes from ``openslide.objective-power``, else
from the microns per pixel (``10 / mpp``: 0.25 um/px ~ 40x, 0.5 um/px ~ 20x). A tile of
``tile_size`` pixels at magnification M spans ``tile_size * power0 / M`` level-0 pixels; it is
read from the best pyramid level and resized.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from m3bind.errors import CorruptFile, TooLarge, UnsupportedFormat
from m3bind.io.limits import LIMITS, check_pixels, check_tiff_segments
from m3bind.io.sample import Sample
from m3bind.modalities import PATHOLOGY

log = logging.getLogger(__name__)
_UPSAMPLE_WARNED: set[tuple[float, float]] = set()

THUMBNAIL_SIZE = 1024


#: Largest TIFF tile OpenSlide may be asked to allocate (4096 x 4096), and largest level side.
MAX_TILE_PIXELS = 2**24
MAX_SIDE = 2**20
#: Most grid cells of one tiling (a 200k x 100k slide at 20x in 224-px tiles has ~4e5).
MAX_GRID_CELLS = 2**24


def check_tiff_geometry(path: Path) -> None:
    """Refuse TIFF-based slides whose tags would make OpenSlide allocate without bound.

    OpenSlide allocates a whole tile (``TileWidth * TileLength * 4`` bytes) through GLib,
    which aborts the process when the allocation fails: a slide whose TileLength reads 2e9
    kills the app or the indexer instead of raising (found by fuzzing). The tags are
    checked here first, with tifffile, which reads them lazily.
    """
    import tifffile

    with open(path, "rb") as f:
        if f.read(4) not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return
    size = os.path.getsize(path)
    try:
        with tifffile.TiffFile(path) as tif:
            for i, page in enumerate(tif.pages):
                if i >= 64:
                    break
                w, h = int(page.imagewidth), int(page.imagelength)
                if w > MAX_SIDE or h > MAX_SIDE:
                    raise TooLarge(f"slide level of {w} x {h} pixels exceeds {MAX_SIDE} per side", path)
                tw, th = int(page.tilewidth or 0), int(page.tilelength or 0)
                if page.is_tiled and (tw <= 0 or th <= 0 or tw * th > MAX_TILE_PIXELS):
                    raise CorruptFile(f"slide tile of {tw} x {th} pixels in page {i}", path)
                if not page.is_tiled and i == 0:
                    rows = min(int(page.rowsperstrip or h), h)
                    check_pixels(rows * w * 4, path, "slide strip")
                check_tiff_segments(page, size, path, f"slide page {i}")
    except (TooLarge, CorruptFile):
        raise
    except Exception as e:  # noqa: BLE001 - tifffile raises TiffFileError, ValueError, struct.error ...
        raise CorruptFile(f"damaged TIFF structure: {type(e).__name__}: {e}", path) from None


def _open(path: Path):
    import openslide

    if not os.access(path, os.R_OK) and path.exists():
        raise CorruptFile("permission denied, cannot read file", path)
    check_tiff_geometry(path)
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise UnsupportedFormat("not a whole-slide image OpenSlide can read", path) from None
    except Exception as e:  # noqa: BLE001 - OpenSlideError and friends
        raise CorruptFile(f"damaged whole-slide image: {e}", path) from None


def _float_prop(props, key: str) -> float | None:
    try:
        v = float(props.get(key))
        return v if 0 < v < float("inf") else None  # NaN fails both comparisons
    except (TypeError, ValueError):
        return None


def slide_info(slide) -> dict[str, Any]:
    """Levels, dimensions, mpp, objective power (read or derived) and vendor of an open slide."""
    import openslide

    props = slide.properties
    mpp_x = _float_prop(props, openslide.PROPERTY_NAME_MPP_X)
    mpp_y = _float_prop(props, openslide.PROPERTY_NAME_MPP_Y)
    power = _float_prop(props, openslide.PROPERTY_NAME_OBJECTIVE_POWER)
    derived = False
    if power is None and mpp_x and 10.0 / mpp_x < float("inf"):
        power, derived = round(10.0 / mpp_x, 1), True
    return {
        "vendor": props.get(openslide.PROPERTY_NAME_VENDOR),
        "level_count": int(slide.level_count),
        "dimensions": [int(v) for v in slide.dimensions],
        "level_dimensions": [[int(a), int(b)] for a, b in slide.level_dimensions],
        "level_downsamples": [float(d) for d in slide.level_downsamples],
        "mpp": [mpp_x, mpp_y] if mpp_x and mpp_y else None,
        "objective_power": power,
        "objective_power_derived": derived,
        "associated_images": sorted(slide.associated_images.keys()),
    }


def tissue_mask(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """Tissue mask of a slide thumbnail: HSV saturation above its Otsu threshold.

    Returns:
        The boolean mask and the threshold used (saturation in ``[0, 1]``). Near-black pixels
        (pen marks, scanner borders) are excluded.
    """
    from skimage.filters import threshold_otsu

    x = rgb[..., :3].astype(np.float32) / 255.0
    # Channel-wise maximum/minimum (the same values as x.max(axis=-1), several times faster than
    # a reduction over a length-3 last axis: it was most of a small slide's read time).
    val = np.maximum(np.maximum(x[..., 0], x[..., 1]), x[..., 2])
    low = np.minimum(np.minimum(x[..., 0], x[..., 1]), x[..., 2])
    sat = np.where(val > 0, (val - low) / np.maximum(val, 1e-6), 0.0)  # HSV saturation
    if float(np.ptp(sat)) < 1e-3:
        return np.zeros(sat.shape, bool), 1.0
    t = max(float(threshold_otsu(sat)), 0.05)  # never call glass noise tissue
    return (sat > t) & (val > 0.15), t


def _cell_fractions(mask: np.ndarray, rows: int, cols: int, cell_y: float, cell_x: float) -> np.ndarray:
    """Tissue fraction of each grid cell: the mean of ``mask`` over thumbnail pixels
    ``[int(r*cell_y), max(y0+1, int((r+1)*cell_y)))`` x likewise for columns (summed-area table)."""
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    r, c = np.arange(rows), np.arange(cols)
    y0 = np.minimum((r * cell_y).astype(np.int64), mask.shape[0] - 1)
    x0 = np.minimum((c * cell_x).astype(np.int64), mask.shape[1] - 1)
    y1 = np.minimum(np.maximum(y0 + 1, ((r + 1) * cell_y).astype(np.int64)), mask.shape[0])
    x1 = np.minimum(np.maximum(x0 + 1, ((c + 1) * cell_x).astype(np.int64)), mask.shape[1])
    total = sat[y1][:, x1] - sat[y0][:, x1] - sat[y1][:, x0] + sat[y0][:, x0]
    area = (y1 - y0)[:, None] * (x1 - x0)[None, :]
    return total / area


def read_slide(path: str | os.PathLike, *, magnification: float = 20.0, tile_size: int = 224,
               max_tiles: int | None = 64, min_tissue: float = 0.5) -> Sample:
    """Read a whole-slide image: thumbnail, metadata and tissue tiles at ``magnification``.

    Args:
        path: The slide file.
        magnification: Target objective magnification of the tiles (20x by default).
        tile_size: Tile side in pixels at the target magnification.
        max_tiles: Most tiles decoded (those with the most tissue); ``None`` for
            :attr:`m3bind.io.LIMITS.max_tiles`.
        min_tissue: Smallest tissue fraction of a grid cell for its tile to be kept.

    Returns:
        A pathology :class:`Sample`: ``array`` the RGB thumbnail, ``tiles`` ``[N, tile, tile, 3]``
        uint8, ``spacing`` the thumbnail's pixel size in mm (when mpp is known), ``meta`` the
        slide info plus ``tile_grid`` (magnification, level-0 tile size, grid rows/cols,
        tissue threshold, level-0 ``coords`` ``[x, y]`` and ``tissue`` fraction of each tile).

    Raises:
        UnsupportedFormat: OpenSlide does not recognise the file.
        CorruptFile: The slide is damaged.
    """
    from PIL import Image

    path = Path(path)
    if magnification <= 0 or tile_size <= 0:
        raise ValueError("magnification and tile_size must be positive")
    slide = _open(path)
    try:
        info = slide_info(slide)
        w0, h0 = info["dimensions"]
        if w0 <= 0 or h0 <= 0:
            raise CorruptFile("slide with empty level 0", path)
        try:
            thumb = np.asarray(slide.get_thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE)).convert("RGB"))
        except Exception as e:  # noqa: BLE001
            raise CorruptFile(f"cannot decode slide thumbnail: {e}", path) from None
        power0 = info["objective_power"]
        if power0 is None:
            log.warning("slide %s states neither objective power nor mpp; assuming 20x", path)
            power0 = 20.0
            info["objective_power_assumed"] = True
        if magnification > power0:
            # Said once per (target, scan) pair: an archive of 10x scans would otherwise log it per slide.
            key = (float(magnification), float(power0))
            if key not in _UPSAMPLE_WARNED:
                _UPSAMPLE_WARNED.add(key)
                log.warning("target %.3gx is above the scan's %.3gx: tiles are upsampled", magnification, power0)
            info["upsampled"] = True
        factor = power0 / magnification
        tile0 = max(1, int(round(tile_size * factor)))  # tile side at level 0
        mask, thr = tissue_mask(thumb)
        sy, sx = thumb.shape[0] / h0, thumb.shape[1] / w0
        rows, cols = h0 // tile0, w0 // tile0
        if rows * cols > MAX_GRID_CELLS:
            raise TooLarge(f"tiling of {rows} x {cols} cells exceeds {MAX_GRID_CELLS}", path)
        frac = _cell_fractions(mask, rows, cols, tile0 * sy, tile0 * sx)
        rr, cc = np.nonzero(frac >= min_tissue)  # row-major: ties keep (row, col) order
        n_tissue = len(rr)
        cap = LIMITS.max_tiles if max_tiles is None else min(max_tiles, LIMITS.max_tiles)
        best = np.argsort(-frac[rr, cc], kind="stable")[:cap]  # no Python list of millions of cells (fuzzing)
        cells = [(float(frac[rr[i], cc[i]]), int(rr[i]), int(cc[i])) for i in best]
        chosen = cells
        check_pixels(len(chosen) * tile_size * tile_size * 3, path, "slide tiles")
        level = slide.get_best_level_for_downsample(factor)
        ds_level = slide.level_downsamples[level]
        read_px = max(1, int(round(tile0 / ds_level)))
        tiles = np.zeros((len(chosen), tile_size, tile_size, 3), np.uint8)
        for i, (_, r, c) in enumerate(chosen):
            try:
                region = slide.read_region((c * tile0, r * tile0), level, (read_px, read_px))
            except Exception as e:  # noqa: BLE001
                raise CorruptFile(f"cannot decode slide tile at level {level}: {e}", path) from None
            bg = Image.new("RGB", region.size, (255, 255, 255))
            bg.paste(region, mask=region.split()[3])  # transparent (outside scan) -> white
            if bg.size != (tile_size, tile_size):
                bg = bg.resize((tile_size, tile_size), Image.Resampling.LANCZOS)
            tiles[i] = np.asarray(bg)
    finally:
        slide.close()
    info["tile_grid"] = {
        "magnification": float(magnification), "tile_size": int(tile_size), "tile_size_level0": tile0,
        "read_level": int(level), "rows": int(rows), "cols": int(cols), "tissue_threshold": thr,
        "n_tissue": n_tissue, "n_tiles": len(chosen),
        "coords": [[c * tile0, r * tile0] for _, r, c in chosen],
        "tissue": [round(f, 3) for f, _, _ in chosen],
    }
    info["thumbnail_scale"] = [sy, sx]
    spacing = None
    if info["mpp"]:
        spacing = (info["mpp"][1] / sy / 1000.0, info["mpp"][0] / sx / 1000.0)
    return Sample(thumb, PATHOLOGY, "wsi", str(path), spacing=spacing, meta=info, tiles=tiles)


__all__ = ["read_slide", "slide_info", "tissue_mask"]
