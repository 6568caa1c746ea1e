"""The :class:`Sample`: what every reader returns and every later stage consumes."""

from __future__ import annotations

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
