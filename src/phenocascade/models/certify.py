"""Calibrate a trained stage on validation data and certify its routing thresholds.

Classifiers and gates: a temperature per label on the raw logits, then Learn-then-Test
thresholds on the calibrated scores. Detectors: each raw box is matched to the ground
truth at IoU >= 0.5 (greedily by score, per class); a temperature per class is fitted on
the logits of the box scores against "matched", then the keep (``negative``) and
confident (``positive``) thresholds are certified on those boxes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from phenocascade.domain import Box, DecodedImage, Sample, StageKind, StageOutput
from phenocascade.models.calibration import (
    calibrate_probability,
    expected_calibration_error,
    fit_temperature,
    logit,
)
from phenocascade.models.thresholds import select_thresholds


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
        Validation summary: per label ``ece_before``, ``ece_after``, ``n``.
    """

    temperature: dict[str, float]
    thresholds: dict[str, dict[str, float]]
    metrics: dict[str, Any]


def _label_pairs(
    kind: StageKind,
    classes: Sequence[str],
    outputs: Sequence[StageOutput],
    samples: Sequence[Sample],
) -> dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]]:
    """Per label, raw scores and 0/1 truths: images for classifiers, boxes for detectors."""
    pairs: dict[str, tuple[list[float], list[int]]] = {c: ([], []) for c in classes}
    for out, sample in zip(outputs, samples, strict=True):
        if kind is StageKind.DETECTOR:
            hits = match_boxes(list(out.boxes), list(sample.boxes))
            for box, hit in zip(out.boxes, hits, strict=True):
                pairs[box.label][0].append(box.score)
                pairs[box.label][1].append(int(hit))
        else:
            for c in classes:
                pairs[c][0].append(out.scores[c])
                pairs[c][1].append(int(c in sample.labels))
    return {
        c: (np.asarray(s, dtype=np.float64), np.asarray(y, dtype=np.int64))
        for c, (s, y) in pairs.items()
    }


def calibrate_stage(
    stage: Any,
    images: Sequence[DecodedImage],
    samples: Sequence[Sample],
    *,
    target_precision: float = 0.99,
    delta: float = 0.1,
) -> Calibration:
    """Fit temperatures and certify thresholds of a trained backend on validation data.

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

    Returns
    -------
    Calibration
        What was stored into ``stage``.
    """
    raw = stage.predict(images, calibrated=False)
    temperature: dict[str, float] = {}
    thresholds: dict[str, dict[str, float]] = {}
    metrics: dict[str, Any] = {}
    for label, (scores, truth) in _label_pairs(stage.kind, stage.classes, raw, samples).items():
        t = fit_temperature(logit(scores), truth)
        calibrated = calibrate_probability(scores, t)
        temperature[label] = t
        thresholds[label] = select_thresholds(
            calibrated, truth, target_precision=target_precision, delta=delta
        ).as_dict()
        metrics[label] = {
            "n": len(scores),
            "positives": int(truth.sum()),
            # JSON has no NaN: an empty set (a detector with no box) has no ECE.
            "ece_before": expected_calibration_error(scores, truth) if len(scores) else None,
            "ece_after": expected_calibration_error(calibrated, truth) if len(scores) else None,
        }
    stage.set_calibration(temperature, thresholds)
    return Calibration(temperature=temperature, thresholds=thresholds, metrics=metrics)
