"""Atomic, resumable checkpoints: safetensors weights + JSON state (+ optimizer state).

Layout of one stage's checkpoint folder::

    <out>/checkpoints/<stage>/
        latest.json              {"step": 120, "dir": "step_00000120"}  (written last, atomically)
        step_00000120/
            <name>.safetensors   one file per module (trainable tensors)
            optim.pt             optimizer + scheduler state (torch.save; loaded weights_only=True)
            state.json           step, counters, anything JSON

A checkpoint is written into a temporary folder that is renamed into place, and ``latest.json``
is replaced (``os.replace``) only afterwards, so a kill at any moment leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from m3bind.atomic import atomic_write_text

log = logging.getLogger(__name__)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """JSON-dump ``obj`` to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def _contiguous(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def save_checkpoint(stage_dir: str | Path, step: int, tensors: Mapping[str, Mapping[str, torch.Tensor]],
                    state: Mapping[str, Any], optim: Mapping[str, Any] | None = None, keep: int = 1) -> Path:
    """Write one checkpoint of a stage atomically and point ``latest.json`` at it.

    Args:
        stage_dir: The stage's checkpoint folder.
        step: Completed optimisation steps.
        tensors: Name -> state dict (each saved as ``<name>.safetensors``).
        state: JSON-serialisable state (counters, phase, ...).
        optim: Optimizer/scheduler state dicts (saved with ``torch.save``, tensors and plain data only).
        keep: How many checkpoints to keep.

    Returns:
        The checkpoint folder.
    """
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=stage_dir, prefix=f".{name}."))
    try:
        for key, sd in tensors.items():
            save_file(_contiguous(sd), str(tmp / f"{key}.safetensors"))
        if optim is not None:
            torch.save(dict(optim), tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2, sort_keys=True))
        final = stage_dir / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_json(stage_dir / "latest.json", {"step": step, "dir": name})
    old = sorted(p for p in stage_dir.glob("step_*") if p.is_dir() and p.name != name)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    log.debug("checkpoint %s", final)
    return final


def load_checkpoint(stage_dir: str | Path) -> dict[str, Any] | None:
    """The latest checkpoint of a stage, or ``None`` when there is none.

    Returns:
        ``{"step", "state", "tensors": {name: state_dict}, "optim": dict | None, "dir"}``.
    """
    stage_dir = Path(stage_dir)
    latest = stage_dir / "latest.json"
    if not latest.is_file():
        return None
    info = json.loads(latest.read_text())
    ckpt = stage_dir / info["dir"]
    state = json.loads((ckpt / "state.json").read_text())
    tensors = {p.name[: -len(".safetensors")]: load_file(str(p)) for p in ckpt.glob("*.safetensors")}
    optim = torch.load(ckpt / "optim.pt", weights_only=True) if (ckpt / "optim.pt").is_file() else None
    return {"step": int(info["step"]), "state": state, "tensors": tensors, "optim": optim, "dir": ckpt}


def mark_done(stage_dir: str | Path, info: Mapping[str, Any]) -> None:
    """Record that a stage finished (its outputs are final); resumed runs skip it."""
    atomic_write_json(Path(stage_dir) / "done.json", dict(info))


def is_done(stage_dir: str | Path) -> dict[str, Any] | None:
    """The ``done.json`` of a finished stage, else ``None``."""
    p = Path(stage_dir) / "done.json"
    return json.loads(p.read_text()) if p.is_file() else None
