"""Model preprocessing, one function per modality, registered in :data:`PREPROCESSORS`.

:func:`preprocess` turns a :class:`~m3bind.io.sample.Sample` into the float32 tensor an encoder
takes. Parameters default to ``get_spec(modality).preprocess_defaults`` and can be overridden
(a model directory stores its own). Output shapes:

========== ===================== ==========================================================
modality   shape                 steps
========== ===================== ==========================================================
cxr        ``[1, S, S]``         display-windowed grey, aspect-preserving resize, pad
retina     ``[3, S, S]``         crop to the field of view (square, whole FOV kept), resize
pathology  ``[T, 3, S, S]``      tissue tiles at the target magnification, optional Macenko
ct         ``[1, D, H, W]``      HU window -> [0, 1], resample to fixed spacing, crop/pad
mri        ``[C, D, H, W]``      per-sequence z-score in a brain mask, resize to the grid
ecg        ``[12, fs*seconds]``  resample, band-pass, crop/zero-pad, per-lead z-score
========== ===================== ==========================================================

Intensities end up roughly zero-centred with unit scale: images map ``[0, 1]`` to ``[-1, 1]``,
MRI and ECG are z-scored.
"""

from __future__ import annotations

import logging
from fractions import Fraction
from typing import Any, Callable

import numpy as np

from m3bind.errors import ConfigError, UnsupportedFormat
from m3bind.io.sample import Sample
from m3bind.modalities import CT, CXR, ECG, MRI, PATHOLOGY, RETINA, get_spec
from m3bind.registry import Registry

log = logging.getLogger(__name__)

#: Preprocessing functions by modality: ``fn(sample, **params) -> np.ndarray``.
PREPROCESSORS: Registry[Callable[..., np.ndarray]] = Registry("preprocessor")


def preprocess(sample: Sample, **params: Any) -> np.ndarray:
    """Preprocess ``sample`` for its modality's encoder.

    Args:
        sample: A loaded sample with a known modality.
        **params: Overrides of the modality's ``preprocess_defaults``.

    Returns:
        A float32 array (see the module table for shapes).

    Raises:
        UnsupportedFormat: The sample has no modality.
        ConfigError: A parameter the modality does not take.
    """
    if sample.modality is None:
        raise UnsupportedFormat("cannot preprocess a sample of unknown modality", sample.path)
    defaults = dict(get_spec(sample.modality).preprocess_defaults)
    fn = PREPROCESSORS.get(sample.modality)
    extra = set(params) - set(defaults) - set(getattr(fn, "optional_params", ()))
    if extra:
        raise ConfigError(f"unknown {sample.modality} preprocessing parameter(s): {', '.join(sorted(extra))}")
    defaults.update(params)
    out = fn(sample, **defaults)
    return np.ascontiguousarray(out, dtype=np.float32)


def _optional(*names: str):
    def deco(fn):
        fn.optional_params = names
        return fn
    return deco


# ---------------------------------------------------------------------------- 2D helpers
def resize_keep_aspect(img: np.ndarray, size: int, pad_value: float = 0.0) -> np.ndarray:
    """Resize ``[H, W]`` or ``[H, W, C]`` float image so its long side is ``size``; centre-pad to square.

    Downscaling is antialiased (PIL's area-aware bilinear filter per channel).
    """
    from PIL import Image

    h, w = img.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    chans = img[..., None] if img.ndim == 2 else img
    out = np.full((size, size, chans.shape[-1]), pad_value, np.float32)
    y0, x0 = (size - nh) // 2, (size - nw) // 2
    for c in range(chans.shape[-1]):
        ch = Image.fromarray(np.ascontiguousarray(chans[..., c], dtype=np.float32), mode="F")
        out[y0:y0 + nh, x0:x0 + nw, c] = np.asarray(ch.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=None))
    return out[..., 0] if img.ndim == 2 else out


@PREPROCESSORS.register(CXR)
def preprocess_cxr(sample: Sample, size: int = 224) -> np.ndarray:
    """``[1, S, S]``: the display-ready grey image (``[0, 1]``, higher brighter), long side
    resized to ``size`` with its aspect ratio kept, padded with black, mapped to ``[-1, 1]``."""
    x = sample.array.astype(np.float32)
    if x.ndim == 3:
        x = x[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32) if x.shape[-1] >= 3 else x[..., 0]
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:  # not display-normalised (e.g. raw values): stretch
        x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    return (resize_keep_aspect(x, size, 0.0)[None] - 0.5) / 0.5


@PREPROCESSORS.register(RETINA)
def preprocess_retina(sample: Sample, size: int = 224) -> np.ndarray:
    """``[3, S, S]``: square crop around the field of view (the whole FOV kept, black margin
    where the FOV touches the image edge), resized to ``size``, mapped to ``[-1, 1]``."""
    from m3bind.io.photo import fov

    rgb = sample.array
    g = sample.meta.get("fov") or fov(rgb)
    crop = crop_to_fov(rgb, g["bbox"])
    x = resize_keep_aspect(crop.astype(np.float32) / 255.0, size, 0.0)
    return (np.moveaxis(x, -1, 0) - 0.5) / 0.5


def crop_to_fov(rgb: np.ndarray, bbox: list[int]) -> np.ndarray:
    """Square crop centred on the FOV bounding box ``[y0, x0, y1, x1]``, padded with black."""
    y0, x0, y1, x1 = bbox
    side = max(y1 - y0, x1 - x0)
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    top, left = cy - side // 2, cx - side // 2
    out = np.zeros((side, side) + rgb.shape[2:], rgb.dtype)
    sy0, sx0 = max(top, 0), max(left, 0)
    sy1, sx1 = min(top + side, rgb.shape[0]), min(left + side, rgb.shape[1])
    out[sy0 - top:sy1 - top, sx0 - left:sx1 - left] = rgb[sy0:sy1, sx0:sx1]
    return out


# ---------------------------------------------------------------------------- pathology
def macenko_stains(rgb: np.ndarray, io: float = 240.0, alpha: float = 1.0, beta: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """Macenko et al. (2009) stain matrix and concentrations of an H&E image.

    Returns:
        ``(stains [3, 2] unit optical-density vectors (H first, E second), concentrations [2, N])``.
    """
    od = -np.log((rgb.reshape(-1, 3).astype(np.float64) + 1.0) / io)
    od_hat = od[(od > beta).all(axis=1)]
    if len(od_hat) < 10:
        raise ValueError("too little tissue for stain estimation")
    _, vecs = np.linalg.eigh(np.cov(od_hat.T))
    plane = vecs[:, 1:3]  # the two largest eigenvectors
    proj = od_hat @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, alpha), np.percentile(phi, 100 - alpha)
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    stains = np.stack([v1, v2], axis=1) if v1[0] > v2[0] else np.stack([v2, v1], axis=1)  # H has more red OD
    stains *= np.sign(stains.sum(axis=0, keepdims=True))
    stains /= np.linalg.norm(stains, axis=0, keepdims=True)
    conc = np.linalg.lstsq(stains, od.T, rcond=None)[0]
    return stains, conc


#: Reference H&E stain matrix and maximal concentrations (Macenko's published defaults).
HE_REF = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
MAX_C_REF = np.array([1.9705, 1.0308])


def macenko_normalize(rgb: np.ndarray, io: float = 240.0) -> np.ndarray:
    """Normalise an H&E ``[H, W, 3]`` uint8 image to the reference stain appearance (Macenko)."""
    try:
        stains, conc = macenko_stains(rgb, io)
    except (ValueError, np.linalg.LinAlgError):
        return rgb
    max_c = np.percentile(conc, 99, axis=1)
    conc = conc * (MAX_C_REF / np.maximum(max_c, 1e-6))[:, None]
    out = io * np.exp(-HE_REF @ conc)
    return np.clip(out.T.reshape(rgb.shape), 0, 255).astype(np.uint8)


@PREPROCESSORS.register(PATHOLOGY)
@_optional("stain_norm")
def preprocess_pathology(sample: Sample, size: int = 224, magnification: float = 20.0, max_tiles: int = 16,
                         stain_norm: bool = False) -> np.ndarray:
    """``[T, 3, S, S]``: up to ``max_tiles`` tissue tiles (most tissue first) at ``magnification``.

    A whole-slide sample tiled at another magnification or size is re-tiled from the slide;
    a photograph is one tile. ``stain_norm`` applies Macenko normalisation per tile.
    """
    tiles = sample.tiles
    grid = sample.meta.get("tile_grid")
    if sample.format == "wsi" and grid and (grid["magnification"] != magnification or grid["tile_size"] != size
                                            or len(tiles) < min(max_tiles, grid["n_tissue"])):
        from m3bind.io.wsi import read_slide

        tiles = read_slide(sample.path, magnification=magnification, tile_size=size, max_tiles=max_tiles).tiles
    if tiles is None:
        tiles = sample.array[None]
    if len(tiles) == 0:  # no tissue found: fall back on the thumbnail
        tiles = sample.array[None]
    out = []
    for t in tiles[:max_tiles]:
        if stain_norm:
            t = macenko_normalize(t)
        x = t.astype(np.float32) / 255.0
        if x.shape[:2] != (size, size):
            x = resize_keep_aspect(x, size, 1.0)  # pad with white glass
        out.append(np.moveaxis(x, -1, 0))
    return (np.stack(out) - 0.5) / 0.5


# ---------------------------------------------------------------------------- volumes
def resize_volume(vol: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Resize ``[Z, Y, X]`` (or ``[C, Z, Y, X]``) to ``shape`` without aliasing.

    Axes that shrink are first averaged over their source extent (area interpolation), so
    that 1-mm slices reduced to a 5-mm grid are slab means rather than every fifth slice;
    what remains is trilinear (torch, ``align_corners=False``), which is the identity on
    axes already at their size.
    """
    import torch
    import torch.nn.functional as F

    shape = tuple(int(s) for s in shape)
    t = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))
    t = t[None, None] if vol.ndim == 3 else t[None]
    shrunk = tuple(min(n, m) for n, m in zip(t.shape[2:], shape))
    if shrunk != tuple(t.shape[2:]):
        t = F.interpolate(t, size=shrunk, mode="area")
    if shrunk != shape:
        t = F.interpolate(t, size=shape, mode="trilinear", align_corners=False)
    return t[0, 0].numpy() if vol.ndim == 3 else t[0].numpy()


def center_crop_pad(vol: np.ndarray, shape: tuple[int, ...], pad_value: float) -> np.ndarray:
    """Centre-crop or centre-pad the last ``len(shape)`` axes of ``vol`` to ``shape``."""
    out = np.full(vol.shape[: vol.ndim - len(shape)] + tuple(shape), pad_value, np.float32)
    src, dst = [], []
    for n, m in zip(vol.shape[-len(shape):], shape):
        if n >= m:
            s0 = (n - m) // 2
            src.append(slice(s0, s0 + m))
            dst.append(slice(0, m))
        else:
            d0 = (m - n) // 2
            src.append(slice(0, n))
            dst.append(slice(d0, d0 + n))
    lead = (slice(None),) * (vol.ndim - len(shape))
    out[lead + tuple(dst)] = vol[lead + tuple(src)]
    return out


def apply_hu_window(hu: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Clip Hounsfield units to ``[lo, hi]`` and map linearly onto ``[0, 1]``."""
    return (np.clip(hu, lo, hi) - lo) / (hi - lo)


@PREPROCESSORS.register(CT)
def preprocess_ct(sample: Sample, grid: tuple[int, int, int] = (64, 128, 128),
                  spacing: tuple[float, float, float] | None = (5.0, 2.5, 2.5),
                  hu_window: tuple[float, float] = (-1000.0, 400.0)) -> np.ndarray:
    """``[1, D, H, W]``: HU clipped to ``hu_window`` and mapped to ``[-1, 1]``, resampled to
    ``spacing`` mm (trilinear) and centre-cropped/padded (with air) to ``grid``; with
    ``spacing=None`` the volume is resized straight to ``grid``."""
    vol = sample.array.astype(np.float32)
    if vol.ndim == 2:
        vol = vol[None]
    lo, hi = float(hu_window[0]), float(hu_window[1])
    if hi <= lo:
        raise ConfigError(f"hu_window {hu_window} must be (low, high)")
    x = apply_hu_window(vol, lo, hi)
    if spacing is None or sample.spacing is None:
        x = resize_volume(x, grid)
    else:
        target = [max(1, round(n * s / t)) for n, s, t in zip(x.shape, sample.spacing, spacing)]
        x = resize_volume(x, target)
        x = center_crop_pad(x, grid, 0.0)
    return ((x - 0.5) / 0.5)[None]



def brain_mask(vol: np.ndarray) -> np.ndarray:
    """Foreground (head) mask of an MRI volume: above the Otsu threshold of the non-zero voxels."""
    from skimage.filters import threshold_otsu

    nz = vol[vol > 0]
    if nz.size < 10 or float(np.ptp(nz)) == 0:
        return vol > 0
    return vol > float(threshold_otsu(nz)) * 0.5


def _sequence_channels(sample: Sample, sequences: tuple[str, ...]) -> dict[str, np.ndarray]:
    vol = sample.array.astype(np.float32)
    names = [n.lower() for n in (sample.channel_names or [])]
    if vol.ndim == 4 and any(n in sequences for n in names):
        return {n: vol[i] for i, n in enumerate(names) if n in sequences}
    first = vol if vol.ndim == 3 else vol[0]
    seq = str(sample.meta.get("sequence", "")).lower()
    return {seq if seq in sequences else sequences[0]: first}


@PREPROCESSORS.register(MRI)
def preprocess_mri(sample: Sample, grid: tuple[int, int, int] = (24, 256, 256),
                   sequences: tuple[str, ...] = ("t1", "t2", "flair", "dwi")) -> np.ndarray:
    """``[C, D, H, W]`` with ``C = len(sequences)``: each sequence z-scored within its brain
    mask (background 0), resized to ``grid``; sequences the sample lacks are zero. A single
    unnamed volume fills the slot of ``meta["sequence"]``, else the first slot."""
    sequences = tuple(s.lower() for s in sequences)
    have = _sequence_channels(sample, sequences)
    out = np.zeros((len(sequences),) + tuple(grid), np.float32)
    for i, name in enumerate(sequences):
        if name not in have:
            continue
        v = have[name]
        m = brain_mask(v)
        if m.sum() > 1:
            mu, sd = float(v[m].mean()), float(v[m].std())
            z = np.where(m, (v - mu) / (sd if sd > 0 else 1.0), 0.0).astype(np.float32)
        else:
            z = np.zeros_like(v)
        out[i] = resize_volume(z, grid)
    return out


# ---------------------------------------------------------------------------- ECG
def resample_signal(x: np.ndarray, fs_in: float, fs_out: float) -> np.ndarray:
    """Polyphase resampling of ``[..., T]`` from ``fs_in`` to ``fs_out`` Hz (anti-aliased)."""
    from scipy.signal import resample_poly

    if abs(fs_in - fs_out) < 1e-9:
        return x.astype(np.float64)
    frac = Fraction(fs_out / fs_in).limit_denominator(1000)
    return resample_poly(x.astype(np.float64), frac.numerator, frac.denominator, axis=-1)


def bandpass(x: np.ndarray, fs: float, band: tuple[float, float] | None, order: int = 3) -> np.ndarray:
    """Zero-phase Butterworth band-pass of ``[..., T]`` (``sosfiltfilt``); ``None`` disables it."""
    from scipy.signal import butter, sosfiltfilt

    if band is None:
        return x
    lo, hi = float(band[0]), min(float(band[1]), 0.45 * fs)
    if not 0 < lo < hi:
        raise ConfigError(f"band {band} invalid at {fs} Hz")
    sos = butter(order, [lo, hi], btype="bandpass", fs=fs, output="sos")
    padlen = min(3 * (2 * len(sos) + 1), x.shape[-1] - 1)
    if padlen < 1:
        return x
    return sosfiltfilt(sos, x, axis=-1, padlen=padlen)


@PREPROCESSORS.register(ECG)
def preprocess_ecg(sample: Sample, fs: float = 100.0, seconds: float = 10.0,
                   band: tuple[float, float] | None = (0.5, 40.0)) -> np.ndarray:
    """``[12, fs*seconds]``: resampled to ``fs``, band-pass filtered, first ``seconds`` kept
    (shorter records zero-padded at the end, as MEDBind), each lead z-scored (flat or
    missing leads stay zero)."""
    if sample.sampling_rate is None:
        raise UnsupportedFormat("ECG sample without a sampling rate", sample.path)
    x = resample_signal(sample.array, float(sample.sampling_rate), float(fs))
    x = bandpass(x, float(fs), band)
    n = int(round(fs * seconds))
    out = np.zeros((x.shape[0], n), np.float64)
    m = min(n, x.shape[1])
    out[:, :m] = x[:, :m]
    mu = out[:, :m].mean(axis=1, keepdims=True) if m else 0.0
    sd = out[:, :m].std(axis=1, keepdims=True) if m else 1.0
    ok = (np.asarray(sd) > 1e-6).reshape(-1, 1)
    out[:, :m] = np.where(ok, (out[:, :m] - mu) / np.where(ok, sd, 1.0), 0.0)
    return out.astype(np.float32)
