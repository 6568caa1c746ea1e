"""H&E-like histology renderer (RGB uint8) by Beer-Lambert stain mixing.

Haematoxylin (nuclei) and eosin (stroma, cytoplasm) optical densities are drawn as maps and
turned into colour with stain vectors, so colours mix like real stains. Normal tissue: round
glands with open lumens lined by one row of small uniform basal nuclei in fibrous stroma.
Low grade tumour: crowded, irregular glands with enlarged, mildly atypical, stratified
nuclei. High grade tumour: solid sheets of pleomorphic, hyperchromatic nuclei with little or
no gland formation and mitoses. Nuisance, per slide: stain amount and hue (labs and batches
differ by up to ~3x in each stain), section thickness, the scanner's white balance and
illumination, blur, stromal inflammation, gland size in normal tissue and stroma between the
tumour cell sheets, so that the mean colour of a field does not give its grade away.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# stain absorbance vectors (RGB optical density per unit stain), Ruifrok & Johnston style
_H = np.array([0.65, 0.70, 0.29])
_E = np.array([0.07, 0.99, 0.11])


def _stains(h: np.ndarray, e: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    hv = _H / np.linalg.norm(_H) * (1 + rng.normal(0, 0.15 * noise, 3))
    ev = _E / np.linalg.norm(_E) * (1 + rng.normal(0, 0.15 * noise, 3))
    # stain batches differ a lot between labs: amount of each stain varies by up to ~3x
    od = h[..., None] * hv * np.exp(noise * rng.uniform(-0.5, 0.7)) \
        + e[..., None] * ev * np.exp(noise * rng.uniform(-0.5, 0.7))
    # scanner white balance and lamp: the light through bare glass differs per channel
    light = 255 * (1 - noise * rng.uniform(0.0, 0.08)) * (1 - noise * rng.uniform(0.0, 0.04, 3))
    return (light * np.exp(-od)).clip(0, 255).astype(np.uint8)


def render_tissue(grade: int, rng: np.random.Generator, size: int = 128, noise: float = 1.0,
                  signal: float = 1.0, mpp: float = 1.0) -> np.ndarray:
    """Render a ``[size, size, 3]`` uint8 H&E field at ``mpp`` micrometres per pixel.

    Args:
        grade: 0 normal, 1 low grade tumour, 2 high grade tumour.
        rng: Random generator.
        size: Output height and width.
        noise: Nuisance multiplier.
        signal: Effect-size multiplier (shrinks atypia towards normal below 1).
        mpp: Micrometres per pixel (nuclei are about 6-15 um across).
    """
    ss = 2 if size <= 256 else 1  # supersample small fields for smooth nuclei
    n = size * ss
    px = 1.0 / (mpp / ss)  # pixels per micrometre on the canvas
    e_img = Image.new("L", (n, n), 0)
    h_img = Image.new("L", (n, n), 0)
    de, dh = ImageDraw.Draw(e_img), ImageDraw.Draw(h_img)
    # stroma: pale eosin ground substance with fibres
    de.rectangle([0, 0, n, n], fill=int(rng.uniform(45, 70)))
    for _ in range(int(n * n / 900)):
        x, y = rng.uniform(0, n, 2)
        a, length = rng.uniform(0, np.pi), rng.uniform(10, 40) * px / 2
        de.line([(x, y), (x + length * np.cos(a), y + length * np.sin(a))], fill=int(rng.uniform(40, 80)),
                width=max(1, int(px)))
    atyp = min(grade, 2) * signal
    nucleus_um = 5.5 + 2.2 * atyp
    pleo = 0.08 + 0.14 * atyp
    if grade < 2 or signal < 0.5:
        gland_um = (55 - 12 * atyp) * np.exp(noise * rng.uniform(-0.3, 0.3))
        spacing = gland_um * (1.45 - 0.3 * atyp)
        for gx in np.arange(rng.uniform(0, spacing), n / px + spacing, spacing):
            for gy in np.arange(rng.uniform(0, spacing), n / px + spacing, spacing):
                cx, cy = (gx + rng.normal(0, spacing * 0.15)) * px, (gy + rng.normal(0, spacing * 0.15)) * px
                rx = gland_um / 2 * px * rng.uniform(0.8, 1.2)
                ry = rx * rng.uniform(0.6 + 0.2 * (1 - atyp), 1.1)
                ang = np.linspace(0, 2 * np.pi, 64)
                wob = 1 + 0.12 * atyp * np.sin(3 * ang + rng.uniform(0, 6))
                poly = [(cx + rx * 1.25 * w * np.cos(t), cy + ry * 1.25 * w * np.sin(t)) for t, w in zip(ang, wob)]
                de.polygon(poly, fill=140)  # epithelium cytoplasm
                lum = [(cx + rx * 0.75 * w * np.cos(t), cy + ry * 0.75 * w * np.sin(t)) for t, w in zip(ang, wob)]
                de.polygon(lum, fill=10)  # lumen
                layers = 1 + int(atyp > 0.5)
                for layer in range(layers):
                    count = int(2 * np.pi * rx / (nucleus_um * px * 1.1))
                    for t in np.linspace(0, 2 * np.pi, max(count, 6), endpoint=False) + rng.uniform(0, 1):
                        rad = (1.0 + 0.18 * layer + rng.normal(0, 0.04 + 0.05 * atyp))
                        w = 1 + 0.12 * atyp * np.sin(3 * t)
                        x, y = cx + rx * rad * w * np.cos(t), cy + ry * rad * w * np.sin(t)
                        r = nucleus_um / 2 * px * np.exp(rng.normal(0, pleo))
                        dh.ellipse([x - r, y - r * 0.7, x + r, y + r * 0.7], fill=int(150 + 60 * atyp * rng.random()))
    else:  # solid sheets of pleomorphic cells
        de.rectangle([0, 0, n, n], fill=120)
        step = nucleus_um * 1.6 * px * np.exp(noise * rng.uniform(-0.1, 0.3))  # cell density varies
        for gx in np.arange(0, n + step, step):
            for gy in np.arange(0, n + step, step):
                x, y = gx + rng.normal(0, step * 0.3), gy + rng.normal(0, step * 0.3)
                r = nucleus_um / 2 * px * np.exp(rng.normal(0, pleo))
                e = rng.uniform(0.6, 1.0)
                dh.ellipse([x - r, y - r * e, x + r, y + r * e], fill=int(rng.uniform(150, 230)))
        for _ in range(int(rng.integers(1, 4))):  # mitoses: dark clumps
            x, y = rng.uniform(0, n, 2)
            dh.ellipse([x - 4 * px, y - 2 * px, x + 4 * px, y + 2 * px], fill=255)
        for _ in range(int(rng.integers(0, 3) * noise)):  # bands of pale stroma between the sheets
            (x0, y0), a, w = rng.uniform(0, n, 2), rng.uniform(0, np.pi), rng.uniform(6, 20) * px
            pts = [(x0 + t * np.cos(a), y0 + t * np.sin(a)) for t in (-2 * n, 2 * n)]
            dh.line(pts, fill=0, width=int(w))
            de.line(pts, fill=int(rng.uniform(45, 70)), width=int(w))
    # scattered stromal nuclei and lymphocytes; inflammation varies their density a lot
    inflammation = np.exp(noise * rng.uniform(-1.0, 1.4))
    for _ in range(int(n * n * inflammation / (px * px * 600))):
        x, y = rng.uniform(0, n, 2)
        r = rng.uniform(2, 3) * px
        dh.ellipse([x - r, y - r * 0.5, x + r, y + r * 0.5], fill=int(rng.uniform(120, 200)))
    blur = ImageFilter.GaussianBlur(radius=0.7 * ss * (1 + 0.3 * noise * rng.random()))
    h = np.asarray(h_img.filter(blur).resize((size, size), Image.BILINEAR), dtype=np.float32) / 255 * 1.6
    e = np.asarray(e_img.filter(blur).resize((size, size), Image.BILINEAR), dtype=np.float32) / 255 * 1.1
    e = e * np.where(h > 0.2, 0.5, 1.0)
    thick = np.exp(noise * rng.uniform(-0.25, 0.25))
    rgb = _stains(h * thick, e * thick + 0.05, rng, noise)
    rgb = rgb.astype(np.float32) + rng.normal(0, 3 * noise, rgb.shape)
    return rgb.clip(0, 255).astype(np.uint8)


def render_slide(grade: int, rng: np.random.Generator, size: int = 256, noise: float = 1.0,
                 signal: float = 1.0, mpp: float = 1.0) -> np.ndarray:
    """A small "slide": tissue on white glass with an irregular tissue outline, ``[size, size, 3]``."""
    tissue = render_tissue(grade, rng, size, noise, signal, mpp)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    th = np.arctan2(yy, xx)
    rad = 0.44 + 0.04 * np.sin(3 * th + rng.uniform(0, 6)) + 0.02 * np.sin(7 * th)
    mask = np.hypot(xx, yy) < rad
    glass = np.full_like(tissue, 242) + rng.integers(-3, 4, tissue.shape).astype(np.uint8)
    return np.where(mask[..., None], tissue, glass)
