"""12-lead ECG from a dipole model: a vectorcardiogram projected on the lead vectors.

The heart's electrical activity is a time-varying 3D dipole ``d(t)`` (x to the patient's
left, y inferior, z anterior), a sum of Gaussian waves per beat (P, septal Q, R, S, T) plus
an ST-segment plateau. Each lead is the projection of ``d(t)`` on its lead vector: limb
leads I and II in the frontal plane at 0 and 60 degrees (III, aVR, aVL, aVF follow from
Einthoven's and Goldberger's relations, so III = II - I holds exactly), precordial leads
V1..V6 in the horizontal plane from right-anterior to left-lateral.

Findings: atrial fibrillation (irregularly irregular RR, no P waves, fibrillatory baseline),
LVH (larger, more posterior-leftward QRS; strain: lateral ST depression and T inversion),
myocardial infarction (pathological Q waves and ST elevation in one territory's leads),
sinus tachycardia (rate 105-135). Nuisance: axis rotation, amplitude scaling, heart-rate
variability, baseline wander, power-line hum, muscle noise.
"""

from __future__ import annotations

import numpy as np

LEAD_NAMES: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF",
                               "V1", "V2", "V3", "V4", "V5", "V6")

# precordial lead directions in the horizontal plane, degrees from the left (x) towards anterior (z)
_PRECORDIAL_DEG = (120.0, 95.0, 75.0, 55.0, 25.0, 0.0)
_PRECORDIAL_GAIN = (1.0, 1.6, 1.9, 2.0, 1.8, 1.5)

#: Unit direction of the injury current (ST elevation) per MI territory.
TERRITORY = {"inferior": np.array([0.0, 1.0, 0.1]), "anterior": np.array([0.1, 0.0, 1.0]),
             "lateral": np.array([1.0, -0.3, -0.1])}


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def _rotation(rng: np.random.Generator, deg: float) -> np.ndarray:
    """A random rotation of up to about ``deg`` degrees (anatomical axis variation)."""
    a = np.deg2rad(rng.normal(0, deg, 3))
    cx, sx, cy, sy, cz, sz = np.cos(a[0]), np.sin(a[0]), np.cos(a[1]), np.sin(a[1]), np.cos(a[2]), np.sin(a[2])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def project(dipole: np.ndarray) -> np.ndarray:
    """Project a ``[T, 3]`` dipole on the 12 leads -> ``[12, T]`` in mV."""
    x, y, z = dipole[:, 0], dipole[:, 1], dipole[:, 2]
    lead_i = x
    lead_ii = 0.5 * x + np.sqrt(3) / 2 * y
    lead_iii = lead_ii - lead_i
    avr = -(lead_i + lead_ii) / 2
    avl = lead_i - lead_ii / 2
    avf = lead_ii - lead_i / 2
    pre = [g * (np.cos(np.deg2rad(d)) * x + np.sin(np.deg2rad(d)) * z - 0.15 * y)
           for d, g in zip(_PRECORDIAL_DEG, _PRECORDIAL_GAIN)]
    return np.stack([lead_i, lead_ii, lead_iii, avr, avl, avf, *pre]).astype(np.float32)


def _rr_intervals(rng: np.random.Generator, duration: float, hr: float, af: bool) -> np.ndarray:
    """Beat times: sinus rhythm with respiratory sinus arrhythmia, or AF's irregular RR."""
    times, t = [], rng.uniform(0.05, 0.6)
    mean_rr = 60.0 / hr
    resp_f, resp_phase = rng.uniform(0.2, 0.33), rng.uniform(0, 2 * np.pi)
    while t < duration + 1.0:
        times.append(t)
        if af:
            rr = mean_rr * rng.uniform(0.6, 1.45)
        else:
            rr = mean_rr * (1 + 0.04 * np.sin(2 * np.pi * resp_f * t + resp_phase) + 0.015 * rng.standard_normal())
        t += max(rr, 0.3)
    return np.array(times)


def render_ecg(findings: dict, attrs: dict, rng: np.random.Generator, fs: float = 500.0,
               seconds: float = 10.0, noise: float = 1.0) -> tuple[np.ndarray, float]:
    """Render one 12-lead ECG.

    Args:
        findings: Finding dict (``atrial fibrillation``, ``left ventricular hypertrophy``,
            ``myocardial infarction``, ``sinus tachycardia``).
        attrs: ``hr``, ``af_rate``, ``territory``, ``signal``.
        rng: Random generator.
        fs: Sampling rate (Hz).
        seconds: Duration (s).
        noise: Nuisance multiplier.

    Returns:
        ``(signal, heart_rate)``: ``signal`` is ``[12, fs*seconds]`` float32 in mV (lead order
        :data:`LEAD_NAMES`), ``heart_rate`` the mean ventricular rate in beats per minute.
    """
    sig = float(attrs.get("signal", 1.0))
    n = round(fs * seconds)
    t = np.arange(n) / fs
    af = bool(findings.get("atrial fibrillation"))
    lvh = bool(findings.get("left ventricular hypertrophy"))
    mi = bool(findings.get("myocardial infarction"))
    hr = float(attrs.get("af_rate", 90) if af else attrs.get("hr", 70))
    rot = _rotation(rng, 12 * noise)
    amp = np.exp(noise * rng.uniform(-0.45, 0.45))  # body habitus, electrode contact
    p_dir, q_dir = rot @ _unit([0.6, 0.7, 0.3]), rot @ _unit([-0.5, 0.1, 0.8])
    r_dir, s_dir = rot @ _unit([0.55, 0.75, -0.35]), rot @ _unit([-0.2, -0.4, -0.9])
    t_dir = rot @ _unit([0.6, 0.6, 0.45])
    r_amp, s_amp, t_amp, st_vec = 1.3, 0.45, 0.32, np.zeros(3)
    if lvh:
        r_amp *= 1 + 0.8 * sig
        s_amp *= 1 + 1.0 * sig
        r_dir = rot @ _unit([0.75, 0.3, -0.6])
        s_dir = rot @ _unit([-0.1, -0.3, -1.0])
        t_dir = -t_dir * (0.3 + 0.7 * sig) + t_dir * (1 - sig) * 0.3  # strain: T opposite the QRS
        st_vec = -0.10 * sig * r_dir
    q_extra = np.zeros(3)
    if mi:
        terr = rot @ _unit(TERRITORY[attrs.get("territory", "anterior")])
        st_vec = st_vec + 0.32 * sig * terr
        q_extra = -0.45 * sig * terr  # pathological Q: early QRS force away from the infarct
        t_dir = _unit(t_dir + 0.8 * terr)
    beats = _rr_intervals(rng, seconds, hr, af)
    rr_mean = float(np.mean(np.diff(beats))) if len(beats) > 1 else 60.0 / hr
    qt = 0.40 * np.sqrt(rr_mean)  # Bazett
    dip = np.zeros((n, 3))

    def wave(center, width, vec, a):
        lo, hi = int(max((center - 5 * width) * fs, 0)), int(min((center + 5 * width) * fs, n))
        if hi <= lo:
            return
        tt = t[lo:hi]
        dip[lo:hi] += a * np.exp(-0.5 * ((tt - center) / width) ** 2)[:, None] * vec[None, :]

    for b in beats:
        if not af:
            wave(b - 0.16, 0.022, p_dir, 0.15)
        wave(b - 0.025, 0.010, q_dir, 0.12)
        if mi:
            wave(b - 0.015, 0.016, q_extra, 1.0)
        wave(b, 0.011, r_dir, r_amp)
        wave(b + 0.03, 0.012, s_dir, s_amp)
        t_center = b + qt - 0.07
        wave(t_center, 0.045, t_dir, t_amp * (1.3 if mi else 1.0))
        if st_vec.any():  # ST plateau from the J point into the T wave
            lo, hi = int((b + 0.04) * fs), int(min((t_center + 0.02) * fs, n))
            if hi > lo >= 0:
                tt = t[lo:hi]
                env = 1 / (1 + np.exp(-(tt - b - 0.05) / 0.006)) * 1 / (1 + np.exp((tt - t_center) / 0.03))
                dip[lo:hi] += env[:, None] * st_vec[None, :]
    if af:  # fibrillatory waves, strongest in V1 and the inferior leads
        f_dir = _unit([0.2, 0.7, 0.7])
        fw = sum(rng.uniform(0.02, 0.05) * np.sin(2 * np.pi * rng.uniform(4, 8) * t + rng.uniform(0, 6.3))
                 for _ in range(3))
        dip += fw[:, None] * f_dir[None, :]
    leads = project(dip * amp)
    # nuisance: baseline wander, power-line hum, muscle and white noise (per lead)
    k = leads.shape[0]
    wander = (rng.uniform(0.03, 0.2, (k, 1)) * noise
              * np.sin(2 * np.pi * rng.uniform(0.1, 0.45, (k, 1)) * t[None, :] + rng.uniform(0, 6.3, (k, 1))))
    hum = 0.01 * noise * rng.random() * np.sin(2 * np.pi * (50 if rng.random() < 0.5 else 60) * t)
    white = 0.012 * noise * rng.standard_normal((k, n))
    leads = leads + wander + hum[None, :] + white
    return leads.astype(np.float32), 60.0 / rr_mean
