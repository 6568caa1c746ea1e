"""Adaptive modality balancing (M3Bind Eqs. 3-5).

Modalities with little data would otherwise be drowned out by the large ones. With
``|D_m|`` the training-set size of modality m:

- Eq. 3, shared-text sampling: ``p_m ∝ (1/|D_m|)^β`` (β = 0.5 by default), normalised to sum 1;
- Eq. 4, per-modality learning rate: ``η_m = η_0 / sqrt(|D_m|)``;
- Eq. 5, per-modality loss weight: ``w_m = 1 / sqrt(|D_m|)``.

With ``normalize=True`` the ``η_m`` and ``w_m`` are rescaled so that their mean over modalities
is ``η_0`` and 1 respectively, keeping λ and η_0 on their usual scale (the run report states
which variant was used).
"""

from __future__ import annotations

import math
from collections.abc import Mapping


def _check(sizes: Mapping[str, int]) -> None:
    if not sizes:
        raise ValueError("sizes is empty")
    bad = {m: n for m, n in sizes.items() if not n or n <= 0}
    if bad:
        raise ValueError(f"data-set sizes must be positive, got {bad}")


def sampling_probs(sizes: Mapping[str, int], beta: float = 0.5) -> dict[str, float]:
    """Shared-text sampling probabilities ``p_m ∝ (1/|D_m|)^β`` (Eq. 3).

    Args:
        sizes: Modality -> number of training items.
        beta: Exponent; 0 gives uniform sampling, 1 inverse-size sampling.

    Returns:
        Modality -> probability, summing to 1.
    """
    _check(sizes)
    raw = {m: (1.0 / n) ** beta for m, n in sizes.items()}
    z = sum(raw.values())
    return {m: v / z for m, v in raw.items()}


def lr_scales(sizes: Mapping[str, int], base_lr: float, normalize: bool = False) -> dict[str, float]:
    """Per-modality learning rates ``η_m = η_0 / sqrt(|D_m|)`` (Eq. 4).

    Args:
        sizes: Modality -> number of training items.
        base_lr: ``η_0``.
        normalize: Rescale so that the mean of the ``η_m`` is ``η_0``.

    Returns:
        Modality -> learning rate.
    """
    _check(sizes)
    lrs = {m: base_lr / math.sqrt(n) for m, n in sizes.items()}
    if normalize:
        mean = sum(lrs.values()) / len(lrs)
        lrs = {m: v * base_lr / mean for m, v in lrs.items()}
    return lrs


def loss_weights(sizes: Mapping[str, int], normalize: bool = False) -> dict[str, float]:
    """Per-modality loss weights ``w_m = 1 / sqrt(|D_m|)`` (Eq. 5).

    Args:
        sizes: Modality -> number of training items.
        normalize: Rescale so that the weights have mean 1.

    Returns:
        Modality -> weight.
    """
    _check(sizes)
    w = {m: 1.0 / math.sqrt(n) for m, n in sizes.items()}
    if normalize:
        mean = sum(w.values()) / len(w)
        w = {m: v / mean for m, v in w.items()}
    return w
