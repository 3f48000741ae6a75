"""Routing thresholds with a finite-sample precision guarantee (Learn then Test).

For one label with calibrated validation scores ``p_i`` and truths ``y_i``, the PASS rule
``p >= t`` has precision ``P(y = 1 | p >= t)``. For each candidate ``t`` we test the null
hypothesis "precision(t) < target" with the exact binomial tail: among the ``n_t`` selected
validation samples, ``k_t`` are errors, and

    p-value(t) = P(Binomial(n_t, 1 - target) <= k_t),

which is the Clopper-Pearson test of the error rate: the null is rejected when there are
few errors. Each decision's loss is 0 or 1, so this tail is exact, and no valid test on
the error count does better: it rejects after ``n`` error-free decisions only once
``target**n <= delta`` (230 at 0.99 / 0.1, 45 at 0.95 / 0.1). The Hoeffding-Bentkus
p-value of Bates et al. ("Distribution-free, risk-controlling prediction sets", JACM
2021), made for any loss in ``[0, 1]``, is selectable (``p_value="hoeffding-bentkus"``):
its Hoeffding term equals the binomial tail at zero errors and exceeds it otherwise, its
Bentkus term is ``e`` times the tail (329 error-free decisions at 0.99 / 0.1 alone), so on
0/1 losses it never certifies more. Candidates are tested in a fixed
sequence from the most conservative threshold towards the least (fixed-sequence testing,
Angelopoulos et al., "Learn then Test", 2021), stopping at the first failure; the last
rejected null gives the threshold with the largest coverage, and with probability at least
``1 - delta`` over the validation draw the chosen rule has precision >= target.

The sequence starts at the first candidate whose selection is large enough for any
outcome to be significant (``target**n <= delta``): smaller selections can never reject,
and testing them first would end every sequence at once. This start depends on the
unlabelled scores only, never on the truths. The SKIP rule ``p <= t`` is handled the same
way with the roles of the classes swapped. When nothing can be certified the thresholds
fall back to ``positive = 1.0`` and ``negative = 0.0``: every decision goes to a human.

Each side's precision is over its whole selection, so many easy decisions can carry a
few wrong ones near the boundary: when the classes are well separated on most samples,
the certified PASS rule reaches below the certified SKIP rule, and both claim the scores
between them. Those contested scores go to a person instead (:func:`_cede_overlap`): PASS
keeps only scores above every validation negative among them, SKIP only scores below
every validation positive among them. Both are still rules their own sequences certified,
and an indeterminate band remains wherever the validation classes mix.

The candidates are not every distinct score but a geometric grid of selection sizes
(:data:`GRID_STEP`: each candidate selects at least 5 % more decisions than the one
before, rounded up to the end of a run of ties, and the last one selects them all).
Fixed-sequence testing is valid for any sequence fixed before the labels are seen
(Learn then Test tests a grid of lambdas), and this grid depends on the unlabelled scores
only. A test at every distinct score fails at the first local cluster of errors: at
0.95 / 0.1, errors at ranks 96 and 104 give p = 0.103 at 104 decisions and end the
sequence, although the top 200 hold three (p = 0.009). The grid tests 98, 103 (one
error), 109 (two: p = 0.085), ... and steps over such a pair once the selection around
it has grown; a denser cluster (three errors among ranks 95 to 108) still ends it. A
rule certified on the grid may select up to 5 % fewer decisions than the largest one a
test at every score would have reached.

A single sequence still ends at its first failure, so one confident error near the top
of the ranking (one mislabelled image) can stop it before it ever reaches a useful coverage.
With ``starts = m`` the sequence is run from ``m`` start points, each at level
``delta / m`` (Bonferroni over the sequences, the multi-start variant of fixed-sequence
testing in Learn then Test): start ``k`` is the first selection size at which ``k``
errors can still be significant, so the later starts step over early errors. The union of
the rejections keeps the family-wise error rate at ``delta``, and the largest rejected
selection gives the threshold. Start points depend on ``target``, ``delta`` and ``m``
only.

Multi-label classifiers can pool their labels (:func:`select_pooled_thresholds`): after a
calibrator per label the scores of different labels are probabilities on one scale, so
one shared ``(positive, negative)`` pair is certified on every (image, label) decision
together. The guarantee is then on the precision of single label decisions pooled over
labels, not on each label separately and not on whole images.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

PValue = Literal["binomial", "hoeffding-bentkus"]
# Relative growth of the selection from one candidate of a fixed sequence to the next.
GRID_STEP = 0.05


def binomial_cdf(k: int, n: int, p: float) -> float:
    """Return ``P(X <= k)`` for ``X ~ Binomial(n, p)``, summed in log space.

    Parameters
    ----------
    k : int
        Number of successes (may be negative, giving 0, or ``>= n``, giving 1).
    n : int
        Number of trials, ``n >= 0``.
    p : float
        Success probability in ``[0, 1]``.
    """
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [
        math.lgamma(n + 1)
        - math.lgamma(i + 1)
        - math.lgamma(n - i + 1)
        + i * log_p
        + (n - i) * log_q
        for i in range(k + 1)
    ]
    top = max(terms)
    return float(min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms)))


def _bernoulli_kl(a: float, b: float) -> float:
    """Kullback-Leibler divergence of Bernoulli(``a``) from Bernoulli(``b``), ``0 < b < 1``."""
    terms = [(a, b), (1.0 - a, 1.0 - b)]
    return sum(x * math.log(x / y) for x, y in terms if x > 0.0)


def hoeffding_bentkus_p_value(errors: int, selected: int, target_precision: float) -> float:
    """Hoeffding-Bentkus p-value of "precision < target" (Bates et al., JACM 2021).

    With risk bound ``a = 1 - target`` and empirical risk ``r = errors / selected``:
    ``min(exp(-n KL(min(r, a) || a)), e * P(Binomial(n, a) <= errors))``. Valid for any
    loss in ``[0, 1]``; on 0/1 losses it is never below :func:`precision_p_value`'s
    binomial tail. Returns ``1.0`` when nothing is selected.
    """
    if selected == 0:
        return 1.0
    a = 1.0 - target_precision
    hoeffding = math.exp(-selected * _bernoulli_kl(min(errors / selected, a), a))
    bentkus = math.e * binomial_cdf(errors, selected, a)
    return min(1.0, hoeffding, bentkus)


def precision_p_value(
    errors: int, selected: int, target_precision: float, p_value: PValue = "binomial"
) -> float:
    """P-value of the null "precision < target" after ``errors`` errors in ``selected`` decisions.

    ``p_value="binomial"`` is the exact tail ``P(Binomial(selected, 1 - target) <= errors)``,
    ``"hoeffding-bentkus"`` :func:`hoeffding_bentkus_p_value`. Returns ``1.0`` when nothing
    is selected.
    """
    if p_value == "hoeffding-bentkus":
        return hoeffding_bentkus_p_value(errors, selected, target_precision)
    if p_value != "binomial":
        raise ValueError(f"p_value must be one of {get_args(PValue)}, got {p_value!r}")
    if selected == 0:
        return 1.0
    return binomial_cdf(errors, selected, 1.0 - target_precision)


def min_certifiable_count(
    target_precision: float, delta: float, errors: int = 0, p_value: PValue = "binomial"
) -> int:
    """Smallest number of decisions with ``errors`` errors whose p-value is ``<= delta``.

    E.g. 230 for ``target_precision=0.99, delta=0.1`` and 45 for ``0.95, 0.1`` without
    errors (``ceil(log(delta) / log(target_precision))``, for either p-value); 77 for
    ``0.95, 0.1`` with one error.
    """
    if not 0.0 < target_precision < 1.0 or not 0.0 < delta < 1.0:
        raise ValueError("target_precision and delta must lie strictly between 0 and 1")
    if errors < 0:
        raise ValueError(f"errors must be >= 0, got {errors}")
    # The error-free count has a closed form and bounds the search from below: the
    # p-value of k errors in n decisions falls as n grows, and neither p-value is below
    # the binomial tail.
    n = max(1, math.ceil(math.log(delta) / math.log(target_precision) - 1e-12)) + errors
    while precision_p_value(errors, n, target_precision, p_value) > delta:
        n += 1
    return n


@dataclass(frozen=True)
class ThresholdRecord:
    """Certified routing thresholds of one label and how they did on validation data.

    Attributes
    ----------
    positive : float
        PASS (or "confident box") when the calibrated score is ``>= positive``.
    negative : float
        SKIP (or "drop box") when the calibrated score is ``<= negative``.
    target_precision : float
        Precision each automatic decision must reach.
    delta : float
        Allowed probability that the guarantee fails.
    achieved_precision_pos, achieved_precision_neg : float
        Precision of the PASS / SKIP decisions on the validation data (1.0 when vacuous,
        i.e. when ``n_pos``/``n_neg`` is 0).
    n_pos, n_neg : int
        Validation samples decided automatically on each side.
    coverage : float
        Fraction of validation samples decided automatically.
    n : int
        Validation samples (or pooled label decisions) the record was computed on.
    """

    positive: float
    negative: float
    target_precision: float
    delta: float
    achieved_precision_pos: float
    achieved_precision_neg: float
    n_pos: int
    n_neg: int
    coverage: float
    n: int

    def as_dict(self) -> dict[str, float]:
        """Return the record as a JSON-ready ``dict`` (the artifact's ``thresholds`` entry)."""
        return {key: float(value) for key, value in asdict(self).items()}


def _fixed_sequence(
    scores_desc: npt.NDArray[np.float64],
    errors_desc: npt.NDArray[np.int64],
    target_precision: float,
    delta: float,
    starts: int = 1,
    p_value: PValue = "binomial",
) -> int:
    """Return how many top-ranked samples the certified rule selects (0 if none).

    ``scores_desc`` is sorted in decreasing order of confidence in the decision and
    ``errors_desc`` marks the samples on which the decision would be wrong. Candidates are
    the distinct scores, so ties are selected together. With ``starts = m`` the sequence is
    run from ``m`` start points at level ``delta / m`` each (see the module docstring);
    ``p_value`` names the test (:func:`precision_p_value`).
    """
    if starts < 1:
        raise ValueError(f"starts must be at least 1, got {starts}")
    level = delta / starts
    cum_errors = np.cumsum(errors_desc)
    # The last index of each run of equal scores is where a threshold can sit.
    ends = np.flatnonzero(np.append(scores_desc[1:] != scores_desc[:-1], True))
    chosen = 0
    for k in range(starts):
        first = min_certifiable_count(target_precision, level, errors=k, p_value=p_value)
        for end in _grid(ends, first):
            selected = int(end) + 1
            errors = int(cum_errors[end])
            if precision_p_value(errors, selected, target_precision, p_value) > level:
                break
            chosen = max(chosen, selected)
    return chosen


def _grid(ends: npt.NDArray[np.int64], first: int) -> list[int]:
    """Return the candidates of one sequence: tie ends on a geometric grid of sizes.

    From the first selection of at least ``first`` decisions, each candidate selects at
    least ``1 + GRID_STEP`` times the previous one (and at least one more), rounded up to
    the end of a run of tied scores; the last candidate selects every decision. The grid
    depends on the unlabelled scores only.
    """
    grid: list[int] = []
    want = first
    for end in ends:
        selected = int(end) + 1
        if selected >= want or (end == ends[-1] and selected >= first):
            grid.append(int(end))
            want = max(selected + 1, math.ceil(selected * (1.0 + GRID_STEP)))
    return grid


def threshold_record(
    scores: npt.ArrayLike,
    labels: npt.ArrayLike,
    positive: float,
    negative: float,
    *,
    target_precision: float,
    delta: float,
) -> ThresholdRecord:
    """Describe given thresholds on validation data: precision, counts and coverage.

    ``positive = 1.0`` (``negative = 0.0``) means that side decides nothing, even for a
    score of exactly 1.0 (0.0). Shapes and meanings as in :func:`select_thresholds`.
    """
    p = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.int64).ravel()
    if p.shape != y.shape:
        raise ValueError(f"scores {p.shape} and labels {y.shape} differ in shape")
    pos_mask = p >= positive if positive < 1.0 else np.zeros(p.shape, dtype=bool)
    neg_mask = p <= negative if negative > 0.0 else np.zeros(p.shape, dtype=bool)
    return ThresholdRecord(
        positive=positive,
        negative=negative,
        target_precision=target_precision,
        delta=delta,
        achieved_precision_pos=float(y[pos_mask].mean()) if pos_mask.any() else 1.0,
        achieved_precision_neg=float(1 - y[neg_mask].mean()) if neg_mask.any() else 1.0,
        n_pos=int(pos_mask.sum()),
        n_neg=int(neg_mask.sum()),
        coverage=float((pos_mask | neg_mask).mean()) if p.size else 0.0,
        n=int(p.size),
    )


def select_thresholds(
    scores: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    target_precision: float = 0.99,
    delta: float = 0.1,
    starts: int = 1,
    p_value: PValue = "binomial",
) -> ThresholdRecord:
    """Choose PASS and SKIP thresholds of one label by Learn-then-Test.

    Parameters
    ----------
    scores : array_like
        Shape ``(n,)``, calibrated validation probabilities in ``[0, 1]``.
    labels : array_like
        Shape ``(n,)``, 1 where the label is truly present (for detectors: the box
        matches a ground-truth box), else 0.
    target_precision : float, default 0.99
        Required precision of each automatic decision.
    delta : float, default 0.1
        The guarantee holds with probability at least ``1 - delta``.
    starts : int, default 1
        Start points of the fixed-sequence test, each at level ``delta / starts``.
    p_value : {"binomial", "hoeffding-bentkus"}, default "binomial"
        The test of each candidate (:func:`precision_p_value`).

    Returns
    -------
    ThresholdRecord
        ``positive = 1.0`` / ``negative = 0.0`` on the sides that could not be certified.
    """
    p = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.int64).ravel()
    if p.shape != y.shape:
        raise ValueError(f"scores {p.shape} and labels {y.shape} differ in shape")
    order = np.argsort(-p, kind="stable")
    n_pos = _fixed_sequence(p[order], (1 - y[order]), target_precision, delta, starts, p_value)
    positive = float(p[order][n_pos - 1]) if n_pos else 1.0
    order = np.argsort(p, kind="stable")
    n_neg = _fixed_sequence(-p[order], y[order], target_precision, delta, starts, p_value)
    negative = float(p[order][n_neg - 1]) if n_neg else 0.0
    if n_pos and n_neg and negative >= positive:
        least = min_certifiable_count(
            target_precision, delta / starts, errors=starts - 1, p_value=p_value
        )
        positive, negative = _cede_overlap(p, y, positive, negative, least)
    # A certified side whose score is exactly 1.0 (0.0) would read as "decides nothing"
    # in threshold_record; scores are clipped away from 0 and 1, so this cannot happen.
    return threshold_record(
        p, y, positive, negative, target_precision=target_precision, delta=delta
    )


def _cede_overlap(
    p: npt.NDArray[np.float64],
    y: npt.NDArray[np.int64],
    positive: float,
    negative: float,
    least: int,
) -> tuple[float, float]:
    """Give the scores claimed by both certified rules, ``[positive, negative]``, to a person.

    PASS moves up to the lowest score above every negative in the overlap, SKIP down to
    the highest score below every positive in it, so ``negative < positive`` after. A
    moved rule selects a subset of the top (bottom) of the ranking its fixed sequence
    certified; it is certified itself if it still selects at least ``least`` samples,
    the largest start of those sequences (with ``starts`` start points, ``starts - 1``
    errors at level ``delta / starts``). Otherwise that side decides nothing.

    Parameters
    ----------
    p, y : numpy.ndarray
        Shape ``(n,)``: calibrated validation scores and 0/1 truths.
    positive, negative : float
        The certified thresholds, ``negative >= positive``.
    least : int
        Smallest selection a moved rule may keep.

    Returns
    -------
    tuple of float
        ``(positive, negative)`` with ``negative < positive``.
    """
    contested = (p >= positive) & (p <= negative)
    negatives, positives = p[contested & (y == 0)], p[contested & (y == 1)]
    if negatives.size:
        above = p[p > negatives.max()]
        positive = float(above.min()) if above.size >= least else 1.0
    if positives.size:
        below = p[p < positives.min()]
        negative = float(below.max()) if below.size >= least else 0.0
    return positive, negative


@dataclass(frozen=True)
class PooledThresholds:
    """One certified threshold pair shared by every label, and how it does per label.

    Attributes
    ----------
    pooled : ThresholdRecord
        The pair certified on all (sample, label) decisions together; ``n`` is their count.
    per_label : dict
        ``{label: ThresholdRecord}`` with the shared pair and that label's own figures.
    """

    pooled: ThresholdRecord
    per_label: dict[str, ThresholdRecord]


def select_pooled_thresholds(
    scores: Mapping[str, npt.ArrayLike],
    labels: Mapping[str, npt.ArrayLike],
    *,
    target_precision: float = 0.99,
    delta: float = 0.1,
    starts: int = 1,
    p_value: PValue = "binomial",
) -> PooledThresholds:
    """Certify one ``(positive, negative)`` pair on the decisions of all labels pooled.

    Parameters
    ----------
    scores : mapping of str to array_like
        Per label, shape ``(n_label,)`` calibrated validation probabilities; they must be
        on one scale (e.g. calibrated per label) for sharing a pair to make sense.
    labels : mapping of str to array_like
        Per label, shape ``(n_label,)`` 0/1 truths, same keys as ``scores``.
    target_precision : float, default 0.99
        Required precision of the pooled automatic label decisions.
    delta : float, default 0.1
        The guarantee holds with probability at least ``1 - delta``.
    starts : int, default 1
        Start points of the fixed-sequence test (see :func:`select_thresholds`).
    p_value : {"binomial", "hoeffding-bentkus"}, default "binomial"
        The test of each candidate (:func:`precision_p_value`).

    Returns
    -------
    PooledThresholds
        ``pooled.n`` is the number of pooled decisions.
    """
    if set(scores) != set(labels):
        raise ValueError(f"scores labels {sorted(scores)} differ from truths {sorted(labels)}")
    names = list(scores)
    flat_scores = [np.asarray(scores[c], dtype=np.float64).ravel() for c in names]
    flat_truths = [np.asarray(labels[c], dtype=np.int64).ravel() for c in names]
    pooled = select_thresholds(
        np.concatenate(flat_scores) if names else np.zeros(0),
        np.concatenate(flat_truths) if names else np.zeros(0, dtype=np.int64),
        target_precision=target_precision,
        delta=delta,
        starts=starts,
        p_value=p_value,
    )
    per_label = {
        c: threshold_record(
            s, y, pooled.positive, pooled.negative, target_precision=target_precision, delta=delta
        )
        for c, s, y in zip(names, flat_scores, flat_truths, strict=True)
    }
    return PooledThresholds(pooled=pooled, per_label=per_label)


def fallback_record(target_precision: float, delta: float) -> ThresholdRecord:
    """Thresholds that certify nothing: every decision goes to a human."""
    return ThresholdRecord(1.0, 0.0, target_precision, delta, 1.0, 1.0, 0, 0, 0.0, 0)
