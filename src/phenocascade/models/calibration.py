"""Temperature scaling per label (Guo et al., 2017), for sigmoid outputs.

A temperature ``T`` maps a logit ``z`` to ``sigmoid(z / T)``. It is fitted on validation
logits by minimising the binary negative log-likelihood; the NLL is convex in ``1 / T``, so a
golden-section search over ``1 / T`` finds the global minimum without a gradient.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

# Probabilities are clipped this far from 0 and 1 before taking logits.
_EPS = 1e-12
# Stage scores are kept this far from 0 and 1 so the certify-nothing fallback thresholds
# (1.0 and 0.0) can never be met by a saturated sigmoid; validation scores used to certify
# thresholds are clipped the same way, so a certified threshold is never exactly 0 or 1.
SCORE_CLIP = 1e-6
_INV_T_RANGE = (1e-3, 50.0)


def sigmoid(z: npt.ArrayLike) -> FloatArray:
    """Numerically stable logistic function, ``float64``."""
    # The tanh form never overflows, unlike 1 / (1 + exp(-z)) for large negative z.
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


def logit(p: npt.ArrayLike) -> FloatArray:
    """Inverse of :func:`sigmoid`, with ``p`` clipped to ``[1e-12, 1 - 1e-12]``."""
    arr = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(arr) - np.log1p(-arr)


def binary_nll(logits: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Mean binary cross-entropy of ``sigmoid(logits)`` against 0/1 ``labels``."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    # log(1 + exp(-z)) for positives and log(1 + exp(z)) for negatives, overflow-free.
    return float(np.mean(np.logaddexp(0.0, -z) * y + np.logaddexp(0.0, z) * (1.0 - y)))


def fit_temperature(
    logits: npt.ArrayLike, labels: npt.ArrayLike, *, iterations: int = 100
) -> float:
    """Fit the temperature minimising the NLL of ``sigmoid(logits / T)``.

    Parameters
    ----------
    logits : array_like
        Shape ``(n,)``, uncalibrated logits of one label.
    labels : array_like
        Shape ``(n,)``, 1 where the label is present, else 0.
    iterations : int, default 100
        Golden-section steps over ``1 / T`` in ``[1e-3, 50]``.

    Returns
    -------
    float
        ``T > 0``; ``1.0`` when the labels hold a single class or there are no samples,
        because the NLL then has no finite minimiser.
    """
    z = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if z.size == 0 or y.min() == y.max():
        return 1.0
    lo, hi = _INV_T_RANGE
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = binary_nll(z * c, y), binary_nll(z * d, y)
    for _ in range(iterations):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = binary_nll(z * c, y)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = binary_nll(z * d, y)
    return float(1.0 / ((a + b) / 2.0))


def apply_temperature(logits: npt.ArrayLike, temperature: float) -> FloatArray:
    """Return calibrated probabilities ``sigmoid(logits / temperature)``, ``float64``."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return sigmoid(np.asarray(logits, dtype=np.float64) / temperature)


def calibrate_probability(p: npt.ArrayLike, temperature: float) -> FloatArray:
    """Apply a temperature to probabilities (through their logits); ``float64``."""
    return apply_temperature(logit(p), temperature)


def expected_calibration_error(
    probs: npt.ArrayLike, labels: npt.ArrayLike, *, bins: int = 15
) -> float:
    """Return the expected calibration error of binary probabilities over equal-width bins.

    Parameters
    ----------
    probs : array_like
        Shape ``(n,)``, predicted probability that the label is present.
    labels : array_like
        Shape ``(n,)``, 0/1 truth.
    bins : int, default 15
        Number of equal-width bins on ``[0, 1]``.

    Returns
    -------
    float
        ``sum_b |B_b| / n * |mean(labels in b) - mean(probs in b)|``; ``nan`` when empty.
    """
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if p.size == 0:
        return float("nan")
    idx = np.minimum((p * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            ece += mask.mean() * abs(y[mask].mean() - p[mask].mean())
    return float(ece)
