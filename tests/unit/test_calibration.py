from __future__ import annotations

import math

import numpy as np
import pytest

from phenocascade.models.calibration import (
    apply_temperature,
    binary_nll,
    calibrate_probability,
    expected_calibration_error,
    fit_temperature,
    logit,
    sigmoid,
)


def _calibrated_draw(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose sigmoid is the true probability of the label."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, n)
    y = (rng.random(n) < sigmoid(z)).astype(float)
    return z, y


def test_already_calibrated_logits_keep_temperature_one() -> None:
    z, y = _calibrated_draw(20_000, 0)
    assert fit_temperature(z, y) == pytest.approx(1.0, abs=0.06)


def test_logits_scaled_by_three_give_temperature_three() -> None:
    z, y = _calibrated_draw(20_000, 1)
    t = fit_temperature(3.0 * z, y)
    assert t == pytest.approx(3.0, rel=0.06)
    # The fitted temperature minimises the NLL: nearby temperatures do worse.
    best = binary_nll(3.0 * z / t, y)
    assert best <= binary_nll(3.0 * z / (t * 1.1), y)
    assert best <= binary_nll(3.0 * z / (t / 1.1), y)


def test_single_class_labels_leave_temperature_at_one() -> None:
    assert fit_temperature([1.0, 2.0, 3.0], [1, 1, 1]) == 1.0
    assert fit_temperature([], []) == 1.0


def test_apply_temperature_hand_values() -> None:
    p = apply_temperature([0.0, 2.0, -4.0], 2.0)
    assert p == pytest.approx([0.5, 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(2))])
    with pytest.raises(ValueError, match="positive"):
        apply_temperature([0.0], 0.0)


def test_logit_inverts_sigmoid_and_survives_extremes() -> None:
    z = np.array([-20.0, -1.0, 0.0, 3.0, 20.0])
    assert logit(sigmoid(z)) == pytest.approx(z, abs=1e-6)
    assert np.isfinite(logit([0.0, 1.0])).all()
    assert calibrate_probability([0.8], 1.0) == pytest.approx([0.8])


def test_expected_calibration_error_hand_case() -> None:
    # Bin of 0.9 holds labels {1, 0}: |0.5 - 0.9| * 2/4; bin of 0.1 holds {0, 0}: 0.1 * 2/4.
    assert expected_calibration_error([0.9, 0.9, 0.1, 0.1], [1, 0, 0, 0]) == pytest.approx(0.25)
    assert expected_calibration_error([1.0, 0.0], [1, 0]) == 0.0
