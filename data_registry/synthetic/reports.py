"""Free-text reports for simulated items: varied phrasings, negations, hedges, incidentals.

Reports often name the patient's systemic conditions in a clinical-history line and, where
the finding fits, in the impression ("consistent with heart failure"), so that a shared text
space can link, say, a cardiomegaly chest X-ray to an LVH ECG of another patient. ECG reports
are machine statements; MRI reports are SeLIP-style clauses of (sequence, side, site,
appearance). Every choice is drawn from the generator passed in.
"""

from __future__ import annotations

import numpy as np

#: Ways a history line names each systemic condition.
CONDITION_PHRASES: dict[str, tuple[str, ...]] = {
    "heart_failure": ("congestive heart failure", "heart failure", "CHF", "chronic heart failure",
                      "congestive cardiac failure", "heart failure with reduced ejection fraction"),
    "pneumonia": ("pneumonia", "community-acquired pneumonia", "fever and productive cough",
                  "suspected chest infection", "lower respiratory tract infection"),
    "atrial_fibrillation": ("atrial fibrillation", "AF", "paroxysmal atrial fibrillation",
                            "irregular pulse, known AF", "atrial fibrillation on anticoagulation"),
    "myocardial_infarction": ("myocardial infarction", "acute chest pain, suspected MI", "prior MI",
                              "STEMI", "coronary artery disease with myocardial infarction"),
    "diabetes": ("diabetes", "type 2 diabetes mellitus", "diabetes mellitus", "known diabetic",
                 "insulin-dependent diabetes"),
    "hypertension": ("hypertension", "high blood pressure", "long-standing hypertension", "HTN",
                     "poorly controlled hypertension"),
    "lung_cancer": ("lung cancer", "suspected bronchial carcinoma", "lung malignancy",
                    "non-small cell lung cancer", "weight loss and haemoptysis, query malignancy"),
    "stroke": ("stroke", "acute onset hemiparesis", "suspected stroke", "sudden aphasia, query CVA",
               "transient weakness, rule out stroke"),
}

_HISTORY_LEADS = ("Clinical history: {}.", "History: {}.", "Indication: {}.", "Patient with {}.",
                  "Reason for exam: {}.", "Known {}.", "Clinical information: {}.")

#: Impression phrasings linking a finding to its systemic cause.
_CONSISTENT = ("consistent with {}", "in keeping with {}", "compatible with {}",
               "likely related to {}", "suggestive of {}")

_HEDGES = ("", "", "", "probable ", "likely ", "possible ", "suspected ")


def _pick(rng: np.random.Generator, options) -> str:
    return str(options[int(rng.integers(len(options)))])


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:] if s else s


def history_line(conditions: tuple[str, ...], rng: np.random.Generator, p: float = 0.7) -> str:
    """A clinical-history line naming some of the conditions (empty with probability 1-p)."""
    if rng.random() > p:
        return ""
    if not conditions:
        return _pick(rng, ("Clinical history: routine check.", "Indication: pre-operative assessment.",
                           "History: screening.", "Reason for exam: annual review.", ""))
    conds = list(conditions)
    rng.shuffle(conds)
    k = 1 + int(rng.random() < 0.4 and len(conds) > 1)
    names = [_pick(rng, CONDITION_PHRASES[c]) for c in conds[:k]]
    return _pick(rng, _HISTORY_LEADS).format(" and ".join(names))


def _link(condition: str, conditions: tuple[str, ...], rng: np.random.Generator, p: float = 0.6) -> str:
    if condition in conditions and rng.random() < p:
        return " " + _pick(rng, _CONSISTENT).format(_pick(rng, CONDITION_PHRASES[condition]))
    return ""


def _join(lines) -> str:
    return " ".join(s.strip() for s in lines if s and s.strip())


# ---------------------------------------------------------------- chest X-ray / CT

_CXR_POS = {
    "cardiomegaly": ("The cardiac silhouette is enlarged.", "Cardiomegaly.", "Enlarged heart size.",
                     "The heart is enlarged, cardiothoracic ratio {ctr:.2f}.",
                     "Moderate cardiomegaly is present."),
    "pleural effusion": ("{side} pleural effusion.",
                         "Blunting of the {side} costophrenic angle consistent with effusion.",
                         "There is a {side} pleural effusion.",
                         "Small to moderate {side} pleural effusion with meniscus."),
    "consolidation": ("Airspace consolidation in the {side} {zone} zone.",
                      "{side} {zone} zone opacity with air bronchograms.",
                      "Focal consolidation at the {side} {zone} lung.",
                      "Patchy airspace disease in the {side} {zone} zone."),
    "lung mass": ("A {size} mass is seen in the {side} {zone} zone.",
                  "Rounded opacity in the {side} {zone} lung, suspicious for malignancy.",
                  "{side} {zone} zone lung mass.", "There is a lobulated {side} {zone} pulmonary mass."),
}
_CXR_NEG = {
    "cardiomegaly": ("Heart size is normal.", "Normal cardiac silhouette.", "No cardiomegaly.",
                     "Cardiomediastinal contours are within normal limits."),
    "pleural effusion": ("No pleural effusion.", "No effusion.", "Costophrenic angles are sharp.",
                         "No pleural effusion or pneumothorax."),
    "consolidation": ("No focal consolidation.", "Lungs are clear.", "No airspace disease.",
                      "No consolidation."),
    "lung mass": ("No suspicious pulmonary mass.", "", "", "No nodules or masses."),
}
_CXR_IMPRESSION = {
    "cardiomegaly": ("cardiomegaly", "enlarged heart", "cardiac enlargement"),
    "pleural effusion": ("pleural effusion", "effusion"),
    "consolidation": ("consolidation", "pneumonia", "airspace consolidation"),
    "lung mass": ("lung mass", "pulmonary mass suspicious for malignancy", "lung lesion, recommend CT"),
}
_CXR_CAUSE = {"cardiomegaly": "heart_failure", "pleural effusion": "heart_failure",
              "consolidation": "pneumonia", "lung mass": "lung_cancer"}
_NORMAL_CXR = ("No acute cardiopulmonary process.", "Normal chest radiograph.",
               "No active disease.", "Clear lungs, normal heart size.", "No acute abnormality.")
_CXR_INCIDENTAL = ("Degenerative changes of the thoracic spine.", "Calcified granuloma in the right upper lobe.",
                   "Aortic knob calcification.", "Old healed rib fracture.", "Mild hyperinflation.")


def cxr_report(findings: dict, attrs: dict, conditions: tuple[str, ...], rng: np.random.Generator,
               modality: str = "cxr") -> str:
    """A chest X-ray report (``modality="ct"`` gives the CT flavour)."""
    ct = modality == "ct"
    sides = {"pleural effusion": attrs.get("effusion_side", "right"),
             "consolidation": attrs.get("consolidation_side", "right"),
             "lung mass": attrs.get("mass_side", attrs.get("nodule_side", "right")),
             "lung nodule": attrs.get("nodule_side", "right")}
    fmt = {"ctr": attrs.get("ctr", 0.6), "mm": attrs.get("nodule_mm", 15.0), "zone": attrs.get("consolidation_zone", "lower"),
               "size": _pick(rng, ("large", "3 cm", "rounded", "spiculated"))}
    lines = [history_line(conditions, rng)]
    if ct:
        lines.append(_pick(rng, ("Technique: axial CT of the chest.", "CT chest without contrast.",
                                 "Findings:", "")))
    else:
        lines.append(_pick(rng, ("PA and lateral views of the chest.", "Single frontal view of the chest.",
                                 "Findings:", "AP portable chest.", "")))
    pos_d = _CT_POS if ct else _CXR_POS
    neg_d = _CT_NEG if ct else _CXR_NEG
    keys = list(pos_d)
    rng.shuffle(keys)
    positives = []
    for k in keys:
        if findings.get(k):
            positives.append(k)
            f = dict(fmt, side=sides.get(k, "right"))
            if k == "lung mass":
                f["zone"] = attrs.get("mass_zone", "upper")
            hedge, phrase = _pick(rng, _HEDGES), _pick(rng, pos_d[k]).format(**f)
            lines.append(_cap(hedge + (phrase[:1].lower() + phrase[1:] if hedge else phrase)))
        elif rng.random() < 0.6:
            lines.append(_pick(rng, neg_d[k]))
    if rng.random() < 0.15:
        lines.append(_pick(rng, _CXR_INCIDENTAL))
    if positives:
        imp = []
        for k in positives:
            cause = _CT_CAUSE.get(k) if ct else _CXR_CAUSE.get(k)
            imp.append(_pick(rng, _CT_IMPRESSION[k] if ct else _CXR_IMPRESSION[k])
                       + (_link(cause, conditions, rng) if cause else ""))
        lines.append(_pick(rng, ("Impression:", "IMPRESSION:", "Conclusion:")) + " " + _cap("; ".join(imp)) + ".")
    else:
        lines.append(_pick(rng, ("Impression: ", "", "IMPRESSION: ")) + _pick(rng, _NORMAL_CT if ct else _NORMAL_CXR))
    return _join(lines)


_CT_POS = {
    "lung nodule": ("A {mm:.0f} mm solid nodule in the {side} upper lobe.",
                    "Spiculated {side} lung nodule measuring {mm:.0f} mm.",
                    "There is a {mm:.0f} mm pulmonary nodule in the {side} lung.",
                    "{side} lobe soft-tissue nodule, {mm:.0f} mm."),
    "consolidation": ("Dense consolidation in the {side} lower lobe with air bronchograms.",
                      "{side} lower lobe airspace consolidation.",
                      "Consolidation of the {side} lung base."),
    "pleural effusion": ("{side} pleural effusion of fluid attenuation.", "Dependent {side} pleural fluid.",
                         "{side} pleural effusion with adjacent atelectasis."),
}
_CT_NEG = {
    "lung nodule": ("No pulmonary nodules.", "No suspicious nodule.", ""),
    "consolidation": ("No consolidation.", "Lung parenchyma is clear.", ""),
    "pleural effusion": ("No pleural effusion.", "No pleural fluid.", ""),
}
_CT_IMPRESSION = {
    "lung nodule": ("lung nodule", "pulmonary nodule, recommend tissue sampling", "suspicious lung nodule"),
    "consolidation": ("consolidation", "lobar pneumonia", "airspace consolidation"),
    "pleural effusion": ("pleural effusion", "effusion"),
}
_CT_CAUSE = {"lung nodule": "lung_cancer", "consolidation": "pneumonia", "pleural effusion": "heart_failure"}
_NORMAL_CT = ("Normal CT of the chest.", "No acute intrathoracic abnormality.", "Clear lungs.",
              "No nodules, consolidation or effusion.")


def ct_report(findings: dict, attrs: dict, conditions: tuple[str, ...], rng: np.random.Generator) -> str:
    """A chest CT report."""
    a = dict(attrs)
    a.setdefault("mass_side", attrs.get("nodule_side", "right"))
    return cxr_report(findings, a, conditions, rng, modality="ct")


# ---------------------------------------------------------------- ECG machine statements

def ecg_report(findings: dict, attrs: dict, conditions: tuple[str, ...], rng: np.random.Generator,
               hr: float | None = None) -> str:
    """ECG machine statements (as MIMIC-IV-ECG prints them), sometimes with an indication line."""
    s: list[str] = []
    if rng.random() < 0.5:
        s.append(history_line(conditions, rng, p=1.0))
    if findings.get("atrial fibrillation"):
        s.append(_pick(rng, ("Atrial fibrillation", "Atrial fibrillation with rapid ventricular response"
                             if attrs.get("af_rate", 80) > 100 else "Atrial fibrillation",
                             "Atrial fibrillation with controlled ventricular response")))
    elif findings.get("sinus tachycardia"):
        s.append(_pick(rng, ("Sinus tachycardia", "Sinus tachycardia.", "Sinus tachycardia - rate {:.0f}")))
    else:
        s.append(_pick(rng, ("Sinus rhythm", "Normal sinus rhythm", "Sinus rhythm with sinus arrhythmia")))
    if findings.get("myocardial infarction"):
        terr = attrs.get("territory", "anterior")
        s.append(_pick(rng, (f"{_cap(terr)} infarct - acute", f"ST elevation {terr} leads, consider acute MI",
                             f"{_cap(terr)} ST elevation myocardial infarction",
                             f"Q waves and ST elevation in {terr} leads - acute MI")))
    if findings.get("left ventricular hypertrophy"):
        s.append(_pick(rng, ("Left ventricular hypertrophy", "LVH with repolarization abnormality",
                             "Left ventricular hypertrophy with secondary ST-T changes",
                             "Voltage criteria for left ventricular hypertrophy")))
    abnormal = any(findings.get(k) for k in findings)
    if not abnormal and rng.random() < 0.2:
        s.append(_pick(rng, ("Borderline T wave abnormalities", "Low QRS voltages in limb leads",
                             "Nonspecific T wave flattening")))
    s.append("Abnormal ECG" if abnormal else _pick(rng, ("Normal ECG", "Normal ECG", "Otherwise normal ECG",
                                                          "Borderline ECG")))
    text = ". ".join(x.rstrip(".") for x in s if x) + "."
    rate = hr if hr is not None else attrs.get("hr", 70)
    return text.replace("{:.0f}", f"{rate:.0f}")


# ---------------------------------------------------------------- retina

def retina_report(findings: dict, attrs: dict, conditions: tuple[str, ...], rng: np.random.Generator) -> str:
    """A fundus photograph report with graded diabetic and hypertensive retinopathy."""
    eye = attrs.get("eye", "right")
    g = int(attrs.get("dr_grade", 0))
    lines = [history_line(conditions, rng), _pick(rng, (f"{_cap(eye)} eye fundus photograph.",
                                                         f"Colour fundus image, {eye} eye.", ""))]
    lines.append(_pick(rng, ("Optic disc is healthy.", "Disc margins are sharp.", "", "Cup-to-disc ratio 0.3.")))
    if g >= 1:
        if findings.get("microaneurysms"):
            lines.append(_pick(rng, ("Scattered microaneurysms.", "Few microaneurysms in the posterior pole.",
                                     "Microaneurysms are present.")))
        if findings.get("haemorrhages"):
            lines.append(_pick(rng, ("Dot and blot haemorrhages.", "Intraretinal haemorrhages in several quadrants.",
                                     "Blot haemorrhages.")))
        if findings.get("hard exudates"):
            lines.append(_pick(rng, ("Hard exudates near the macula.", "Yellow hard exudates.",
                                     "Exudates in the posterior pole.")))
        if findings.get("venous beading"):
            lines.append(_pick(rng, ("Venous beading.", "Venous beading in two quadrants.")))
        grade = ("mild", "moderate", "severe")[min(g, 3) - 1]
        npdr = _pick(rng, (f"{grade} non-proliferative diabetic retinopathy", f"{grade} diabetic retinopathy",
                           f"{grade} NPDR"))
        lines.append("Impression: " + _cap(npdr) + _link("diabetes", conditions, rng) + ".")
    elif findings.get("arteriolar narrowing"):
        lines.append(_pick(rng, ("Generalised arteriolar narrowing with arteriovenous nicking.",
                                 "Attenuated arterioles with AV nipping.", "Narrowed retinal arterioles.")))
        lines.append("Impression: " + _cap(_pick(rng, ("hypertensive retinopathy", "grade 2 hypertensive retinopathy",
                                                       "hypertensive retinal changes")))
                     + _link("hypertension", conditions, rng) + ".")
    else:
        if rng.random() < 0.5:
            lines.append(_pick(rng, ("No haemorrhages or exudates.", "No microaneurysms.", "Vessels are normal.")))
        lines.append(_pick(rng, ("No diabetic retinopathy.", "Normal fundus.", "No retinopathy.",
                                 "Impression: no signs of retinopathy.")))
    return _join(lines)


# ---------------------------------------------------------------- pathology

def pathology_report(findings: dict, attrs: dict, conditions: tuple[str, ...], rng: np.random.Generator) -> str:
    """A short histopathology report of a lung biopsy."""
    lines = [history_line(conditions, rng, p=0.5),
             _pick(rng, ("Lung, core biopsy:", "Specimen: lung biopsy.", "Microscopy:", ""))]
    grade = int(attrs.get("grade", 0))
    if grade == 0:
        lines.append(_pick(rng, ("Benign lung tissue with regular glandular architecture.",
                                 "Normal tissue, no malignancy identified.",
                                 "Regular glands lined by small uniform nuclei. No atypia.",
                                 "Negative for malignancy.")))
    elif grade == 1:
        lines.append(_pick(rng, ("Well differentiated adenocarcinoma, low grade.",
                                 "Crowded well-formed glands with mild nuclear atypia: low grade carcinoma.",
                                 "Low grade tumour with preserved gland formation.")))
    else:
        lines.append(_pick(rng, ("Poorly differentiated carcinoma, high grade.",
                                 "Solid sheets of pleomorphic tumour cells with frequent mitoses, high grade.",
                                 "High grade tumour without gland formation.")))
    if grade and rng.random() < 0.5:
        lines.append(_pick(rng, ("Findings in keeping with primary lung cancer.",
                                 "Consistent with lung malignancy.", "Compatible with bronchial carcinoma.")))
    return _join(lines)


# ---------------------------------------------------------------- MRI (SeLIP-style clauses)

_SITES = {"MCA": "frontoparietal cortex", "PCA": "occipital lobe", "ACA": "medial frontal lobe"}


def mri_clauses(findings: dict, attrs: dict, rng: np.random.Generator) -> list[tuple[str, str, str, str]]:
    """SeLIP clauses ``(sequence, side, site, appearance)`` describing the study."""
    cl: list[tuple[str, str, str, str]] = []
    if findings.get("acute ischemic stroke"):
        side, site = attrs.get("stroke_side", "left"), _SITES.get(attrs.get("territory", "MCA"), "cortex")
        cl.append(("DWI", side, site, _pick(rng, ("hyperintense, restricted diffusion", "high signal",
                                                   "markedly hyperintense"))))
        cl.append(("FLAIR", side, site, _pick(rng, ("mildly hyperintense", "subtle high signal"))))
    if findings.get("white matter lesions"):
        cl.append(("FLAIR", "bilateral", "periventricular white matter",
                   _pick(rng, ("multiple hyperintense foci", "scattered punctate hyperintensities",
                               "confluent hyperintense lesions"))))
        cl.append(("T2", "bilateral", "deep white matter", "hyperintense foci"))
    if findings.get("brain tumor"):
        side = attrs.get("tumor_side", "right")
        cl.append(("T1", side, "parietal lobe", _pick(rng, ("hypointense mass", "low signal mass lesion"))))
        cl.append(("FLAIR", side, "parietal white matter", _pick(rng, ("surrounding vasogenic oedema",
                                                                        "perilesional hyperintense oedema"))))
    if not cl:
        cl.append((_pick(rng, ("T2", "FLAIR", "T1")), "bilateral", _pick(rng, ("brain parenchyma", "white matter",
                                                                                "grey and white matter")),
                   _pick(rng, ("normal signal", "no abnormal signal", "normal appearance"))))
        if rng.random() < 0.5:
            cl.append(("DWI", "bilateral", "brain", "no restricted diffusion"))
    return cl


def mri_report(findings: dict, attrs: dict, conditions: tuple[str, ...], rng: np.random.Generator) -> str:
    """An MRI report: a history line, then one sentence per SeLIP clause, then an impression."""
    lines = [history_line(conditions, rng, p=0.6)]
    for seq, side, site, app in mri_clauses(findings, attrs, rng):
        side_txt = "" if side == "bilateral" and rng.random() < 0.5 else side + " "
        lines.append(_cap(_pick(rng, (f"{seq}: {side_txt}{site} shows {app}.",
                                      f"On {seq}, {app} in the {side_txt}{site}.",
                                      f"{seq} {side_txt}{site}: {app}."))))
    imp = []
    if findings.get("acute ischemic stroke"):
        imp.append(_pick(rng, ("acute ischaemic stroke", "acute infarct", "acute ischemic stroke"))
                   + _link("atrial_fibrillation", conditions, rng, p=0.3))
    if findings.get("white matter lesions"):
        imp.append(_pick(rng, ("white matter lesions, small vessel disease", "chronic microvascular changes",
                               "white matter hyperintensities")) + _link("hypertension", conditions, rng, p=0.4))
    if findings.get("brain tumor"):
        imp.append(_pick(rng, ("brain tumour", "intracranial mass, likely metastasis", "brain metastasis"))
                   + _link("lung_cancer", conditions, rng))
    lines.append("Impression: " + (_cap("; ".join(imp)) if imp else _pick(rng, (
        "Normal MRI of the brain", "No acute intracranial abnormality", "Normal study"))) + ".")
    return _join(lines)


REPORTERS = {"cxr": cxr_report, "ct": ct_report, "ecg": ecg_report, "retina": retina_report,
             "pathology": pathology_report, "mri": mri_report}
