"""Chest CT volume renderer in Hounsfield units, array ``[Z, Y, X]`` (z from the lung bases up,
y anterior to posterior, x from the patient's right to left as axial images are displayed).

Anatomy: elliptical body with a subcutaneous fat layer, rib ring and vertebra (bone), two
lungs (air, tapering to the apices) with branching vessels, a heart and aorta in the
mediastinum, the patient table. Findings, sized to stay visible on a coarse ``[8, 32, 32]``
model grid in the lung window (-1000..400 HU):

- lung nodule / mass: a solid (+35 HU) lobulated sphere of 14-30 mm with a thin
  ground-glass halo, placed wholly inside the lung;
- consolidation: a lobar / segmental region of soft-tissue attenuation (about +25 HU) with
  branching air bronchograms, anywhere from the anterior to the posterior lung (not layering);
- pleural effusion: dependent (posterior) water-attenuation fluid (about +10 HU) with a
  horizontal meniscus, and a band of compressive atelectasis in the lung just above it.

Nuisance: body size, lung volume and inspiration (parenchymal density), patient position
(left-right and anterior-posterior shift, scan range), dependent atelectasis as a normal
supine variant (a thin posterior band of denser lung), reconstruction noise. Position and
density vary so that coarse pixel intensities alone do not give the finding away.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _airway_tree(rng: np.random.Generator, start: np.ndarray, direction: np.ndarray, shape, steps: int,
                 branches: int) -> np.ndarray:
    """Voxel mask of a few random-walk tubes (one voxel wide) from ``start`` along ``direction``."""
    mask = np.zeros(shape, dtype=bool)
    for _ in range(branches):
        p, d = start.astype(float).copy(), direction.astype(float).copy()
        jitter = rng.normal(0, 0.15, (steps, 3))
        pts = np.empty((steps, 3))
        for s in range(steps):
            d = d / np.sqrt(d @ d) + jitter[s]
            p = p + d * (0.8 / np.sqrt(d @ d))
            pts[s] = p
        idx = np.round(pts).astype(int)
        ok = np.all((idx >= 0) & (idx < np.array(shape)), axis=1)
        mask[idx[ok, 0], idx[ok, 1], idx[ok, 2]] = True
    return mask


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
    out_shape = tuple(int(n) for n in shape)
    fov, z_extent = 360.0, 240.0
    spacing = (z_extent / out_shape[0], fov / out_shape[1], fov / out_shape[2])
    # thick slices integrate their slab: render sub-slices at most ~5 mm apart, average them
    sub = max(1, int(np.ceil(spacing[0] / 5.0 - 1e-9)))
    shape = (out_shape[0] * sub, out_shape[1], out_shape[2])
    nz, ny, nx = shape
    fine = (spacing[0] / sub, spacing[1], spacing[2])
    # patient position: left-right shift ox, scan range shift oz (coordinates relative to the patient)
    ox, oz = rng.uniform(-0.07, 0.07) * noise, rng.uniform(-0.06, 0.06) * noise
    # slice centres at linspace(0, 1, Z); the sub-slices spread over each slice's slab
    zc = np.linspace(0, 1, out_shape[0])[:, None] + ((np.arange(sub) + 0.5) / sub - 0.5) / max(out_shape[0] - 1, 1)
    z = zc.reshape(-1)[:, None, None] - oz
    y = np.linspace(-1, 1, ny)[None, :, None]
    x = np.linspace(-1, 1, nx)[None, None, :] - ox
    bw, bh = rng.uniform(0.80, 0.92), rng.uniform(0.55, 0.66)
    oy = rng.normal(0.05, 0.03 * noise) + rng.uniform(-0.08, 0.08) * noise
    body_r = np.broadcast_to((x / bw) ** 2 + ((y - oy) / bh) ** 2, shape)
    vol = np.full(shape, -1000.0)
    vol[body_r < 1] = -100.0  # fat
    inner = np.broadcast_to((x / (bw - 0.07)) ** 2 + ((y - oy) / (bh - 0.06)) ** 2, shape)
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
    vol[lung] = -850.0 + 45 * noise * rng.standard_normal()  # inspiration level
    # heart (left-anterior, lower slices), aorta, vertebra, spinal canal
    heart = (((x - 0.10) / 0.27) ** 2 + ((y - oy + 0.12) / 0.25) ** 2 + ((z - 0.25) / 0.38) ** 2) < 1
    vol[heart] = 45.0
    aorta = np.broadcast_to(((x + 0.02) ** 2 + (y - oy - 0.22) ** 2) < 0.006, shape)
    vol[aorta] = 50.0
    asc = ((x + 0.08) ** 2 + (y - oy + 0.05) ** 2) < 0.007
    vol[asc & (z > 0.5)] = 50.0
    vert = np.broadcast_to((x ** 2 + (y - oy - 0.38) ** 2) < 0.012, shape)
    vol[vert] = 400.0
    vol[np.broadcast_to((x ** 2 + (y - oy - 0.40) ** 2) < 0.002, shape)] = 30.0
    # pulmonary vessels: random walks from the hila, drawn as short bright tubes
    vess = np.zeros(shape, dtype=bool)
    for sgn in (-1, 1):
        for _ in range(10):
            p = np.array([rng.uniform(0.25, 0.6) * (nz - 1), (0.5 + 0.5 * (oy - 0.05)) * (ny - 1),
                          (0.5 + 0.5 * (ox + sgn * 0.24)) * (nx - 1)])
            d = np.array([rng.normal(0, 0.3), rng.normal(0, 0.6), sgn * 1.0])
            vess |= _airway_tree(rng, p, d, shape, int(nx * 0.35), 1)
    vol[vess & lung] = 30.0
    if rng.random() < 0.5:  # dependent atelectasis, a normal supine finding: a posterior band
        band = rng.uniform(0.04, 0.18) * noise
        post = np.zeros(shape, dtype=bool)
        for side in lungs.values():  # the lowest (most posterior) lung voxels of each column
            deep = np.cumsum(side[:, ::-1, :], axis=1)[:, ::-1, :]  # lung voxels at or behind (y)
            post |= side & (deep <= max(1, round(band * ny / 2)))
        vol[post] = -400.0 + 60 * rng.standard_normal()
    # findings
    if findings.get("pleural effusion"):
        eside = attrs.get("effusion_side", "right")
        for side in (("right", "left") if eside == "bilateral" else (eside,)):
            sgn = -1 if side == "right" else 1
            depth = (0.35 + 0.35 * float(attrs.get("effusion_size", 0.7))) * sig
            level = oy + 0.40 - depth * 0.55  # horizontal meniscus (supine: fluid lies posteriorly)
            pleural = (inner < 0.80) & (x * sgn > 0.08) & ~heart & (z < 0.8)
            fluid = pleural & (y > level) & (vol < 0)
            vol[fluid] = 10.0 + 5 * rng.standard_normal()
            # compressive atelectasis: a band of denser lung just above the fluid
            atel = lungs[side] & ~fluid & (y > level - 0.12 * sig) & (z < 0.8)
            vol[atel] = -350.0 + 30 * rng.standard_normal()
    if findings.get("consolidation"):
        side = attrs.get("consolidation_side", "right")
        sgn = -1 if side == "right" else 1
        # a lobe or segment: centred anywhere from anterior to posterior, lower to upper zones
        c = np.array([rng.uniform(0.25, 0.65), oy + rng.uniform(-0.30, 0.20), sgn * 0.42])
        r = np.array([0.26, 0.30, 0.24]) * (0.75 + 0.25 * sig)
        blob = ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2
        rough = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) * 4
        cons = lungs[side] & (blob + rough * 0.3 < 1.0)
        start = np.array([(c[0] + oz) * (nz - 1), (0.5 + 0.5 * (oy - 0.05)) * (ny - 1),
                          (0.5 + 0.5 * (ox + sgn * 0.3)) * (nx - 1)])
        bronch = _airway_tree(rng, start, np.array([0.0, (c[1] - oy) * 2, sgn * 1.0]), shape, int(nx * 0.4), 4)
        vol[cons] = 25.0 + 15 * rng.standard_normal()
        vol[cons & bronch] = -900.0  # air bronchograms
    if findings.get("lung nodule"):
        side = attrs.get("nodule_side", "right")
        r_mm = float(attrs.get("nodule_mm", 20)) / 2 * (0.6 + 0.4 * sig)
        depth_mm = ndimage.distance_transform_edt(lungs[side], sampling=fine)
        cand = np.argwhere(depth_mm >= min(0.8 * r_mm, depth_mm.max()))
        if len(cand):
            cz, cy, cx = cand[int(rng.integers(len(cand)))]
            dz = (np.arange(nz)[:, None, None] - cz) * fine[0]
            dy = (np.arange(ny)[None, :, None] - cy) * fine[1]
            dx = (np.arange(nx)[None, None, :] - cx) * fine[2]
            d = np.sqrt(dz ** 2 + dy ** 2 + dx ** 2)
            # lobulated margin: the radius varies smoothly with direction
            az, el = np.arctan2(dy, dx), np.arctan2(dz, np.hypot(dx, dy))
            k = rng.integers(3, 6)
            lobes = 1 + 0.15 * np.sin(k * az + rng.uniform(0, 6)) * np.cos(2 * el + rng.uniform(0, 6))
            vol[(d < r_mm * lobes * 1.35) & lung] = -550.0  # ground-glass halo
            vol[d < r_mm * lobes] = 35.0
    # table below the patient
    vol[:, int(ny * (0.5 + 0.5 * (oy + bh + 0.08))):int(ny * (0.5 + 0.5 * (oy + bh + 0.12))) + 1, :] = 200.0
    vol = ndimage.gaussian_filter(vol, (0.5 * sub, 0.7, 0.7)).reshape(out_shape[0], sub, ny, nx).mean(1)
    vol += rng.normal(0, 12 * noise, out_shape)
    return np.clip(vol, -1024, 3000).astype(np.float32), spacing
