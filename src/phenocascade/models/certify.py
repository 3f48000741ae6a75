"""Calibrate a trained stage and certify its routing thresholds.

Per label (per class for detectors) a calibrator maps raw scores to probabilities: a
temperature, Platt's slope and offset, or an isotonic fit, whichever has the lowest
out-of-fold log-loss (:func:`~phenocascade.models.calibration.select_calibrator`). PASS
and SKIP thresholds are then certified by Learn-then-Test
(:mod:`phenocascade.models.thresholds`) on *out-of-fold* calibrated scores: every score
that enters the certificate was calibrated by a map fitted without its image's fold, so
the deployed thresholds are never fitted on the images that certify them. The deployed
calibrator is the chosen method fitted on every sample.

The samples come from one of two places:

* :func:`calibrate_stage`: the validation split scored by the trained stage, cut into
  :data:`CALIBRATION_FOLDS` grouped folds for the calibrators;
* :func:`certify_outputs` given out-of-fold model outputs (cross-fitting): every image of
  train and val scored by a model trained without its fold, the same folds cross-fitting
  the calibrators (``phenocascade.recipes.core.fit_and_save`` with ``cross_fit=K``).

Detectors: each raw box is matched to the ground truth at IoU >= 0.5 (greedily by score,
per class) and calibrated against "matched"; the keep (``negative``) and confident
(``positive``) thresholds are certified on those boxes, and the keep threshold is capped
so that it drops at most ``1 - target_precision`` of the true boxes
(:func:`keep_threshold_cap`). True boxes the detector never proposed count as dropped
ones (score 0). When they alone exceed that share, the class's ``finds_all`` is false
(the cap then bounds the misses among proposed boxes only), and
:func:`~phenocascade.domain.route` sends images without a confident box of the class to
a person instead of declaring them free of it.

Gates: a SKIP discards the image without anyone seeing it. The certified SKIP rule bounds
the share of usable images *among the discarded ones*, which depends on how many unusable
images the calibration data holds: certified on a mix that is two thirds unusable, it
discards clear images freely in a stream of clear ones. So a gate's SKIP threshold is also
capped by the split-conformal quantile of the usable images' scores
(:func:`keep_threshold_cap`), so that at most ``discard_rate`` (:data:`GATE_DISCARD_RATE`,
1 %) of usable images are discarded whatever the share of unusable ones in the stream.

Thresholds are certified per label, or (``threshold_mode="pooled"``, the default for
multi-label classifiers) as one pair shared by all labels on their pooled decisions. A
classifier only PASSes an image when every label is decided; with a few dozen validation
positives per label no label alone reaches the count a certificate needs (45 error-free
decisions at 95 % precision, delta 0.1), while the pooled decisions do.

Certificates hold only for images like the calibration data, so the validation images
also fit the stage's shift detector (:mod:`phenocascade.models.novelty`): an image beyond
it is routed to a person whatever its scores.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from phenocascade.domain import Box, DecodedImage, Sample, StageKind, StageOutput, box_iou
from phenocascade.models.calibration import (
    SCORE_CLIP,
    Calibrator,
    expected_calibration_error,
    logit,
    select_calibrator,
)
from phenocascade.models.novelty import DEFAULT_ALPHA, NoveltyHolder, StageNovelty
from phenocascade.models.thresholds import (
    PValue,
    select_pooled_thresholds,
    select_thresholds,
    threshold_record,
)

log = logging.getLogger(__name__)

ThresholdMode = Literal["per_label", "pooled"]
# Grouped folds of the validation images over which calibrators are cross-fitted.
CALIBRATION_FOLDS = 5
# Largest share of usable images a gate may discard without a person (see the docstring).
GATE_DISCARD_RATE = 0.01


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
    """Fitted calibrators and certified thresholds of one stage.

    Attributes
    ----------
    calibrators : dict
        ``{label: Calibrator}``, each fitted on every sample.
    thresholds : dict
        ``{label: ThresholdRecord.as_dict()}``, certified on the out-of-fold scores.
    metrics : dict
        Summary stored as the artifact's ``metrics["calibration"]``: ``threshold_mode``
        (``"per_label"`` or ``"pooled"``), ``starts``, ``target_precision``, ``delta``,
        ``pooled`` (the shared pair's ``ThresholdRecord.as_dict()`` with the pooled ``n``
        and achieved precisions, or ``None`` per label) and ``labels``: per label ``n``,
        ``positives``, ``calibrator`` (the method chosen), ``cv_log_loss`` (out-of-fold
        log-loss of each method tried), ``ece_before`` (raw scores), ``ece_after`` (the
        chosen calibrator on the samples it was fitted on) and ``ece_after_cv`` (its
        out-of-fold scores, the ones certified); detectors add ``unfound``.
    certification : dict
        Stored as the artifact's ``metrics["certification"]``: ``method``
        (``"ltt-binomial"`` or ``"ltt-hoeffding-bentkus"``), ``n`` (samples the
        certificate spent), ``cross_fit`` (model folds, 0 for the validation split
        alone) and ``calibration_folds``.
    novelty : dict or None
        :meth:`StageNovelty.summary <phenocascade.models.novelty.StageNovelty.summary>` of
        the fitted shift detector, ``None`` when none was fitted.
    """

    calibrators: dict[str, Calibrator]
    thresholds: dict[str, dict[str, float]]
    metrics: dict[str, Any]
    certification: dict[str, Any]
    novelty: dict[str, Any] | None = None


def group_folds(samples: Sequence[Sample], folds: int, *, seed: int = 0) -> npt.NDArray[np.int64]:
    """Deal the samples into ``folds`` folds, the samples of one group together.

    A sample's group is ``Sample.group``, else its ``image_id``. Groups are shuffled with
    ``seed`` and dealt in turn, so fold sizes (in groups) differ by at most one.

    Returns
    -------
    numpy.ndarray
        Shape ``(len(samples),)``, ``int64``: each sample's fold in ``range(folds)``.
    """
    if folds < 1:
        raise ValueError(f"folds must be at least 1, got {folds}")
    keys = [s.group or s.image_id for s in samples]
    groups = sorted(set(keys))
    order = np.random.default_rng(seed).permutation(len(groups))
    fold_of = {groups[g]: turn % folds for turn, g in enumerate(order)}
    return np.array([fold_of[k] for k in keys], dtype=np.int64)


@dataclass(frozen=True)
class _LabelData:
    """One label's raw scores, 0/1 truths, the image each came from, and unfound truths."""

    scores: npt.NDArray[np.float64]
    truths: npt.NDArray[np.int64]
    image: npt.NDArray[np.int64]
    unfound: int


def _label_pairs(
    kind: StageKind,
    classes: Sequence[str],
    outputs: Sequence[StageOutput],
    samples: Sequence[Sample],
) -> dict[str, _LabelData]:
    """Per label, raw scores, truths, image indices and unfound truths.

    Classifiers: one score per image, no unfound truths. Detectors: one score per box,
    and the number of true boxes that no box of the label matched (never proposed).
    """
    scores: dict[str, list[float]] = {c: [] for c in classes}
    truths: dict[str, list[int]] = {c: [] for c in classes}
    image: dict[str, list[int]] = {c: [] for c in classes}
    unfound = dict.fromkeys(classes, 0)
    for index, (out, sample) in enumerate(zip(outputs, samples, strict=True)):
        if kind is StageKind.DETECTOR:
            hits = match_boxes(list(out.boxes), list(sample.boxes))
            entries = [
                (box.label, box.score, int(hit)) for box, hit in zip(out.boxes, hits, strict=True)
            ]
            for truth in sample.boxes:
                if truth.label in unfound:
                    unfound[truth.label] += 1
        else:
            entries = [(c, out.scores[c], int(c in sample.labels)) for c in classes]
        for label, score, truth_value in entries:
            scores[label].append(score)
            truths[label].append(truth_value)
            image[label].append(index)
            if kind is StageKind.DETECTOR:
                unfound[label] -= truth_value
    return {
        c: _LabelData(
            np.asarray(scores[c], dtype=np.float64),
            np.asarray(truths[c], dtype=np.int64),
            np.asarray(image[c], dtype=np.int64),
            unfound[c],
        )
        for c in classes
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
    above the backend's score floor is kept, and the image goes to a person. A gate's SKIP
    threshold is capped the same way on its usable images' scores (:func:`_cap_discards`).

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
    p_value: PValue = "binomial",
    novelty_alpha: float | None = DEFAULT_ALPHA,
    seed: int = 0,
    discard_rate: float = GATE_DISCARD_RATE,
) -> Calibration:
    """Fit calibrators, certify thresholds and fit the shift detector on validation data.

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
    p_value : {"binomial", "hoeffding-bentkus"}, default "binomial"
        The test of each threshold candidate.
    novelty_alpha : float or None, default 0.05
        False-alarm rate of the shift detector, fitted when the stage has ``set_novelty``
        (:class:`~phenocascade.models.novelty.NoveltyHolder`); ``None`` fits none.
    seed : int, default 0
        Seeds the calibrators' folds (:func:`group_folds`).
    discard_rate : float, default 0.01
        A gate's SKIP threshold discards at most this share of usable images
        (:data:`GATE_DISCARD_RATE`); unused by other stages.

    Returns
    -------
    Calibration
        What was stored into ``stage``.
    """
    raw = stage.predict(images, calibrated=False)
    calibration = certify_outputs(
        stage,
        raw,
        samples,
        group_folds(samples, CALIBRATION_FOLDS, seed=seed),
        target_precision=target_precision,
        delta=delta,
        threshold_mode=threshold_mode,
        starts=starts,
        p_value=p_value,
        discard_rate=discard_rate,
    )
    novelty = fit_novelty(stage, [images], novelty_alpha, n=len(images))
    return replace(calibration, novelty=novelty)


def certify_outputs(
    stage: Any,
    raw: Sequence[StageOutput],
    samples: Sequence[Sample],
    folds: npt.ArrayLike,
    *,
    target_precision: float = 0.99,
    delta: float = 0.1,
    threshold_mode: ThresholdMode | None = None,
    starts: int = 1,
    p_value: PValue = "binomial",
    cross_fit: int = 0,
    discard_rate: float = GATE_DISCARD_RATE,
) -> Calibration:
    """Fit calibrators and certify thresholds on given raw outputs; store them in ``stage``.

    Parameters
    ----------
    stage : backend
        Gives ``kind`` and ``classes`` and receives ``set_calibration``.
    raw : sequence of StageOutput
        Uncalibrated outputs (``predict(..., calibrated=False)``), aligned with
        ``samples``: the stage's own on validation data, or out-of-fold ones from models
        trained without each sample's fold.
    samples : sequence of Sample
        Their truths.
    folds : array_like
        Shape ``(len(samples),)``: each sample's fold, over which the calibrators are
        cross-fitted (a sample's certified score comes from a calibrator fitted without
        its fold).
    target_precision, delta, threshold_mode, starts, p_value, discard_rate
        As in :func:`calibrate_stage`.
    cross_fit : int, default 0
        Number of model folds behind out-of-fold ``raw`` (0: the stage's own outputs);
        recorded in ``certification``.

    Returns
    -------
    Calibration
        Without ``novelty``.
    """
    mode = threshold_mode or default_threshold_mode(stage.kind, stage.classes)
    if mode not in ("per_label", "pooled"):
        raise ValueError(f"threshold_mode must be 'per_label' or 'pooled', got {mode!r}")
    fold = np.asarray(folds, dtype=np.int64)
    pairs = _label_pairs(stage.kind, stage.classes, raw, samples)
    calibrators, calibrated, per_label = _calibrate_labels(pairs, fold)
    truths = {label: data.truths for label, data in pairs.items()}
    thresholds, pooled = _certify(
        mode,
        calibrated,
        truths,
        target_precision=target_precision,
        delta=delta,
        starts=starts,
        p_value=p_value,
    )
    if stage.kind is StageKind.GATE:
        thresholds = _cap_discards(
            thresholds, calibrated, truths, discard_rate, target_precision, delta
        )
    softmax_groups = [tuple(g) for g in getattr(stage, "softmax_groups", None) or ()]
    group_metrics: dict[str, Any] | None = None
    if stage.kind is StageKind.CLASSIFIER and softmax_groups:
        thresholds, group_metrics = _certify_groups(
            thresholds,
            calibrated,
            truths,
            softmax_groups,
            pooled=mode == "pooled",
            target_precision=target_precision,
            delta=delta,
            starts=starts,
            p_value=p_value,
        )
    if stage.kind is StageKind.DETECTOR:
        unfound = {label: data.unfound for label, data in pairs.items()}
        for label, missed in unfound.items():
            per_label[label]["unfound"] = missed
        thresholds = _cap_keep_thresholds(
            thresholds, calibrated, truths, unfound, target_precision, delta
        )
        thresholds = _certify_absence(
            thresholds,
            pairs,
            calibrated,
            samples,
            target_precision=target_precision,
            delta=delta,
            starts=starts,
            p_value=p_value,
        )
    stage.set_calibration(calibrators, thresholds)
    metrics = {
        "threshold_mode": mode,
        "starts": starts,
        "target_precision": target_precision,
        "delta": delta,
        "pooled": pooled,
        "labels": per_label,
        "groups": group_metrics,
        **({"discard_rate": discard_rate} if stage.kind is StageKind.GATE else {}),
    }
    certification = {
        "method": f"ltt-{p_value}",
        "n": len(samples),
        "cross_fit": cross_fit,
        "calibration_folds": len(np.unique(fold)),
    }
    return Calibration(calibrators, thresholds, metrics, certification)


def _calibrate_labels(
    pairs: Mapping[str, _LabelData], folds: npt.NDArray[np.int64]
) -> tuple[dict[str, Calibrator], dict[str, npt.NDArray[np.float64]], dict[str, Any]]:
    """Choose and fit each label's calibrator; return it, the out-of-fold scores, metrics.

    The out-of-fold scores are clipped to ``[1e-6, 1 - 1e-6]`` like stage outputs.
    """
    calibrators: dict[str, Calibrator] = {}
    calibrated: dict[str, npt.NDArray[np.float64]] = {}
    per_label: dict[str, Any] = {}
    for label, data in pairs.items():
        logits = logit(data.scores)
        choice = select_calibrator(logits, data.truths, folds[data.image])
        calibrators[label] = choice.calibrator
        calibrated[label] = np.clip(choice.out_of_fold, SCORE_CLIP, 1.0 - SCORE_CLIP)
        in_sample = choice.calibrator(logits)
        empty = len(data.scores) == 0
        per_label[label] = {
            "n": len(data.scores),
            "positives": int(data.truths.sum()),
            "calibrator": choice.calibrator.method,
            "cv_log_loss": choice.cv_log_loss,
            # JSON has no NaN: an empty set (a detector with no box) has no ECE.
            "ece_before": None if empty else expected_calibration_error(data.scores, data.truths),
            "ece_after": None if empty else expected_calibration_error(in_sample, data.truths),
            "ece_after_cv": (
                None if empty else expected_calibration_error(calibrated[label], data.truths)
            ),
        }
    return calibrators, calibrated, per_label


def _certify(
    mode: ThresholdMode,
    calibrated: Mapping[str, npt.NDArray[np.float64]],
    truths: Mapping[str, npt.NDArray[np.int64]],
    *,
    target_precision: float,
    delta: float,
    starts: int,
    p_value: PValue,
) -> tuple[dict[str, dict[str, float]], dict[str, float] | None]:
    """Certify each label's pair, or one pooled pair; return the records and the pooled one."""
    if mode == "pooled":
        pooled = select_pooled_thresholds(
            calibrated,
            truths,
            target_precision=target_precision,
            delta=delta,
            starts=starts,
            p_value=p_value,
        )
        per_label = {label: record.as_dict() for label, record in pooled.per_label.items()}
        return per_label, pooled.pooled.as_dict()
    records = {
        label: select_thresholds(
            scores,
            truths[label],
            target_precision=target_precision,
            delta=delta,
            starts=starts,
            p_value=p_value,
        )
        for label, scores in calibrated.items()
    }
    return {label: record.as_dict() for label, record in records.items()}, None


def _certify_groups(
    thresholds: Mapping[str, dict[str, float]],
    calibrated: Mapping[str, npt.NDArray[np.float64]],
    truths: Mapping[str, npt.NDArray[np.int64]],
    groups: Sequence[tuple[str, ...]],
    *,
    pooled: bool,
    target_precision: float,
    delta: float,
    starts: int,
    p_value: PValue,
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Certify the confident threshold of each softmax group on its argmax decisions.

    The decision of a group is its best-scored label; it is right when that label is the
    image's. Each image gives one decision per group, scored by the best calibrated
    (out-of-fold) score, and the PASS side of :func:`select_thresholds` certifies the
    score from which these decisions are right at ``target_precision``: per group, or
    (``pooled``) one threshold on the decisions of every group together, as pooled labels
    share one. It becomes each member's ``positive``, at least just above 0.5, so at most
    one member of a group is ever confidently present (a higher threshold is an earlier
    step of the certified sequence). The members' ``negative`` (certified on labels)
    stays; their records' figures are those of the new pair, and ``one_of`` marks them
    (every image holds one label of the group), so that routing asks an expert instead of
    declaring all of them absent. That takes decisions away from the certified set, each
    time a set of which at least one member was wrong. Returns the records and, per
    group, its threshold, decisions and precision on the calibration images.
    """
    decisions: dict[tuple[str, ...], tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]] = {}
    for group in groups:
        scores = np.stack([calibrated[c] for c in group], axis=1)
        hits = np.stack([truths[c] for c in group], axis=1)
        top = scores.argmax(axis=1)
        rows = np.arange(len(scores))
        decisions[group] = (scores[rows, top], hits[rows, top])
    kwargs: dict[str, Any] = {
        "target_precision": target_precision,
        "delta": delta,
        "starts": starts,
        "p_value": p_value,
    }
    if pooled:
        shared = select_thresholds(
            np.concatenate([d[0] for d in decisions.values()]),
            np.concatenate([d[1] for d in decisions.values()]),
            **kwargs,
        ).positive
        certified = dict.fromkeys(groups, shared)
    else:
        certified = {g: select_thresholds(*d, **kwargs).positive for g, d in decisions.items()}
    out = {label: dict(record) for label, record in thresholds.items()}
    metrics: dict[str, Any] = {}
    for group, threshold in certified.items():
        positive = max(threshold, float(np.nextafter(0.5, 1.0)))
        for label in group:
            out[label] = threshold_record(
                calibrated[label],
                truths[label],
                max(positive, out[label]["negative"]),
                out[label]["negative"],
                target_precision=target_precision,
                delta=delta,
            ).as_dict() | {"one_of": True}
        score, right = decisions[group]
        decided = score >= positive
        metrics["|".join(group)] = {
            "labels": list(group),
            "positive": positive,
            "n": len(score),
            "decided": int(decided.sum()),
            "precision": float(right[decided].mean()) if decided.any() else 1.0,
        }
    return out, metrics


def _cap_keep_thresholds(
    thresholds: Mapping[str, dict[str, float]],
    calibrated: Mapping[str, npt.NDArray[np.float64]],
    truths: Mapping[str, npt.NDArray[np.int64]],
    unfound: Mapping[str, int],
    target_precision: float,
    delta: float,
) -> dict[str, dict[str, float]]:
    """Cap each detector class's keep threshold by :func:`keep_threshold_cap`; add ``finds_all``."""
    capped: dict[str, dict[str, float]] = {}
    miss_rate = 1.0 - target_precision
    for label, record in thresholds.items():
        # A true box never proposed is missed whatever the threshold: it scores 0. If
        # those alone exceed the miss rate, "no kept box" cannot mean "none here"; the
        # keep threshold then bounds only the misses among the proposed boxes.
        proposed = calibrated[label][truths[label] == 1]
        cap = keep_threshold_cap(np.concatenate([proposed, np.zeros(unfound[label])]), miss_rate)
        finds_all = cap > 0.0
        if not finds_all:
            cap = keep_threshold_cap(proposed, miss_rate)
        capped[label] = _lowered(
            record, calibrated[label], truths[label], cap, target_precision, delta
        ) | {"finds_all": finds_all}
    return capped


def _lowered(
    record: Mapping[str, float],
    scores: npt.NDArray[np.float64],
    truths: npt.NDArray[np.int64],
    cap: float,
    target_precision: float,
    delta: float,
) -> dict[str, float]:
    """``record`` with its SKIP (keep) threshold lowered to ``cap``, its figures recomputed."""
    return threshold_record(
        scores,
        truths,
        record["positive"],
        min(record["negative"], cap),
        target_precision=target_precision,
        delta=delta,
    ).as_dict()


def _cap_discards(
    thresholds: Mapping[str, dict[str, float]],
    calibrated: Mapping[str, npt.NDArray[np.float64]],
    truths: Mapping[str, npt.NDArray[np.int64]],
    discard_rate: float,
    target_precision: float,
    delta: float,
) -> dict[str, dict[str, float]]:
    """Cap a gate's SKIP threshold so that it discards at most ``discard_rate`` of usable images.

    The cap is :func:`keep_threshold_cap` of the usable (label present) images' out-of-fold
    calibrated scores; each record gains ``discard_cap``, the cap itself.
    """
    if not 0.0 < discard_rate < 1.0:
        raise ValueError(f"discard_rate must lie strictly between 0 and 1, got {discard_rate}")
    capped: dict[str, dict[str, float]] = {}
    for label, record in thresholds.items():
        cap = keep_threshold_cap(calibrated[label][truths[label] == 1], discard_rate)
        capped[label] = _lowered(
            record, calibrated[label], truths[label], cap, target_precision, delta
        ) | {"discard_cap": cap}
    return capped


def _certify_absence(
    thresholds: Mapping[str, dict[str, float]],
    pairs: Mapping[str, _LabelData],
    calibrated: Mapping[str, npt.NDArray[np.float64]],
    samples: Sequence[Sample],
    *,
    target_precision: float,
    delta: float,
    starts: int,
    p_value: PValue,
) -> dict[str, dict[str, float]]:
    """Certify each detector class's image-level absence threshold; add ``absent``.

    The claim routed on is "this image holds no object of the class". Each image's score
    is its best out-of-fold calibrated box of the class (``1e-6`` with none), its truth
    whether it holds a true box, and the SKIP side of :func:`select_thresholds` on those
    pairs certifies the largest score at or below which the images are free of the
    class at ``target_precision``. It is kept below the confident threshold
    (``positive``), so an image with a confident box is never decided free of its class;
    a lower threshold is an earlier step of the same fixed sequence, so the certificate
    still holds. It is not capped at the keep threshold (``negative``): the claim is about
    the image, so an image decided free of a class shows none of its boxes, kept or not
    (``CalibratedDetector._decided``), and a box-level SKIP rule that certified nothing
    (a weak detector's boxes tie at the score floor) does not stop it. ``absent`` is 0
    (no image decided) when nothing certifies. ``absent_images`` and ``absent_precision``
    say how many calibration images it decided, and how rightly.
    """
    out: dict[str, dict[str, float]] = {}
    for label, record in thresholds.items():
        best = np.full(len(samples), SCORE_CLIP)
        np.maximum.at(best, pairs[label].image, calibrated[label])
        holds = np.array([any(b.label == label for b in s.boxes) for s in samples], dtype=np.int64)
        images = select_thresholds(
            best,
            holds,
            target_precision=target_precision,
            delta=delta,
            starts=starts,
            p_value=p_value,
        )
        absent = images.negative
        if record["positive"] < 1.0:
            absent = min(absent, float(np.nextafter(record["positive"], 0.0)))
        decided = best <= absent  # scores are >= 1e-6, so absent = 0 decides none
        out[label] = dict(record) | {
            "absent": absent,
            "absent_images": int(decided.sum()),
            "absent_precision": float(1.0 - holds[decided].mean()) if decided.any() else 1.0,
        }
    return out


def fit_novelty(
    stage: Any, chunks: Iterable[Sequence[DecodedImage]], alpha: float | None, *, n: int
) -> dict[str, Any] | None:
    """Fit the stage's shift detector on the ``n`` images of ``chunks`` and store it.

    Returns its summary; ``None`` (nothing fitted) for ``alpha=None``, for stand-ins that
    cannot hold one, and for fewer than 3 images, too few to fit.
    """
    holder = stage if isinstance(stage, NoveltyHolder) else None
    if alpha is None or holder is None:
        return None
    if n < 3:
        log.warning("%d images: too few to fit a shift detector", n)
        return None
    novelty = StageNovelty.fit(stage, chunks, alpha=alpha)
    holder.set_novelty(novelty)
    return novelty.summary()
