"""Adaptive modality balancing (DESIGN Eqs. 3-5) against hand computation and properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from train.balancing import loss_weights, lr_scales, sampling_probs

SIZES = {"cxr": 100, "ecg": 25, "mri": 4}


def test_sampling_probs_hand():
    # (1/n)^0.5 = 0.1, 0.2, 0.5 -> sum 0.8
    p = sampling_probs(SIZES)
    assert p == pytest.approx({"cxr": 0.125, "ecg": 0.25, "mri": 0.625})
    assert sampling_probs(SIZES, beta=0.0) == pytest.approx({m: 1 / 3 for m in SIZES})
    inv = sampling_probs(SIZES, beta=1.0)  # 0.01, 0.04, 0.25 -> 0.30
    assert inv == pytest.approx({"cxr": 0.01 / 0.3, "ecg": 0.04 / 0.3, "mri": 0.25 / 0.3})


def test_lr_scales_hand():
    assert lr_scales(SIZES, 1e-3) == pytest.approx({"cxr": 1e-4, "ecg": 2e-4, "mri": 5e-4})
    # normalised: mean of (0.1, 0.2, 0.5) is 0.8/3 -> rates scaled so their mean is 1e-3
    norm = lr_scales(SIZES, 1e-3, normalize=True)
    assert norm == pytest.approx({"cxr": 1e-3 * 0.1 * 3 / 0.8, "ecg": 1e-3 * 0.2 * 3 / 0.8,
                                  "mri": 1e-3 * 0.5 * 3 / 0.8})


def test_loss_weights_hand():
    assert loss_weights(SIZES) == pytest.approx({"cxr": 0.1, "ecg": 0.2, "mri": 0.5})
    assert loss_weights(SIZES, normalize=True) == pytest.approx(
        {"cxr": 0.3 / 0.8, "ecg": 0.6 / 0.8, "mri": 1.5 / 0.8})


def test_bad_sizes_raise():
    with pytest.raises(ValueError):
        sampling_probs({})
    with pytest.raises(ValueError):
        loss_weights({"cxr": 0})


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.sampled_from(["cxr", "ct", "retina", "ecg", "pathology", "mri"]),
                       st.integers(1, 10**6), min_size=1),
       st.floats(0.0, 2.0))
def test_properties(sizes, beta):
    p = sampling_probs(sizes, beta)
    assert sum(p.values()) == pytest.approx(1.0)
    w = loss_weights(sizes)
    lr = lr_scales(sizes, 0.01)
    for a in sizes:
        for b in sizes:
            if sizes[a] < sizes[b]:  # smaller data sets get more weight, rate and probability
                assert w[a] > w[b] and lr[a] > lr[b] and p[a] >= p[b]
        assert lr[a] == pytest.approx(0.01 * w[a])
    assert sum(loss_weights(sizes, True).values()) / len(sizes) == pytest.approx(1.0)
    assert sum(lr_scales(sizes, 0.01, True).values()) / len(sizes) == pytest.approx(0.01)
    # normalisation keeps the ratios
    wn = loss_weights(sizes, True)
    a, b = next(iter(sizes)), list(sizes)[-1]
    assert wn[a] / wn[b] == pytest.approx(w[a] / w[b])
    assert math.isfinite(sum(p.values()))
