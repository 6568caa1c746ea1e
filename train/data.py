"""Training data: modality–report pairs over a cohort manifest, shared texts, batch samplers.

Files go through the one data path of the project (``m3bind.io.load`` ->
``m3bind.preprocess.preprocess``) once; the preprocessed tensors are cached as safetensors
under the run folder, so training steps only index memory.

Batches are a pure function of ``(seed, stream, step)``: every sampler draws from a
``torch.Generator`` seeded per epoch (or per step), so a run resumed from a checkpoint at step
k sees exactly the batches an uninterrupted run sees after step k.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import zlib
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from m3bind import zeroshot
from m3bind.errors import ConfigError, M3BindError
from m3bind.modalities import get_spec
from train.config import DataConfig, DatasetSource

log = logging.getLogger(__name__)

MANIFEST = "manifest.csv"


def stream_seed(seed: int, stream: str, index: int) -> int:
    """A stable 63-bit seed for ``(seed, stream name, index)`` (no Python ``hash`` randomisation)."""
    h = hashlib.sha256(f"{seed}/{stream}/{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, stream: str, index: int) -> torch.Generator:
    """A fresh ``torch.Generator`` for one epoch/step of one sampling stream."""
    return torch.Generator().manual_seed(stream_seed(seed, stream, index))


# --------------------------------------------------------------------------- cohort


def ensure_cohort(cfg: DataConfig) -> Path:
    """The cohort root; the simulated cohort is generated there when its manifest is missing."""
    root = Path(cfg.cohort)
    if (root / MANIFEST).is_file():
        _check_generated(root, cfg)
        return root
    if cfg.generate_patients is None:
        if cfg.datasets:
            return root
        raise ConfigError("no manifest.csv and data.generate_patients is null", str(root))
    from data_registry import synthetic

    log.info("generating the simulated cohort (%d patients, seed %d) in %s",
             cfg.generate_patients, cfg.generate_seed, root)
    synthetic.generate(root, cfg.generate_patients, cfg.generate_seed, size=cfg.generate_size,
                       progress=False, **cfg.generate_kwargs)
    return root


def _check_generated(root: Path, cfg: DataConfig) -> None:
    """Refuse a simulated cohort generated with other settings than ``cfg.generate_*`` asks for
    (a stale folder would silently train and evaluate on another cohort)."""
    info = root / "cohort.json"
    if cfg.generate_patients is None or not info.is_file():
        return
    try:
        have = json.loads(info.read_text()).get("config", {})
    except (OSError, ValueError):
        return
    from data_registry.synthetic.generate import CohortConfig

    # a setting an older cohort.json does not record was generated at its default; the worker
    # count does not change the output
    defaults = {f.name: f.default if f.default_factory is MISSING else f.default_factory()
                for f in fields(CohortConfig)}
    want = {"patients": cfg.generate_patients, "seed": cfg.generate_seed, "size": cfg.generate_size,
            **cfg.generate_kwargs}
    have = {**defaults, **have}
    diff = {k: (have.get(k), v) for k, v in want.items()
            if k != "workers" and k in have
            and (list(have[k]) if isinstance(have[k], (list, tuple)) else have[k])
            != (list(v) if isinstance(v, (list, tuple)) else v)}
    if diff:
        raise ConfigError("the cohort folder holds a cohort generated with other settings "
                          f"(have, want: {diff}); point data.cohort at a new folder or delete it", str(root))


def _dataset_rows(modality: str, src: DatasetSource) -> list[dict[str, Any]]:
    """Manifest-style rows of a public data set's items that carry a report."""
    import data_registry

    ds = data_registry.get(src.adapter, root=src.root, **src.options)
    if ds.modality != modality:
        raise ConfigError(f"data set {src.adapter} holds {ds.modality}, configured for {modality}", src.root)
    rows = []
    for i, rec in enumerate(ds):
        if not rec.report:
            continue
        rows.append({"item_id": f"{src.adapter}:{i:07d}", "patient": rec.patient, "modality": modality,
                     "path": str(rec.path), "label": "", "report": rec.report, "split": rec.split or "train",
                     "pair_id": ""})
    return rows


def read_items(cfg: DataConfig, root: Path) -> list[dict[str, Any]]:
    """Manifest rows (dicts with the DESIGN.md columns): the cohort's, with the modalities named
    in ``cfg.datasets`` replaced by their public data sets' report pairs."""
    rows: list[dict[str, Any]] = []
    path = root / MANIFEST
    if path.is_file():
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        need = {"item_id", "modality", "path", "label", "report", "split"}
        if rows and not need <= set(rows[0]):
            raise ConfigError(f"manifest lacks columns {sorted(need - set(rows[0]))}", str(path))
    elif not cfg.datasets:
        raise ConfigError("cohort has no manifest.csv", str(root))
    for m, src in cfg.datasets.items():
        rows = [r for r in rows if not (r["modality"] == m and r["split"] == "train")]
        rows += [r for r in _dataset_rows(m, src) if r["split"] == "train"]
    return rows


# --------------------------------------------------------------------------- tensor cache


def _preprocess_one(args: tuple[str, str, dict]) -> np.ndarray | str:
    """The preprocessed array of one file, or the one-line error for a file that cannot be read."""
    path, modality, params = args
    from m3bind.io import load
    from m3bind.preprocess import preprocess

    try:
        return np.ascontiguousarray(preprocess(load(path, modality), **params), dtype=np.float32)
    except M3BindError as e:
        return e.line()


def _harmonise(arrays: list[np.ndarray], modality: str) -> np.ndarray:
    """Stack per-item arrays; tile counts (pathology) are made equal by cycling tiles."""
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        rest = {a.shape[1:] for a in arrays}
        if len(rest) != 1:
            raise ValueError(f"{modality}: preprocessed shapes differ: {sorted(shapes)[:4]}")
        t = max(a.shape[0] for a in arrays)
        arrays = [a[np.arange(t) % a.shape[0]] for a in arrays]
    return np.stack(arrays)


def cached_tensors(items: Sequence[Mapping[str, Any]], root: Path, modality: str,
                   params: Mapping[str, Any], cache_dir: Path, num_workers: int = 0,
                   progress: bool = True) -> tuple[torch.Tensor, np.ndarray]:
    """Preprocessed tensors of ``items`` (one modality), built once and cached.

    Items whose file cannot be read (an ``M3BindError``) are left out with a warning.

    Args:
        items: Manifest rows of one modality.
        root: Cohort root (``path`` columns are relative to it).
        modality: The modality name.
        params: Preprocessing keyword arguments.
        cache_dir: Folder of the safetensors cache files.
        num_workers: Worker processes for reading/preprocessing (0 = in process).
        progress: Show a progress bar.

    Returns:
        ``(x [K, ...], kept [N] bool)`` — the tensors of the K readable items and which they are.
    """
    params = dict(params)
    key = hashlib.sha256(json.dumps({"m": modality, "p": params, "ids": [r["item_id"] for r in items]},
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{modality}-{key}.safetensors"
    if path.is_file():
        d = load_file(str(path))
        kept = d["kept"].astype(bool) if "kept" in d else np.ones(len(items), bool)
        return torch.from_numpy(d["x"]), kept
    jobs = [(str(root / r["path"]), modality, params) for r in items]
    desc = f"preprocess {modality}"
    if num_workers > 0:
        with ProcessPoolExecutor(num_workers) as ex:
            arrays = list(tqdm(ex.map(_preprocess_one, jobs, chunksize=8), total=len(jobs),
                               desc=desc, disable=not progress))
    else:
        arrays = [_preprocess_one(j) for j in tqdm(jobs, desc=desc, disable=not progress)]
    kept = np.array([not isinstance(a, str) for a in arrays])
    for job, a in zip(jobs, arrays):
        if isinstance(a, str):
            log.warning("%s: item left out of training: %s", modality, a)
    if not kept.any():
        raise ConfigError(f"no readable {modality} items", str(root))
    x = _harmonise([a for a in arrays if not isinstance(a, str)], modality)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"x": x, "kept": kept.astype(np.uint8)}, str(tmp))
    tmp.replace(path)
    return torch.from_numpy(x), kept


@dataclass
class ModalityData:
    """The training pairs of one modality, preprocessed and in memory."""

    modality: str
    x: torch.Tensor
    reports: list[str]
    labels: list[str]
    item_ids: list[str]
    pair_ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.reports)

    @property
    def text_ids(self) -> torch.Tensor:
        """Integer id per row; identical reports share one (TMCL positives, distinct-text batches)."""
        ids: dict[str, int] = {}
        return torch.tensor([ids.setdefault(r, len(ids)) for r in self.reports])


def load_modality_data(rows: Sequence[Mapping[str, Any]], root: Path, modality: str, split: str,
                       params: Mapping[str, Any], cache_dir: Path, max_items: int | None = None,
                       num_workers: int = 0, progress: bool = True) -> ModalityData:
    """The ``split`` pairs of ``modality`` (preprocessed with ``params``)."""
    items = [r for r in rows if r["modality"] == modality and r["split"] == split]
    items.sort(key=lambda r: r["item_id"])
    if max_items is not None:
        items = items[:max_items]
    if not items:
        raise ConfigError(f"no {split} items of modality {modality}", str(root))
    x, kept = cached_tensors(items, root, modality, params, cache_dir, num_workers, progress)
    items = [r for r, k in zip(items, kept) if k]
    return ModalityData(modality=modality, x=x, reports=[r["report"] for r in items],
                        labels=[r["label"] for r in items], item_ids=[r["item_id"] for r in items],
                        pair_ids=[r.get("pair_id") or "" for r in items])


def preprocess_params(modality: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The modality's preprocessing defaults with the config's overrides applied."""
    params = dict(get_spec(modality).preprocess_defaults)
    params.update(overrides)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}


# --------------------------------------------------------------------------- samplers


def distinct_text_batches(texts: Sequence[str], batch_size: int, g: torch.Generator,
                          drop_last: bool = True) -> list[list[int]]:
    """One epoch of batches in which no two rows share a text (SeLIP's distinct-text sampler).

    Rows are shuffled with ``g``; a row whose text is already in the open batch waits for the
    next batch. A batch holds at most as many rows as there are distinct texts.

    Args:
        texts: Text of each row.
        batch_size: Rows per batch.
        g: Generator of the shuffle.
        drop_last: Drop a final incomplete batch.
    """
    order = torch.randperm(len(texts), generator=g).tolist()
    batches: list[list[int]] = []
    pending = order
    while pending:
        batch: list[int] = []
        seen: set[str] = set()
        rest: list[int] = []
        for i in pending:
            if len(batch) < batch_size and texts[i] not in seen:
                batch.append(i)
                seen.add(texts[i])
            else:
                rest.append(i)
        if len(batch) == batch_size or not drop_last:
            batches.append(batch)
        if len(batch) < batch_size:
            break
        pending = rest
    return batches


class StepBatcher:
    """Batches indexed by global step: epoch e is a fresh distinct-text shuffle seeded by e.

    ``batch(step)`` depends only on ``(seed, stream, step)``, which makes resumption exact.
    """

    def __init__(self, texts: Sequence[str], batch_size: int, seed: int, stream: str):
        self.texts = list(texts)
        self.batch_size = min(batch_size, len(set(self.texts)))
        self.seed, self.stream = seed, stream
        self._epochs: dict[int, list[list[int]]] = {}
        self._per_epoch = len(self._epoch(0))
        if self._per_epoch == 0:
            raise ValueError(f"{stream}: no full batch of {self.batch_size} distinct texts")

    def _epoch(self, e: int) -> list[list[int]]:
        if e not in self._epochs:
            self._epochs = {e: distinct_text_batches(self.texts, self.batch_size,
                                                     generator(self.seed, self.stream, e))}
        return self._epochs[e]

    def batch(self, step: int) -> list[int]:
        """Row indices of the batch of ``step``."""
        e, i = divmod(step, self._per_epoch)
        batches = self._epoch(e)
        return batches[i % len(batches)]


class SharedTextSampler:
    """Shared texts for the alignment and KD losses, drawn by modality probability p_m (Eq. 3).

    Each draw picks a modality with probability ``probs[m]``, then one of that modality's texts
    uniformly; draws within a step are distinct texts where possible.
    """

    def __init__(self, pools: Mapping[str, Sequence[str]], probs: Mapping[str, float] | None,
                 seed: int, stream: str = "shared"):
        self.names = [m for m in pools if len(pools[m])]
        self.pools = {m: list(pools[m]) for m in self.names}
        if probs is None:  # uniform over the union of all texts
            total = sum(len(self.pools[m]) for m in self.names)
            probs = {m: len(self.pools[m]) / total for m in self.names}
        p = torch.tensor([float(probs.get(m, 0.0)) for m in self.names], dtype=torch.float64)
        self.probs = p / p.sum()
        self.seed, self.stream = seed, stream

    def sample(self, step: int, n: int) -> list[str]:
        """``n`` texts for ``step``."""
        g = generator(self.seed, self.stream, step)
        out: list[str] = []
        seen: set[str] = set()
        for _ in range(4 * n):
            m = self.names[int(torch.multinomial(self.probs, 1, generator=g))]
            pool = self.pools[m]
            t = pool[int(torch.randint(len(pool), (1,), generator=g))]
            if t not in seen:
                out.append(t)
                seen.add(t)
            if len(out) == n:
                break
        return out


def shared_text_pools(train: Mapping[str, ModalityData], cfg: DataConfig) -> dict[str, list[str]]:
    """Per-modality pools of shared texts: each modality's distinct training reports (+ OpenI under
    cxr; + the modality's label prompts with ``cfg.shared_prompts``)."""
    pools = {m: sorted(set(d.reports)) for m, d in train.items()}
    if cfg.shared_prompts:
        pools = {m: sorted(set(pool) | set(label_prompt_texts(m))) for m, pool in pools.items()}
    if cfg.shared_texts == "train_reports+openi" and "cxr" in pools:
        from data_registry import openi

        extra = [" ".join(x for x in (r.findings, r.impression) if x).strip()
                 for r in openi.load_reports()[: cfg.openi_max]]
        pools["cxr"] = sorted(set(pools["cxr"]) | {t for t in extra if t})
        log.info("shared texts: %d OpenI reports added to the cxr pool", len(extra))
    return pools


def label_prompt_texts(modality: str) -> list[str]:
    """Every text zero-shot classification embeds for the modality's default labels: the prompt
    templates, the expert descriptions and the bare label names (``m3bind.zeroshot`` modes)."""
    labels = list(get_spec(modality).labels)
    return sorted({t for mode in zeroshot.MODES
                   for prompts in zeroshot.label_prompts(modality, labels, mode=mode).values() for t in prompts})


def crc(text: str) -> int:
    """A stable small integer for a string (text ids across processes)."""
    return zlib.crc32(text.encode())


def take(x: torch.Tensor, idx: Iterable[int]) -> torch.Tensor:
    """Rows ``idx`` of ``x`` as a new tensor."""
    return x[torch.as_tensor(list(idx), dtype=torch.long)]
