"""Calibrate a trained stage on validation data and certify its routing thresholds.

Classifiers and gates: a temperature per label on the raw logits, then Learn-then-Test
thresholds on the calibrated scores. Detectors: each raw box is matched to the ground
truth at IoU >= 0.5 (greedily by score, per class); a temperature per class is fitted on
the logits of the box scores against "matched", then the keep (``negative``) and
confident (``positive``) thresholds are certified on those boxes, and the keep threshold
is capped so that it drops at most ``1 - target_precision`` of the true boxes
(:func:`keep_threshold_cap`). True boxes the detector never proposed count as dropped
ones (score 0). When they alone exceed that share, the class's ``finds_all`` is false
(the cap then bounds the misses among proposed boxes only), and
:func:`~phenocascade.domain.route` sends images without a confident box of the class to
a person instead of declaring them free of it.

Thresholds are certified per label, or (``threshold_mode="pooled"``, the default for
multi-label classifiers) as one pair shared by all labels on their pooled decisions. A
classifier only PASSes an image when every label is decided; with a few dozen validation
positives per label no label alone reaches the count a certificate needs (45 error-free
decisions at 95 % precision, delta 0.1), while the pooled decisions do.

The temperatures and the thresholds are fitted on the same validation data: a
temperature is a monotone map per label, so it leaves that label's ranking unchanged,
but in pooled mode it does shift labels against each other.

Certificates hold only for images like the validation data, so the same images also fit
the stage's shift detector (:mod:`phenocascade.models.novelty`): an image beyond it is
routed to a person whatever its scores.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from phenocascade.domain import Box, DecodedImage, Sample, StageKind, StageOutput
from phenocascade.models.calibration import (
    SCORE_CLIP,
    calibrate_probability,
    expected_calibration_error,
    fit_temperature,
    logit,
)
from phenocascade.models.novelty import DEFAULT_ALPHA, NoveltyHolder, StageNovelty
from phenocascade.models.thresholds import (
    select_pooled_thresholds,
    select_thresholds,
    threshold_record,
)

log = logging.getLogger(__name__)

ThresholdMode = Literal["per_label", "pooled"]


def box_iou(a: npt.ArrayLike, b: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """IoU matrix between ``(n, 4)`` and ``(m, 4)`` boxes ``[x_min, y_min, x_max, y_max]``."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def match_boxes(
    predicted: Sequence[Box], truth: Sequence[Box], *, iou: float = 0.5
) -> npt.NDArray[np.bool_]:
    """Mark each predicted box that matches a not-yet-matched truth box of its class.

    Predictions are visited by decreasing score (the COCO/VOC rule), so a truth box counts
    once. Returns a boolean array aligned with ``predicted``.
    """
    matched = np.zeros(len(predicted), dtype=bool)
    used: set[int] = set()
    for i in sorted(range(len(predicted)), key=lambda k: -predicted[k].score):
        p = predicted[i]
        candidates = [j for j, t in enumerate(truth) if t.label == p.label and j not in used]
        if not candidates:
            continue
        ious = box_iou([p.as_list()], [truth[j].as_list() for j in candidates])[0]
        best = int(np.argmax(ious))
        if ious[best] >= iou:
            matched[i] = True
            used.add(candidates[best])
    return matched


@dataclass(frozen=True)
class Calibration:
    """Fitted temperatures and certified thresholds of one stage.

    Attributes
    ----------
    temperature : dict
        ``{label: T}``.
    thresholds : dict
        ``{label: ThresholdRecord.as_dict()}``.
    metrics : dict
        Validation summary, stored as the artifact's ``metrics["calibration"]``:
        ``threshold_mode`` (``"per_label"`` or ``"pooled"``), ``starts``,
        ``target_precision``, ``delta``, ``pooled`` (the shared pair's
        ``ThresholdRecord.as_dict()`` with the pooled ``n`` and achieved precisions, or
        ``None`` per label) and ``labels``: per label ``n``, ``positives``,
        ``ece_before``, ``ece_after``.
    novelty : dict or None
        :meth:`StageNovelty.summary <phenocascade.models.novelty.StageNovelty.summary>` of
        the fitted shift detector, ``None`` when none was fitted.
    """

    temperature: dict[str, float]
    thresholds: dict[str, dict[str, float]]
    metrics: dict[str, Any]
    novelty: dict[str, Any] | None = None


def _label_pairs(
    kind: StageKind,
    classes: Sequence[str],
    outputs: Sequence[StageOutput],
    samples: Sequence[Sample],
) -> dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.int64], int]]:
    """Per label, raw scores, 0/1 truths and unfound truths.

    Classifiers: one score per image, no unfound truths. Detectors: one score per box,
    and the number of true boxes that no box of the label matched (never proposed).
    """
    pairs: dict[str, tuple[list[float], list[int]]] = {c: ([], []) for c in classes}
    unfound = dict.fromkeys(classes, 0)
    for out, sample in zip(outputs, samples, strict=True):
        if kind is StageKind.DETECTOR:
            hits = match_boxes(list(out.boxes), list(sample.boxes))
            for box, hit in zip(out.boxes, hits, strict=True):
                pairs[box.label][0].append(box.score)
                pairs[box.label][1].append(int(hit))
                unfound[box.label] -= int(hit)
            for truth in sample.boxes:
                if truth.label in unfound:
                    unfound[truth.label] += 1
        else:
            for c in classes:
                pairs[c][0].append(out.scores[c])
                pairs[c][1].append(int(c in sample.labels))
    return {
        c: (np.asarray(s, dtype=np.float64), np.asarray(y, dtype=np.int64), unfound[c])
        for c, (s, y) in pairs.items()
    }


def keep_threshold_cap(true_scores: npt.ArrayLike, miss_rate: float) -> float:
    """Highest keep threshold that drops at most ``miss_rate`` of true boxes (conformal).

    A detector drops boxes scoring ``<= negative`` without asking anyone, so a dropped
    true box is a silent miss. The certified SKIP rule only bounds the share of true boxes
    *among the dropped ones*: for a weak detector, whose boxes are nearly all false, it
    certifies dropping every box. This cap bounds the share of true boxes that are
    dropped instead. With the ``m`` calibrated scores of validation boxes that match a
    truth, sorted ``s_1 <= ... <= s_m``, and ``k = floor((m + 1) * miss_rate)``, a new
    true box (exchangeable with them) scores below ``s_k`` with probability at most
    ``k / (m + 1) <= miss_rate`` (the split-conformal quantile), so the cap sits just
    below ``s_k``. With ``k = 0`` (too few matched boxes) the cap is ``0.0``: every box
    above the backend's score floor is kept, and the image goes to a person.

    Parameters
    ----------
    true_scores : array_like
        Shape ``(m,)``, calibrated scores of the validation boxes matched to a truth.
    miss_rate : float
        Largest allowed share of true boxes dropped, in ``(0, 1)``.

    Returns
    -------
    float
        The cap on the ``negative`` (keep) threshold, in ``[0, 1)``.
    """
    scores = np.sort(np.asarray(true_scores, dtype=np.float64).ravel())
    k = math.floor((len(scores) + 1) * miss_rate)
    if k == 0:
        return 0.0
    return float(np.nextafter(scores[k - 1], 0.0))


def default_threshold_mode(kind: StageKind, classes: Sequence[str]) -> ThresholdMode:
    """``"pooled"`` for classifiers with several labels, else ``"per_label"``.

    A classifier routes an image on all its labels at once, so its labels share one
    decision budget; a gate has a single label, and a detector's classes are routed box
    by box with class-specific keep thresholds.
    """
    return "pooled" if kind is StageKind.CLASSIFIER and len(classes) > 1 else "per_label"


def calibrate_stage(
    stage: Any,
    images: Sequence[DecodedImage],
    samples: Sequence[Sample],
    *,
    target_precision: float = 0.99,
    delta: float = 0.1,
    threshold_mode: ThresholdMode | None = None,
    starts: int = 1,
    novelty_alpha: float | None = DEFAULT_ALPHA,
) -> Calibration:
    """Fit temperatures, certify thresholds and fit the shift detector on validation data.

    Parameters
    ----------
    stage : backend
        A fitted backend with ``kind``, ``classes``, ``predict(images, calibrated=False)`` and
        ``set_calibration``; the result is stored into it.
    images : sequence of DecodedImage
        Validation pixels, aligned with ``samples``.
    samples : sequence of Sample
        Validation truths (labels, or boxes for detectors).
    target_precision : float, default 0.99
        Precision each automatic decision must reach.
    delta : float, default 0.1
        Allowed probability that a guarantee fails.
    threshold_mode : {"per_label", "pooled"} or None, default None
        ``"pooled"`` certifies one pair shared by all labels on their pooled calibrated
        decisions; ``"per_label"`` certifies each label on its own. ``None`` picks
        :func:`default_threshold_mode`.
    starts : int, default 1
        Start points of the fixed-sequence test (see
        :mod:`phenocascade.models.thresholds`).
    novelty_alpha : float or None, default 0.02
        False-alarm rate of the shift detector, fitted when the stage has ``set_novelty``
        (:class:`~phenocascade.models.novelty.NoveltyHolder`); ``None`` fits none.

    Returns
    -------
    Calibration
        What was stored into ``stage``.
    """
    mode = threshold_mode or default_threshold_mode(stage.kind, stage.classes)
    if mode not in ("per_label", "pooled"):
        raise ValueError(f"threshold_mode must be 'per_label' or 'pooled', got {mode!r}")
    raw = stage.predict(images, calibrated=False)
    temperature: dict[str, float] = {}
    calibrated: dict[str, npt.NDArray[np.float64]] = {}
    truths: dict[str, npt.NDArray[np.int64]] = {}
    per_label: dict[str, Any] = {}
    unfound: dict[str, int] = {}
    for label, (scores, truth, missed) in _label_pairs(
        stage.kind, stage.classes, raw, samples
    ).items():
        unfound[label] = missed
        t = fit_temperature(logit(scores), truth)
        temperature[label] = t
        calibrated[label] = np.clip(calibrate_probability(scores, t), SCORE_CLIP, 1.0 - SCORE_CLIP)
        truths[label] = truth
        per_label[label] = {
            "n": len(scores),
            "positives": int(truth.sum()),
            # JSON has no NaN: an empty set (a detector with no box) has no ECE.
            "ece_before": expected_calibration_error(scores, truth) if len(scores) else None,
            "ece_after": (
                expected_calibration_error(calibrated[label], truth) if len(scores) else None
            ),
        }
        if stage.kind is StageKind.DETECTOR:
            per_label[label]["unfound"] = missed
    pooled_record: dict[str, float] | None = None
    if mode == "pooled":
        pooled = select_pooled_thresholds(
            calibrated, truths, target_precision=target_precision, delta=delta, starts=starts
        )
        thresholds = {label: record.as_dict() for label, record in pooled.per_label.items()}
        pooled_record = pooled.pooled.as_dict()
    else:
        thresholds = {
            label: select_thresholds(
                calibrated[label],
                truths[label],
                target_precision=target_precision,
                delta=delta,
                starts=starts,
            ).as_dict()
            for label in calibrated
        }
    if stage.kind is StageKind.DETECTOR:
        for label, record in thresholds.items():
            # A true box never proposed is missed whatever the threshold: it scores 0. If
            # those alone exceed the miss rate, "no kept box" cannot mean "none here"; the
            # keep threshold then bounds only the misses among the proposed boxes.
            proposed = calibrated[label][truths[label] == 1]
            miss_rate = 1.0 - target_precision
            cap = keep_threshold_cap(
                np.concatenate([proposed, np.zeros(unfound[label])]), miss_rate
            )
            finds_all = cap > 0.0
            if not finds_all:
                cap = keep_threshold_cap(proposed, miss_rate)
            negative = min(record["negative"], cap)
            thresholds[label] = threshold_record(
                calibrated[label],
                truths[label],
                record["positive"],
                negative,
                target_precision=target_precision,
                delta=delta,
            ).as_dict() | {"finds_all": finds_all}
    stage.set_calibration(temperature, thresholds)
    novelty = _fit_novelty(stage, images, novelty_alpha)
    metrics = {
        "threshold_mode": mode,
        "starts": starts,
        "target_precision": target_precision,
        "delta": delta,
        "pooled": pooled_record,
        "labels": per_label,
    }
    return Calibration(
        temperature=temperature, thresholds=thresholds, metrics=metrics, novelty=novelty
    )


def _fit_novelty(
    stage: Any, images: Sequence[DecodedImage], alpha: float | None
) -> dict[str, Any] | None:
    """Fit the stage's shift detector on ``images`` and store it; return its summary.

    Skipped (``None``) for ``alpha=None``, for stand-ins that cannot hold one, and for
    fewer than 3 images, too few to fit.
    """
    holder = stage if isinstance(stage, NoveltyHolder) else None
    if alpha is None or holder is None:
        return None
    if len(images) < 3:
        log.warning("%d validation images: too few to fit a shift detector", len(images))
        return None
    novelty = StageNovelty.fit(stage, images, alpha=alpha)
    holder.set_novelty(novelty)
    return novelty.summary()
