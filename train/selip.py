"""SeLIP components: report structuring, the soft report-similarity matrix, a distinct-text sampler, retrieval.

SeLIP (Liu et al., 2025) trains head-MRI CLIP models with soft targets: reports are structured
into clauses ``(modality, orientation, site, appearance)`` — modality being the MRI sequence —
and two reports are similar in proportion to how much their clauses agree. The loss itself
(``selip_loss``) lives in ``train/losses.py``; this module provides its ``similarity`` argument
and the machinery around it:

* :class:`Clause`, the :data:`EXTRACTORS` registry and two extractors: :class:`RuleBasedExtractor`
  for the simulated MRI reports (three sentence patterns, see ``data_registry.synthetic.reports``)
  and :class:`LLMExtractor`, which asks a user-supplied local callable (a local LLM, no network)
  for JSON clauses;
* :func:`tdc` (Dice overlap of clause tokens), :func:`clause_similarity`
  (``½·TDC(t_i,t_j)·(w_loc + w_per)``), :func:`report_similarity` (mean over clause pairs) and
  :func:`similarity_matrix`;
* :class:`DistinctTextBatchSampler`, which never puts the same text twice in a batch (two equal
  texts would be contradictory hard targets);
* :func:`retrieval_topk`: every image against all distinct texts, Top-1/2/5/10.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Sampler

from m3bind.errors import M3BindError
from m3bind.registry import Registry

log = logging.getLogger(__name__)


class ClauseParseError(M3BindError):
    """An extractor's output could not be read as clauses."""


# =========================================================================== clauses and extractors


_WORD = re.compile(r"[a-z0-9]+")


def _norm(s: str) -> str:
    return " ".join(_WORD.findall(s.lower()))


@dataclass(frozen=True)
class Clause:
    """One structured statement of a report.

    Attributes:
        modality: MRI sequence (``T1``, ``T2``, ``FLAIR``, ``DWI``, ...).
        orientation: Side (``left``, ``right``, ``bilateral``; ``""`` when unstated).
        site: Anatomical site (``periventricular white matter``).
        appearance: What is seen there (``multiple hyperintense foci``).
    """

    modality: str
    orientation: str
    site: str
    appearance: str

    def tokens(self) -> frozenset[str]:
        """Lower-case word tokens of all four fields (the set TDC compares)."""
        return frozenset(
            _WORD.findall(
                " ".join((self.modality, self.orientation, self.site, self.appearance)).lower()
            )
        )

    def normalized(self) -> Clause:
        """The clause with every field lower-cased, punctuation dropped and whitespace collapsed."""
        return Clause(
            _norm(self.modality), _norm(self.orientation), _norm(self.site), _norm(self.appearance)
        )


class ClauseExtractor(Protocol):
    """Turns a free-text report into clauses."""

    def extract(self, report: str) -> list[Clause]:
        """The clauses of ``report`` (possibly none)."""
        ...


#: Clause extractors by name; each entry builds an extractor from keyword arguments.
EXTRACTORS: Registry[Callable[..., ClauseExtractor]] = Registry("clause extractor")

#: MRI sequence names the rule-based extractor recognises.
SEQUENCES: tuple[str, ...] = (
    "T1",
    "T1C",
    "T1CE",
    "T1-weighted",
    "T2",
    "T2-weighted",
    "FLAIR",
    "DWI",
    "ADC",
    "SWI",
    "GRE",
    "T2*",
)
SIDES: tuple[str, ...] = ("left", "right", "bilateral")


@EXTRACTORS.register("rule")
class RuleBasedExtractor:
    """Rule-based clauses for reports written as one sentence per finding.

    Recognised sentence forms (the simulated cohort's MRI reports):

    * ``"<SEQ>: [side] <site> shows <appearance>."``
    * ``"On <SEQ>, <appearance> in the [side] <site>."``
    * ``"<SEQ> [side] <site>: <appearance>."``

    Other sentences (history, impression) are ignored. A missing side is ``""``.

    Args:
        sequences: Sequence names to recognise.
        sides: Side words.
    """

    def __init__(self, sequences: Sequence[str] = SEQUENCES, sides: Sequence[str] = SIDES):
        seq = "|".join(re.escape(s) for s in sorted(sequences, key=len, reverse=True))
        side = "|".join(re.escape(s) for s in sides)
        opt_side = rf"(?:(?P<side>{side})\s+)?"
        self._patterns = (
            re.compile(
                rf"^(?P<seq>{seq})\s*:\s*{opt_side}(?P<site>.+?)\s+shows\s+(?P<app>.+)$",
                re.IGNORECASE,
            ),
            re.compile(
                rf"^on\s+(?P<seq>{seq})\s*,\s*(?P<app>.+)\s+in\s+the\s+{opt_side}(?P<site>.+)$",
                re.IGNORECASE,
            ),
            re.compile(
                rf"^(?P<seq>{seq})\s+{opt_side}(?P<site>[^:]+?)\s*:\s*(?P<app>.+)$", re.IGNORECASE
            ),
        )

    def extract(self, report: str) -> list[Clause]:
        """Clauses of ``report``, in order of appearance."""
        out = []
        for sentence in re.split(r"(?<=\.)\s+|\n+", report):
            sentence = sentence.strip().rstrip(".").strip()
            for pat in self._patterns:
                m = pat.match(sentence)
                if m:
                    out.append(
                        Clause(
                            m["seq"].upper(),
                            (m["side"] or "").lower(),
                            m["site"].strip().lower(),
                            m["app"].strip().lower(),
                        )
                    )
                    break
        return out


LLM_PROMPT = (
    "Structure the radiology findings below into a JSON list. Each element is one statement with the keys "
    '"modality" (imaging sequence, e.g. T1, T2, FLAIR, DWI), "orientation" (left, right, bilateral or ""), '
    '"site" (anatomical location) and "appearance" (what is seen). Answer with the JSON list only.\n\n'
    "Findings:\n{report}\n"
)


@EXTRACTORS.register("llm")
class LLMExtractor:
    """Clauses from a local language model behind a plain callable.

    The callable receives the prompt (:data:`LLM_PROMPT` filled with the report) and returns the
    model's text answer: a JSON list of objects with the keys ``modality``, ``orientation``,
    ``site`` and ``appearance`` (code fences and text around the list are tolerated). Nothing
    here opens a network connection; the callable decides how the model runs.

    Args:
        generate: ``prompt -> answer`` (e.g. a llama.cpp or transformers pipeline wrapper).
        prompt: Prompt template with a ``{report}`` field.
    """

    KEYS = ("modality", "orientation", "site", "appearance")

    def __init__(self, generate: Callable[[str], str], prompt: str = LLM_PROMPT):
        if not callable(generate):
            raise TypeError("LLMExtractor needs a callable prompt -> answer")
        if "{report}" not in prompt:
            raise ValueError("the prompt template needs a {report} field")
        self.generate = generate
        self.prompt = prompt

    def parse(self, answer: str) -> list[Clause]:
        """Clauses from the model's answer; :class:`ClauseParseError` when it is not a JSON list of clauses."""
        start, end = answer.find("["), answer.rfind("]")
        if start < 0 or end < start:
            raise ClauseParseError("LLM answer holds no JSON list")
        try:
            items = json.loads(answer[start : end + 1])
        except json.JSONDecodeError as e:
            raise ClauseParseError(f"LLM answer is not valid JSON: {e.msg}") from None
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not {"modality", "site", "appearance"} <= set(item):
                raise ClauseParseError(f"LLM clause {i} lacks modality/site/appearance")
            out.append(Clause(*(str(item.get(k) or "").strip() for k in self.KEYS)))
        return out

    def extract(self, report: str) -> list[Clause]:
        """Ask the model for the clauses of ``report``."""
        return self.parse(self.generate(self.prompt.format(report=report)))


def build_extractor(name: str, **kwargs) -> ClauseExtractor:
    """The extractor registered as ``name``, built with ``kwargs``."""
    return EXTRACTORS.get(name)(**kwargs)


@dataclass
class SeLIPConfig:
    """SeLIP as an option of a training stage: ``α·L_clip + β·L_se`` with clause-based soft targets."""

    alpha: float = field(default=1.0, metadata={"help": "α, weight of the hard-target CLIP loss"})
    beta: float = field(default=1.0, metadata={"help": "β, weight of the soft-target KL loss L_se"})
    extractor: str = field(
        default="rule",
        metadata={
            "help": "clause extractor name in train.selip.EXTRACTORS (rule; llm needs a callable, Python API only)"
        },
    )
    distinct_texts: bool = field(
        default=True, metadata={"help": "batches never hold the same report twice"}
    )
    modalities: list[str] = field(
        default_factory=lambda: ["mri"],
        metadata={
            "help": "modalities whose reports are structured into clauses (others keep hard targets)"
        },
    )

    def __post_init__(self):
        if self.alpha < 0 or self.beta < 0 or (self.alpha == 0 and self.beta == 0):
            raise ValueError("selip: alpha and beta must be >= 0 and not both 0")
        if self.extractor not in EXTRACTORS:
            raise ValueError(
                f"selip.extractor must be one of {EXTRACTORS.names()}, got {self.extractor!r}"
            )


# =========================================================================== similarity


def tdc(a: frozenset[str] | set[str], b: frozenset[str] | set[str]) -> float:
    """Token Dice coefficient ``2|A∩B| / (|A|+|B|)`` of two token sets (0 when both are empty)."""
    if not a and not b:
        return 0.0
    return 2.0 * len(a & b) / (len(a) + len(b))


def clause_similarity(a: Clause, b: Clause) -> float:
    """SeLIP clause similarity ``½·TDC(t_a, t_b)·(w_loc + w_per)``.

    ``w_loc`` = 1 when the clauses name the same site, ``w_per`` = 1 when they describe the
    same appearance (after normalisation), 0 otherwise; so the similarity is in [0, 1] and is 1
    for a clause with itself. The side (orientation) and sequence enter through the tokens of TDC.
    """
    an, bn = a.normalized(), b.normalized()
    w_loc = float(an.site == bn.site)
    w_per = float(an.appearance == bn.appearance)
    return 0.5 * tdc(a.tokens(), b.tokens()) * (w_loc + w_per)


def report_similarity(a: Sequence[Clause], b: Sequence[Clause]) -> float:
    """Mean clause similarity over all ``|a|·|b|`` clause pairs (0 when either report has no clause)."""
    if not a or not b:
        return 0.0
    return sum(clause_similarity(x, y) for x in a for y in b) / (len(a) * len(b))


def similarity_matrix(
    reports: Sequence[Sequence[Clause]], texts: Sequence[str] | None = None
) -> torch.Tensor:
    """SeLIP's report similarity ``S`` ``[N, N]`` for a batch, the ``similarity`` of ``selip_loss``.

    A report without clauses falls back to a hard target: similarity 1 with itself (and with
    identical ``texts`` when given) and 0 with every other report, so the diagonal is always
    positive.

    Args:
        reports: Clauses of each report of the batch.
        texts: The report texts (optional; only used for the fallback).
    """
    n = len(reports)
    s = torch.zeros(n, n, dtype=torch.float32)
    for i in range(n):
        for j in range(i, n):
            v = report_similarity(reports[i], reports[j])
            s[i, j] = s[j, i] = v
    for i in range(n):
        if s[i, i] <= 0:
            for j in range(n):
                same = i == j or (texts is not None and _norm(texts[i]) == _norm(texts[j]))
                s[i, j] = s[j, i] = float(same)
    return s


class ReportSimilarity:
    """Builds ``S`` for batches of report texts, extracting each distinct text's clauses once.

    Args:
        extractor: The clause extractor (:func:`build_extractor`).
    """

    def __init__(self, extractor: ClauseExtractor):
        self.extractor = extractor
        self._cache: dict[str, list[Clause]] = {}

    def clauses(self, text: str) -> list[Clause]:
        """The (cached) clauses of ``text``."""
        if text not in self._cache:
            self._cache[text] = list(self.extractor.extract(text))
        return self._cache[text]

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """``S`` ``[N, N]`` for the batch ``texts`` (:func:`similarity_matrix`)."""
        return similarity_matrix([self.clauses(t) for t in texts], texts)


# =========================================================================== distinct-text sampler


class DistinctTextBatchSampler(Sampler[list[int]]):
    """Batches in which no text occurs twice; every item once per epoch.

    Items are grouped by (case- and whitespace-normalised) text; the groups are laid out one after
    another in random order and item ``k`` of that layout goes to batch ``k mod B`` with
    ``B = max(ceil(N / batch_size), largest group)`` batches, so the items of one group always
    land in different batches and every batch holds at most ``batch_size`` items. Batch order
    and order within a batch are shuffled. When one text is more frequent than
    ``ceil(N / batch_size)`` the batches get smaller rather than repeat it.

    Args:
        texts: One text per data-set item.
        batch_size: Maximum batch size.
        generator: Randomness (a fresh permutation every epoch).
        drop_last: Drop batches smaller than ``batch_size``.
    """

    def __init__(
        self,
        texts: Sequence[str],
        batch_size: int,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.keys = [" ".join(str(t).lower().split()) for t in texts]
        self.batch_size = batch_size
        self.generator = generator
        self.drop_last = drop_last
        groups: dict[str, list[int]] = {}
        for i, k in enumerate(self.keys):
            groups.setdefault(k, []).append(i)
        self._groups = list(groups.values())
        n = len(self.keys)
        self.num_batches = max(
            math.ceil(n / batch_size), max((len(g) for g in self._groups), default=0)
        )

    def _randperm(self, n: int) -> list[int]:
        return torch.randperm(n, generator=self.generator).tolist()

    def batches(self) -> list[list[int]]:
        """One epoch of batches."""
        layout: list[int] = []
        for gi in self._randperm(len(self._groups)):
            g = self._groups[gi]
            layout.extend(g[j] for j in self._randperm(len(g)))
        out: list[list[int]] = [[] for _ in range(self.num_batches)]
        for k, idx in enumerate(layout):
            out[k % self.num_batches].append(idx)
        out = [[b[j] for j in self._randperm(len(b))] for b in out if b]
        if self.drop_last:
            out = [b for b in out if len(b) == self.batch_size]
        return [out[j] for j in self._randperm(len(out))]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        if not self.drop_last:
            return min(self.num_batches, len(self.keys))
        n = len(self.keys)
        return sum(
            1
            for b in range(self.num_batches)
            if len(range(b, n, self.num_batches)) == self.batch_size
        )


# =========================================================================== retrieval evaluation


def distinct_texts(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """The distinct texts (first-occurrence order) and, per item, the index of its text among them."""
    index: dict[str, int] = {}
    uniq: list[str] = []
    where = np.empty(len(texts), dtype=np.int64)
    for i, t in enumerate(texts):
        k = " ".join(str(t).lower().split())
        if k not in index:
            index[k] = len(uniq)
            uniq.append(t)
        where[i] = index[k]
    return uniq, where


def retrieval_topk(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    gt: Sequence[int],
    ks: Sequence[int] = (1, 2, 5, 10),
) -> dict[str, float]:
    """SeLIP retrieval: every image against all distinct texts; Top-k = share whose own text ranks ≤ k.

    The rank of the true text is 1 + the number of texts scoring strictly higher (cosine).

    Args:
        image_emb: ``[N, D]`` image embeddings.
        text_emb: ``[M, D]`` embeddings of the distinct texts (:func:`distinct_texts`).
        gt: Per image, the index of its text in ``text_emb``.
        ks: Cut-offs.

    Returns:
        ``{"Top-1": ..., "Top-2": ..., ...}`` in [0, 1].
    """
    img = np.asarray(image_emb, dtype=np.float64)
    txt = np.asarray(text_emb, dtype=np.float64)
    img = img / np.maximum(np.linalg.norm(img, axis=1, keepdims=True), 1e-12)
    txt = txt / np.maximum(np.linalg.norm(txt, axis=1, keepdims=True), 1e-12)
    gt = np.asarray(gt, dtype=np.int64)
    sims = img @ txt.T
    own = sims[np.arange(len(gt)), gt]
    ranks = 1 + (sims > own[:, None]).sum(axis=1)
    return {f"Top-{k}": float((ranks <= k).mean()) if len(gt) else float("nan") for k in ks}
