"""The :class:`Sample`: what every reader returns and every later stage consumes."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Sample:
    """One item read from disk, in physical units, before model preprocessing.

    Attributes:
        array: The data. 2D images ``[H, W]`` (grey) or ``[H, W, 3]`` (RGB, uint8 or float);
            volumes ``[Z, Y, X]`` or ``[C, Z, Y, X]`` for multi-sequence MRI (float32, CT in
            Hounsfield units); signals ``[leads, time]`` (float32, mV).
        modality: One of :data:`m3bind.modalities.MODALITIES`, or ``None`` when unknown.
        format: Source format: ``dicom``, ``nifti``, ``wfdb``, ``png``, ``jpeg``, ``tiff``, ``wsi``.
        path: The file or folder read.
        spacing: Physical spacing per array axis in mm (images and volumes), else ``None``.
        sampling_rate: Samples per second (signals), else ``None``.
        lead_names: Standard lead names in array order (signals), else ``None``.
        window: Display window ``(centre, width)`` in array units, where the file gives one.
        meta: JSON-serialisable metadata, without PHI unless explicitly requested.
        modality_guess: True when ``modality`` is a best guess (formats that carry no modality).
        tiles: For whole-slide images, ``[N, H, W, 3]`` uint8 tiles at the target magnification.
        channel_names: For multi-channel volumes, the sequence name per channel.
    """

    array: np.ndarray
    modality: str | None
    format: str
    path: str
    spacing: tuple[float, ...] | None = None
    sampling_rate: float | None = None
    lead_names: list[str] | None = None
    window: tuple[float, float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    modality_guess: bool = False
    tiles: np.ndarray | None = None
    channel_names: list[str] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of :attr:`array`."""
        return tuple(int(s) for s in self.array.shape)


def _json_key(key: Any) -> str:
    """A dict key as JSON text spells it (``json.dumps`` accepts str, int, float, bool, None)."""
    if isinstance(key, str):
        return str.__str__(key)
    if key is None or isinstance(key, (int, float)):
        return json.dumps(key)
    return str(key)


def json_meta(obj: Any, drop: Callable[[str], bool] | None = None) -> Any:
    """Reader metadata as plain JSON data: what ``json.loads(json.dumps(obj, default=...))``
    gives, where ``default`` turns an array or numpy scalar into ``.tolist()`` and anything else
    into its text, without the round trip through text (a third of the time).

    Args:
        obj: Metadata (nested dicts, lists, tuples, numbers, strings, arrays, pydicom values).
        drop: Dict entries whose key (as text) it names are left out, at any depth.

    Returns:
        Dicts with string keys, lists, ``str``, ``int``, ``float``, ``bool`` and ``None`` only
        (subclasses such as pydicom's ``DSfloat`` or ``UID`` become their base type). A key JSON
        would refuse (a tuple, a numpy integer) becomes its text instead of an error.
    """
    t = type(obj)
    if t is str or t is int or t is float or t is bool or obj is None:
        return obj
    if isinstance(obj, dict):
        return {_json_key(k): json_meta(v, drop) for k, v in obj.items()
                if drop is None or not drop(str(k))}
    if isinstance(obj, (list, tuple)):
        return [json_meta(v, drop) for v in obj]
    if isinstance(obj, str):
        return str.__str__(obj)
    if isinstance(obj, int):  # bool has no subclasses: an int subclass (IS, IntEnum) here
        return int.__index__(obj)
    if isinstance(obj, float):
        return float.__float__(obj)
    return json_meta(obj.tolist() if hasattr(obj, "tolist") else str(obj), drop)
