"""Clinician-readable previews of a :class:`~m3bind.io.sample.Sample` as an RGB ``uint8`` image.

One renderer per modality in :data:`RENDERERS`:

* ``cxr``: the display-windowed radiograph (its VOI window; ``window=(centre, width)`` in
  array units overrides it), square pixels.
* ``ct``/``mri``: one slice (``slice=``, default the middle one) with a window preset
  (``window="lung"`` (-600/1500), ``"mediastinum"`` (40/400), ``"bone"`` (400/1800),
  ``"brain"`` (40/80), or ``(centre, width)``), square millimetres, orientation letters for
  axial slices (radiological convention: patient's right on the viewer's left);
  multi-sequence MRI shows each sequence side by side.
* ``ecg``: the standard 12-lead sheet: 25 mm/s, 10 mm/mV, red millimetre grid, 3x4 layout
  (I/aVR/V1/V4, II/aVL/V2/V5, III/aVF/V3/V6, 2.5 s each) plus a 10 s lead II rhythm strip,
  1 mV calibration pulses and lead labels.
* ``pathology``: the slide thumbnail with the chosen tiles outlined; a tile image as is.
* ``retina``: the fundus photograph, whole field of view.

Previews are de-identified: the caption under the image holds modality, geometry and
display settings only, never names, identifiers or dates.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import numpy as np

from m3bind.io.sample import Sample
from m3bind.modalities import CT, CXR, ECG, MRI, PATHOLOGY, RETINA, get_spec
from m3bind.registry import Registry

log = logging.getLogger(__name__)

#: Renderers by modality: ``fn(sample, **opts) -> uint8 [H, W, 3]``.
RENDERERS: Registry[Callable[..., np.ndarray]] = Registry("renderer")

#: CT window presets (centre, width) in HU.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
MAX_SIDE = 1024
#: Caption names: the registry's titles name the usual organ ("Chest CT"); a preview names
#: only what the file is, since the same modality images other organs too.
_TITLES = {m: {CT: "CT", MRI: "MRI", CXR: "Radiograph"}.get(m, get_spec(m).title) for m in (CXR, CT, RETINA, ECG, PATHOLOGY, MRI)}


def preview(sample: Sample, **opts: Any) -> np.ndarray:
    """Render ``sample`` for a human reader.

    Args:
        sample: Any loaded sample.
        **opts: Renderer options (``window``, ``slice`` for volumes; ``caption=False`` to omit
            the caption bar).

    Returns:
        ``[H, W, 3]`` uint8 RGB image.
    """
    mod = sample.modality or _fallback_modality(sample)
    caption = opts.pop("caption", True)
    img, lines = RENDERERS.get(mod)(sample, **opts)
    if caption:
        title = _TITLES[mod] + (f", {sample.meta['body_part'].lower()}" if sample.meta.get("body_part") else "")
        title += " (modality guessed)" if sample.modality_guess else ""
        img = _with_caption(img, [f"{title} | {sample.format} | shape {list(sample.shape)}"] + lines)
    return img


def save_preview(sample: Sample, path: str | os.PathLike, **opts: Any) -> str:
    """Render ``sample`` (:func:`preview`) and write it as PNG to ``path``; return the path."""
    from PIL import Image

    Image.fromarray(preview(sample, **opts)).save(path, format="PNG")
    return str(path)


def _fallback_modality(sample: Sample) -> str:
    a = sample.array
    if sample.sampling_rate is not None:
        return ECG
    if a.ndim >= 3 and a.shape[-1] != 3:
        return MRI
    return RETINA if a.ndim == 3 else CXR


# ---------------------------------------------------------------------------- helpers
def _font(size: int = 14):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow without FreeType
        return ImageFont.load_default()


def _with_caption(img: np.ndarray, lines: list[str], min_width: int = 480) -> np.ndarray:
    from PIL import Image, ImageDraw

    import textwrap

    h, w = img.shape[:2]
    width = max(w, min_width)
    lines = [part for line in lines for part in textwrap.wrap(line, max(20, width // 7)) or [""]]
    bar = 8 + 18 * len(lines)
    canvas = Image.new("RGB", (width, h + bar), (24, 24, 24))
    canvas.paste(Image.fromarray(img), (0, 0))
    d = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        d.text((6, h + 4 + 18 * i), line, fill=(235, 235, 235), font=_font(14))
    return np.asarray(canvas)


def _to_rgb(grey01: np.ndarray) -> np.ndarray:
    g = np.clip(grey01 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def _resize(img: np.ndarray, spacing: tuple[float, float] | None, max_side: int = MAX_SIDE,
            min_side: int = 0) -> np.ndarray:
    """Resize to square physical pixels, long side at most ``max_side`` and at least ``min_side``."""
    from PIL import Image

    h, w = img.shape[:2]
    sy, sx = spacing if spacing else (1.0, 1.0)
    ph, pw = h * sy / min(sy, sx), w * sx / min(sy, sx)  # size with square pixels
    scale = min(max_side / max(ph, pw), max(1.0, min_side / max(ph, pw)))
    nh, nw = max(1, round(ph * scale)), max(1, round(pw * scale))
    if (nh, nw) == (h, w):
        return img
    return np.asarray(Image.fromarray(img).resize((nw, nh), Image.Resampling.LANCZOS))


def window_array(x: np.ndarray, centre: float, width: float) -> np.ndarray:
    """Linear window: ``centre - width/2`` -> 0, ``centre + width/2`` -> 1, clipped."""
    return np.clip((x - (centre - width / 2.0)) / max(width, 1e-6), 0.0, 1.0)


# ---------------------------------------------------------------------------- renderers
@RENDERERS.register(CXR)
def render_cxr(sample: Sample, window: tuple[float, float] | None = None, **_: Any):
    x = sample.array.astype(np.float32)
    if x.ndim == 3:
        x = x[..., :3].mean(axis=-1) / (255.0 if sample.array.dtype == np.uint8 else 1.0)
    c, w = window or sample.window or (0.5, 1.0)
    img = _resize(_to_rgb(window_array(x, c, w)), sample.spacing[:2] if sample.spacing else None)
    lines = [f"window {c:g}/{w:g} ({sample.meta.get('voi', 'display values')})"]
    if sample.spacing:
        lines.append(f"pixel {sample.spacing[0]:.3g} x {sample.spacing[1]:.3g} mm")
    return img, lines


def _volume_window(sample: Sample, vol: np.ndarray, window) -> tuple[float, float, str]:
    if isinstance(window, str):
        if window not in WINDOW_PRESETS:
            raise ValueError(f"unknown window preset {window!r} (known: {', '.join(WINDOW_PRESETS)})")
        return (*WINDOW_PRESETS[window], window)
    if window is not None:
        return float(window[0]), float(window[1]), "custom"
    if sample.window:
        return float(sample.window[0]), float(sample.window[1]), "file"
    if sample.modality == CT or (sample.modality is None and float(vol.min()) < -500):
        return (*WINDOW_PRESETS["mediastinum"], "mediastinum")
    nz = vol[vol > 0] if (vol > 0).any() else vol.ravel()
    lo, hi = np.percentile(nz, [0.5, 99.5])
    return float((lo + hi) / 2), float(max(hi - lo, 1e-6)), "auto 0.5-99.5%"


def _orientation_letters(img: np.ndarray) -> np.ndarray:
    from PIL import Image, ImageDraw

    im = Image.fromarray(img)
    d = ImageDraw.Draw(im)
    h, w = img.shape[:2]
    f = _font(18)
    for text, xy in (("A", (w // 2 - 5, 4)), ("P", (w // 2 - 5, h - 24)), ("R", (6, h // 2 - 10)),
                     ("L", (w - 18, h // 2 - 10))):
        d.text(xy, text, fill=(255, 210, 0), font=f, stroke_width=2, stroke_fill=(0, 0, 0))
    return np.asarray(im)


@RENDERERS.register(CT)
@RENDERERS.register(MRI)
def render_volume(sample: Sample, window=None, slice: int | None = None, **_: Any):  # noqa: A002 - the option's name
    vol = sample.array.astype(np.float32)
    chans = vol[None] if vol.ndim == 3 else vol if vol.ndim == 4 else vol[None, None]
    names = sample.channel_names or [None] * chans.shape[0]
    nz = chans.shape[1]
    z = nz // 2 if slice is None else int(np.clip(slice, 0, nz - 1))
    sp = sample.spacing[-2:] if sample.spacing else None
    panels, lines = [], []
    side = MAX_SIDE // max(1, min(chans.shape[0], 4)) if chans.shape[0] > 1 else 768
    min_side = min(512 if chans.shape[0] == 1 else 384, side)
    for name, v in zip(names, chans):
        c, w, how = _volume_window(sample, v, window)
        img = _resize(_to_rgb(window_array(v[z], c, w)), sp, max_side=side, min_side=min_side)
        if sample.meta.get("plane") == "axial":
            img = _orientation_letters(img)
        if name:
            img = _with_caption(img, [name], min_width=0)
        panels.append(img)
        lines.append(f"{name + ': ' if name else ''}window {c:.4g}/{w:.4g} ({how})")
    h = max(p.shape[0] for p in panels)
    panels = [np.pad(p, ((0, h - p.shape[0]), (0, 4), (0, 0))) for p in panels]
    img = np.concatenate(panels, axis=1)
    unit = " HU" if sample.modality == CT else ""
    lines = [f"slice {z + 1}/{nz} ({sample.meta.get('plane', 'plane unknown')}){unit}; " + "; ".join(lines)]
    if sample.spacing:
        lines.append("voxel " + " x ".join(f"{s:.3g}" for s in sample.spacing) + " mm (z, y, x)")
    return img, lines


#: Standard 3x4 layout: rows of leads, each column 2.5 s of the record.
ECG_LAYOUT = (("I", "aVR", "V1", "V4"), ("II", "aVL", "V2", "V5"), ("III", "aVF", "V3", "V6"))


@RENDERERS.register(ECG)
def render_ecg(sample: Sample, speed: float = 25.0, gain: float = 10.0, rhythm_lead: str = "II",
               display_band: tuple[float, float] | None = (0.05, 150.0), dpi: int = 130, **_: Any):
    """12-lead sheet at ``speed`` mm/s and ``gain`` mm/mV on a millimetre grid.

    The traces are shown through a zero-phase ``display_band`` filter (diagnostic 0.05-150 Hz;
    ``None`` shows the raw signal) with each lead's median as its baseline."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    from m3bind.preprocess import bandpass

    fs = float(sample.sampling_rate or 0)
    names = list(sample.lead_names or [])
    mask = sample.meta.get("lead_mask") or [True] * len(names)
    n10 = int(round(10 * fs))
    sig = sample.array[:, :n10].astype(np.float64)
    band = (display_band[0], min(display_band[1], 0.45 * fs)) if display_band else None
    if band is not None and sig.shape[1] > 3 * 7 + 1:
        sig = bandpass(sig, fs, band)
    sig = sig - np.median(sig, axis=1, keepdims=True)
    left, pitch, top = 12.0, 35.0, 12.0
    width_mm = left + 10 * speed + 4
    height_mm = top + 4 * pitch + 4
    fig = Figure(figsize=(width_mm / 25.4, height_mm / 25.4), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width_mm)
    ax.set_ylim(0, height_mm)
    ax.axis("off")
    fig.patch.set_facecolor("white")
    for step, colour, lw in ((1.0, (1.0, 0.82, 0.82), 0.3), (5.0, (0.95, 0.45, 0.45), 0.7)):
        xs = np.arange(0, width_mm + 1e-6, step)
        ys = np.arange(0, height_mm + 1e-6, step)
        segs = [((x, 0), (x, height_mm)) for x in xs] + [((0, y), (width_mm, y)) for y in ys]
        ax.add_collection(LineCollection(segs, colors=[colour], linewidths=lw, zorder=0))

    def baseline(row: int) -> float:
        return height_mm - top - pitch * row - pitch / 2

    def trace(lead: str, t0: float, t1: float, row: int, x0: float, sep: bool):
        y0 = baseline(row)
        label = lead
        if lead in names and mask[names.index(lead)]:
            v = sig[names.index(lead)]
            i0, i1 = int(round(t0 * fs)), min(int(round(t1 * fs)), v.shape[0])
            if i1 > i0:
                t = np.arange(i0, i1) / fs - t0
                # traces may overlap the neighbouring rows as on paper; only absurd values are clipped
                y = np.clip(v[i0:i1], -2 * pitch / gain, 2 * pitch / gain)
                ax.plot(x0 + t * speed, y0 + y * gain, color="black", lw=0.7, zorder=2)
        else:
            label += " (missing)"
        ax.text(x0 + 1.0, y0 + 0.35 * pitch, label, fontsize=8, fontweight="bold", zorder=3)
        if sep:
            ax.plot([x0, x0], [y0 - 4, y0 + 4], color="black", lw=0.8, zorder=2)

    for row in range(4):  # 1 mV calibration pulse, 200 ms wide
        y0 = baseline(row)
        ax.plot([2, 4, 4, 9, 9, 11], [y0, y0, y0 + gain, y0 + gain, y0, y0], color="black", lw=0.8)
    for r, leads in enumerate(ECG_LAYOUT):
        for c, lead in enumerate(leads):
            trace(lead, 2.5 * c, 2.5 * (c + 1), r, left + 2.5 * c * speed, c > 0)
    trace(rhythm_lead, 0.0, 10.0, 3, left, False)
    filt = f"display filter {band[0]:g}-{band[1]:g} Hz" if band else "unfiltered"
    ax.text(left, height_mm - 5, f"{speed:g} mm/s   {gain:g} mm/mV   {fs:g} Hz   {filt}   "
            f"record {sample.shape[1] / fs if fs else 0:.1f} s",
            fontsize=8, zorder=3)
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    missing = [n for n, m in zip(names, mask) if not m]
    lines = [f"{len(names) - len(missing)} of {len(names)} leads recorded" + (f", missing: {', '.join(missing)}" if missing else "")]
    return img, lines


@RENDERERS.register(PATHOLOGY)
def render_pathology(sample: Sample, **_: Any):
    from PIL import Image, ImageDraw

    img = sample.array if sample.array.dtype == np.uint8 else np.clip(sample.array, 0, 255).astype(np.uint8)
    grid = sample.meta.get("tile_grid")
    lines = []
    if grid and sample.meta.get("thumbnail_scale"):
        sy, sx = sample.meta["thumbnail_scale"]
        im = Image.fromarray(img)
        d = ImageDraw.Draw(im)
        t0 = grid["tile_size_level0"]
        for x, y in grid["coords"]:
            d.rectangle([x * sx, y * sy, (x + t0) * sx - 1, (y + t0) * sy - 1], outline=(0, 170, 0), width=2)
        img = np.asarray(im)
        mpp = sample.meta.get("mpp")
        lines.append(f"{grid['n_tiles']} of {grid['n_tissue']} tissue tiles outlined: {grid['tile_size']} px at "
                     f"{grid['magnification']:g}x | scan {sample.meta.get('objective_power')}x"
                     + (f", {mpp[0]:.3g} um/px" if mpp else "") + f", {sample.meta.get('level_count')} levels")
    return _resize(img, None), lines


@RENDERERS.register(RETINA)
def render_retina(sample: Sample, **_: Any):
    img = sample.array
    if img.ndim == 2:
        img = _to_rgb(img.astype(np.float32) / max(float(img.max()), 1e-6))
    fov = sample.meta.get("fov")
    lines = [f"field of view radius {fov['radius']:.0f} px ({fov['fraction']:.0%} of the image)"] if fov else []
    return _resize(img, None), lines
