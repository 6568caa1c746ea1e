"""Per-modality viewers: which display controls a sample gets and how it is drawn.

All pixels come from :func:`m3bind.render.preview` (window/level, slice and window presets,
the 12-lead ECG grid, the slide thumbnail) or, for whole-slide images, from the tiles the
reader already cut (:attr:`Sample.tiles`); nothing here decodes a file a second way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from m3bind.modalities import IMAGE2D, SPECS, VOLUME, get_spec

log = logging.getLogger(__name__)

#: Window choices for volumes: "auto" (the file's window; mediastinum for CT without one;
#: intensity percentiles for MRI) and the renderer's presets (HU: lung, mediastinum, bone, brain).
AUTO_WINDOW = "auto"
WINDOW_PRESETS: tuple[str, ...] = (AUTO_WINDOW, "lung", "mediastinum", "bone", "brain")

#: Most tiles shown in the slide gallery.
MAX_TILES = 48


@dataclass
class ViewControls:
    """Which viewer controls a sample gets, and their ranges.

    Attributes:
        window_level: CXR-like grey images: centre/width sliders.
        centre, width: Initial window (array units).
        lo, hi: Range of the centre slider; the width slider runs up to ``hi - lo``.
        slices: Number of slices of a volume (0 for none); ``slice`` the initial one.
        preset: Initial window preset of a volume, or ``None``.
        presets: Window presets offered (CT: HU presets; MRI: none — its intensities have no
            fixed scale, the renderer windows each sequence on its own percentiles).
        sequences: Sequence names of a multi-channel MRI (all shown side by side), else empty.
        tiles: Whether the sample carries slide tiles.
    """

    window_level: bool = False
    centre: float = 0.5
    width: float = 1.0
    lo: float = 0.0
    hi: float = 1.0
    slices: int = 0
    slice: int = 0
    preset: str | None = None
    presets: tuple[str, ...] = ()
    sequences: tuple[str, ...] = ()
    tiles: bool = False


def controls_for(sample) -> ViewControls:
    """The viewer controls fitting ``sample`` (by modality kind and array shape)."""
    c = ViewControls()
    arr = sample.array
    m = sample.modality
    kind = get_spec(m).kind if m in SPECS else None
    if kind == VOLUME or (kind is None and arr.ndim >= 3 and arr.shape[-1] not in (3, 4)):
        c.slices = int(arr.shape[-3])
        c.slice = c.slices // 2
        c.preset = AUTO_WINDOW
        c.presets = WINDOW_PRESETS if m != "mri" else ()
        if arr.ndim == 4:  # the renderer shows every sequence side by side
            c.sequences = tuple(sample.channel_names or [f"channel {i}" for i in range(arr.shape[0])])
    elif arr.ndim == 2 and kind == IMAGE2D:
        finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
        lo, hi = (float(np.min(finite)), float(np.max(finite))) if finite.size else (0.0, 1.0)
        if hi <= lo:
            hi = lo + 1.0
        lo, hi = _nice(lo, hi)
        c.window_level, c.lo, c.hi = True, lo, hi
        if sample.window:
            c.centre, c.width = float(sample.window[0]), float(sample.window[1])
        else:
            p1, p99 = np.percentile(finite, [1, 99]) if finite.size else (lo, hi)
            c.centre, c.width = float((p1 + p99) / 2), float(max(p99 - p1, 1e-6))
        c.centre = min(max(c.centre, lo), hi)
        c.width = min(max(c.width, (hi - lo) / 500), 2 * (hi - lo))
    if getattr(sample, "tiles", None) is not None and len(sample.tiles):
        c.tiles = True
    return c


def _nice(lo: float, hi: float) -> tuple[float, float]:
    """``lo``/``hi`` rounded outwards to 3 significant digits of the range (tidy slider ends)."""
    import math

    digits = 2 - math.floor(math.log10(hi - lo))
    step = 10.0 ** -digits
    return round(math.floor(lo / step) * step, max(digits, 0)), round(math.ceil(hi / step) * step, max(digits, 0))


def render(sample, *, centre: float | None = None, width: float | None = None,
           slice_index: int | None = None, preset: str | None = None) -> np.ndarray:
    """The display image ``[H, W, 3]`` uint8 of ``sample`` with the viewer's settings."""
    from m3bind.render import preview

    opts: dict[str, Any] = {}
    c = controls_for(sample)
    if c.window_level and centre is not None and width is not None:
        opts["window"] = (float(centre), float(width))
    if c.slices:
        if slice_index is not None:
            opts["slice"] = int(min(max(slice_index, 0), c.slices - 1))
        if preset and preset != AUTO_WINDOW:
            opts["window"] = preset
    return np.asarray(preview(sample, **opts), dtype=np.uint8)


def thumbnail(sample) -> np.ndarray:
    """The default display of ``sample`` (search results, archive browsing)."""
    from m3bind.render import preview

    return np.asarray(preview(sample), dtype=np.uint8)


def tile_gallery(sample) -> list[tuple[np.ndarray, str]]:
    """The slide's tissue tiles as ``(image, caption)`` for a zoomable gallery."""
    tiles = getattr(sample, "tiles", None)
    if tiles is None:
        return []
    n = len(tiles)
    return [(np.asarray(tiles[i], dtype=np.uint8), f"tile {i + 1}/{n}") for i in range(min(n, MAX_TILES))]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, bool) for x in v):
        return f"{sum(v)} of {len(v)} true"
    if isinstance(v, (list, tuple)):
        return " × ".join(_fmt(x) for x in v) if all(isinstance(x, (int, float)) for x in v) \
            else ", ".join(_fmt(x) for x in v)
    if isinstance(v, dict):
        return "; ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return str(v)


def metadata_rows(sample, *, max_rows: int = 60) -> list[list[str]]:
    """Key metadata as ``[field, value]`` rows: what a reader needs before looking at pixels.

    PHI is whatever :func:`m3bind.io.load` left in ``sample.meta`` (nothing unless the app runs
    with PHI enabled).
    """
    m = sample.modality
    title = SPECS[m].title if m in SPECS else "unknown"
    rows = [["modality", f"{title} ({m})" + (" — best guess" if sample.modality_guess else "")
             if m else "unknown — choose one"],
            ["format", sample.format],
            ["shape", " × ".join(str(s) for s in sample.shape)]]
    if sample.spacing:
        rows.append(["spacing (mm)", _fmt(tuple(float(s) for s in sample.spacing))])
    if sample.sampling_rate:
        secs = sample.array.shape[-1] / float(sample.sampling_rate)
        rows.append(["sampling rate", f"{float(sample.sampling_rate):g} Hz ({secs:.1f} s)"])
    if sample.lead_names:
        rows.append(["leads", ", ".join(sample.lead_names)])
    if sample.channel_names:
        rows.append(["sequences", ", ".join(sample.channel_names)])
    if sample.window:
        rows.append(["file window (centre, width)",
                     ", ".join(f"{float(x):.4g}" for x in sample.window)])
    if getattr(sample, "tiles", None) is not None:
        rows.append(["tiles", str(len(sample.tiles))])
    for k, v in (sample.meta or {}).items():
        if len(rows) >= max_rows:
            break
        text = _fmt(v)
        if k.endswith("_date") and len(text) == 8 and text.isdigit():  # DICOM DA -> ISO
            text = f"{text[:4]}-{text[4:6]}-{text[6:]}"
        rows.append([str(k).replace("_", " "), text[:200]])
    return rows


def metadata_html(sample) -> str:
    """:func:`metadata_rows` as a two-column HTML table (values escaped)."""
    import html

    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
                   for k, v in metadata_rows(sample))
    return f"<table>{rows}</table>"
