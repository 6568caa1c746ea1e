"""Frontal chest radiograph renderer (PA projection, display convention: bright = attenuating).

The image is an attenuation map built from anatomy in normalised coordinates (x to the
patient's left on the image's right, as radiographs are displayed; y downwards): a torso
with soft tissue, two lung fields above domed hemidiaphragms, a mediastinum and spine, a
heart whose width over the inner thoracic width is the cardiothoracic ratio, posterior ribs
and clavicles. Findings modify the map: pleural effusion (meniscus at the costophrenic
angle), consolidation (patchy opacity with air bronchograms), lung mass (lobulated nodule).
Nuisance: rotation, shift, scale, inspiration depth, exposure, blur and quantum noise.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_ZONES = {"upper": -0.35, "middle": -0.05, "lower": 0.22}


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return n / (n.std() + 1e-8)


def render_cxr(findings: dict, attrs: dict, rng: np.random.Generator, size: int = 128,
               noise: float = 1.0) -> tuple[np.ndarray, float]:
    """Render one radiograph.

    Args:
        findings: Finding dict (``cardiomegaly``, ``pleural effusion``, ``consolidation``, ``lung mass``).
        attrs: Rendering attributes (``ctr``, sides, zones, sizes, ``signal``).
        rng: Random generator.
        size: Output height and width in pixels.
        noise: Nuisance multiplier (1.0 default).

    Returns:
        ``(image, pixel_spacing_mm)``: ``image`` is ``[size, size]`` float32 in [0, 1].
    """
    sig = float(attrs.get("signal", 1.0))
    ss = 2 if size < 128 else 1  # supersample tiny images for smooth edges
    n = size * ss
    # positioning: rotation, shift, scale
    ang = np.deg2rad(rng.normal(0, 4 * noise))
    scale = 1 + noise * rng.uniform(-0.14, 0.08)
    cx0, cy0 = rng.normal(0, 0.07 * noise, 2)
    yy, xx = np.mgrid[-1:1:n * 1j, -1:1:n * 1j]
    xr = (np.cos(ang) * (xx - cx0) + np.sin(ang) * (yy - cy0)) / scale
    yr = (-np.sin(ang) * (xx - cx0) + np.cos(ang) * (yy - cy0)) / scale
    x, y = xr, yr

    insp = rng.uniform(-0.05, 0.05)  # inspiration depth moves the diaphragm
    ax = np.abs(x)
    shoulder = -0.78 + 0.35 * np.clip(ax - 0.45, 0, None) ** 2 / 0.25
    body = ((ax < 0.93 - 0.08 * np.clip(y - 0.4, 0, None)) & (y > shoulder)) | ((ax < 0.2) & (y <= -0.78))
    body = ndimage.gaussian_filter(body.astype(float), 1.5 * ss)
    dens = 0.40 * body
    thorax_w = 0.74 * (1 + noise * rng.uniform(-0.08, 0.06))  # habitus
    dome = lambda xc, base: base - 0.16 * np.clip(1 - ((x - xc) / 0.45) ** 2, 0, 1)
    diaph = np.where(x < 0, dome(-0.36, 0.58 + insp), dome(0.36, 0.63 + insp))  # right dome higher
    above = y < diaph
    # lung outline: narrow rounded apices widening towards the costophrenic angles
    lat = 0.30 + (thorax_w - 0.30) * np.sqrt(np.clip((y + 0.80) / 1.2, 0, 1))
    thorax = (ax < lat) & (y > -0.82)
    medi_half = 0.10 + 0.04 * np.clip(y + 0.3, 0, None)
    knob = ((x - 0.13) / 0.07) ** 2 + ((y + 0.28) / 0.07) ** 2 < 1  # aortic knob
    medi = ((np.abs(x - 0.02) < medi_half) & (y < 0.1)) | knob
    ctr = float(attrs.get("ctr", 0.44))
    if findings.get("cardiomegaly"):
        ctr = 0.46 + (ctr - 0.46) * sig  # the signal knob shrinks the effect towards normal
    heart_w = ctr * 2 * thorax_w
    right_border = -0.10 - 0.25 * max(ctr - 0.45, 0)
    hx = right_border + heart_w / 2
    hy = 0.36 + insp
    heart = (((x - hx) / (heart_w / 2)) ** 2 + ((y - hy) / 0.30) ** 2 < 1) & (y > -0.02) & (y < diaph + 0.02)
    lung = thorax & above & ~medi & ~heart & (ax > 0.04)
    lung_soft = ndimage.gaussian_filter(lung.astype(float), 1.2 * ss)
    dens = dens - 0.30 * lung_soft
    # vascular markings: fine smooth texture, denser towards hila and bases
    markings = np.abs(_smooth_noise(rng, (n, n), 1.5 * ss)) * np.exp(-((ax - 0.2) ** 2) / 0.10)
    dens += 0.06 * lung_soft * markings
    # abdomen below the diaphragm (with a gastric bubble on the left), heart, mediastinum, spine
    sub = (~above) & (ax < lat + 0.05)
    dens += 0.14 * ndimage.gaussian_filter(sub.astype(float), 1.0 * ss)
    bubble = ((x - 0.38) / 0.10) ** 2 + ((y - diaph - 0.09) / 0.06) ** 2 < 1
    dens -= 0.10 * ndimage.gaussian_filter(bubble.astype(float), 1.0 * ss)
    dens += 0.17 * ndimage.gaussian_filter(heart.astype(float), 1.0 * ss)
    dens += 0.15 * ndimage.gaussian_filter(medi.astype(float), 1.0 * ss)
    trachea = (np.abs(x - 0.0) < 0.035) & (y < -0.35)
    dens -= 0.08 * ndimage.gaussian_filter(trachea.astype(float), 1.0 * ss)
    spine = np.abs(x - 0.01) < 0.065
    dens += 0.07 * spine * body + 0.02 * spine * (np.sin(y * 42) > 0.5)
    # posterior ribs (sloping down laterally) over the hemithoraces, clavicles
    ribs = np.zeros_like(x)
    for k in range(10):
        y0 = -0.80 + k * 0.13
        cy = y0 + 0.55 * np.clip(ax - 0.06, 0, None) ** 1.6
        ribs += np.exp(-(((y - cy) / 0.028) ** 2)) * (ax > 0.06)
    ribs = np.clip(ribs, 0, 1) * (ax < lat + 0.06) * (y < diaph + 0.04)
    dens += 0.06 * ribs
    clav = np.exp(-(((y + 0.66 + 0.18 * ax - 0.25 * ax ** 2) / 0.03) ** 2)) * (ax < 0.62) * (ax > 0.06)
    dens += 0.10 * clav
    # findings
    if findings.get("pleural effusion"):
        side = attrs.get("effusion_side", "right")
        sides = ("left", "right") if side == "bilateral" else (side,)
        for s in sides:
            sgn = -1 if s == "right" else 1  # patient's right on image left
            h = (0.10 + 0.22 * float(attrs.get("effusion_size", 0.7))) * sig
            level = diaph - h - 0.25 * np.clip(ax - 0.25, 0, None)  # meniscus: higher laterally
            fluid = (y > level) & (y < diaph + 0.03) & thorax & (x * sgn > 0.05)
            dens += 0.24 * ndimage.gaussian_filter(fluid.astype(float), 2.0 * ss) * thorax
    if findings.get("consolidation"):
        sgn = -1 if attrs.get("consolidation_side", "right") == "right" else 1
        zy = _ZONES.get(attrs.get("consolidation_zone", "lower"), 0.2)
        blob = np.exp(-(((x - sgn * 0.42) / 0.2) ** 2 + ((y - zy) / 0.16) ** 2))
        patch = np.clip(blob * (1.2 + 0.6 * _smooth_noise(rng, (n, n), 3 * ss)), 0, 1.4)
        bronch = np.abs(_smooth_noise(rng, (n, n), 2 * ss)) < 0.12
        dens += sig * 0.42 * patch * lung_soft * (1 - 0.5 * bronch)
    if findings.get("lung mass"):
        sgn = -1 if attrs.get("mass_side", "right") == "right" else 1
        zy = _ZONES.get(attrs.get("mass_zone", "upper"), -0.3)
        r = (0.07 + 0.06 * float(attrs.get("mass_size", 0.8))) * (0.6 + 0.4 * sig)
        mx, my = sgn * rng.uniform(0.3, 0.5), zy + rng.uniform(-0.06, 0.06)
        th = np.arctan2(y - my, x - mx)
        rr = r * (1 + 0.15 * np.sin(3 * th + rng.uniform(0, 6)) + 0.08 * np.sin(5 * th))
        mass = np.hypot(x - mx, y - my) < rr
        dens += 0.26 * ndimage.gaussian_filter(mass.astype(float), 0.8 * ss)
    # exposure, scatter blur, quantum noise
    dens = ndimage.gaussian_filter(dens, 0.6 * ss)
    if ss > 1:
        dens = dens.reshape(size, ss, size, ss).mean(axis=(1, 3))
    gamma = np.exp(noise * rng.uniform(-0.35, 0.35))  # exposure / processing
    lo, hi = noise * rng.uniform(0.0, 0.12), 1 - noise * rng.uniform(0.0, 0.15)
    img = lo + (hi - lo) * np.clip(dens / 0.9, 0, 1) ** gamma
    img = img + 0.015 * noise * rng.standard_normal(img.shape) + 0.02 * noise * _smooth_noise(rng, img.shape, size / 16)
    spacing = 430.0 / size  # 43 cm detector
    return np.clip(img, 0, 1).astype(np.float32), spacing
