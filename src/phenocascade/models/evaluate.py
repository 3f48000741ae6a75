"""Evaluation of a stage on labelled images: metrics JSON and plots (matplotlib, Agg).

Classifiers and gates: AUROC, average precision, F1 at 0.5, ECE per label, macro-F1, and
the precision and coverage of the automatic decisions at the stage's thresholds.
Detectors: AP at IoU 0.5 per class from pycocotools' COCOeval, recall at one false
positive per image, and the same routing figures on boxes.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede pyplot's import
import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt

from phenocascade.domain import DecodedImage, LabelThresholds, Sample, StageKind, StageOutput
from phenocascade.models.calibration import expected_calibration_error
from phenocascade.models.certify import match_boxes

FloatArray = npt.NDArray[np.float64]


def _finite(x: float) -> float | None:
    """Return ``x`` or ``None`` when it is NaN (JSON has no NaN)."""
    return None if math.isnan(x) else float(x)


def auroc(scores: npt.ArrayLike, truth: npt.ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied ranks averaged); NaN if one class."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(truth, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def precision_recall(
    scores: npt.ArrayLike, truth: npt.ArrayLike, n_truth: int | None = None
) -> tuple[FloatArray, FloatArray]:
    """Precision and recall at every score cut-off, by decreasing score.

    ``n_truth`` is the number of positives to recall (defaults to ``truth.sum()``; detectors
    pass the number of ground-truth boxes, since missed objects have no score).
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(truth, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    tp = np.cumsum(y[order])
    total = float(y.sum() if n_truth is None else n_truth)
    precision = tp / np.arange(1, len(s) + 1)
    recall = tp / total if total > 0 else np.zeros_like(tp)
    return precision, recall


def average_precision(scores: npt.ArrayLike, truth: npt.ArrayLike) -> float:
    """Average precision ``sum_n (R_n - R_{n-1}) P_n`` (scikit-learn's definition)."""
    precision, recall = precision_recall(scores, truth)
    if len(recall) == 0 or recall[-1] == 0:
        return float("nan") if np.asarray(truth).sum() == 0 else 0.0
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


def f1_at(scores: npt.ArrayLike, truth: npt.ArrayLike, threshold: float = 0.5) -> float:
    """F1 score of ``scores >= threshold`` (0 when there are no positives at all)."""
    pred = np.asarray(scores) >= threshold
    y = np.asarray(truth, dtype=bool)
    tp = int((pred & y).sum())
    denom = int(pred.sum() + y.sum())
    return 2.0 * tp / denom if denom else 0.0


def routing_figures(scores: FloatArray, truth: FloatArray, t: LabelThresholds) -> dict[str, Any]:
    """Precision of PASS (``>= positive``) and SKIP (``<= negative``) decisions, and coverage."""
    y = truth.astype(bool)
    pos, neg = scores >= t.positive, scores <= t.negative
    return {
        "coverage": float((pos | neg).mean()) if len(scores) else 0.0,
        "precision_pass": _finite(float(y[pos].mean())) if pos.any() else None,
        "precision_skip": _finite(float((~y[neg]).mean())) if neg.any() else None,
        "n_pass": int(pos.sum()),
        "n_skip": int(neg.sum()),
    }


def classification_metrics(
    outputs: Sequence[StageOutput],
    samples: Sequence[Sample],
    classes: Sequence[str],
    thresholds: Mapping[str, LabelThresholds],
) -> tuple[dict[str, Any], dict[str, tuple[FloatArray, FloatArray]]]:
    """Image-level metrics per label and macro averages; also returns the score arrays."""
    arrays: dict[str, tuple[FloatArray, FloatArray]] = {}
    per_label: dict[str, Any] = {}
    for c in classes:
        s = np.array([o.scores[c] for o in outputs], dtype=np.float64)
        y = np.array([c in smp.labels for smp in samples], dtype=np.float64)
        arrays[c] = (s, y)
        per_label[c] = {
            "n": len(s),
            "positives": int(y.sum()),
            "auroc": _finite(auroc(s, y)),
            "ap": _finite(average_precision(s, y)),
            "f1@0.5": f1_at(s, y),
            "ece": _finite(expected_calibration_error(s, y)),
            "routing": routing_figures(s, y, thresholds[c]) if c in thresholds else None,
            "routing_fixed_0.5": routing_figures(s, y, LabelThresholds(0.5, 0.5)),
        }
    f1s = [v["f1@0.5"] for v in per_label.values()]
    aps = [v["ap"] for v in per_label.values() if v["ap"] is not None]
    aurocs = [v["auroc"] for v in per_label.values() if v["auroc"] is not None]
    summary = {
        "macro_f1": float(np.mean(f1s)) if f1s else None,
        "mean_ap": float(np.mean(aps)) if aps else None,
        "macro_auroc": float(np.mean(aurocs)) if aurocs else None,
        "per_label": per_label,
    }
    return summary, arrays


def coco_ap50(
    outputs: Sequence[StageOutput],
    samples: Sequence[Sample],
    sizes: Sequence[tuple[int, int]],
    classes: Sequence[str],
) -> dict[str, float | None]:
    """AP at IoU 0.5 per class with pycocotools (101-point interpolation).

    Parameters
    ----------
    outputs : sequence of StageOutput
        Detections per image, in the pixels of ``sizes``.
    samples : sequence of Sample
        Ground-truth boxes per image, same order.
    sizes : sequence of (int, int)
        ``(height, width)`` of each image.
    classes : sequence of str
        Classes to report.

    Returns
    -------
    dict
        AP50 per class; ``None`` for a class without ground-truth boxes.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cat = {c: i + 1 for i, c in enumerate(classes)}
    gt: dict[str, Any] = {
        "images": [{"id": i + 1, "width": w, "height": h} for i, (h, w) in enumerate(sizes)],
        "categories": [{"id": k, "name": c} for c, k in cat.items()],
        "annotations": [],
    }
    dets = []
    for i, (out, smp) in enumerate(zip(outputs, samples, strict=True)):
        for b in smp.boxes:
            w, h = b.x_max - b.x_min, b.y_max - b.y_min
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": i + 1,
                    "category_id": cat[b.label],
                    "bbox": [b.x_min, b.y_min, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        for b in out.boxes:
            dets.append(
                {
                    "image_id": i + 1,
                    "category_id": cat[b.label],
                    "score": b.score,
                    "bbox": [b.x_min, b.y_min, b.x_max - b.x_min, b.y_max - b.y_min],
                }
            )
    result: dict[str, float | None] = {}
    # pycocotools prints its progress and summaries to stdout.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if not dets or not gt["annotations"]:
            return {c: (0.0 if gt["annotations"] else None) for c in classes}
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.iouThrs = np.array([0.5])
        ev.params.maxDets = [1, 10, 100]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"]  # (iou, recall, class, area, maxdet)
    for c, k in cat.items():
        p = precision[0, :, k - 1, 0, -1]
        result[c] = _finite(float(np.mean(p[p > -1]))) if (p > -1).any() else None
    return result


def recall_at_fp_per_image(
    outputs: Sequence[StageOutput], samples: Sequence[Sample], fp_per_image: float = 1.0
) -> float | None:
    """Return the largest recall (classes pooled) at ``fp_per_image`` false positives per image."""
    scores: list[float] = []
    hits: list[bool] = []
    for out, smp in zip(outputs, samples, strict=True):
        matched = match_boxes(list(out.boxes), list(smp.boxes))
        scores.extend(b.score for b in out.boxes)
        hits.extend(matched.tolist())
    n_truth = sum(len(s.boxes) for s in samples)
    if n_truth == 0:
        return None
    if not scores:
        return 0.0
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    h = np.asarray(hits, dtype=float)[order]
    tp, fp = np.cumsum(h), np.cumsum(1 - h)
    ok = fp <= fp_per_image * len(samples)
    return float(tp[ok].max() / n_truth) if ok.any() else 0.0


def _legend(ax: Any) -> None:
    """Label the curves, or say that there are none (a detector that found no box)."""
    if ax.get_lines():
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no scored predictions", ha="center", va="center")


def _plot_pr(
    arrays: Mapping[str, tuple[FloatArray, FloatArray]],
    path: Path,
    n_truth: Mapping[str, int] | None = None,
) -> None:
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, (s, y) in arrays.items():
        if len(s):
            precision, recall = precision_recall(s, y, None if n_truth is None else n_truth[label])
            ax.step(recall, precision, where="post", label=label)
    ax.set(
        xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="Precision-recall"
    )
    _legend(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_reliability(
    arrays: Mapping[str, tuple[FloatArray, FloatArray]], path: Path, bins: int = 10
) -> None:
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([0, 1], [0, 1], "k:", label="perfect")
    for label, (s, y) in arrays.items():
        if not len(s):
            continue
        idx = np.minimum((s * bins).astype(int), bins - 1)
        xs = [s[idx == b].mean() for b in range(bins) if (idx == b).any()]
        ys = [y[idx == b].mean() for b in range(bins) if (idx == b).any()]
        ax.plot(xs, ys, "o-", label=label, markersize=3)
    ax.set(xlabel="mean predicted probability", ylabel="observed frequency", title="Reliability")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_confusion(arrays: Mapping[str, tuple[FloatArray, FloatArray]], path: Path) -> None:
    labels = list(arrays)
    fig, axes = plt.subplots(1, len(labels), figsize=(2.4 * len(labels), 2.6), squeeze=False)
    for ax, label in zip(axes[0], labels, strict=True):
        s, y = arrays[label]
        pred = s >= 0.5
        m = np.array(
            [
                [np.sum(~pred & (y == 0)), np.sum(pred & (y == 0))],
                [np.sum(~pred & (y == 1)), np.sum(pred & (y == 1))],
            ]
        )
        ax.imshow(m, cmap="Blues")
        for (r, c), v in np.ndenumerate(m):
            ax.text(c, r, str(v), ha="center", va="center")
        ax.set(
            xticks=[0, 1],
            yticks=[0, 1],
            xticklabels=["no", "yes"],
            yticklabels=["no", "yes"],
            xlabel="predicted",
            ylabel="true",
        )
        ax.set_title(label, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_coverage(arrays: Mapping[str, tuple[FloatArray, FloatArray]], path: Path) -> None:
    """Precision of PASS decisions against the fraction of samples passed, per label."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, (s, y) in arrays.items():
        if len(s):
            precision, _ = precision_recall(s, y)
            ax.plot(np.arange(1, len(s) + 1) / len(s), precision, label=label)
    ax.set(
        xlabel="coverage (fraction auto-passed)",
        ylabel="precision",
        ylim=(0, 1.02),
        title="Coverage vs precision",
    )
    _legend(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_stage(
    stage: Any, images: Sequence[DecodedImage], samples: Sequence[Sample], out_dir: Path
) -> dict[str, Any]:
    """Evaluate a stage and write ``metrics.json`` and PNG plots into ``out_dir``.

    Parameters
    ----------
    stage : Stage
        A loaded backend (``predict(images)`` with calibrated scores).
    images : sequence of DecodedImage
        Evaluation pixels, aligned with ``samples``.
    samples : sequence of Sample
        Truths: labels, or boxes for detectors.
    out_dir : pathlib.Path
        Created if missing.

    Returns
    -------
    dict
        The metrics written to ``metrics.json``. Detectors: ``ap50`` (mean over classes
        with truths of pycocotools' AP at IoU 0.5, ``None`` if no class has a truth),
        ``ap50_per_class`` and ``recall_at_1fp`` (classes pooled, one false positive per
        image), all on every raw box with calibrated scores.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    thresholds = dict(stage.thresholds)
    metrics: dict[str, Any] = {
        "model": stage.model_name,
        "version": stage.version,
        "kind": str(stage.kind),
        "n_images": len(images),
    }
    if stage.kind is StageKind.DETECTOR:
        # Every raw box (with calibrated scores) so that AP covers the whole ranking.
        outputs = [
            StageOutput(
                scores=o.scores,
                boxes=tuple(
                    type(b)(
                        b.x_min,
                        b.y_min,
                        b.x_max,
                        b.y_max,
                        b.label,
                        float(stage.calibrated_score(b.label, b.score)),
                    )
                    for b in o.boxes
                ),
            )
            for o in stage.predict(images, calibrated=False)
        ]
        per_class = coco_ap50(
            outputs, samples, [(img.height, img.width) for img in images], stage.classes
        )
        present = [v for v in per_class.values() if v is not None]
        metrics["ap50"] = float(np.mean(present)) if present else None
        metrics["ap50_per_class"] = per_class
        metrics["recall_at_1fp"] = recall_at_fp_per_image(outputs, samples)
        arrays: dict[str, tuple[FloatArray, FloatArray]] = {}
        n_truth: dict[str, int] = {}
        for c in stage.classes:
            s: list[float] = []
            y: list[bool] = []
            for o, smp in zip(outputs, samples, strict=True):
                boxes = [b for b in o.boxes if b.label == c]
                s.extend(b.score for b in boxes)
                y.extend(match_boxes(boxes, [t for t in smp.boxes if t.label == c]).tolist())
            arrays[c] = (np.asarray(s, dtype=np.float64), np.asarray(y, dtype=np.float64))
            n_truth[c] = sum(1 for smp in samples for t in smp.boxes if t.label == c)
            metrics.setdefault("boxes", {})[c] = {
                "n_truth": n_truth[c],
                "ece": _finite(expected_calibration_error(*arrays[c])),
                "routing": routing_figures(*arrays[c], thresholds[c]) if c in thresholds else None,
            }
        _plot_pr(arrays, out_dir / "pr_curves.png", n_truth)
    else:
        outputs = stage.predict(images)
        summary, arrays = classification_metrics(outputs, samples, stage.classes, thresholds)
        metrics.update(summary)
        _plot_pr(arrays, out_dir / "pr_curves.png")
        _plot_confusion(arrays, out_dir / "confusion.png")
    _plot_reliability(arrays, out_dir / "reliability.png")
    _plot_coverage(arrays, out_dir / "coverage_precision.png")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


# The summary metric that ranks models of each kind of stage (higher is better): it decides
# promotions (the retrainer) and model selection (sweeps). All are rankings.
KIND_METRICS: dict[StageKind, str] = {
    StageKind.GATE: "auroc",
    StageKind.CLASSIFIER: "mean_ap",
    StageKind.DETECTOR: "ap50",
}


def summary_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """Return the scalar metrics of an :func:`evaluate_stage` report.

    Returns
    -------
    dict of str to float
        Classifiers and gates: ``auroc`` (macro over labels), ``mean_ap``, ``macro_f1``;
        detectors: ``ap50`` (mean over classes that have boxes) and ``recall_at_1fp`` (one
        false positive per image). Metrics that could not be computed are left out.
    """
    found: dict[str, Any] = {
        "auroc": report.get("macro_auroc"),
        "mean_ap": report.get("mean_ap"),
        "macro_f1": report.get("macro_f1"),
        "ap50": report.get("ap50"),
        "recall_at_1fp": report.get("recall_at_1fp"),
    }
    return {
        k: float(v)
        for k, v in found.items()
        if isinstance(v, int | float) and not math.isnan(float(v))
    }
