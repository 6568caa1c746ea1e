"""Simulated patients: systemic conditions, the findings they cause in each organ, and splits.

A patient carries patient-level *conditions* (heart failure, pneumonia, diabetes ...). Each
condition shows, with some probability, as *findings* in several modalities (heart failure:
cardiomegaly and effusion on CXR, left-ventricular hypertrophy on ECG, effusion on CT). Each
modality item gets one primary *label* from :data:`m3bind.modalities.SPECS` by a fixed
priority over its findings.

Cross-modal relevance (used by the evaluation of linked test patients): two patients are
relevant to each other when their condition sets intersect, ``healthy`` counting as a
condition of its own (see :func:`same_condition`). :func:`primary_condition` gives a single
condition per patient for stricter, single-class use.

Everything here is deterministic per seed: a patient's random stream is
``np.random.default_rng([seed, patient_index, stream])`` and no global state is touched.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field

import numpy as np

from m3bind.modalities import MODALITIES, SPECS

HEALTHY = "healthy"

#: Patient-level systemic conditions, in priority order (most specific / severe first);
#: :func:`primary_condition` picks the first one a patient has.
CONDITIONS: tuple[str, ...] = (
    "lung_cancer", "stroke", "myocardial_infarction", "heart_failure", "pneumonia",
    "atrial_fibrillation", "diabetes", "hypertension",
)

#: Findings that can be reported per modality (keys of the manifest's ``findings`` JSON).
FINDINGS: dict[str, tuple[str, ...]] = {
    "cxr": ("cardiomegaly", "pleural effusion", "consolidation", "lung mass"),
    "ct": ("lung nodule", "consolidation", "pleural effusion"),
    "ecg": ("atrial fibrillation", "left ventricular hypertrophy", "myocardial infarction",
            "sinus tachycardia"),
    "retina": ("microaneurysms", "haemorrhages", "hard exudates", "venous beading",
               "arteriolar narrowing"),
    "pathology": ("tumor", "high grade"),
    "mri": ("acute ischemic stroke", "white matter lesions", "brain tumor"),
}

#: Per modality, (label, rule) in priority order; the first rule that holds gives the label.
#: Rules read the finding dict; the last entry is the normal label.
_LABEL_PRIORITY: dict[str, tuple[tuple[str, str], ...]] = {
    "cxr": (("lung mass", "lung mass"), ("consolidation", "consolidation"),
            ("cardiomegaly", "cardiomegaly"), ("pleural effusion", "pleural effusion"),
            ("no finding", "")),
    "ct": (("lung nodule", "lung nodule"), ("consolidation", "consolidation"),
           ("pleural effusion", "pleural effusion"), ("normal", "")),
    "ecg": (("atrial fibrillation", "atrial fibrillation"),
            ("myocardial infarction", "myocardial infarction"),
            ("left ventricular hypertrophy", "left ventricular hypertrophy"),
            ("sinus tachycardia", "sinus tachycardia"), ("normal sinus rhythm", "")),
    "mri": (("brain tumor", "brain tumor"), ("acute ischemic stroke", "acute ischemic stroke"),
            ("white matter lesions", "white matter lesions"), ("normal", "")),
}


@dataclass
class Patient:
    """One simulated patient.

    Attributes:
        index: Position in the cohort (feeds the random streams).
        patient_id: Stable identifier, e.g. ``SIM00042``.
        age: Age in years.
        sex: ``"M"`` or ``"F"``.
        conditions: Systemic conditions (subset of :data:`CONDITIONS`), priority order.
        split: ``train``, ``val`` or ``test``.
        modalities: The modalities this patient contributes items for.
        pair_id: Non-empty for patients of the paired CXR-ECG training subset.
        admission: Date of the index admission.
        findings: Per modality, the true finding dict (finding -> 0/1).
        attrs: Per modality, rendering parameters (sides, sites, grades, severities).
    """

    index: int
    patient_id: str
    age: int
    sex: str
    conditions: tuple[str, ...]
    split: str = "train"
    modalities: tuple[str, ...] = ()
    pair_id: str = ""
    admission: _dt.date = _dt.date(2020, 1, 1)
    findings: dict[str, dict[str, int]] = field(default_factory=dict)
    attrs: dict[str, dict] = field(default_factory=dict)

    @property
    def condition(self) -> str:
        """The ``condition`` manifest value: conditions ';'-joined, ``healthy`` when none."""
        return ";".join(self.conditions) if self.conditions else HEALTHY


def condition_set(condition: str) -> frozenset[str]:
    """The set of conditions in a manifest ``condition`` string (``healthy`` is one)."""
    return frozenset(c for c in str(condition).split(";") if c)


def same_condition(a: str, b: str) -> bool:
    """The cross-modal relevance rule: True when two patients share at least one condition.

    ``a`` and ``b`` are manifest ``condition`` strings; ``healthy`` matches only ``healthy``.
    """
    return bool(condition_set(a) & condition_set(b))


def primary_condition(condition: str) -> str:
    """The highest-priority condition in a manifest ``condition`` string (``healthy`` if none)."""
    cs = condition_set(condition)
    for c in CONDITIONS:
        if c in cs:
            return c
    return HEALTHY


def label_for(modality: str, findings: dict[str, int], attrs: dict) -> str:
    """The primary label of one item from its findings (one of ``SPECS[modality].labels``)."""
    if modality == "retina":
        grade = int(attrs.get("dr_grade", 0))
        if grade > 0:
            return ("mild diabetic retinopathy", "moderate diabetic retinopathy",
                    "severe diabetic retinopathy")[min(grade, 3) - 1]
        return "hypertensive retinopathy" if findings.get("arteriolar narrowing") else "no retinopathy"
    if modality == "pathology":
        if not findings.get("tumor"):
            return "normal tissue"
        return "high grade tumor" if findings.get("high grade") else "low grade tumor"
    for label, key in _LABEL_PRIORITY[modality]:
        if not key or findings.get(key):
            return label
    raise AssertionError("unreachable")


def canonical_findings(modality: str, label: str, rng: np.random.Generator) -> tuple[dict, dict]:
    """A finding dict and attributes that produce ``label`` (used for label noise)."""
    f = {k: 0 for k in FINDINGS[modality]}
    attrs: dict = {}
    if modality == "retina":
        grades = {"mild diabetic retinopathy": 1, "moderate diabetic retinopathy": 2,
                  "severe diabetic retinopathy": 3}
        g = grades.get(label, 0)
        attrs["dr_grade"] = g
        f["microaneurysms"] = int(g >= 1)
        f["haemorrhages"] = int(g >= 2)
        f["hard exudates"] = int(g >= 2)
        f["venous beading"] = int(g >= 3)
        f["arteriolar narrowing"] = int(label == "hypertensive retinopathy")
    elif modality == "pathology":
        f["tumor"] = int(label != "normal tissue")
        f["high grade"] = int(label == "high grade tumor")
        attrs["grade"] = 2 if f["high grade"] else int(f["tumor"])
    elif label in f:
        f[label] = 1
    assert label_for(modality, f, attrs) == label, (modality, label)
    return f, attrs


def _sample_conditions(rng: np.random.Generator, age: int, sex: str) -> tuple[str, ...]:
    """Correlated systemic conditions of a hospital cohort (plausible, not epidemiology)."""
    a = (age - 60) / 15.0
    logit = lambda z: 1.0 / (1.0 + np.exp(-z))
    has: dict[str, bool] = {}
    has["hypertension"] = rng.random() < logit(-0.7 + 0.9 * a)
    has["diabetes"] = rng.random() < logit(-1.6 + 0.4 * a + 0.5 * has["hypertension"])
    has["myocardial_infarction"] = rng.random() < logit(
        -2.8 + 0.5 * a + 0.6 * has["hypertension"] + 0.6 * has["diabetes"] + 0.3 * (sex == "M"))
    has["heart_failure"] = rng.random() < logit(
        -2.6 + 0.5 * a + 0.8 * has["hypertension"] + 1.4 * has["myocardial_infarction"])
    has["atrial_fibrillation"] = rng.random() < logit(-2.6 + 0.7 * a + 1.0 * has["heart_failure"])
    has["stroke"] = rng.random() < logit(
        -3.0 + 0.5 * a + 1.2 * has["atrial_fibrillation"] + 0.6 * has["hypertension"])
    has["pneumonia"] = rng.random() < logit(-2.0 + 0.3 * a)
    has["lung_cancer"] = rng.random() < logit(-2.6 + 0.5 * a)
    return tuple(c for c in CONDITIONS if has[c])


def _findings(p: Patient, rng: np.random.Generator, signal: float) -> None:
    """Fill ``p.findings`` and ``p.attrs`` for every modality from the patient's conditions."""
    c = set(p.conditions)
    side = lambda: str(rng.choice(["left", "right"]))
    # -- chest X-ray
    hf, pn, lc = "heart_failure" in c, "pneumonia" in c, "lung_cancer" in c
    cardiomegaly = hf and rng.random() < 0.8
    effusion = (hf and rng.random() < 0.5) or (pn and rng.random() < 0.15) or (lc and rng.random() < 0.1)
    cxr = {"cardiomegaly": int(cardiomegaly), "pleural effusion": int(effusion),
           "consolidation": int(pn and rng.random() < 0.9), "lung mass": int(lc and rng.random() < 0.85)}
    eff_side = "bilateral" if hf and rng.random() < 0.6 else side()
    cxr_attrs = {
        "ctr": float(np.clip(rng.normal(0.60, 0.035), 0.54, 0.7) if cardiomegaly
                     else np.clip(rng.normal(0.44, 0.03), 0.36, 0.49)),
        "effusion_side": eff_side, "effusion_size": float(rng.uniform(0.5, 1.0)),
        "consolidation_side": side(), "consolidation_zone": str(rng.choice(["lower", "middle", "upper"])),
        "mass_side": side(), "mass_zone": str(rng.choice(["upper", "middle", "lower"])),
        "mass_size": float(rng.uniform(0.7, 1.0)),
    }
    p.findings["cxr"], p.attrs["cxr"] = cxr, cxr_attrs
    # -- chest CT (same episode: same sides)
    ct = {"lung nodule": int(lc and rng.random() < 0.95), "consolidation": int(pn and rng.random() < 0.9),
          "pleural effusion": int((hf and rng.random() < 0.6) or (pn and rng.random() < 0.15))}
    p.findings["ct"] = ct
    p.attrs["ct"] = {"nodule_side": cxr_attrs["mass_side"], "nodule_mm": float(rng.uniform(18, 34)),
                     "consolidation_side": cxr_attrs["consolidation_side"],
                     "effusion_side": eff_side, "effusion_size": float(rng.uniform(0.5, 1.0))}
    # -- ECG
    af = "atrial_fibrillation" in c and rng.random() < 0.85
    mi = "myocardial_infarction" in c and rng.random() < 0.8
    lvh = (hf and rng.random() < 0.7) or ("hypertension" in c and rng.random() < 0.35)
    tachy = not af and (pn and rng.random() < 0.7 or hf and rng.random() < 0.15)
    p.findings["ecg"] = {"atrial fibrillation": int(af), "left ventricular hypertrophy": int(lvh),
                         "myocardial infarction": int(mi), "sinus tachycardia": int(tachy)}
    p.attrs["ecg"] = {"territory": str(rng.choice(["anterior", "inferior", "lateral"])),
                      "hr": float(rng.uniform(105, 135) if tachy else rng.uniform(56, 92)),
                      "af_rate": float(rng.uniform(75, 125))}
    # -- retina
    dm, htn = "diabetes" in c, "hypertension" in c
    grade = int(rng.choice(4, p=[0.3, 0.3, 0.25, 0.15])) if dm else 0
    narrowing = htn and rng.random() < 0.6
    p.findings["retina"] = {"microaneurysms": int(grade >= 1), "haemorrhages": int(grade >= 2),
                            "hard exudates": int(grade >= 2), "venous beading": int(grade >= 3),
                            "arteriolar narrowing": int(narrowing)}
    p.attrs["retina"] = {"dr_grade": grade, "eye": str(rng.choice(["left", "right"]))}
    # -- pathology (lung biopsy)
    tumor = lc and rng.random() < 0.9
    high = tumor and rng.random() < 0.5
    p.findings["pathology"] = {"tumor": int(tumor), "high grade": int(high)}
    p.attrs["pathology"] = {"grade": 2 if high else int(tumor), "site": "lung"}
    # -- head MRI
    stroke = "stroke" in c and rng.random() < 0.9
    wml = (htn and rng.random() < 0.35) or (dm and rng.random() < 0.2) or (p.age > 75 and rng.random() < 0.15)
    mets = lc and rng.random() < 0.35
    p.findings["mri"] = {"acute ischemic stroke": int(stroke), "white matter lesions": int(wml),
                         "brain tumor": int(mets)}
    p.attrs["mri"] = {"stroke_side": side(), "territory": str(rng.choice(["MCA", "PCA", "ACA"])),
                      "tumor_side": side(), "n_wml": int(rng.integers(4, 12))}
    for m in MODALITIES:
        p.attrs[m]["signal"] = signal


#: Relative chance that a patient with a condition is imaged with a modality (referral bias);
#: a base weight of 1.0 applies to everyone.
_INDICATION: dict[str, dict[str, float]] = {
    "cxr": {"heart_failure": 1.5, "pneumonia": 2.0, "lung_cancer": 1.0},
    "ct": {"lung_cancer": 2.0, "pneumonia": 1.0, "heart_failure": 0.5},
    "ecg": {"atrial_fibrillation": 3.0, "myocardial_infarction": 2.5, "heart_failure": 1.0, "hypertension": 0.5},
    "retina": {"diabetes": 3.0, "hypertension": 1.5},
    "pathology": {"lung_cancer": 8.0},
    "mri": {"stroke": 5.0, "lung_cancer": 1.0, "hypertension": 0.5},
}


def modality_weights(conditions: tuple[str, ...]) -> np.ndarray:
    """Referral-biased probabilities over :data:`MODALITIES` for a one-modality patient."""
    w = np.array([1.0 + sum(_INDICATION[m].get(c, 0.0) for c in conditions) for m in MODALITIES])
    return w / w.sum()


def build_patients(n: int, seed: int, *, val_fraction: float = 0.1, test_fraction: float = 0.15,
                   paired_fraction: float = 0.0, test_modalities: tuple[str, ...] = MODALITIES,
                   signal: float = 1.0) -> list[Patient]:
    """Draw ``n`` patients with conditions, findings, splits and modalities.

    Train and val patients contribute exactly one modality each (drawn with referral bias),
    except the paired subset (``paired_fraction`` of train patients) who contribute a CXR
    and an ECG sharing a ``pair_id``. Test patients contribute every modality in
    ``test_modalities`` (the linked set).

    Args:
        n: Number of patients.
        seed: Random seed.
        val_fraction: Fraction of patients in ``val``.
        test_fraction: Fraction of patients in the linked ``test`` split.
        paired_fraction: Fraction of train patients in the paired CXR-ECG subset.
        test_modalities: Modalities every test patient has.
        signal: Effect-size multiplier passed to the renderers (1.0 = default difficulty).

    Returns:
        The patients, in index order.
    """
    if n < 1:
        raise ValueError("need at least one patient")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum below 1")
    if not 0 <= paired_fraction <= 1:
        raise ValueError("paired_fraction must be in [0, 1]")
    split_rng = np.random.default_rng([seed, 0x5EED])
    order = split_rng.permutation(n)
    n_test, n_val = round(test_fraction * n), round(val_fraction * n)
    split_of = np.array(["train"] * n, dtype=object)
    split_of[order[:n_test]] = "test"
    split_of[order[n_test:n_test + n_val]] = "val"
    train_idx = order[n_test + n_val:]
    paired = {int(i) for i in train_idx[: round(paired_fraction * len(train_idx))]}
    patients = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, 1])
        sex = "M" if rng.random() < 0.5 else "F"
        age = int(np.clip(rng.normal(62, 15), 18, 95))
        conds = _sample_conditions(rng, age, sex)
        admission = _dt.date(2015, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 3650)))
        p = Patient(index=i, patient_id=f"SIM{i:05d}", age=age, sex=sex, conditions=conds,
                    split=str(split_of[i]), admission=admission)
        _findings(p, rng, signal)
        if p.split == "test":
            p.modalities = tuple(test_modalities)
        elif i in paired:
            p.modalities, p.pair_id = ("cxr", "ecg"), f"PAIR{i:05d}"
        else:
            p.modalities = (MODALITIES[int(rng.choice(len(MODALITIES), p=modality_weights(conds)))],)
        patients.append(p)
    return patients


def check_labels() -> None:
    """Assert every label this module can emit is a zero-shot label of its modality."""
    for m in MODALITIES:
        labels = set(SPECS[m].labels)
        for lab in (_LABEL_PRIORITY.get(m) or ()):
            assert lab[0] in labels, (m, lab[0])


check_labels()
