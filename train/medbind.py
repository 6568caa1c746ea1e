"""MEDBind components that are not losses: ECG report labelling, report text, text ids, cross-modal zero-shot.

MEDBind (Gao et al., MICCAI 2024) binds CXR, ECG and text. Its losses (TMCL, EMCL) live in
``train/losses.py``; this module holds what surrounds them:

* :func:`label_ecg_report` — rule-based labels for MIMIC-IV-ECG machine reports (keywords per
  class plus disallowed content, MEDBind Appendix Table A.3 in spirit; see the note below);
* :func:`ecg_report_text` / :func:`ecg_report_from_row` — MEDBind's text for an ECG: the machine
  statements ``report_0 … report_17`` joined into one report;
* :func:`text_ids` — the ``text_ids`` argument of ``tmcl_loss`` (identical texts share an id,
  stable across processes so that ids gathered under DDP still agree);
* :func:`class_prototypes` / :func:`cross_modal_zeroshot` — MEDBind's cross-modality zero-shot: a
  query of one modality (say CXR) is classified against a labelled support set of another
  modality (say ECG) by its cosine similarity to each class prototype.

Note on Table A.3: the exact keyword table of the MEDBind appendix could not be retrieved
offline. :data:`MIMIC_ECG_RULES` is therefore a rule set written from the PTB-XL diagnostic
superclasses (NORM, MI, STTC, CD, HYP) and the statement conventions of the MIMIC-IV-ECG machine
reports ("Inferior infarct - age undetermined", "Nonspecific ST-T changes", "Normal ECG except
for rate", ...), following the same scheme: per class a list of keywords and a list of
disallowed content, plus report-level exclusions (paced rhythm, unreadable recordings).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from m3bind.modalities import ECG, get_spec

log = logging.getLogger(__name__)

NAN = float("nan")


@dataclass
class MEDBindConfig:
    """MEDBind as an option of stage 0 (the top-level ``medbind:`` block of a training config).

    EMCL on the paired CXR-ECG subset is ``bind.emcl_weight`` (stage 1), usable with or without
    this block.
    """

    modalities: list[str] = field(
        default_factory=lambda: ["cxr", "ecg"],
        metadata={"help": "modalities whose stage-0 teachers train with the MEDBind text loss"},
    )
    text_loss: str = field(
        default="tmcl",
        metadata={
            "help": "modality-text loss: tmcl (identical texts are extra positives, MEDBind Eq. 1) or clip"
        },
    )
    normalize_text_ids: bool = field(
        default=True, metadata={"help": "TMCL compares texts case- and whitespace-insensitively"}
    )
    distinct_texts: bool = field(
        default=False,
        metadata={
            "help": "batches of distinct reports (false: random batches, so that identical reports "
            "meet in a batch and TMCL counts them as positives)"
        },
    )

    def __post_init__(self):
        if self.text_loss not in ("tmcl", "clip"):
            raise ValueError(f"medbind.text_loss must be tmcl or clip, got {self.text_loss!r}")
        if not self.modalities:
            raise ValueError("medbind.modalities must not be empty")


# --------------------------------------------------------------------------- ECG report labelling


@dataclass(frozen=True)
class LabelRule:
    """One class of the rule-based labeller.

    Attributes:
        label: Class name.
        keywords: Regular expressions (matched on lower-case text at word boundaries); a mention
            of any of them in a statement is a candidate positive.
        disallowed: Regular expressions; a statement that contains one of them does not count
            as a mention of this class (e.g. "normal variant" for a Q-wave statement).
        exclusive_of: Classes whose positive label forces this one to 0 (NORM is exclusive of
            every abnormal class).
    """

    label: str
    keywords: tuple[str, ...]
    disallowed: tuple[str, ...] = ()
    exclusive_of: tuple[str, ...] = ()


#: Cues before a keyword (within its statement) that make the mention uncertain (label NaN).
UNCERTAINTY_CUES: tuple[str, ...] = (
    r"possible",
    r"possibly",
    r"probable",
    r"probably",
    r"consider",
    r"cannot rule out",
    r"cannot be ruled out",
    r"cannot exclude",
    r"can not rule out",
    r"may be",
    r"suggests?",
    r"suspect(?:ed)?",
    r"questionable",
    r"borderline",
    r"likely",
    r"query",
    r"rule out",
)

#: Cues before a keyword (within its statement) that negate it (label 0).
NEGATION_CUES: tuple[str, ...] = (
    r"no",
    r"not",
    r"without",
    r"absence of",
    r"absent",
    r"negative for",
    r"no evidence of",
    r"no longer",
    r"resolved",
    r"ruled out",
    r"free of",
)

#: Report-level exclusions: content that makes the morphology uninterpretable (all labels NaN).
REPORT_EXCLUSIONS: tuple[str, ...] = (
    r"pacemaker",
    r"paced rhythm",
    r"(?:a|v|av|dual|atrial|ventricular)[- ]paced",
    r"pacing",
    r"lead reversal",
    r"limb leads? reversed",
    r"technically (?:poor|unsatisfactory|limited)",
    r"data quality may affect interpretation",
    r"unsuitable for analysis",
    r"recording unsuitable",
    r"uninterpretable",
)

#: Statements that carry the indication, not a finding of this tracing (skipped by the labeller).
HISTORY_PREFIXES: tuple[str, ...] = (
    r"clinical history",
    r"history",
    r"indication",
    r"reason for exam",
    r"patient with",
    r"known",
    r"clinical information",
)

_ABNORMAL = ("MI", "STTC", "CD", "HYP")

#: MIMIC-IV-ECG machine-statement rules for the PTB-XL diagnostic superclasses.
MIMIC_ECG_RULES: tuple[LabelRule, ...] = (
    LabelRule(
        "NORM",
        keywords=(r"normal ecg", r"normal electrocardiogram", r"within normal limits"),
        # "Otherwise normal ECG" / "Normal ECG except for rate" / "Borderline ECG" say that
        # something else is on the tracing; "abnormal ECG" never matches thanks to \b.
        disallowed=(r"otherwise", r"except", r"borderline", r"abnormal"),
        exclusive_of=_ABNORMAL,
    ),
    LabelRule(
        "MI",
        keywords=(
            r"infarct(?:ion)?",
            r"myocardial infarction",
            r"stemi",
            r"nstemi",
            r"acute mi",
            r"\bmi",
            r"q waves?",
            r"injury pattern",
            r"old infarct",
        ),
        disallowed=(
            r"normal variant",
            r"poor r wave progression",
            r"rate-related",
            r"pulmonary disease pattern",
        ),
    ),
    LabelRule(
        "STTC",
        keywords=(
            r"st-t (?:wave )?changes?",
            r"st-t (?:wave )?abnormalit(?:y|ies)",
            r"st changes?",
            r"st depression",
            r"st elevation",
            r"t wave (?:inversion|abnormalit(?:y|ies)|changes?|flattening)",
            r"inverted t waves?",
            r"repolarization abnormality",
            r"ischemi[ac]",
            r"long qt",
            r"prolonged qt",
            r"nonspecific st",
            r"nonspecific t wave",
        ),
        disallowed=(r"early repolarization", r"normal variant", r"juvenile t waves?"),
    ),
    LabelRule(
        "CD",
        keywords=(
            r"bundle branch block",
            r"rbbb",
            r"lbbb",
            r"fascicular block",
            r"hemiblock",
            r"a-?v block",
            r"av conduction delay",
            r"heart block",
            r"intraventricular conduction",
            r"ivcd",
            r"wpw",
            r"wolff-parkinson-white",
            r"pre-?excitation",
            r"prolonged pr",
            r"short pr",
            r"1st degree",
            r"2nd degree",
            r"3rd degree",
            r"first degree",
            r"second degree",
            r"third degree",
            r"mobitz",
            r"wenckebach",
        ),
        disallowed=(r"rate-related aberration",),
    ),
    LabelRule(
        "HYP",
        keywords=(
            r"ventricular hypertrophy",
            r"lvh",
            r"rvh",
            r"atrial enlargement",
            r"atrial abnormality",
            r"biventricular hypertrophy",
            r"septal hypertrophy",
            r"lae",
            r"rae",
        ),
        disallowed=(r"hypertrophic cardiomyopathy",),
    ),
)


def _compile(patterns: Iterable[str]) -> re.Pattern:
    return re.compile(r"\b(?:" + "|".join(patterns) + r")\b")


_UNCERTAIN_RE = _compile(UNCERTAINTY_CUES)
_NEGATION_RE = _compile(NEGATION_CUES)
_EXCLUSION_RE = _compile(REPORT_EXCLUSIONS)
_HISTORY_RE = re.compile(r"^(?:" + "|".join(HISTORY_PREFIXES) + r")\b")
_STATEMENT_SPLIT = re.compile(r"[.;\n]+|\s-{2,}\s")


def split_statements(text: str) -> list[str]:
    """Split an ECG report into lower-case statements (on ``.``, ``;``, newlines and ``--``).

    Args:
        text: The report, machine statements joined by any of those separators.
    """
    return [s.strip() for s in _STATEMENT_SPLIT.split(text.lower()) if s.strip()]


def _mention_state(statement: str, rule: LabelRule) -> float | None:
    """1 (asserted), NaN (uncertain), 0 (negated) or None (no mention) of ``rule`` in one statement."""
    if rule.disallowed and _compile(rule.disallowed).search(statement):
        return None
    states = []
    for m in _compile(rule.keywords).finditer(statement):
        before = statement[: m.start()]
        if _UNCERTAIN_RE.search(before):
            states.append(NAN)
        elif _NEGATION_RE.search(before):
            states.append(0.0)
        else:
            return 1.0
    if any(math.isnan(x) for x in states):
        return NAN
    return 0.0 if states else None


def label_ecg_report(text: str, rules: Sequence[LabelRule] = MIMIC_ECG_RULES) -> dict[str, float]:
    """Rule-based labels of an ECG machine report.

    Per class, over the report's statements: any asserted mention (a keyword without a
    negation or uncertainty cue before it in its statement, in a statement without
    disallowed content) gives 1; else any uncertain mention ("possible anterior infarct",
    "consider acute ST elevation MI") gives NaN; else 0 (negated or not mentioned). A class
    with ``exclusive_of`` is 0 when one of those classes is 1. Report-level exclusions (paced
    rhythm, lead reversal, unreadable tracing) give NaN for every class; indication lines
    ("History: atrial fibrillation") are skipped.

    Args:
        text: The report (machine statements, see :func:`ecg_report_text`).
        rules: The classes; :data:`MIMIC_ECG_RULES` by default.

    Returns:
        ``{label: 1.0 | 0.0 | nan}`` for every rule, in rule order.
    """
    labels = [r.label for r in rules]
    if _EXCLUSION_RE.search(text.lower()):
        return {lab: NAN for lab in labels}
    statements = [s for s in split_statements(text) if not _HISTORY_RE.match(s)]
    out: dict[str, float] = {}
    for rule in rules:
        states = [_mention_state(s, rule) for s in statements]
        states = [s for s in states if s is not None]
        if any(s == 1.0 for s in states):
            out[rule.label] = 1.0
        elif any(math.isnan(s) for s in states):
            out[rule.label] = NAN
        else:
            out[rule.label] = 0.0
    for rule in rules:
        if rule.exclusive_of and any(out.get(o) == 1.0 for o in rule.exclusive_of):
            out[rule.label] = 0.0
    return out


def project_ecg_rules() -> tuple[LabelRule, ...]:
    """Rules for the project's own ECG labels (``SPECS["ecg"].labels``), used on simulated reports."""
    labels = get_spec(ECG).labels
    mi = next(r for r in MIMIC_ECG_RULES if r.label == "MI")
    table = {
        "normal sinus rhythm": LabelRule(
            "normal sinus rhythm",
            (r"normal sinus rhythm", r"sinus rhythm"),
            disallowed=(r"tachycardia", r"bradycardia"),
        ),
        "atrial fibrillation": LabelRule(
            "atrial fibrillation", (r"atrial fibrillation", r"afib", r"a-fib")
        ),
        "left ventricular hypertrophy": LabelRule(
            "left ventricular hypertrophy", (r"left ventricular hypertrophy", r"lvh")
        ),
        "myocardial infarction": LabelRule(
            "myocardial infarction", mi.keywords + (r"st elevation",), mi.disallowed
        ),
        "sinus tachycardia": LabelRule("sinus tachycardia", (r"sinus tachycardia",)),
    }
    missing = [lab for lab in labels if lab not in table]
    if missing:
        raise KeyError(f"no ECG labelling rule for labels {missing}")
    return tuple(table[lab] for lab in labels)


# --------------------------------------------------------------------------- report text


def ecg_report_text(statements: Iterable[str | None]) -> str:
    """MEDBind's report text for an ECG: the machine statements joined in order.

    Empty cells (``None``, ``""``, ``"nan"``) are dropped, as are exact repeats of a statement;
    each statement ends with a period; whitespace is collapsed.

    Args:
        statements: The machine statements (MIMIC-IV-ECG ``report_0`` … ``report_17``).
    """
    seen: set[str] = set()
    parts: list[str] = []
    for s in statements:
        if s is None or (isinstance(s, float) and math.isnan(s)):
            continue
        s = " ".join(str(s).split()).strip().rstrip(".").strip()
        if not s or s.lower() == "nan" or s.lower() in seen:
            continue
        seen.add(s.lower())
        parts.append(s + ".")
    return " ".join(parts)


def ecg_report_from_row(row: Mapping[str, object], n_reports: int = 18) -> str:
    """The report text of one MIMIC-IV-ECG ``machine_measurements.csv`` row (``report_0`` … ``report_{n-1}``)."""
    return ecg_report_text(row.get(f"report_{i}") for i in range(n_reports))  # type: ignore[misc]


# --------------------------------------------------------------------------- TMCL text ids


def _canonical(text: str, normalize: bool) -> str:
    return " ".join(text.lower().split()) if normalize else text


def text_ids(texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
    """``text_ids`` for ``tmcl_loss``: identical texts share an id.

    The id is a 63-bit hash of the text (after lower-casing and collapsing whitespace when
    ``normalize``), so ids agree across processes and batches — which they must when DDP
    gathers them from every rank. Collisions between different texts have probability ~n²/2⁶⁴.

    Args:
        texts: One text per row of the batch.
        normalize: Compare texts case- and whitespace-insensitively.

    Returns:
        ``[N]`` int64 tensor.
    """
    ids = [
        int.from_bytes(
            hashlib.blake2b(_canonical(t, normalize).encode("utf-8"), digest_size=8).digest(), "big"
        )
        >> 1
        for t in texts
    ]
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------- cross-modal zero-shot


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def class_prototypes(
    embeddings: np.ndarray, labels: Sequence[str], classes: Sequence[str] | None = None
) -> tuple[list[str], np.ndarray]:
    """One prototype per class: the mean of the class's L2-normalised embeddings, re-normalised.

    Args:
        embeddings: Support embeddings ``[N, D]``.
        labels: Class of each support row.
        classes: Class order; the sorted distinct labels by default. Every class needs a row.

    Returns:
        ``(classes, prototypes [C, D])``, prototypes L2-normalised (float64).
    """
    emb = _l2(embeddings)
    labels = list(labels)
    if len(labels) != emb.shape[0]:
        raise ValueError(f"{emb.shape[0]} support embeddings but {len(labels)} labels")
    classes = sorted(set(labels)) if classes is None else list(classes)
    protos = []
    for c in classes:
        rows = [i for i, lab in enumerate(labels) if lab == c]
        if not rows:
            raise ValueError(f"class {c!r} has no support item")
        protos.append(emb[rows].mean(axis=0))
    return classes, _l2(np.stack(protos))


def cross_modal_zeroshot(
    query: np.ndarray,
    support: np.ndarray,
    support_labels: Sequence[str],
    classes: Sequence[str] | None = None,
    logit_scale: float = 1.0,
) -> tuple[list[str], np.ndarray, list[str]]:
    """MEDBind cross-modality zero-shot: classify queries of one modality by a support set of another.

    E.g. CXR query embeddings against ECG support embeddings labelled with (shared) classes: each
    query takes the class whose prototype (:func:`class_prototypes`) is most cosine-similar.

    Args:
        query: Query embeddings ``[Q, D]`` (modality A).
        support: Support embeddings ``[N, D]`` (modality B), in the same shared space.
        support_labels: Class of each support row.
        classes: Class order (default: sorted distinct support labels).
        logit_scale: Multiplies the cosine similarities before the softmax of the returned scores.

    Returns:
        ``(predicted label per query, softmax scores [Q, C], classes)``.
    """
    classes, protos = class_prototypes(support, support_labels, classes)
    sims = _l2(query) @ protos.T
    logits = logit_scale * sims
    logits = logits - logits.max(axis=1, keepdims=True)
    scores = np.exp(logits)
    scores /= scores.sum(axis=1, keepdims=True)
    preds = [classes[i] for i in sims.argmax(axis=1)]
    return preds, scores.astype(np.float32), classes


def cross_modal_zeroshot_metrics(
    query: np.ndarray,
    query_labels: Sequence[str],
    support: np.ndarray,
    support_labels: Sequence[str],
) -> dict[str, float]:
    """Accuracy and macro-F1 of :func:`cross_modal_zeroshot` (e.g. CXR queries, ECG support, shared classes).

    Classes are those of the support set; macro-F1 averages the per-class F1 over the support
    classes that occur among the predictions or the true query labels.

    Returns:
        ``{"accuracy", "macro_f1", "chance"}`` — chance = the accuracy of always predicting the
        most frequent query class.
    """
    preds, _, classes = cross_modal_zeroshot(query, support, support_labels)
    truth = list(query_labels)
    if len(truth) != len(preds):
        raise ValueError(f"{len(preds)} queries but {len(truth)} query labels")
    acc = float(np.mean([p == t for p, t in zip(preds, truth)]))
    f1s = []
    for c in classes:
        tp = sum(p == c and t == c for p, t in zip(preds, truth))
        fp = sum(p == c and t != c for p, t in zip(preds, truth))
        fn = sum(p != c and t == c for p, t in zip(preds, truth))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    counts = {t: truth.count(t) for t in set(truth)}
    return {
        "accuracy": acc,
        "macro_f1": float(np.mean(f1s)) if f1s else float("nan"),
        "chance": max(counts.values()) / len(truth) if truth else float("nan"),
    }
