"""The modality registry: modality names fixed in one place, one :class:`ModalitySpec` each.

Everything that differs per modality — how its input is shaped, how it is preprocessed,
which encoder family embeds it, its default zero-shot labels and prompts — is declared here
and looked up by name. Other modules build their per-modality stages in a loop over
:data:`MODALITIES` (as ImageBind does), never by copy-paste.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

#: The six modality names, in canonical order. Use these strings everywhere.
CXR, CT, RETINA, ECG, PATHOLOGY, MRI = "cxr", "ct", "retina", "ecg", "pathology", "mri"
MODALITIES: tuple[str, ...] = (CXR, CT, RETINA, ECG, PATHOLOGY, MRI)

#: Encoder input kinds.
IMAGE2D, VOLUME, SIGNAL = "image2d", "volume", "signal"


@dataclass(frozen=True)
class ModalitySpec:
    """What m3bind knows about one modality.

    Attributes:
        name: Modality name (one of :data:`MODALITIES`).
        title: Human-readable name.
        kind: Input kind: ``image2d``, ``volume`` or ``signal``.
        channels: Channels of the preprocessed tensor (3 for RGB, 1 for grey, 12 for ECG leads,
            sequences for multi-sequence MRI).
        preprocess_defaults: Default keyword arguments of the modality's preprocessing function
            (``m3bind.preprocess``); a model directory may override them.
        labels: Default zero-shot labels (mutually exclusive classes), in the field's words.
        templates: Prompt templates; ``{}`` is replaced by the label text.
        descriptions: Expert-knowledge descriptions per label (FLAIR's domain-knowledge prompts).
    """

    name: str
    title: str
    kind: str
    channels: int
    preprocess_defaults: Mapping[str, object]
    labels: tuple[str, ...]
    templates: tuple[str, ...]
    descriptions: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def _freeze(d: dict) -> Mapping:
    return MappingProxyType(d)


SPECS: Mapping[str, ModalitySpec] = _freeze({
    CXR: ModalitySpec(
        name=CXR, title="Chest X-ray", kind=IMAGE2D, channels=1,
        preprocess_defaults=_freeze({"size": 224}),
        labels=("no finding", "cardiomegaly", "pleural effusion", "consolidation", "lung mass"),
        templates=(
            "chest x-ray showing {}.",
            "a frontal chest radiograph with {}.",
            "findings: {}.",
            "impression: {}.",
        ),
        descriptions=_freeze({
            "no finding": ("clear lungs, normal heart size, no effusion or consolidation",),
            "cardiomegaly": ("enlarged cardiac silhouette with cardiothoracic ratio above 0.5",),
            "pleural effusion": ("blunting of the costophrenic angle with a meniscus of fluid",),
            "consolidation": ("airspace opacity with air bronchograms consistent with pneumonia",),
            "lung mass": ("a rounded opacity in the lung suspicious for malignancy",),
        }),
    ),
    CT: ModalitySpec(
        name=CT, title="Chest CT", kind=VOLUME, channels=1,
        preprocess_defaults=_freeze({"grid": (64, 128, 128), "spacing": (5.0, 2.5, 2.5),
                                     "hu_window": (-1000.0, 400.0)}),
        labels=("normal", "lung nodule", "consolidation", "pleural effusion"),
        templates=(
            "chest ct showing {}.",
            "computed tomography of the chest with {}.",
            "ct findings: {}.",
        ),
        descriptions=_freeze({
            "normal": ("clear lungs without nodules, consolidation or effusion",),
            "lung nodule": ("a solid round pulmonary nodule in the lung parenchyma",),
            "consolidation": ("dense airspace consolidation of a lung segment",),
            "pleural effusion": ("dependent fluid in the pleural space with water attenuation",),
        }),
    ),
    RETINA: ModalitySpec(
        name=RETINA, title="Retinal fundus", kind=IMAGE2D, channels=3,
        preprocess_defaults=_freeze({"size": 224}),
        labels=("no retinopathy", "mild diabetic retinopathy", "moderate diabetic retinopathy",
                "severe diabetic retinopathy", "hypertensive retinopathy"),
        templates=(
            "fundus photograph showing {}.",
            "retinal image with {}.",
            "ophthalmic examination: {}.",
        ),
        descriptions=_freeze({
            "no retinopathy": ("healthy retina with normal vessels, optic disc and macula",),
            "mild diabetic retinopathy": ("a few microaneurysms only",),
            "moderate diabetic retinopathy": ("microaneurysms, dot and blot haemorrhages and hard exudates",),
            "severe diabetic retinopathy": ("many haemorrhages, exudates and venous beading",),
            "hypertensive retinopathy": ("arteriolar narrowing with arteriovenous nicking",),
        }),
    ),
    ECG: ModalitySpec(
        name=ECG, title="12-lead ECG", kind=SIGNAL, channels=12,
        preprocess_defaults=_freeze({"fs": 100.0, "seconds": 10.0, "band": (0.5, 40.0)}),
        labels=("normal sinus rhythm", "atrial fibrillation", "left ventricular hypertrophy",
                "myocardial infarction", "sinus tachycardia"),
        templates=(
            "ecg showing {}.",
            "12-lead electrocardiogram with {}.",
            "{}.",
        ),
        descriptions=_freeze({
            "normal sinus rhythm": ("regular rhythm at 60 to 100 beats per minute with normal p waves",),
            "atrial fibrillation": ("irregularly irregular rhythm without p waves",),
            "left ventricular hypertrophy": ("tall qrs voltages with lateral st depression and t wave inversion",),
            "myocardial infarction": ("pathological q waves with st elevation in one territory",),
            "sinus tachycardia": ("sinus rhythm faster than 100 beats per minute",),
        }),
    ),
    PATHOLOGY: ModalitySpec(
        name=PATHOLOGY, title="Histopathology", kind=IMAGE2D, channels=3,
        preprocess_defaults=_freeze({"size": 224, "magnification": 20.0, "max_tiles": 16,
                                     "stain_norm": False}),
        labels=("normal tissue", "low grade tumor", "high grade tumor"),
        templates=(
            "an h&e image of {}.",
            "histopathology showing {}.",
            "a tissue section with {}.",
        ),
        descriptions=_freeze({
            "normal tissue": ("regular glands with small uniform nuclei",),
            "low grade tumor": ("well formed crowded glands with mild nuclear atypia",),
            "high grade tumor": ("solid sheets of pleomorphic nuclei without gland formation",),
        }),
    ),
    MRI: ModalitySpec(
        name=MRI, title="Head MRI", kind=VOLUME, channels=4,
        preprocess_defaults=_freeze({"grid": (24, 256, 256),
                                     "sequences": ("t1", "t2", "flair", "dwi")}),
        labels=("normal", "acute ischemic stroke", "white matter lesions", "brain tumor"),
        templates=(
            "brain mri showing {}.",
            "magnetic resonance imaging of the head with {}.",
            "mri findings: {}.",
        ),
        descriptions=_freeze({
            "normal": ("normal grey and white matter signal without lesions",),
            "acute ischemic stroke": ("a territorial region of restricted diffusion, bright on dwi",),
            "white matter lesions": ("multiple periventricular flair hyperintense foci",),
            "brain tumor": ("a mass with surrounding oedema and mass effect",),
        }),
    ),
})


def get_spec(name: str) -> ModalitySpec:
    """The :class:`ModalitySpec` of modality ``name``; a ValueError naming the known ones otherwise."""
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown modality {name!r} (known: {', '.join(MODALITIES)})") from None
