from __future__ import annotations

import json
import math

import numpy as np
import pytest

from phenocascade.errors import ArtifactError
from phenocascade.models.calibration import (
    MIN_PER_CLASS,
    Calibrator,
    Isotonic,
    Platt,
    Temperature,
    apply_temperature,
    binary_log_loss,
    binary_nll,
    calibrate_probability,
    calibrator_from_dict,
    cross_fitted,
    expected_calibration_error,
    fit_isotonic,
    fit_platt,
    fit_temperature,
    logit,
    select_calibrator,
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


def _shifted_draw(n: int, seed: int, shift: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """A model that is overconfident by ``shift`` logits on every sample."""
    z, y = _calibrated_draw(n, seed)
    return z + shift, y


def test_platt_removes_a_shift_that_a_temperature_cannot() -> None:
    z, y = _shifted_draw(20_000, 3)
    a, b = fit_platt(z, y)
    assert a == pytest.approx(1.0, abs=0.06) and b == pytest.approx(-2.0, abs=0.1)
    platt, temperature = Platt.fit(z, y), Temperature.fit(z, y)
    # A temperature can only scale the shifted logits: the scores stay biased upwards.
    assert expected_calibration_error(platt(z), y) < 0.02
    assert expected_calibration_error(temperature(z), y) > 0.1
    assert binary_log_loss(platt(z), y) < binary_log_loss(temperature(z), y) - 0.05


def test_selection_picks_an_offset_for_shifted_scores_on_held_out_loss() -> None:
    z, y = _shifted_draw(3000, 4)
    choice = select_calibrator(z, y, np.arange(len(z)) % 5)
    assert choice.calibrator.method in ("platt", "isotonic")
    assert set(choice.cv_log_loss) == {"temperature", "platt", "isotonic"}
    assert choice.cv_log_loss[choice.calibrator.method] == min(choice.cv_log_loss.values())
    assert choice.cv_log_loss["platt"] < choice.cv_log_loss["temperature"] - 0.05
    assert binary_log_loss(choice.out_of_fold, y) == pytest.approx(
        choice.cv_log_loss[choice.calibrator.method]
    )


def test_calibrated_scores_keep_the_temperature() -> None:
    z, y = _calibrated_draw(3000, 5)
    choice = select_calibrator(z, y, np.arange(len(z)) % 5)
    # Nothing to correct: the one-parameter map does as well on held-out folds.
    assert choice.cv_log_loss["temperature"] <= choice.cv_log_loss["platt"] + 1e-3


def test_too_few_of_a_class_keep_the_temperature() -> None:
    z = np.linspace(-3.0, 3.0, 50)
    y = np.zeros(50)
    y[-(MIN_PER_CLASS - 1) :] = 1
    choice = select_calibrator(z, y, np.arange(50) % 5)
    assert isinstance(choice.calibrator, Temperature)
    assert list(choice.cv_log_loss) == ["temperature"]
    empty = select_calibrator([], [], [])
    assert empty.calibrator == Temperature(1.0) and empty.out_of_fold.shape == (0,)


def test_a_falling_platt_fit_is_not_a_candidate() -> None:
    # Labels anti-correlated with the scores: Platt would invert the ranking.
    z = np.linspace(-3.0, 3.0, 100)
    y = (z < 0).astype(float)
    assert fit_platt(z, y)[0] < 0
    choice = select_calibrator(z, y, np.arange(100) % 5)
    assert "platt" not in choice.cv_log_loss


def test_platt_with_a_single_class_is_the_identity() -> None:
    assert fit_platt([0.5, 1.0, 2.0], [1, 1, 1]) == (1.0, 0.0)
    assert fit_platt([], []) == (1.0, 0.0)


def test_isotonic_pools_adjacent_violators_by_hand() -> None:
    # Labels 0, 1, 0, 1 at logits 0..3: the middle pair violates the order and pools to
    # 0.5 at its centre 1.5.
    x, y = fit_isotonic([0.0, 1.0, 2.0, 3.0], [0, 1, 0, 1])
    np.testing.assert_allclose(x, [0.0, 1.5, 3.0])
    np.testing.assert_allclose(y, [0.0, 0.5, 1.0])
    iso = Isotonic(tuple(x), tuple(y))
    # Linear between block centres, constant beyond the ends.
    np.testing.assert_allclose(iso(np.array([-5.0, 0.75, 2.25, 9.0])), [0.0, 0.25, 0.75, 1.0])
    # Equal logits share a block (logit 3: labels 1 and 0, mean 0.5), and a block whose
    # mean equals its predecessor's pools with it: means come out strictly increasing.
    x, y = fit_isotonic([0.0, 1.0, 2.0, 3.0, 3.0], [0, 1, 0, 1, 0])
    np.testing.assert_allclose(x, [0.0, (1.0 + 2.0 + 3.0 + 3.0) / 4])
    np.testing.assert_allclose(y, [0.0, 0.5])


def test_isotonic_fit_is_increasing_and_keeps_the_interior_ranking() -> None:
    z, y = _shifted_draw(2000, 6)
    iso = Isotonic.fit(z, y)
    assert np.all(np.diff(iso.x) > 0) and np.all(np.diff(iso.y) > 0)
    inner = np.sort(z[(z > iso.x[0]) & (z < iso.x[-1])])
    assert np.all(np.diff(iso(inner)) > 0)


def test_out_of_fold_scores_do_not_see_their_own_labels() -> None:
    z, y = _shifted_draw(600, 7)
    folds = np.arange(600) % 3
    flipped = np.where(folds == 0, 1 - y, y)
    for method in ("temperature", "platt", "isotonic"):
        before = cross_fitted(method, z, y, folds)
        after = cross_fitted(method, z, flipped, folds)
        np.testing.assert_array_equal(before[folds == 0], after[folds == 0])
        assert not np.array_equal(before[folds != 0], after[folds != 0])


@pytest.mark.parametrize(
    "calibrator", [Temperature(1.7), Platt(0.8, -1.25), Isotonic((-1.0, 0.5, 2.0), (0.1, 0.4, 0.9))]
)
def test_calibrators_round_trip_through_json(calibrator: Calibrator) -> None:
    record = json.loads(json.dumps(calibrator.as_dict()))
    loaded = calibrator_from_dict(record)
    assert loaded == calibrator
    z = np.linspace(-4.0, 4.0, 9)
    np.testing.assert_array_equal(loaded(z), calibrator(z))


def test_unknown_or_incomplete_calibrator_records_are_refused() -> None:
    with pytest.raises(ArtifactError, match="unknown calibrator 'beta'"):
        calibrator_from_dict({"method": "beta", "a": 1.0})
    with pytest.raises(ArtifactError, match="incomplete"):
        calibrator_from_dict({"method": "platt", "a": 1.0})
