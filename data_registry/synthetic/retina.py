"""Colour fundus photograph renderer (RGB uint8).

A circular field of view over an orange-red fundus with vignetting and choroidal texture;
an optic disc (bright, with a cup) on the nasal side; a darker macula and fovea temporally;
a vessel tree of arterioles (thinner, lighter) and venules (wider, darker) leaving the disc
in superior and inferior arcades with branches. Diabetic retinopathy by grade adds
microaneurysms, dot-blot haemorrhages, hard exudates, cotton-wool spots and venous beading;
hypertensive retinopathy narrows the arterioles and adds arteriovenous nicking.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def _walk(rng, p, a, length, curve, step):
    pts = [np.array(p, float)]
    for _ in range(max(int(length / step), 2)):
        a += curve + rng.normal(0, 0.04)
        pts.append(pts[-1] + step * np.array([np.cos(a), np.sin(a)]))
    return np.array(pts)


def _vessel_paths(rng: np.random.Generator, disc, macula, size: int, toward_x: float):
    """Polylines ``(points, generation)``: superior and inferior temporal arcades arching
    around the macula with side branches pointing away from it, and shorter nasal vessels."""
    paths = []
    dx = macula[0] - disc[0]
    for up in (-1, 1):
        s = np.linspace(0, 1, 60)
        ax = disc[0] + dx * s * 1.9 + rng.normal(0, size * 0.01)
        ay = disc[1] + up * size * rng.uniform(0.19, 0.24) * np.sin(np.clip(s * 1.5, 0, 1) * np.pi / 2)
        ay = ay + up * size * 0.08 * np.clip(s - 0.7, 0, None)
        arc = np.stack([ax, ay], 1)
        paths.append((arc, 0))
        for i in rng.choice(np.arange(8, 55), size=5, replace=False):
            d = arc[i + 1] - arc[i]
            a = np.arctan2(d[1], d[0]) + up * np.sign(toward_x) * rng.uniform(0.4, 0.9) * (1 if rng.random() < 0.7 else -1)
            paths.append((_walk(rng, arc[i], a, size * rng.uniform(0.12, 0.25), 0.0, size * 0.01), 1))
        for _ in range(2):  # nasal
            a = np.arctan2(up * rng.uniform(0.2, 1.0), -toward_x)
            paths.append((_walk(rng, disc, a, size * rng.uniform(0.2, 0.3), rng.normal(0, 0.01), size * 0.01), 1))
    return paths


def render_retina(findings: dict, attrs: dict, rng: np.random.Generator, size: int = 128,
                  noise: float = 1.0) -> np.ndarray:
    """Render one fundus photograph.

    Args:
        findings: Finding dict (``microaneurysms``, ``haemorrhages``, ``hard exudates``,
            ``venous beading``, ``arteriolar narrowing``).
        attrs: ``dr_grade`` (0-3), ``eye`` (left/right), ``signal``.
        rng: Random generator.
        size: Output height and width.
        noise: Nuisance multiplier.

    Returns:
        ``[size, size, 3]`` uint8.
    """
    sig = float(attrs.get("signal", 1.0))
    ss = 2
    n = size * ss
    eye_sign = 1 if attrs.get("eye", "right") == "right" else -1  # disc nasal
    cx, cy = n / 2 + rng.normal(0, n * 0.01 * noise), n / 2 + rng.normal(0, n * 0.01 * noise)
    disc = (cx + eye_sign * n * rng.uniform(0.17, 0.21), cy + rng.normal(0, n * 0.02))
    macula = (cx - eye_sign * n * 0.08, cy + rng.normal(0, n * 0.01))
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    r = np.hypot(xx - cx, yy - cy) / (n * 0.47)
    base = np.array([rng.uniform(0.72, 0.88), rng.uniform(0.32, 0.42), rng.uniform(0.12, 0.2)])
    vign = np.clip(1 - 0.45 * r ** 2.2, 0, 1)
    tex = np.asarray(Image.fromarray((rng.random((n // 8, n // 8)) * 255).astype(np.uint8)).resize((n, n), Image.BICUBIC),
                     dtype=np.float32) / 255
    img = base[None, None, :] * vign[..., None] * (0.92 + 0.12 * tex[..., None])
    dm = np.hypot(xx - macula[0], yy - macula[1]) / (n * 0.09)
    img *= (1 - 0.35 * np.exp(-dm ** 2))[..., None]
    dd = np.hypot(xx - disc[0], yy - disc[1]) / (n * 0.065)
    img = img * (1 - np.exp(-dd ** 4))[..., None] + np.exp(-dd ** 4)[..., None] * np.array([0.98, 0.85, 0.55])
    img = img + np.exp(-(dd / 0.45) ** 4)[..., None] * np.array([0.02, 0.12, 0.25])  # cup
    canvas = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    narrow = bool(findings.get("arteriolar narrowing"))
    beading = bool(findings.get("venous beading"))
    toward = -eye_sign
    for kind in ("vein", "artery"):
        jitter = np.array([rng.normal(0, n * 0.012), rng.normal(0, n * 0.012)])
        for pts, gen in _vessel_paths(rng, disc, macula, n, toward):
            pts = pts + jitter * np.linspace(0, 1, len(pts))[:, None]
            w = n * (0.016 if kind == "vein" else 0.011) * (0.65 ** gen)
            if kind == "artery" and narrow:
                w *= 1 - 0.45 * sig
            col = (120, 20, 18) if kind == "vein" else (185, 45, 30)
            for i in range(len(pts) - 1):
                ww = w * (1 + 0.5 * np.sin(i * 1.3)) if (beading and kind == "vein") else w
                draw.line([tuple(pts[i]), tuple(pts[i + 1])], fill=col, width=max(round(ww), 1))
    grade = int(attrs.get("dr_grade", 0))
    fov = lambda: (cx + rng.normal(0, n * 0.18), cy + rng.normal(0, n * 0.15))
    if grade >= 1 and findings.get("microaneurysms"):
        for _ in range(int((4 + 6 * grade) * sig)):
            x, y = fov()
            rr = n * 0.005
            draw.ellipse([x - rr, y - rr, x + rr, y + rr], fill=(110, 10, 10))
    if findings.get("haemorrhages"):
        for _ in range(int((4 + 8 * (grade - 1)) * sig)):
            x, y = fov()
            rr = n * rng.uniform(0.01, 0.022)
            draw.ellipse([x - rr, y - rr * rng.uniform(0.7, 1.2), x + rr, y + rr], fill=(95, 12, 10))
    if findings.get("hard exudates"):
        for _ in range(int((5 + 8 * (grade - 1)) * sig)):
            x, y = macula[0] + rng.normal(0, n * 0.09), macula[1] + rng.normal(0, n * 0.07)
            rr = n * rng.uniform(0.005, 0.012)
            draw.ellipse([x - rr, y - rr, x + rr, y + rr], fill=(235, 215, 110))
    if grade >= 3:
        for _ in range(int(3 * sig)):  # cotton-wool spots
            x, y = fov()
            rr = n * rng.uniform(0.02, 0.035)
            draw.ellipse([x - rr, y - rr * 0.7, x + rr, y + rr * 0.7], fill=(225, 200, 170))
    if narrow:  # arteriovenous nicking: pale gaps where arterioles cross venules
        for _ in range(int(3 * sig)):
            x, y = fov()
            draw.ellipse([x - n * 0.01, y - n * 0.01, x + n * 0.01, y + n * 0.01], fill=(200, 90, 50))
    canvas = canvas.filter(ImageFilter.GaussianBlur(radius=ss * 0.6)).resize((size, size), Image.LANCZOS)
    out = np.asarray(canvas, dtype=np.float32) / 255
    gain = rng.uniform(0.8, 1.15) ** noise
    out = out * gain + rng.normal(0, 0.012 * noise, out.shape)
    yy, xx = np.mgrid[0:size, 0:size]
    mask = np.hypot(xx - cx / ss, yy - cy / ss) < size * 0.47
    out = out * mask[..., None]
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)
