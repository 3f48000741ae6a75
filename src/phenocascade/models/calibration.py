"""Score calibrators per label: temperature, Platt and isotonic, chosen by held-out loss.

Every calibrator is a monotone map from a raw logit ``z`` (a classifier's output, or the
logit of a detector's box score) to a probability:

* :class:`Temperature` (Guo et al., "On calibration of modern neural networks", 2017):
  ``sigmoid(z / T)``. One parameter and no offset: it cannot move the scores of a model
  that is wrong on average, only sharpen or soften them.
* :class:`Platt` (Platt, "Probabilistic outputs for support vector machines", 1999):
  ``sigmoid(a z + b)``, fitted by Newton's method on Platt's smoothed targets
  (Lin, Lin and Weng, "A note on Platt's probabilistic outputs for support vector
  machines", 2007), with ``a > 0`` so that the ranking is kept.
* :class:`Isotonic` (Zadrozny and Elkan, 2002): the pool-adjacent-violators fit, stored
  as breakpoints and interpolated linearly between the centres of its blocks (centred
  isotonic regression, Oron and Flournoy, 2017), so it is strictly increasing between
  the first and last block and keeps the ranking there.

:func:`select_calibrator` fits every candidate on all but one fold and scores the left-out
fold, and keeps the candidate whose out-of-fold log-loss is lowest. The log-loss is a
proper scoring rule and punishes a confident wrong probability hard, which is the error
that matters for certified routing; the in-sample ECE would always prefer the isotonic
fit, which nearly interpolates the data it is fitted on. The ECE before and after
(:func:`expected_calibration_error`) is reported, not used to choose.

Calibrators are stored as plain JSON (:meth:`Temperature.as_dict` and
:func:`calibrator_from_dict`): a method name and two floats, or two lists of breakpoints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import numpy as np
import numpy.typing as npt

from phenocascade.errors import ArtifactError

FloatArray = npt.NDArray[np.float64]
CalibratorMethod = Literal["temperature", "platt", "isotonic"]
CALIBRATOR_METHODS: tuple[CalibratorMethod, ...] = get_args(CalibratorMethod)

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


def binary_log_loss(probs: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Mean binary log-loss of ``probs`` clipped to ``[1e-6, 1 - 1e-6]``, as stages clip them.

    ``nan`` when there are no samples.
    """
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), SCORE_CLIP, 1.0 - SCORE_CLIP)
    y = np.asarray(labels, dtype=np.float64).ravel()
    if p.size == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def fit_platt(
    logits: npt.ArrayLike, labels: npt.ArrayLike, *, iterations: int = 100
) -> tuple[float, float]:
    """Fit ``sigmoid(a z + b)`` to 0/1 labels by Newton's method (Lin, Lin and Weng, 2007).

    The targets are Platt's smoothed ones, ``(n_pos + 1) / (n_pos + 2)`` for positives and
    ``1 / (n_neg + 2)`` for negatives, so a perfectly separated set still has a finite fit.

    Parameters
    ----------
    logits : array_like
        Shape ``(n,)``, uncalibrated logits of one label.
    labels : array_like
        Shape ``(n,)``, 1 where the label is present, else 0.
    iterations : int, default 100
        Upper bound on Newton steps (each with a backtracking line search).

    Returns
    -------
    tuple of float
        ``(a, b)``; ``(1.0, 0.0)`` (the identity) when the labels hold a single class or
        there are no samples. ``a`` may come out ``<= 0`` on scores unrelated to the labels.
    """
    z = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    n_pos = float(y.sum())
    if z.size == 0 or n_pos in (0.0, float(z.size)):
        return 1.0, 0.0
    target = np.where(y == 1, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (z.size - n_pos + 2.0))
    design = np.stack([z, np.ones_like(z)], axis=1)

    def objective(params: FloatArray) -> float:
        f = design @ params
        return float(np.sum(np.logaddexp(0.0, f) - target * f))

    params = np.array([1.0, 0.0])
    current = objective(params)
    for _ in range(iterations):
        q = sigmoid(design @ params)
        gradient = design.T @ (q - target)
        # A tiny ridge keeps the Hessian invertible when every logit is the same.
        hessian = (design * (q * (1.0 - q))[:, None]).T @ design + 1e-12 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        scale = 1.0
        while scale > 1e-10 and objective(params - scale * step) >= current:
            scale /= 2.0
        if scale <= 1e-10:
            break
        params = params - scale * step
        current = objective(params)
        if np.abs(scale * step).max() < 1e-10:
            break
    return float(params[0]), float(params[1])


def fit_isotonic(logits: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """Pool-adjacent-violators fit of 0/1 labels on logits: block centres and block means.

    Equal logits share a block. Adjacent blocks are pooled while the earlier one's mean is
    not below the later one's, so the means come out strictly increasing.

    Parameters
    ----------
    logits : array_like
        Shape ``(n,)``, ``n >= 1``, uncalibrated logits of one label.
    labels : array_like
        Shape ``(n,)``, 0/1 truths.

    Returns
    -------
    tuple of numpy.ndarray
        ``(x, y)``, each shape ``(m,)`` with ``m`` the number of blocks: the mean logit of
        each block (strictly increasing) and the share of positives in it.
    """
    z = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if z.size == 0:
        raise ValueError("an isotonic fit needs at least one sample")
    values, inverse, counts = np.unique(z, return_inverse=True, return_counts=True)
    positives = np.bincount(inverse, weights=y)
    # Each block: [sum of labels, sum of logits, count].
    blocks: list[list[float]] = []
    for value, pos, count in zip(values, positives, counts, strict=True):
        block = [float(pos), float(value * count), float(count)]
        while blocks and blocks[-1][0] / blocks[-1][2] >= block[0] / block[2]:
            previous = blocks.pop()
            block = [a + b for a, b in zip(previous, block, strict=True)]
        blocks.append(block)
    pooled = np.asarray(blocks)
    return pooled[:, 1] / pooled[:, 2], pooled[:, 0] / pooled[:, 2]


@dataclass(frozen=True)
class Temperature:
    """``sigmoid(z / temperature)``: temperature scaling, no offset."""

    temperature: float
    method: ClassVar[CalibratorMethod] = "temperature"

    @classmethod
    def fit(cls, logits: npt.ArrayLike, labels: npt.ArrayLike) -> Temperature:
        """Fit by :func:`fit_temperature`."""
        return cls(fit_temperature(logits, labels))

    def __call__(self, logits: npt.ArrayLike) -> FloatArray:
        """Calibrated probabilities of ``logits`` (any shape), ``float64``."""
        return apply_temperature(logits, self.temperature)

    def as_dict(self) -> dict[str, Any]:
        """Return the JSON record ``{"method": "temperature", "temperature": T}``."""
        return {"method": self.method, "temperature": self.temperature}


@dataclass(frozen=True)
class Platt:
    """``sigmoid(a z + b)``: Platt scaling, a slope and an offset."""

    a: float
    b: float
    method: ClassVar[CalibratorMethod] = "platt"

    @classmethod
    def fit(cls, logits: npt.ArrayLike, labels: npt.ArrayLike) -> Platt:
        """Fit by :func:`fit_platt`."""
        return cls(*fit_platt(logits, labels))

    def __call__(self, logits: npt.ArrayLike) -> FloatArray:
        """Calibrated probabilities of ``logits`` (any shape), ``float64``."""
        return sigmoid(self.a * np.asarray(logits, dtype=np.float64) + self.b)

    def as_dict(self) -> dict[str, Any]:
        """Return the JSON record ``{"method": "platt", "a": a, "b": b}``."""
        return {"method": self.method, "a": self.a, "b": self.b}


@dataclass(frozen=True)
class Isotonic:
    """Centred isotonic regression: linear between breakpoints, constant beyond the ends.

    Attributes
    ----------
    x : tuple of float
        Breakpoint logits, strictly increasing (the centres of the fit's blocks).
    y : tuple of float
        Probabilities at the breakpoints, strictly increasing, in ``[0, 1]``.
    """

    x: tuple[float, ...]
    y: tuple[float, ...]
    method: ClassVar[CalibratorMethod] = "isotonic"

    @classmethod
    def fit(cls, logits: npt.ArrayLike, labels: npt.ArrayLike) -> Isotonic:
        """Fit by :func:`fit_isotonic`."""
        x, y = fit_isotonic(logits, labels)
        return cls(tuple(map(float, x)), tuple(map(float, y)))

    def __call__(self, logits: npt.ArrayLike) -> FloatArray:
        """Calibrated probabilities of ``logits`` (any shape), ``float64``."""
        return np.interp(np.asarray(logits, dtype=np.float64), self.x, self.y)

    def as_dict(self) -> dict[str, Any]:
        """Return the JSON record ``{"method": "isotonic", "x": [...], "y": [...]}``."""
        return {"method": self.method, "x": list(self.x), "y": list(self.y)}


Calibrator = Temperature | Platt | Isotonic
_CALIBRATORS: dict[str, type[Calibrator]] = {c.method: c for c in (Temperature, Platt, Isotonic)}
# Platt's two and the isotonic fit's many parameters are not fitted from fewer samples of
# either class than this; the temperature is kept.
MIN_PER_CLASS = 10


def calibrator_from_dict(record: Mapping[str, Any]) -> Calibrator:
    """Rebuild a calibrator from its :meth:`as_dict` record (an artifact's metadata).

    Raises
    ------
    ArtifactError
        If the record names no known method or lacks its parameters.
    """
    kind = _CALIBRATORS.get(str(record.get("method")))
    try:
        if kind is Temperature:
            return Temperature(float(record["temperature"]))
        if kind is Platt:
            return Platt(float(record["a"]), float(record["b"]))
        if kind is Isotonic:
            return Isotonic(tuple(map(float, record["x"])), tuple(map(float, record["y"])))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"calibrator record {dict(record)} is incomplete: {exc}") from exc
    raise ArtifactError(
        f"unknown calibrator {record.get('method')!r} (known: {list(_CALIBRATORS)}); the "
        "artifact was written by another phenocascade version"
    )


@dataclass(frozen=True)
class CalibratorChoice:
    """The calibrator chosen for one label and its held-out figures.

    Attributes
    ----------
    calibrator : Calibrator
        The chosen method, fitted on every sample.
    out_of_fold : numpy.ndarray
        Shape ``(n,)``: each sample's probability under the chosen method fitted without
        its fold.
    cv_log_loss : dict
        ``{method: out-of-fold log-loss}`` of every method tried.
    """

    calibrator: Calibrator
    out_of_fold: FloatArray
    cv_log_loss: dict[str, float]


def cross_fitted(
    method: CalibratorMethod, logits: FloatArray, labels: FloatArray, folds: npt.ArrayLike
) -> FloatArray:
    """Probabilities of each sample under ``method`` fitted on the other folds.

    With a single fold nothing can be held out, and the fit on all samples is used.
    """
    fold = np.asarray(folds)
    out = np.empty(logits.shape, dtype=np.float64)
    for k in np.unique(fold):
        held = fold == k
        rest = ~held if (~held).any() else held
        out[held] = _CALIBRATORS[method].fit(logits[rest], labels[rest])(logits[held])
    return out


def select_calibrator(
    logits: npt.ArrayLike,
    labels: npt.ArrayLike,
    folds: npt.ArrayLike,
    *,
    methods: Sequence[CalibratorMethod] = CALIBRATOR_METHODS,
) -> CalibratorChoice:
    """Choose the calibrator of one label by out-of-fold log-loss.

    Parameters
    ----------
    logits : array_like
        Shape ``(n,)``, uncalibrated logits.
    labels : array_like
        Shape ``(n,)``, 0/1 truths.
    folds : array_like
        Shape ``(n,)``, the fold of each sample (samples of one image share one).
    methods : sequence of str, default ("temperature", "platt", "isotonic")
        Candidates. Platt and isotonic are tried only with at least :data:`MIN_PER_CLASS`
        samples of each class, Platt only if its slope on all samples is positive (else
        it would invert the ranking); the temperature when nothing else qualifies.

    Returns
    -------
    CalibratorChoice
        The lowest out-of-fold log-loss wins; ties go to the earlier method.
    """
    z = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if z.size == 0:
        return CalibratorChoice(Temperature(1.0), np.zeros(0), {})
    n_pos = int(y.sum())
    fitted: dict[CalibratorMethod, Calibrator] = {}
    for method in methods:
        if method != "temperature" and min(n_pos, z.size - n_pos) < MIN_PER_CLASS:
            continue
        candidate = _CALIBRATORS[method].fit(z, y)
        if not (isinstance(candidate, Platt) and candidate.a <= 0.0):
            fitted[method] = candidate
    if not fitted:
        fitted = {"temperature": Temperature.fit(z, y)}
    held_out = {m: cross_fitted(m, z, y, folds) for m in fitted}
    losses: dict[str, float] = {m: binary_log_loss(p, y) for m, p in held_out.items()}
    best = min(held_out, key=lambda m: losses[m])
    return CalibratorChoice(fitted[best], held_out[best], losses)
