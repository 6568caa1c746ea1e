"""MEDBind components: ECG labelling, report text, TMCL text ids, cross-modality zero-shot."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_registry.synthetic.reports import ecg_report
from m3bind.modalities import get_spec
from train.losses import tmcl_loss
from train.medbind import (
    MIMIC_ECG_RULES,
    class_prototypes,
    cross_modal_zeroshot,
    cross_modal_zeroshot_metrics,
    ecg_report_from_row,
    ecg_report_text,
    label_ecg_report,
    project_ecg_rules,
    split_statements,
    text_ids,
)

N = math.nan
CLASSES = [r.label for r in MIMIC_ECG_RULES]


def _same(got: dict, want: dict) -> bool:
    return got.keys() == want.keys() and all(
        (math.isnan(got[k]) and math.isnan(want[k])) or got[k] == want[k] for k in want
    )


# Hand-labelled MIMIC-IV-ECG style reports: (report, {NORM, MI, STTC, CD, HYP}).
CASES = [
    ("Sinus rhythm. Normal ECG.", dict(NORM=1, MI=0, STTC=0, CD=0, HYP=0)),
    # "otherwise"/"borderline"/"except" are disallowed content for NORM
    ("Sinus rhythm. Otherwise normal ECG.", dict(NORM=0, MI=0, STTC=0, CD=0, HYP=0)),
    ("Sinus bradycardia. Normal ECG except for rate.", dict(NORM=0, MI=0, STTC=0, CD=0, HYP=0)),
    ("Borderline ECG", dict(NORM=0, MI=0, STTC=0, CD=0, HYP=0)),
    # "abnormal ECG" must not match "normal ecg"
    ("Abnormal ECG", dict(NORM=0, MI=0, STTC=0, CD=0, HYP=0)),
    ("Inferior infarct - age undetermined. Abnormal ECG.", dict(NORM=0, MI=1, STTC=0, CD=0, HYP=0)),
    # uncertainty cue before the keyword -> NaN
    (
        "Possible anterior infarct - age undetermined. Abnormal ECG.",
        dict(NORM=0, MI=N, STTC=0, CD=0, HYP=0),
    ),
    ("Cannot rule out septal infarct", dict(NORM=0, MI=N, STTC=0, CD=0, HYP=0)),
    # an asserted mention anywhere wins over an uncertain one elsewhere
    ("Possible inferior infarct. Old anterior infarct.", dict(NORM=0, MI=1, STTC=0, CD=0, HYP=0)),
    # the cue after the keyword does not make it uncertain; ischemia stays uncertain but ST-T is asserted
    (
        "Lateral ST-T changes may be due to myocardial ischemia",
        dict(NORM=0, MI=0, STTC=1, CD=0, HYP=0),
    ),
    ("ST elevation anterior leads, consider acute MI", dict(NORM=0, MI=N, STTC=1, CD=0, HYP=0)),
    # disallowed content: Q-wave statement that is a normal variant; early repolarization
    (
        "Q waves in III - probable normal variant. Normal ECG.",
        dict(NORM=1, MI=0, STTC=0, CD=0, HYP=0),
    ),
    ("Early repolarization. Normal ECG.", dict(NORM=1, MI=0, STTC=0, CD=0, HYP=0)),
    # negations
    ("No evidence of infarction. RBBB. LVH.", dict(NORM=0, MI=0, STTC=0, CD=1, HYP=1)),
    (
        "1st degree A-V block; Left anterior fascicular block",
        dict(NORM=0, MI=0, STTC=0, CD=1, HYP=0),
    ),
    (
        "Left ventricular hypertrophy with repolarization abnormality",
        dict(NORM=0, MI=0, STTC=1, CD=0, HYP=1),
    ),
    # NORM is exclusive of every abnormal class
    ("Normal ECG. Nonspecific T wave abnormality.", dict(NORM=0, MI=0, STTC=1, CD=0, HYP=0)),
    # indication lines are not findings
    (
        "History: old myocardial infarction. Sinus rhythm. Normal ECG.",
        dict(NORM=1, MI=0, STTC=0, CD=0, HYP=0),
    ),
    # report-level exclusions (paced, lead reversal) -> everything NaN
    ("V-paced rhythm. Abnormal ECG.", dict(NORM=N, MI=N, STTC=N, CD=N, HYP=N)),
    ("Sinus rhythm. Lead reversal suspected. Normal ECG.", dict(NORM=N, MI=N, STTC=N, CD=N, HYP=N)),
]


@pytest.mark.parametrize("report,want", CASES)
def test_label_ecg_report_hand_labelled(report, want):
    got = label_ecg_report(report)
    assert list(got) == CLASSES
    assert _same(got, {k: float(v) for k, v in want.items()}), (report, got)


def test_split_statements():
    assert split_statements("Sinus rhythm. LVH; Abnormal ECG\nRBBB") == [
        "sinus rhythm",
        "lvh",
        "abnormal ecg",
        "rbbb",
    ]


def test_project_rules_agree_with_simulated_ecg_findings():
    rules = project_ecg_rules()
    assert [r.label for r in rules] == list(get_spec("ecg").labels)
    rng = np.random.default_rng(0)
    for i in range(200):
        f = {
            k: int(rng.random() < 0.3)
            for k in (
                "atrial fibrillation",
                "left ventricular hypertrophy",
                "myocardial infarction",
                "sinus tachycardia",
            )
        }
        attrs = {"territory": ["anterior", "inferior", "lateral"][i % 3], "af_rate": 120, "hr": 110}
        text = ecg_report(
            f, attrs, ("atrial_fibrillation", "myocardial_infarction"), np.random.default_rng(i)
        )
        lab = label_ecg_report(text, rules)
        af, st = f["atrial fibrillation"], f["sinus tachycardia"]
        want = {
            "atrial fibrillation": af,
            "left ventricular hypertrophy": f["left ventricular hypertrophy"],
            "myocardial infarction": f["myocardial infarction"],
            "sinus tachycardia": int(st and not af),
            "normal sinus rhythm": int(not af and not st),
        }
        assert lab == {k: float(v) for k, v in want.items()}, (text, lab)


def test_ecg_report_text_template():
    assert (
        ecg_report_text(
            [
                "Sinus rhythm",
                None,
                "",
                "nan",
                float("nan"),
                "  Left  ventricular hypertrophy. ",
                "sinus rhythm",
                "Abnormal ECG",
            ]
        )
        == "Sinus rhythm. Left ventricular hypertrophy. Abnormal ECG."
    )
    row = {f"report_{i}": None for i in range(18)}
    row.update(
        report_0="Atrial fibrillation", report_3="Abnormal ECG", report_17="Low QRS voltages"
    )
    assert ecg_report_from_row(row) == "Atrial fibrillation. Abnormal ECG. Low QRS voltages."


def test_text_ids_identical_texts_share_an_id():
    ids = text_ids(["Normal ECG.", "normal  ECG.", "Abnormal ECG.", "Normal ECG."])
    assert ids.dtype == torch.long and ids.shape == (4,)
    assert ids[0] == ids[1] == ids[3] and ids[0] != ids[2]
    strict = text_ids(["Normal ECG.", "normal  ECG."], normalize=False)
    assert strict[0] != strict[1]
    # stable across calls (hash, not first-occurrence order): needed when DDP gathers ids
    assert torch.equal(text_ids(["Abnormal ECG.", "Normal ECG."]), ids[[2, 0]])


def test_text_ids_feed_tmcl_as_multi_positive():
    g = torch.Generator().manual_seed(0)
    texts = ["a", "b", "a", "c", "b", "a"]
    z = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    t = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    s = 10.0
    # independent loop: positives of i are rows whose text equals text i
    total = 0.0
    for q, k in ((t, z), (z, t)):
        rows = []
        for i in range(6):
            logits = [s * float(q[i] @ k[j]) for j in range(6)]
            lse = math.log(sum(math.exp(v) for v in logits))
            pos = [j for j in range(6) if texts[j] == texts[i]]
            rows.append(-sum(logits[p] - lse for p in pos) / len(pos))
        total += sum(rows) / 6
    got = tmcl_loss(z, t, text_ids(texts), s)
    assert got.item() == pytest.approx(total, rel=1e-5)


def test_class_prototypes_hand_worked():
    emb = np.array([[2.0, 0.0], [0.0, 3.0], [0.0, -1.0], [3.0, 4.0]])
    classes, protos = class_prototypes(emb, ["a", "b", "b", "a"])
    assert classes == ["a", "b"]
    # a: mean((1,0),(0.6,0.8)) = (0.8,0.4) -> normalised
    assert np.allclose(protos[0], np.array([0.8, 0.4]) / math.hypot(0.8, 0.4))
    # b: mean((0,1),(0,-1)) = (0,0): stays ~0 (no direction), norm guarded
    assert np.all(np.isfinite(protos[1]))
    with pytest.raises(ValueError, match="no support item"):
        class_prototypes(emb, ["a", "b", "b", "a"], classes=["a", "b", "c"])


def test_cross_modal_zeroshot_prototype_classification():
    rng = np.random.default_rng(0)
    centers = np.eye(4, 16) * 3.0
    labels = ["afib", "lvh", "mi", "normal"]
    support = np.concatenate([c + 0.3 * rng.standard_normal((10, 16)) for c in centers])
    sup_labels = [lab for lab in labels for _ in range(10)]
    order = rng.permutation(4)
    query = centers[order] + 0.3 * rng.standard_normal((4, 16))
    preds, scores, classes = cross_modal_zeroshot(query, support, sup_labels, logit_scale=10.0)
    assert classes == labels
    assert preds == [labels[i] for i in order]
    assert scores.shape == (4, 4) and np.allclose(scores.sum(axis=1), 1.0, atol=1e-6)
    # independent: argmax of cosine to the normalised class means
    protos = np.stack(
        [
            support[i * 10 : (i + 1) * 10]
            / np.linalg.norm(support[i * 10 : (i + 1) * 10], axis=1, keepdims=True)
            for i in range(4)
        ]
    ).mean(1)
    cos = (query / np.linalg.norm(query, axis=1, keepdims=True)) @ (
        protos / np.linalg.norm(protos, axis=1, keepdims=True)
    ).T
    assert np.allclose(scores, np.exp(10 * cos) / np.exp(10 * cos).sum(1, keepdims=True), atol=1e-5)


def test_cross_modal_zeroshot_metrics_hand_worked():
    # support (say ECG): class "hf" along x, class "af" along y
    support = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    sup_labels = ["hf", "hf", "af", "af"]
    # queries (say CXR): predicted hf, hf, af, hf; truth hf, af, af, hf
    query = np.array([[1.0, 0.2], [0.8, 0.3], [0.2, 1.0], [0.7, 0.1]])
    got = cross_modal_zeroshot_metrics(query, ["hf", "af", "af", "hf"], support, sup_labels)
    # hf: tp 2, fp 1, fn 0 -> F1 4/5; af: tp 1, fp 0, fn 1 -> F1 2/3
    assert got["accuracy"] == pytest.approx(0.75)
    assert got["macro_f1"] == pytest.approx((4 / 5 + 2 / 3) / 2)
    assert got["chance"] == pytest.approx(0.5)
