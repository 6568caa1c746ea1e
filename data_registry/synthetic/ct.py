"""Chest CT volume renderer in Hounsfield units, array ``[Z, Y, X]`` (z from the lung bases up,
y anterior to posterior, x from the patient's right to left as axial images are displayed).

Anatomy: elliptical body with a subcutaneous fat layer, rib ring and vertebra (bone), two
lungs (air, tapering to the apices) with branching vessels, a heart and aorta in the
mediastinum, the patient table. Findings: solid lung nodule, consolidation with air
bronchograms, dependent pleural effusion (water attenuation). Nuisance: body size, lung
volume, position, reconstruction noise.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def render_ct(findings: dict, attrs: dict, rng: np.random.Generator, shape=(24, 64, 64),
              noise: float = 1.0) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Render one chest CT.

    Args:
        findings: Finding dict (``lung nodule``, ``consolidation``, ``pleural effusion``).
        attrs: ``nodule_side``, ``nodule_mm``, ``consolidation_side``, ``effusion_side``,
            ``effusion_size``, ``signal``.
        rng: Random generator.
        shape: ``(Z, Y, X)`` voxels.
        noise: Nuisance multiplier.

    Returns:
        ``(volume_hu, spacing_mm)`` with ``spacing_mm = (slice, row, column)``.
    """
    sig = float(attrs.get("signal", 1.0))
    nz, ny, nx = shape
    fov, z_extent = 360.0, 240.0
    spacing = (z_extent / nz, fov / ny, fov / nx)
    z, y, x = np.meshgrid(np.linspace(0, 1, nz), np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij")
    bw, bh = rng.uniform(0.80, 0.92), rng.uniform(0.55, 0.66)
    oy = rng.normal(0.05, 0.03 * noise)
    body_r = (x / bw) ** 2 + ((y - oy) / bh) ** 2
    vol = np.full(shape, -1000.0)
    vol[body_r < 1] = -100.0  # fat
    inner = (x / (bw - 0.07)) ** 2 + ((y - oy) / (bh - 0.06)) ** 2
    vol[inner < 1] = 40.0  # muscle / soft tissue
    # ribs: a thin, interrupted bone ring under the muscle layer
    ring = (inner > 0.78) & (inner < 0.86) & (np.sin(8 * np.arctan2(y - oy, x) + 3 * z) > -0.2)
    vol[ring] = 500.0
    # lungs: two ellipsoids, narrower towards the apex (z=1), cut by the domes at the base
    lv = rng.uniform(0.9, 1.05)
    taper = np.sqrt(np.clip(1.15 - z, 0.05, None))
    lungs = {}
    for side, sgn in (("right", -1), ("left", 1)):
        lx, ly = sgn * 0.42, oy - 0.02
        e = ((x - lx) / (0.33 * lv * taper)) ** 2 + ((y - ly) / (0.48 * lv * taper)) ** 2
        dome = z > 0.12 + 0.25 * np.exp(-((x - lx) ** 2 + (y - ly) ** 2) / 0.05) * (1.0 if side == "right" else 0.8)
        lungs[side] = (e < 1) & dome & (inner < 0.78)
    lung = lungs["right"] | lungs["left"]
    vol[lung] = -860.0 + 30 * rng.standard_normal()
    # heart (left-anterior, lower slices), aorta, vertebra, spinal canal
    heart = (((x - 0.10) / 0.27) ** 2 + ((y - oy + 0.12) / 0.25) ** 2 + ((z - 0.25) / 0.38) ** 2) < 1
    vol[heart] = 45.0
    aorta = ((x + 0.02) ** 2 + (y - oy - 0.22) ** 2) < 0.006
    vol[aorta] = 50.0
    asc = ((x + 0.08) ** 2 + (y - oy + 0.05) ** 2) < 0.007
    vol[asc & (z > 0.5)] = 50.0
    vert = (x ** 2 + (y - oy - 0.38) ** 2) < 0.012
    vol[vert] = 400.0
    vol[(x ** 2 + (y - oy - 0.40) ** 2) < 0.002] = 30.0
    # pulmonary vessels: random walks from the hila, drawn as short bright tubes
    vess = np.zeros(shape, dtype=bool)
    for side, sgn in (("right", -1), ("left", 1)):
        for _ in range(10):
            p = np.array([rng.uniform(0.25, 0.6) * (nz - 1), (0.5 + 0.5 * (oy - 0.05)) * (ny - 1),
                          (0.5 + sgn * 0.12) * (nx - 1)])
            d = np.array([rng.normal(0, 0.3), rng.normal(0, 0.6), sgn * 1.0])
            steps = int(nx * 0.35)
            jitter = rng.normal(0, 0.15, (steps, 3))
            pts = np.empty((steps, 3))
            for s in range(steps):
                d = d / np.sqrt(d @ d) + jitter[s]
                p = p + d * (0.8 / np.sqrt(d @ d))
                pts[s] = p
            idx = np.round(pts).astype(int)
            ok = np.all((idx >= 0) & (idx < np.array(shape)), axis=1)
            vess[idx[ok, 0], idx[ok, 1], idx[ok, 2]] = True
    vol[vess & lung] = 30.0
    # findings
    if findings.get("pleural effusion"):
        eside = attrs.get("effusion_side", "right")
        for side in (("right", "left") if eside == "bilateral" else (eside,)):
            sgn = -1 if side == "right" else 1
            depth = (0.25 + 0.35 * float(attrs.get("effusion_size", 0.7))) * sig
            pleural = (inner < 0.80) & (x * sgn > 0.08) & ~heart & (z < 0.75)
            fluid = pleural & (y > oy + 0.40 - depth * 0.55) & (vol < 0)
            vol[fluid] = 10.0 + 5 * rng.standard_normal()
    if findings.get("consolidation"):
        side = attrs.get("consolidation_side", "right")
        sgn = -1 if side == "right" else 1
        c = np.array([rng.uniform(0.2, 0.45), oy + rng.uniform(0.0, 0.2), sgn * 0.42])
        blob = ((z - c[0]) / 0.22) ** 2 + ((y - c[1]) / 0.28) ** 2 + ((x - c[2]) / 0.20) ** 2
        rough = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) * 4
        cons = lungs[side] & (blob + rough * 0.3 < 1.0 * (0.7 + 0.3 * sig))
        bronch = vess | (np.abs(ndimage.gaussian_filter(rng.standard_normal(shape), 1.0)) < 0.03)
        vol[cons & ~bronch] = -40.0 + 25 * rng.standard_normal()
    if findings.get("lung nodule"):
        side = attrs.get("nodule_side", "right")
        cand = np.argwhere(ndimage.binary_erosion(lungs[side], iterations=2) if lungs[side].sum() > 200 else lungs[side])
        if len(cand):
            cz, cy, cx = cand[int(rng.integers(len(cand)))]
            r_mm = float(attrs.get("nodule_mm", 15)) / 2 * (0.6 + 0.4 * sig)
            d = np.sqrt(((np.arange(nz)[:, None, None] - cz) * spacing[0]) ** 2
                        + ((np.arange(ny)[None, :, None] - cy) * spacing[1]) ** 2
                        + ((np.arange(nx)[None, None, :] - cx) * spacing[2]) ** 2)
            vol[d < r_mm * (1 + 0.15 * rng.standard_normal(shape) * 0.5)] = 35.0
    # table below the patient
    vol[:, int(ny * (0.5 + 0.5 * (oy + bh + 0.08))):int(ny * (0.5 + 0.5 * (oy + bh + 0.12))) + 1, :] = 200.0
    vol = ndimage.gaussian_filter(vol, (0.5, 0.7, 0.7))
    vol += rng.normal(0, 12 * noise, shape)
    return np.clip(vol, -1024, 3000).astype(np.float32), spacing
