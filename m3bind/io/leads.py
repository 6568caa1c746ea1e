"""ECG lead names: map any common spelling onto the standard twelve.

Files name their leads in many ways: ``'I'``, ``'lead I'``, ``'Lead I (Einthoven)'`` (DICOM code
meanings), ``'AVR'``/``'aVR'``/``'avr'``, ``'V1 '``, ``'MLII'`` (MIT-BIH modified lead II),
``'DII'`` (European notation), ``'C1'`` (IEC chest-lead notation). :func:`canonical_lead`
turns each into one of :data:`STANDARD_LEADS`, or ``None`` for leads outside the twelve
(e.g. ``'V4R'``, ``'X'``, respiration channels).
"""

from __future__ import annotations

import re

#: The standard 12 leads in the conventional order.
STANDARD_LEADS: tuple[str, ...] = (
    "I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6",
)

_ALIASES: dict[str, str] = {}
for _lead in STANDARD_LEADS:
    _ALIASES[_lead.lower()] = _lead
for _i, _roman in enumerate(("i", "ii", "iii"), start=1):
    _ALIASES[str(_i)] = STANDARD_LEADS[_i - 1]          # "lead 1"
    _ALIASES["d" + _roman] = STANDARD_LEADS[_i - 1]     # DI, DII, DIII
    _ALIASES["ml" + _roman] = STANDARD_LEADS[_i - 1]    # MLI, MLII, MLIII (modified limb leads)
    _ALIASES["ml" + str(_i)] = STANDARD_LEADS[_i - 1]
for _k in range(1, 7):
    _ALIASES[f"c{_k}"] = f"V{_k}"                       # IEC chest-lead names
    _ALIASES[f"mv{_k}"] = f"V{_k}"                      # modified chest leads (MV1...)

# words that decorate a lead name without changing it
_NOISE = re.compile(r"\(.*?\)|\b(lead|ecg|ekg|einthoven|goldberger|wilson|unipolar|bipolar)\b")


def canonical_lead(name: str) -> str | None:
    """The standard name of lead ``name``, or ``None`` if it is not one of the 12.

    Args:
        name: A lead name as written in a file.

    Returns:
        One of :data:`STANDARD_LEADS`, or ``None``.

    Examples:
        >>> canonical_lead("Lead I (Einthoven)"), canonical_lead("AVR"), canonical_lead("MLII")
        ('I', 'aVR', 'II')
    """
    s = re.sub(r"[_\-.:]+", " ", str(name).lower())
    s = _NOISE.sub(" ", s)
    s = re.sub(r"\s+", "", s)
    return _ALIASES.get(s)


def map_leads(names: list[str]) -> dict[str, int]:
    """Map standard lead name -> index in ``names`` (first occurrence wins; others ignored)."""
    out: dict[str, int] = {}
    for i, n in enumerate(names):
        std = canonical_lead(n)
        if std is not None and std not in out:
            out[std] = i
    return out
