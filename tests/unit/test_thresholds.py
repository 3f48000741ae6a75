from __future__ import annotations

import math

import numpy as np
import pytest

from phenocascade.domain import LabelThresholds
from phenocascade.models.thresholds import (
    binomial_cdf,
    min_certifiable_count,
    precision_p_value,
    select_thresholds,
)


def _exact_cdf(k: int, n: int, p: float) -> float:
    """Independent reference: exact binomial sum with integer binomial coefficients."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


@pytest.mark.parametrize(
    ("k", "n", "p"), [(1, 3, 0.5), (0, 230, 0.01), (5, 120, 0.05), (30, 400, 0.1)]
)
def test_binomial_cdf_matches_exact_sum(k: int, n: int, p: float) -> None:
    assert binomial_cdf(k, n, p) == pytest.approx(_exact_cdf(k, n, p), rel=1e-9)


def test_binomial_cdf_hand_values_and_edges() -> None:
    assert binomial_cdf(1, 3, 0.5) == pytest.approx(0.5)  # (1 + 3) / 8
    assert binomial_cdf(-1, 5, 0.3) == 0.0
    assert binomial_cdf(5, 5, 0.3) == 1.0
    assert precision_p_value(0, 0, 0.99) == 1.0
    assert precision_p_value(0, 230, 0.99) == pytest.approx(0.99**230)


def test_minimum_count_for_a_certificate() -> None:
    assert min_certifiable_count(0.99, 0.1) == 230  # 0.99**229 > 0.1 >= 0.99**230
    assert 0.99**229 > 0.1 >= 0.99**230
    assert min_certifiable_count(0.95, 0.1) == 45


def test_separable_scores_with_enough_samples_are_certified() -> None:
    rng = np.random.default_rng(0)
    pos = rng.uniform(0.9, 1.0, 300)
    neg = rng.uniform(0.0, 0.1, 300)
    record = select_thresholds(np.r_[pos, neg], np.r_[np.ones(300), np.zeros(300)])
    assert record.positive == pytest.approx(pos.min())
    assert record.negative == pytest.approx(neg.max())
    assert record.coverage == 1.0
    assert record.achieved_precision_pos == 1.0 and record.achieved_precision_neg == 1.0
    assert (record.n_pos, record.n_neg) == (300, 300)
    LabelThresholds(record.positive, record.negative)  # a valid routing pair


def test_too_few_samples_fall_back_to_annotating_everything() -> None:
    scores = np.r_[np.full(100, 0.99), np.full(100, 0.01)]
    record = select_thresholds(scores, np.r_[np.ones(100), np.zeros(100)], target_precision=0.99)
    assert (record.positive, record.negative) == (1.0, 0.0)
    assert record.coverage == 0.0 and record.n_pos == 0 and record.n_neg == 0


def test_sequence_stops_at_the_first_failed_test() -> None:
    # 60 correct positives above 20 negatives above 60 more positives: the top block is
    # certified at 0.9, adding the negatives fails, so the later positives are never used
    # although the whole set has precision 120/140 = 0.857.
    scores = np.linspace(1.0, 0.01, 140)
    labels = np.r_[np.ones(60), np.zeros(20), np.ones(60)]
    record = select_thresholds(scores, labels, target_precision=0.9, delta=0.1)
    selected = int((scores >= record.positive).sum())
    assert _exact_cdf(int((labels[:selected] == 0).sum()), selected, 0.1) <= 0.1
    assert 60 <= selected < 140
    assert record.achieved_precision_pos >= 0.9


def test_guarantee_holds_in_simulation() -> None:
    # Scores uniform on [0, 1] and P(y=1 | s) = s, so precision(s >= t) = (1 + t) / 2:
    # a 0.9 target is met exactly by thresholds t >= 0.8.
    rng = np.random.default_rng(1)
    violations = 0
    trials = 100
    for _ in range(trials):
        s = rng.random(400)
        y = (rng.random(400) < s).astype(int)
        record = select_thresholds(s, y, target_precision=0.9, delta=0.1)
        if record.n_pos and record.positive < 0.8:
            violations += 1
    assert violations / trials <= 0.15


def test_mismatched_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        select_thresholds([0.1, 0.2], [1])
