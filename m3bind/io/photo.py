"""Photographs (PNG, JPEG, TIFF): fundus photographs, pathology tiles, exported radiographs.

These formats carry no modality. The caller names it; otherwise :func:`guess_modality` makes a
best guess from the pixels (``Sample.modality_guess`` is then True):

* grey image -> ``cxr`` (an exported radiograph);
* colour image with dark corners around a bright, roughly round field of view whose
  red channel dominates -> ``retina``;
* colour image whose tissue pixels are pink/purple (green lowest, as eosin and
  haematoxylin absorb green) -> ``pathology``;
* anything else: no guess, :class:`~m3bind.errors.UnsupportedFormat` asking for a modality.

Fundus photographs keep their whole field of view: the reader never crops, it records the
field of view (``meta["fov"]``: centre, radius, bounding box, area fraction) that
preprocessing crops to.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from m3bind.errors import CorruptFile, TooLarge, UnsupportedFormat
from m3bind.io.limits import LIMITS, ClampedFile, check_file, check_pixels, check_tiff_segments
from m3bind.io.sample import Sample
from m3bind.modalities import CXR, PATHOLOGY, RETINA

log = logging.getLogger(__name__)

PHOTO_MODALITIES = (CXR, RETINA, PATHOLOGY)


def _read_pillow(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    from PIL import Image, ImageOps

    Image.MAX_IMAGE_PIXELS = LIMITS.max_pixels
    with open(path, "rb") as f:
        return _decode_pillow(Image, ImageOps, ClampedFile(f, os.path.getsize(path)), path)


def _decode_pillow(Image, ImageOps, fp, path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(fp)
            w, h = im.size
            bands = len(im.getbands())
            check_pixels(w * h * bands, path, "image")
            n_frames = getattr(im, "n_frames", 1)
            im = ImageOps.exif_transpose(im)
            im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise TooLarge(f"image too large to decode safely: {e}", path) from None
    mode = im.mode
    if mode in ("1", "L", "LA", "I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im.convert("L") if mode in ("1", "LA") else im)
    else:
        arr = np.asarray(im.convert("RGB"))
    return arr, {"pil_mode": mode, "pages": n_frames, "width": w, "height": h}


def _read_tifffile(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        check_pixels(int(np.prod(page.shape, dtype=np.int64)), path, "TIFF page")
        check_tiff_segments(page, os.path.getsize(path), path)
        arr = page.asarray()
        pages = len(tif.pages)
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar configuration
    if arr.ndim == 3:
        arr = arr[..., :3]
    return arr, {"pages": pages, "reader": "tifffile"}


def read_pixels(path: str | os.PathLike, fmt: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode a PNG/JPEG/TIFF into ``[H, W]`` or ``[H, W, 3]`` (native dtype) plus format notes."""
    path = Path(path)
    check_file(path)
    try:
        return _read_pillow(path)
    except (TooLarge, CorruptFile):
        raise
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError/SyntaxError/ValueError on damage
        if fmt == "tiff":
            try:
                return _read_tifffile(path)
            except (TooLarge, CorruptFile):
                raise
            except Exception as e2:  # noqa: BLE001
                raise CorruptFile(f"cannot decode TIFF: {e2}", path) from None
        raise CorruptFile(f"cannot decode {fmt.upper()}: {e}", path) from None


def fov_mask(rgb: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Field-of-view mask of a fundus photograph: the largest bright region, holes filled.

    Args:
        rgb: ``[H, W, 3]`` image (any dtype; scaled to 0-255 when not uint8).
        threshold: Brightness (max over channels, 0-255) above which a pixel is inside;
            default ``max(10, 6% of the 99th percentile)``.
    """
    from scipy import ndimage

    x = rgb.astype(np.float32)
    if rgb.dtype != np.uint8:
        x = x / max(float(x.max()), 1e-6) * 255.0
    bright = x.max(axis=-1) if x.ndim == 3 else x
    t = threshold if threshold is not None else max(10.0, 0.06 * float(np.percentile(bright, 99)))
    mask = bright > t
    mask = ndimage.binary_opening(mask, iterations=2)
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum_labels(mask, lab, index=np.arange(1, n + 1))
    mask = lab == (1 + int(np.argmax(sizes)))
    return ndimage.binary_fill_holes(mask)


def fov_geometry(mask: np.ndarray) -> dict[str, Any]:
    """Centre, equivalent radius, bounding box ``[y0, x0, y1, x1]`` (exclusive) and area fraction."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return {"center": None, "radius": 0.0, "bbox": [0, 0, *mask.shape], "fraction": 0.0}
    return {
        "center": [float(ys.mean()), float(xs.mean())],
        "radius": float(np.sqrt(len(ys) / np.pi)),
        "bbox": [int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1],
        "fraction": float(len(ys) / mask.size),
    }


def fov(rgb: np.ndarray, max_side: int = 512) -> dict[str, Any]:
    """Field-of-view geometry (:func:`fov_geometry`) computed on a copy at most ``max_side`` wide.

    The mask is found on a strided copy (speed) and its coordinates scaled back to full size.
    """
    stride = max(1, int(np.ceil(max(rgb.shape[:2]) / max_side)))
    small = rgb[::stride, ::stride]
    g = fov_geometry(fov_mask(small))
    if g["center"] is not None:
        g["center"] = [c * stride + (stride - 1) / 2 for c in g["center"]]
        g["radius"] *= stride
        y0, x0, y1, x1 = g["bbox"]
        h, w = rgb.shape[:2]
        g["bbox"] = [y0 * stride, x0 * stride, min(h, y1 * stride), min(w, x1 * stride)]
    return g


def _is_grey(arr: np.ndarray) -> bool:
    if arr.ndim == 2:
        return True
    x = arr[::4, ::4].astype(np.float32)
    return float(np.abs(x[..., 0] - x[..., 1]).mean() + np.abs(x[..., 1] - x[..., 2]).mean()) < 4.0


def guess_modality(arr: np.ndarray) -> str | None:
    """Best-guess modality of a photograph from its pixels (see the module docstring)."""
    if _is_grey(arr):
        return CXR
    rgb = arr if arr.dtype == np.uint8 else (arr / max(float(arr.max()), 1) * 255).astype(np.uint8)
    h, w = rgb.shape[:2]
    k = max(2, min(h, w) // 20)
    corners = [rgb[:k, :k], rgb[:k, -k:], rgb[-k:, :k], rgb[-k:, -k:]]
    dark_corners = sum(float(c.max(axis=-1).mean()) < 25 for c in corners)
    stride = max(1, int(np.ceil(max(h, w) / 512)))
    rgb = rgb[::stride, ::stride]
    h, w = rgb.shape[:2]
    mask = fov_mask(rgb)
    frac = float(mask.mean())
    inside = rgb[mask].astype(np.float32) if mask.any() else rgb.reshape(-1, 3).astype(np.float32)
    r, g, b = inside.mean(axis=0)
    if dark_corners >= 3 and 0.25 < frac < 0.97 and r > g > b * 0.8 and r > 1.3 * b:
        return RETINA
    tissue = rgb.reshape(-1, 3).astype(np.float32)
    tissue = tissue[tissue.min(axis=1) < 215]  # drop the white glass background
    if len(tissue) > 0.02 * h * w:
        r, g, b = tissue.mean(axis=0)
        if g < r and g < b:
            return PATHOLOGY
    return None


def read_photo(path: str | os.PathLike, fmt: str, modality: str | None = None) -> Sample:
    """Read a PNG/JPEG/TIFF photograph as a cxr, retina or pathology :class:`Sample`.

    Args:
        path: The image file.
        fmt: ``png``, ``jpeg`` or ``tiff`` (from :func:`m3bind.io.detect`).
        modality: ``cxr``, ``retina`` or ``pathology``; guessed when ``None``.

    Raises:
        UnsupportedFormat: A modality photographs cannot hold, or no guess possible.
        CorruptFile, TooLarge: Damaged or oversized image.
    """
    path = Path(path)
    if modality is not None and modality not in PHOTO_MODALITIES:
        raise UnsupportedFormat(f"a {fmt.upper()} image cannot be read as {modality}", path)
    arr, meta = read_pixels(path, fmt)
    if arr.ndim == 3 and arr.shape[-1] < 3:  # grey (+ alpha) stored with a samples axis (fuzzing)
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise UnsupportedFormat(f"image of shape {arr.shape} is neither grey nor RGB", path)
    guess = modality is None
    mod = modality or guess_modality(arr)
    if mod is None:
        raise UnsupportedFormat("cannot tell the modality of this photograph (not a fundus, H&E tile "
                                "or grey radiograph); pass a modality", path)
    meta["bit_depth"] = int(arr.dtype.itemsize * 8)
    if mod == CXR:
        x = arr.astype(np.float32)
        if arr.ndim == 3:
            x = x @ np.array([0.299, 0.587, 0.114], np.float32)
        full = 255.0 if arr.dtype == np.uint8 else (65535.0 if float(x.max()) > 4095 else 4095.0)
        if arr.dtype.kind == "f":
            lo, hi = float(x.min()), float(x.max())
            x, full = x - lo, max(hi - lo, 1e-6)
        return Sample(np.clip(x / full, 0, 1).astype(np.float32), CXR, fmt, str(path), window=(0.5, 1.0),
                      meta=meta, modality_guess=guess)
    rgb = arr
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=-1)
    if rgb.dtype != np.uint8:
        rgb = np.clip(rgb.astype(np.float32) / max(float(rgb.max()), 1.0) * 255 + 0.5, 0, 255).astype(np.uint8)
    tiles = None
    if mod == RETINA:
        meta["fov"] = fov(rgb)
    else:
        tiles = rgb[None]
    return Sample(np.ascontiguousarray(rgb), mod, fmt, str(path), meta=meta, modality_guess=guess, tiles=tiles)
