"""Shift detection: flag images unlike the data a stage was calibrated on.

A stage's certificates (:mod:`phenocascade.models.certify`) hold only for images like its
validation split. :class:`NoveltyDetector` scores how far an image's features lie from
that split, and :class:`NoveltyGuard` marks every image beyond the detector's threshold
``novel``, which :func:`phenocascade.domain.route` sends to a person whatever its scores.

The score is a Mahalanobis distance. Features are standardised, projected on at most
``min(d, n // 2)`` principal axes (probabilistic PCA: the discarded axes keep one shared
noise variance, so a shift outside the kept axes still counts), and the covariance of the
projection is shrunk towards a scaled identity by the Ledoit-Wolf formula (Ledoit and
Wolf, "A well-conditioned estimator for large-dimensional covariance matrices", 2004).

The threshold is set to a false-alarm rate ``alpha`` by cross-fitting: the calibration
features are split into ``folds``, each fold is scored by a detector fitted on the others,
and the threshold is the conformal quantile of those out-of-fold scores, the
``ceil((n + 1)(1 - alpha))``-th smallest. A new in-distribution image scores above it
with probability at most about ``alpha`` (a CV+ style bound, Barber et al., "Predictive
inference with the jackknife+", 2021; the deployed detector is fitted on all ``n``
images, so its scores tend to be lower than the out-of-fold ones and the rate lower).
Fewer than ``1 / alpha - 1`` images (:func:`min_calibration_size`) cannot support the
rate: the threshold is then the largest out-of-fold score, the strictest finite conformal
threshold, and the false-alarm rate is at most about ``1 / (n + 1)`` instead of ``alpha``
(:attr:`NoveltyDetector.false_alarm_bound`). Flagging nothing would let a tier trained
on a small dataset decide images of a modality it never saw.

``DEFAULT_ALPHA = 0.05``: a false alarm only costs an expert question, a miss can cost a
silent wrong decision. At 0.02 (0.01 for each of a segmenter-based tier's two detectors)
the bootstrap majority of a fresh machine (2026-12) flagged 25 of 72 BCCD test smears on
its backbone features: the conformal threshold sits in the tail of the rare DSB
modalities (brightfield, stained) among its 532 calibration images. At 0.05 it flagged
72 of 72, and 1 of 132 DSB test images. 0.05 is reached from 19 calibration images.

Features: every stage is scored on :func:`image_descriptor`, whatever its backend, and
stages with an ``embed`` method (:class:`~phenocascade.models.base.Embedder`, the image
classifiers' pooled backbone features) on those too, by a second detector
(:class:`StageNovelty`); an image either flags is novel. The recipes fit them on the
tier's train and val images: fitted on the 133 DSB val images alone, the descriptor
flagged none of 60 BCCD smears the majority classifier never saw; on train and val, both
kinds together flagged all 60 and 1 of 132 DSB test images (``docs/routing.md``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol, Self, cast, get_args, runtime_checkable

import numpy as np
import numpy.typing as npt

from phenocascade.domain import DecodedImage, LabelThresholds, StageKind, StageOutput
from phenocascade.errors import ArtifactError
from phenocascade.models.base import Embedder, Stage
from phenocascade.models.preprocess import to_unit_rgb

log = logging.getLogger(__name__)

DEFAULT_ALPHA = 0.05
NOVELTY_FILE = "novelty.npz"
FeatureKind = Literal["descriptor", "backbone"]

# Floors that keep the fit defined when a feature or a direction never varies; a new image
# that varies there lands far away, which is the point.
_RELATIVE_STD_FLOOR = 1e-3
_ABSOLUTE_FLOOR = 1e-12
_RIDGE = 1e-6


def ledoit_wolf_covariance(x: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Shrunk covariance of centred samples (Ledoit-Wolf), made positive definite.

    Parameters
    ----------
    x : array_like
        Shape ``(n, p)``, rows centred (mean zero).

    Returns
    -------
    numpy.ndarray
        Shape ``(p, p)``, ``float64``: ``(1 - rho) S + rho mu I + 1e-6 I`` with ``S`` the
        sample covariance, ``mu = trace(S) / p`` and ``rho`` in ``[0, 1]`` the
        Ledoit-Wolf shrinkage intensity.
    """
    z = np.asarray(x, dtype=np.float64)
    n, p = z.shape
    sample = z.T @ z / n
    mu = float(np.trace(sample)) / p
    target = mu * np.eye(p)
    distance = float(((sample - target) ** 2).sum())
    # sum_i ||x_i x_i^T - S||_F^2 = sum_i ||x_i||^4 - n ||S||_F^2
    spread = (float(((z**2).sum(1) ** 2).sum()) - n * float((sample**2).sum())) / n**2
    rho = min(max(spread, 0.0), distance) / distance if distance > 0 else 1.0
    return (1.0 - rho) * sample + rho * target + _RIDGE * np.eye(p)


def conformal_threshold(scores: npt.ArrayLike, alpha: float) -> float:
    """Return the ``ceil((n + 1)(1 - alpha))``-th smallest of ``n`` scores (``inf`` past ``n``).

    Parameters
    ----------
    scores : array_like
        Shape ``(n,)``, out-of-fold scores of in-distribution samples.
    alpha : float
        Target false-alarm rate in ``(0, 1)``.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    # The tolerance keeps e.g. (99 + 1) * 0.99 at rank 99, not 100.
    rank = math.ceil((len(s) + 1) * (1.0 - alpha) - 1e-9)
    return float(s[rank - 1]) if 1 <= rank <= len(s) else math.inf


def min_calibration_size(alpha: float) -> int:
    """Fewest scores for which :func:`conformal_threshold` at ``alpha`` is finite.

    That is ``ceil(1 / alpha - 1)``: 19 for ``alpha = 0.05``, 99 for ``0.01``.

    Parameters
    ----------
    alpha : float
        Target false-alarm rate in ``(0, 1)``.
    """
    # ceil((n + 1)(1 - alpha)) <= n  <=>  n >= (1 - alpha) / alpha, with the tolerance of
    # conformal_threshold's rank so that both agree at the boundary.
    return max(0, math.ceil((1.0 - alpha) / alpha - 1e-9))


@dataclass(frozen=True)
class _Gaussian:
    """Standardisation, principal axes and shrunk precision of one fit."""

    mean: npt.NDArray[np.float64]
    scale: npt.NDArray[np.float64]
    components: npt.NDArray[np.float64]
    precision: npt.NDArray[np.float64]
    noise_var: float

    @classmethod
    def fit(cls, x: npt.NDArray[np.float64], max_components: int | None) -> _Gaussian:
        n, d = x.shape
        mean = x.mean(0)
        std = x.std(0)
        floor = max(_RELATIVE_STD_FLOOR * float(np.median(std)), _ABSOLUTE_FLOOR)
        scale = np.maximum(std, floor)
        z = (x - mean) / scale
        k = max(1, min(d, n // 2, max_components or d))
        components = np.linalg.svd(z, full_matrices=False)[2][:k]
        projected = z @ components.T
        precision = np.asarray(np.linalg.inv(ledoit_wolf_covariance(projected)), np.float64)
        noise_var = 0.0
        if k < d:
            residual = z - projected @ components
            noise_var = max(float((residual**2).sum()) / (n * (d - k)), _ABSOLUTE_FLOOR)
        return cls(mean, scale, components, precision, noise_var)

    def score(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        z = (x - self.mean) / self.scale
        projected = z @ self.components.T
        d2 = np.einsum("ij,jk,ik->i", projected, self.precision, projected)
        if self.noise_var > 0:
            d2 = d2 + ((z - projected @ self.components) ** 2).sum(1) / self.noise_var
        return np.sqrt(np.maximum(d2, 0.0))


def _matrix(features: npt.ArrayLike) -> npt.NDArray[np.float64]:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must have shape (n, d), got {x.shape}")
    return x


class NoveltyDetector:
    """Mahalanobis novelty score with a threshold at a calibrated false-alarm rate.

    Parameters
    ----------
    alpha : float, default 0.05
        Target rate of in-distribution images flagged novel, in ``(0, 1)``.
    folds : int, default 5
        Cross-fitting folds for the threshold (at most ``n``).
    max_components : int or None, default None
        Cap on the principal axes kept; ``None`` keeps ``min(d, n // 2)``.
    seed : int, default 0
        Seeds the fold assignment.

    Attributes
    ----------
    threshold_ : float
        Scores above it are novel: the conformal threshold at ``alpha``, or the largest
        out-of-fold score when ``n`` is too small for ``alpha`` (see
        :attr:`false_alarm_bound`). ``inf`` (nothing flagged) only in states saved before
        that fallback.
    n_samples_, n_features_in_ : int
        Shape of the calibration features.
    gaussian_ : _Gaussian
        The fit on all calibration features.
    """

    def __init__(
        self,
        *,
        alpha: float = DEFAULT_ALPHA,
        folds: int = 5,
        max_components: int | None = None,
        seed: int = 0,
    ) -> None:
        self.alpha = alpha
        self.folds = folds
        self.max_components = max_components
        self.seed = seed

    def fit(self, features: npt.ArrayLike) -> Self:
        """Fit on ``(n, d)`` in-distribution features, ``n >= 3``; returns ``self``.

        Raises
        ------
        ValueError
            If ``alpha`` is outside ``(0, 1)``, ``folds < 2``, ``n < 3`` or a feature is
            not finite.
        """
        x = _matrix(features)
        if not 0.0 < self.alpha < 1.0 or self.folds < 2:
            raise ValueError(f"need 0 < alpha < 1 and folds >= 2, got {self.alpha}, {self.folds}")
        if len(x) < 3 or not np.isfinite(x).all():
            raise ValueError(f"need at least 3 rows of finite features, got shape {x.shape}")
        rng = np.random.default_rng(self.seed)
        out_of_fold = np.empty(len(x))
        for held in np.array_split(rng.permutation(len(x)), min(self.folds, len(x))):
            rest = np.setdiff1d(np.arange(len(x)), held)
            out_of_fold[held] = _Gaussian.fit(x[rest], self.max_components).score(x[held])
        self.gaussian_ = _Gaussian.fit(x, self.max_components)
        self.n_samples_, self.n_features_in_ = x.shape
        if len(x) >= min_calibration_size(self.alpha):
            self.threshold_ = conformal_threshold(out_of_fold, self.alpha)
        else:
            # The conformal rank falls past n. The largest score is the strictest finite
            # threshold: a looser rate than asked beats flagging nothing, which would let
            # the stage decide images unlike anything it was calibrated on.
            self.threshold_ = float(out_of_fold.max())
        return self

    @property
    def false_alarm_bound(self) -> float:
        """Bound on the rate of in-distribution images flagged novel, as fitted.

        ``alpha`` when the ``n`` calibration rows support it (``n >=``
        :func:`min_calibration_size`), else ``1 / (n + 1)``: the threshold is then the
        largest of ``n`` out-of-fold scores, which a new in-distribution image exceeds
        with probability at most about ``1 / (n + 1)``.
        """
        n = self.n_samples_
        return self.alpha if n >= min_calibration_size(self.alpha) else 1.0 / (n + 1)

    def score(self, features: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Mahalanobis distance of each row, shape ``(n,)``, ``float64``; ``inf`` if not finite.

        Raises
        ------
        ValueError
            If the features do not have the calibration's ``d`` columns.
        """
        x = _matrix(features)
        if x.shape[1] != self.n_features_in_:
            raise ValueError(f"expected {self.n_features_in_} features, got {x.shape[1]}")
        finite = np.isfinite(x).all(1)
        scores = np.full(len(x), np.inf)
        scores[finite] = self.gaussian_.score(x[finite])
        return scores

    def is_novel(self, features: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """Whether each row scores above :attr:`threshold_`, shape ``(n,)``, ``bool``."""
        return self.score(features) > self.threshold_

    def to_state(self) -> dict[str, npt.NDArray[np.float64] | float]:
        """Return configuration and learned state as arrays and floats (``np.savez``-ready)."""
        g = self.gaussian_
        return {
            "mean": g.mean,
            "scale": g.scale,
            "components": g.components,
            "precision": g.precision,
            "noise_var": g.noise_var,
            "threshold": self.threshold_,
            "alpha": self.alpha,
            "folds": float(self.folds),
            "max_components": float(self.max_components or 0),
            "seed": float(self.seed),
            "n_samples": float(self.n_samples_),
        }

    @classmethod
    def from_state(cls, state: Any) -> NoveltyDetector:
        """Rebuild from :meth:`to_state` output (or the ``np.load`` of its ``np.savez``)."""
        detector = cls(
            alpha=float(state["alpha"]),
            folds=int(state["folds"]),
            max_components=int(state["max_components"]) or None,
            seed=int(state["seed"]),
        )
        arrays = {k: np.asarray(state[k], dtype=np.float64) for k in ("mean", "scale")}
        detector.gaussian_ = _Gaussian(
            mean=arrays["mean"],
            scale=arrays["scale"],
            components=np.asarray(state["components"], dtype=np.float64),
            precision=np.asarray(state["precision"], dtype=np.float64),
            noise_var=float(state["noise_var"]),
        )
        detector.threshold_ = float(state["threshold"])
        detector.n_samples_ = int(state["n_samples"])
        detector.n_features_in_ = len(arrays["mean"])
        return detector


# -- a backend-agnostic image descriptor -----------------------------------------------------
_DESCRIPTOR_SIDE = 128
_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
_GRADIENT_QUANTILES = (0.5, 0.9, 0.99)
_DARK_LEVEL = 0.1
_GREY_BINS = 32
DESCRIPTOR_SIZE = 3 * len(_QUANTILES) + 5 + len(_GRADIENT_QUANTILES)


def _downsample(pixels: npt.NDArray[Any], side: int) -> npt.NDArray[Any]:
    """Block-average ``(H, W, C)`` pixels to a long side of at most ``side``.

    The factor is an integer; the dtype is kept, so the networks' normalisation applies
    unchanged.
    """
    f = max(1, -(-max(pixels.shape[:2]) // side))
    h, w = (pixels.shape[0] // f) * f, (pixels.shape[1] // f) * f
    if f == 1 or h == 0 or w == 0:
        return pixels[::f, ::f]
    blocks = pixels[:h, :w].astype(np.float32).reshape(h // f, f, w // f, f, -1)
    return np.rint(blocks.mean(axis=(1, 3))).astype(pixels.dtype)


def image_descriptor(
    pixels: npt.NDArray[np.uint8] | npt.NDArray[np.uint16],
) -> npt.NDArray[np.float64]:
    """Intensity, colour and texture statistics that tell imaging modalities apart.

    The image is block-averaged to a long side of at most 128 pixels, then normalised as
    every network sees it (:func:`~phenocascade.models.preprocess.to_unit_rgb`).

    Parameters
    ----------
    pixels : numpy.ndarray
        Shape ``(H, W, C)``, ``C`` in {1, 3}, dtype ``uint8`` or ``uint16``.

    Returns
    -------
    numpy.ndarray
        Shape ``(DESCRIPTOR_SIZE,)`` = ``(23,)``, ``float64``: the 5, 25, 50, 75 and 95 %
        quantiles of each RGB channel (15); mean and 95 % quantile of the per-pixel
        channel spread (saturation); colourfulness (Hasler and Suesstrunk 2003); entropy
        of the 32-bin grey histogram over ``log 32``; the fraction of grey pixels below
        0.1 (dark background); the 50, 90 and 99 % quantiles of the grey gradient norm.
    """
    planes = pixels[:, :, None] if pixels.ndim == 2 else pixels
    unit = to_unit_rgb(_downsample(planes, _DESCRIPTOR_SIDE)).astype(np.float64)
    grey = unit.mean(axis=2)
    channels = np.quantile(unit.reshape(-1, 3), _QUANTILES, axis=0).T.ravel()
    spread = unit.max(axis=2) - unit.min(axis=2)
    rg = unit[..., 0] - unit[..., 1]
    yb = 0.5 * (unit[..., 0] + unit[..., 1]) - unit[..., 2]
    colourfulness = math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean())
    hist = np.histogram(grey, bins=_GREY_BINS, range=(0.0, 1.0))[0] / grey.size
    hist = hist[hist > 0]
    entropy = float(-(hist * np.log(hist)).sum()) / math.log(_GREY_BINS)
    # np.gradient needs two pixels per axis; a one-pixel line has no texture to measure.
    gradient = np.hypot(*np.gradient(grey)) if min(grey.shape) >= 2 else np.zeros(1)
    stats = [
        spread.mean(),
        np.quantile(spread, 0.95),
        colourfulness,
        entropy,
        (grey < _DARK_LEVEL).mean(),
    ]
    return np.concatenate([channels, stats, np.quantile(gradient, _GRADIENT_QUANTILES)])


# -- a stage's novelty: features, fit, storage, and the guard that applies it ----------------
def stage_features(
    stage: Stage, images: Sequence[DecodedImage], kind: FeatureKind
) -> npt.NDArray[np.float64]:
    """Novelty features of a batch, shape ``(len(images), d)``, ``float64``.

    ``kind="descriptor"``: :func:`image_descriptor` of each image (``d = 23``);
    ``"backbone"``: the stage's :meth:`~phenocascade.models.base.Embedder.embed`.

    Raises
    ------
    ArtifactError
        If ``kind`` is ``"backbone"`` and the stage has no ``embed``.
    """
    if kind == "descriptor":
        rows = [image_descriptor(img.pixels) for img in images]
        return np.stack(rows) if rows else np.zeros((0, DESCRIPTOR_SIZE))
    if not isinstance(stage, Embedder):
        raise ArtifactError(
            f"novelty features {kind!r} need a stage with embed(); {stage.model_name} has none"
        )
    return np.asarray(stage.embed(images), dtype=np.float64)


@dataclass(frozen=True)
class StageNovelty:
    """Fitted :class:`NoveltyDetector` s, one per kind of feature the stage is read on.

    An image is novel when any of them flags it. Each is fitted at ``alpha / k`` for ``k``
    kinds, so the false-alarm rate of the union stays at most ``alpha`` (Bonferroni).

    Stored beside the weights as ``novelty.npz`` (``np.savez``: arrays only, read back with
    ``allow_pickle=False``): ``features`` lists the kinds, and each detector's arrays are
    prefixed ``<kind>.``. A file from before (one detector, ``features`` a single name,
    unprefixed arrays) still loads.
    """

    parts: tuple[tuple[FeatureKind, NoveltyDetector], ...]

    @property
    def features(self) -> str:
        """The kinds of features read, joined by ``+`` (e.g. ``"descriptor+backbone"``)."""
        return "+".join(kind for kind, _ in self.parts)

    @classmethod
    def fit(
        cls,
        stage: Stage,
        chunks: Iterable[Sequence[DecodedImage]],
        *,
        alpha: float = DEFAULT_ALPHA,
        features: Sequence[FeatureKind] | None = None,
    ) -> StageNovelty:
        """Fit one detector per kind of features on the calibration images.

        Parameters
        ----------
        stage : Stage
            The stage whose features are read (``"backbone"`` needs its ``embed``).
        chunks : iterable of sequences of DecodedImage
            The calibration images, in chunks (so that a large set need not be held in
            memory at once; ``[images]`` for one list).
        alpha : float, default DEFAULT_ALPHA
            False-alarm rate of the union, shared evenly between the kinds.
        features : sequence of {"descriptor", "backbone"} or None, default None
            ``None``: both for a stage with ``embed`` (:class:`Embedder`), else the
            descriptor.
        """
        both: tuple[FeatureKind, ...] = ("descriptor", "backbone")
        kinds = tuple(features or (both if isinstance(stage, Embedder) else ("descriptor",)))
        rows: dict[FeatureKind, list[npt.NDArray[np.float64]]] = {k: [] for k in kinds}
        n = 0
        for chunk in chunks:
            n += len(chunk)
            for kind in kinds:
                rows[kind].append(stage_features(stage, chunk, kind))
        each = alpha / len(kinds)
        parts = []
        for kind in kinds:
            x = np.concatenate(rows[kind]) if rows[kind] else np.zeros((0, 1))
            detector = NoveltyDetector(alpha=each).fit(x)
            if detector.false_alarm_bound > each:
                log.warning(
                    "%s: %d calibration images are too few for a novelty false-alarm rate "
                    "of %.3g on its %s features (%d are needed); its threshold is their "
                    "largest score instead, a false-alarm rate of at most about %.3g",
                    stage.model_name,
                    n,
                    each,
                    kind,
                    min_calibration_size(each),
                    detector.false_alarm_bound,
                )
            parts.append((kind, detector))
        return cls(tuple(parts))

    def flags(self, stage: Stage, images: Sequence[DecodedImage]) -> npt.NDArray[np.bool_]:
        """Which images are novel (flagged by any detector), shape ``(len(images),)``."""
        novel = np.zeros(len(images), dtype=bool)
        if not images:
            return novel
        for kind, detector in self.parts:
            novel |= detector.is_novel(stage_features(stage, images, kind))
        return novel

    def summary(self) -> dict[str, Any]:
        """Return ``{"alpha", "features", "threshold", "n"}`` for the metadata.

        ``alpha`` is the union's false-alarm rate asked for; ``threshold`` the score
        threshold per kind (``None`` when infinite, in states saved before the fallback of
        :attr:`NoveltyDetector.threshold_`); ``n`` the calibration images.
        """
        return {
            "alpha": round(sum(d.alpha for _, d in self.parts), 12),
            "features": self.features,
            "threshold": {
                kind: None if math.isinf(d.threshold_) else d.threshold_ for kind, d in self.parts
            },
            "n": self.parts[0][1].n_samples_,
        }

    def save(self, folder: Path) -> dict[str, Any]:
        """Write ``folder/novelty.npz``; return :meth:`summary`."""
        folder.mkdir(parents=True, exist_ok=True)
        state: dict[str, Any] = {"features": np.array([kind for kind, _ in self.parts])}
        for kind, detector in self.parts:
            state.update({f"{kind}.{k}": v for k, v in detector.to_state().items()})
        np.savez(folder / NOVELTY_FILE, **state)
        return self.summary()

    @classmethod
    def load(cls, folder: Path) -> StageNovelty | None:
        """Read ``folder/novelty.npz``; ``None`` if the artifact has none.

        Raises
        ------
        ArtifactError
            If the file is there but unreadable, or names unknown features.
        """
        path = folder / NOVELTY_FILE
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as state:
                named = state["features"]
                kinds = [str(named)] if named.ndim == 0 else [str(k) for k in named]
                unknown = [k for k in kinds if k not in get_args(FeatureKind)]
                if unknown:
                    raise ArtifactError(f"{path} names unknown novelty features {unknown[0]!r}")
                if named.ndim == 0:
                    parts = [(kinds[0], NoveltyDetector.from_state(state))]
                else:
                    parts = [
                        (k, NoveltyDetector.from_state(_prefixed(state, f"{k}."))) for k in kinds
                    ]
        except (OSError, KeyError, ValueError) as exc:
            raise ArtifactError(f"{path} is not a readable novelty state: {exc}") from exc
        return cls(tuple((cast(FeatureKind, k), d) for k, d in parts))


def _prefixed(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Return the arrays of ``state`` whose names start with ``prefix``, without it."""
    return {k[len(prefix) :]: state[k] for k in state if k.startswith(prefix)}


@runtime_checkable
class NoveltyHolder(Protocol):
    """A stage that keeps a fitted :class:`StageNovelty` and saves it with its artifact."""

    def set_novelty(self, novelty: StageNovelty) -> None:
        """Store the fitted novelty state."""
        ...


class NoveltyGuard:
    """A :class:`~phenocascade.models.base.Stage` that marks images unlike the calibration data.

    Composed around any stage: its outputs are the stage's, with ``novel=True`` where the
    stage's :class:`StageNovelty` flags the image. Without novelty state (an artifact made
    before shift detection) nothing is flagged. Every other attribute, the Stage ones
    (``kind``, ``classes``, ``version``, ``thresholds``, ...) and the backend's own
    (``calibrated_score``, ``embed``, ``save``, ...), is read from the wrapped stage.

    Parameters
    ----------
    stage : Stage
        The stage to guard.
    novelty : StageNovelty or None
        Its fitted novelty state.
    """

    # Declared for the Stage protocol; __getattr__ reads them from the wrapped stage.
    kind: StageKind
    classes: Sequence[str]
    model_name: str
    version: str
    thresholds: Mapping[str, LabelThresholds]
    gate_label: str

    def __init__(self, stage: Stage, novelty: StageNovelty | None) -> None:
        self.stage = stage
        self.novelty = novelty

    @classmethod
    def around(cls, stage: Stage, folder: Path) -> NoveltyGuard:
        """Guard ``stage`` with the novelty state saved in its artifact ``folder``."""
        novelty = StageNovelty.load(folder)
        if novelty is None:
            log.warning(
                "%s has no %s (trained before shift detection): none of its images will be "
                "flagged novel; retrain the tier to add it",
                folder,
                NOVELTY_FILE,
            )
        elif any(math.isinf(d.threshold_) for _, d in novelty.parts):
            log.warning(
                "%s/%s flags no image as novel (fitted on too few images before the "
                "largest calibration score became the fallback threshold); retrain the tier",
                folder,
                NOVELTY_FILE,
            )
        return cls(stage, novelty)

    def predict(
        self, images: Sequence[DecodedImage], *, calibrated: bool = True
    ) -> list[StageOutput]:
        """Return the stage's outputs, ``novel`` set where the image is flagged.

        ``calibrated=False`` (raw scores, for calibration) returns the stage's outputs
        unflagged.
        """
        if not calibrated:
            raw: list[StageOutput] = cast(Any, self.stage).predict(images, calibrated=False)
            return raw
        outputs = list(self.stage.predict(images))
        if self.novelty is None:
            return outputs
        flags = self.novelty.flags(self.stage, images)
        return [replace(o, novel=True) if f else o for o, f in zip(outputs, flags, strict=True)]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("stage", "novelty"):
            raise AttributeError(name)
        return getattr(self.stage, name)
