"""Head MRI renderer: four co-registered sequences (T1, T2, FLAIR, DWI), each ``[Z, Y, X]``.

Tissue maps (scalp fat, skull, CSF, cortical grey matter, white matter, deep grey nuclei,
lateral ventricles) are built once per study; each sequence maps tissues to intensities by
its own contrast table (T1: white matter bright, CSF dark; T2: CSF bright; FLAIR: T2 with
CSF suppressed; DWI b=1000: tissue mid-grey, CSF dark). Lesions carry their own per-sequence
signal: acute ischaemic stroke is bright on DWI (restricted diffusion) and faint on FLAIR in
a vascular territory; white-matter lesions are periventricular FLAIR/T2-bright foci; a
tumour is T1-dark, T2-bright with FLAIR-bright oedema and mass effect. Nuisance: head size
and position, bias field, Rician noise.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

SEQUENCES: tuple[str, ...] = ("t1", "t2", "flair", "dwi")

#: Intensity per tissue and sequence (arbitrary units, roughly [0, 1]).
_CONTRAST = {
    #            t1    t2    flair dwi
    "fat":      (0.95, 0.65, 0.55, 0.10),
    "bone":     (0.05, 0.05, 0.05, 0.02),
    "csf":      (0.12, 1.00, 0.06, 0.08),
    "gm":       (0.55, 0.62, 0.62, 0.50),
    "wm":       (0.82, 0.42, 0.45, 0.40),
    "deep":     (0.62, 0.55, 0.55, 0.45),
    "stroke":   (0.45, 0.75, 0.72, 1.00),
    "wml":      (0.60, 0.90, 0.95, 0.45),
    "tumor":    (0.35, 0.85, 0.80, 0.60),
    "oedema":   (0.55, 0.80, 0.85, 0.50),
}


def render_mri(findings: dict, attrs: dict, rng: np.random.Generator, shape=(16, 64, 64),
               noise: float = 1.0) -> tuple[dict[str, np.ndarray], tuple[float, float, float]]:
    """Render one multi-sequence head MRI study.

    Args:
        findings: ``acute ischemic stroke``, ``white matter lesions``, ``brain tumor``.
        attrs: ``stroke_side``, ``territory`` (MCA/PCA/ACA), ``tumor_side``, ``n_wml``, ``signal``.
        rng: Random generator.
        shape: ``(Z, Y, X)``; z runs from inferior to superior, y anterior to posterior,
            x from the patient's right to left.
        noise: Nuisance multiplier.

    Returns:
        ``(volumes, spacing_mm)``: ``volumes[seq]`` is ``[Z, Y, X]`` float32 for each of
        :data:`SEQUENCES`; ``spacing_mm = (slice, row, column)``.
    """
    sig = float(attrs.get("signal", 1.0))
    nz, ny, nx = shape
    fov, z_extent = 220.0, 128.0
    spacing = (z_extent / nz, fov / ny, fov / nx)
    z, y, x = np.meshgrid(np.linspace(-1, 1, nz), np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij")
    a, b = rng.uniform(0.66, 0.74), rng.uniform(0.80, 0.88)
    oy, ox = rng.normal(0, 0.02 * noise), rng.normal(0, 0.02 * noise)
    zc = np.clip(1 - (z * 0.85) ** 2, 0.05, 1) ** 0.5  # the head narrows to the vertex
    r = np.sqrt(((x - ox) / (a * zc)) ** 2 + ((y - oy) / (b * zc)) ** 2)
    lab = np.zeros(shape, np.int8)
    names = list(_CONTRAST)
    idx = {k: i + 1 for i, k in enumerate(names)}
    lab[r < 1.0] = idx["fat"]
    lab[r < 0.93] = idx["bone"]
    lab[r < 0.87] = idx["csf"]
    lab[r < 0.84] = idx["gm"]
    gyri = 0.06 * np.sin(14 * np.arctan2(y - oy, x - ox) + 6 * z)
    lab[r < 0.72 + gyri] = idx["wm"]
    deep = (((np.abs(x - ox) - 0.16) / 0.08) ** 2 + ((y - oy) / 0.14) ** 2 + (z / 0.35) ** 2) < 1
    lab[deep] = idx["deep"]
    vent = (((np.abs(x - ox) - 0.07) / 0.06) ** 2 + ((y - oy + 0.05) / 0.30) ** 2 + ((z - 0.1) / 0.35) ** 2) < 1
    lab[vent] = idx["csf"]
    lab[(np.abs(x - ox) < 0.015) & (r < 0.87) & (y - oy < -0.1)] = idx["csf"]  # interhemispheric fissure
    brain = r < 0.84
    if findings.get("white matter lesions"):
        wm = np.argwhere((lab == idx["wm"]) & (np.abs(x - ox) < 0.4) & (np.abs(x - ox) > 0.1))
        for _ in range(int(attrs.get("n_wml", 6) * (0.4 + 0.6 * sig))):
            c = wm[int(rng.integers(len(wm)))]
            rad = rng.uniform(1.0, 2.0)
            d = ((np.arange(nz)[:, None, None] - c[0]) / 0.7) ** 2 + (np.arange(ny)[None, :, None] - c[1]) ** 2 \
                + (np.arange(nx)[None, None, :] - c[2]) ** 2
            lab[(d < rad ** 2) & brain & (lab != idx["csf"])] = idx["wml"]
    if findings.get("acute ischemic stroke"):
        sgn = -1 if attrs.get("stroke_side", "left") == "right" else 1
        terr = attrs.get("territory", "MCA")
        ty = {"MCA": 0.0, "PCA": 0.55, "ACA": -0.45}.get(terr, 0.0)
        tx = {"MCA": 0.5, "PCA": 0.25, "ACA": 0.1}.get(terr, 0.5)
        wedge = (((x - ox - sgn * tx) / 0.25) ** 2 + ((y - oy - ty) / 0.28) ** 2 + ((z - 0.1) / 0.5) ** 2) \
            < (0.6 + 0.4 * sig)
        lab[wedge & brain & (lab != idx["csf"])] = idx["stroke"]
    if findings.get("brain tumor"):
        sgn = -1 if attrs.get("tumor_side", "right") == "right" else 1
        c = (rng.uniform(-0.1, 0.4), oy + rng.uniform(-0.3, 0.3), ox + sgn * rng.uniform(0.3, 0.45))
        dd = np.sqrt(((x - c[2]) / 0.13) ** 2 + ((y - c[1]) / 0.13) ** 2 + ((z - c[0]) / 0.3) ** 2)
        rad = 0.7 + 0.3 * sig
        lab[(dd < rad * 1.9) & brain & (lab != idx["csf"])] = idx["oedema"]
        lab[(dd < rad) & brain] = idx["tumor"]
    contrast = np.array([_CONTRAST[k] for k in names], dtype=np.float32)
    contrast = np.vstack([np.zeros((1, 4), np.float32), contrast])
    smooth = lambda v: ndimage.gaussian_filter(v, (0.4, 0.6, 0.6))
    bias = 1 + 0.12 * noise * (rng.normal() * x + rng.normal() * y + 0.5 * rng.normal() * z)
    out = {}
    for si, seq in enumerate(SEQUENCES):
        v = smooth(contrast[lab, si]) * bias
        s = 0.025 * noise
        v = np.sqrt((v + rng.normal(0, s, shape)) ** 2 + rng.normal(0, s, shape) ** 2)  # Rician
        out[seq] = (v * 1000).astype(np.float32)
    return out, spacing
