"""How much each tier, and the cascade, decides alone at a guaranteed precision (issue 10).

A recipe outside the library. Each bundled tier is trained here at a target precision of
0.99 (delta 0.1), into a temporary artifacts folder, in the bootstrap's order (the
majority recipe adopts the minority tier's segmenter); every figure is measured on the
test splits only. The quality tier's certificate is cross-fitted (``--folds`` folds over
train + val). The minority and majority recipes cannot be: their segmenter trains on half
of the train split, so they certify on val and the other half (``cross_fit`` per tier in
the output says which).

Usage::

    .venv/bin/python benchmarks/automation.py [--folds 3] [--only quality,majority,minority]
        [--keep DIR | --reuse DIR]

``--reuse DIR`` scores the champions that a ``--keep DIR`` run trained (training is
deterministic on one machine, so they are the models a fresh run would train), for a
change of the measurement alone; ``models_reused_from`` and each tier's ``model`` say so.

Writes ``benchmarks/results/automation.json``. Per tier, and for the cascade end to end,
four threshold variants of the same model and calibrators:

- ``certified``: the deployed certificate (cross-fitted Learn-then-Test, binomial tail,
  see ``docs/routing.md``);
- ``fixed``: the seed's hand-set thresholds on raw scores (PASS at >= 0.85, SKIP or absent
  at <= 0.4);
- ``val_only``: the certificate recomputed at 0.99 on the val split alone (the old one);
- ``oracle``: per label, the thresholds that reach 0.99 on the test split itself, with the
  most decisions (an upper bound, never deployed).

For each: ``images`` (the fraction decided with nothing left to an expert, and the
fraction of those decided wholly right), ``labels`` (the fraction of (image, label)
decisions made alone, and their precision; a gate has one label, a detector one per class)
and ``questions_per_100`` (labels left to experts per 100 images); a gate adds
``usable_discarded``, the clear test images it skipped alone. Routing is per label
(:func:`phenocascade.domain.pending_labels`, groups from the label names) and images the
shift detector flags are left to experts in every variant.

``ece_test`` gives, per label, the test split's expected calibration error (15 bins) of
the raw scores and of the deployed calibrators; ``ece_val`` what training recorded on
val (before, after, and after out of fold).

``end_to_end`` (with all three tiers) runs the DSB test images (all in focus) through the
gate, then the majority classifier and the minority detector. ``held_out_modality``
streams BCCD's blood smears, a modality neither branch tier ever saw, through the
majority and minority tiers run: how many were decided alone in any label (goal: none)
and how many were flagged novel.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

import models as bench
from phenocascade import domain
from phenocascade.config import Settings
from phenocascade.domain import LabelThresholds, Sample, StageKind, StageOutput
from phenocascade.models.base import load_stage
from phenocascade.models.calibration import expected_calibration_error
from phenocascade.models.certify import calibrate_stage, match_boxes
from phenocascade.recipes import recipe, tier_data, train_tier
from phenocascade.recipes.bundled import BOOTSTRAP_ORDER
from phenocascade.recipes.bundled_data import bccd_set

log = logging.getLogger("benchmarks.automation")
RESULTS = Path(__file__).parent / "results"
TARGET, DELTA = 0.99, 0.1
TIERS = ("quality", "majority", "minority")
VARIANTS = ("certified", "fixed", "val_only", "oracle")


# -- one tier's decisions on one image ------------------------------------------------------
@dataclass(frozen=True)
class Judged:
    """The labels a tier left to experts, and whether each label it decided is right."""

    pending: tuple[str, ...]
    right: dict[str, bool]


def judge(model: bench.Replay, out: StageOutput, sample: Sample, gate_truth: bool) -> Judged:
    """Route one output per label and check each decided label against the truth.

    A gate label is right when PASS meets a clear image or SKIP an unclear one
    (``gate_truth``); a classifier label when "present" (at or above its confident
    threshold) matches the truth; a detector class when each of its boxes matches a true
    box of the class (IoU >= 0.5) and, where the class is certified to be found, every true
    box of it was found.
    """
    t = model.thresholds
    groups = domain.exclusive_groups(model.classes)
    pending = domain.pending_labels(model.kind, out, t, model.gate_label, groups)
    right: dict[str, bool] = {}
    for label in model.classes:
        if label in pending:
            continue
        if model.kind is StageKind.GATE:
            right[label] = (out.scores[label] >= t[label].positive) == gate_truth
        elif model.kind is StageKind.CLASSIFIER:
            right[label] = (out.scores[label] >= t[label].positive) == (label in sample.labels)
        else:
            said = [b for b in out.boxes if b.label == label]
            truth = [b for b in sample.boxes if b.label == label]
            hits = match_boxes(said, truth)
            complete = not t[label].finds_all or int(hits.sum()) == len(truth)
            right[label] = bool(hits.all()) and complete
    return Judged(pending, right)


def summarise(judged: Sequence[Judged], n_labels: int) -> dict[str, Any]:
    """Images and labels decided alone, their precision, and expert questions per 100."""
    n = len(judged)
    whole = [j for j in judged if not j.pending]
    decisions = [ok for j in judged for ok in j.right.values()]
    total_labels = n_labels * n if n_labels else sum(len(j.pending) + len(j.right) for j in judged)
    return {
        "images": {
            "fraction": _ratio(len(whole), n),
            "precision": _ratio(sum(all(j.right.values()) for j in whole), len(whole)),
            "n": n,
            "decided": len(whole),
        },
        "labels": {
            "fraction": _ratio(len(decisions), total_labels),
            "precision": _ratio(sum(decisions), len(decisions)),
            "n": total_labels,
            "decided": len(decisions),
        },
        "questions_per_100": round(100 * sum(len(j.pending) for j in judged) / n, 1) if n else 0,
    }


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


# -- thresholds of the variants -------------------------------------------------------------
def oracle_pair(
    scores: Sequence[float], truth: Sequence[bool], target: float
) -> tuple[float, float]:
    """Return the ``(positive, negative)`` pair with the most decisions at ``target`` here.

    On these very samples: the lowest ``positive`` whose PASS side is right at least
    ``target`` of the time, and the highest ``negative`` whose SKIP side is.
    """
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    s = np.asarray(scores, dtype=float)[order]
    y = np.asarray(truth, dtype=bool)[order]
    positive, negative = 1.0, 0.0
    if len(s):
        precision = np.cumsum(y) / np.arange(1, len(s) + 1)
        ok = np.nonzero(precision >= target)[0]
        if len(ok):
            positive = float(s[ok[-1]])
        npv = np.cumsum(~y[::-1]) / np.arange(1, len(s) + 1)
        ok = np.nonzero(npv >= target)[0]
        if len(ok):
            negative = float(s[::-1][ok[-1]])
    negative = min(negative, positive)
    return positive, negative


def oracle(model: bench.Replay, data: bench.Pass, gate_truth: Sequence[bool]) -> bench.Replay:
    """``model`` with each label's thresholds picked on ``data`` itself at 0.99."""
    outs = model.predict(data.images)
    pairs: dict[str, LabelThresholds] = {}
    for label in model.classes:
        t = model.thresholds[label]
        if model.kind is StageKind.DETECTOR:
            # Boxes: PASS when right; the keep threshold and finds_all stay the model's.
            scores, truth = [], []
            for out, sample in zip(outs, data.samples, strict=True):
                said = [b for b in out.boxes if b.label == label]
                hits = match_boxes(said, [b for b in sample.boxes if b.label == label])
                scores += [b.score for b in said]
                truth += [bool(h) for h in hits]
            positive, _ = oracle_pair(scores, truth, TARGET)
            pairs[label] = replace(t, positive=max(positive, t.negative))
            continue
        scores = [o.scores[label] for o in outs]
        if model.kind is StageKind.GATE:
            truth = list(gate_truth)
        else:
            truth = [label in s.labels for s in data.samples]
        positive, negative = oracle_pair(scores, truth, TARGET)
        pairs[label] = LabelThresholds(positive=positive, negative=negative)
    return replace(model, thresholds=pairs)


def val_only(
    tier: str, stage: Any, model: bench.Replay, settings: Settings, size: str
) -> bench.Replay:
    """``model`` with calibrators and a 0.99 certificate fitted on the val split alone."""
    val = bench.decode_set(tier_data(tier, settings, "val"))  # type: ignore[arg-type]
    on_val = bench.replay(stage, val.images)
    # Fits on_val's calibrators and thresholds (Replay.set_calibration).
    calibrate_stage(
        on_val,
        val.images,
        val.samples,
        target_precision=TARGET,
        delta=DELTA,
        starts=recipe(tier, size).ltt_starts,  # type: ignore[arg-type]
        novelty_alpha=None,
    )
    return replace(model, calibrators=on_val.calibrators, thresholds=on_val.thresholds)


# -- a tier ---------------------------------------------------------------------------------
@dataclass
class TierRun:
    """One trained tier: its stage, its replayed test outputs and novelty flags."""

    stage: Any
    data: bench.Pass
    models: dict[str, bench.Replay]
    novel: dict[str, bool]
    gate_truth: list[bool]


def novelty_flags(stage: Any, data: bench.Pass) -> dict[str, bool]:
    """Which images the stage's shift detector flags (none without one)."""
    novelty = getattr(stage, "novelty", None)
    if novelty is None:
        return {i.image_id: False for i in data.images}
    flags = novelty.flags(stage.stage, data.images)
    return {i.image_id: bool(f) for i, f in zip(data.images, flags, strict=True)}


def cross_fit_folds(tier: str, folds: int, size: str) -> int:
    """``folds``, or 0 for a recipe whose segmenter trains on part of what it would pool."""
    plan = recipe(tier, size)  # type: ignore[arg-type]
    return 0 if plan.train_data is not None or plan.segmenter_from is not None else folds


def run_tier(tier: str, settings: Settings, folds: int, size: str, *, reuse: bool) -> TierRun:
    """Train ``tier`` at a 0.99 certificate, or load its champion (``reuse``); replay on test."""
    if reuse:
        stage = load_stage(settings.artifacts, tier)
        log.info("%s: reusing %s", tier, stage.version)
    else:
        started = time.perf_counter()
        folder = train_tier(
            tier,
            settings=settings,
            size=size,
            progress=False,
            cross_fit=cross_fit_folds(tier, folds, size),
            target_precision=TARGET,
            delta=DELTA,
        )
        log.info("%s trained in %.0f s", tier, time.perf_counter() - started)
        stage = load_stage(settings.artifacts, tier, folder.name)
    data = bench.decode_set(tier_data(tier, settings, "test"))  # type: ignore[arg-type]
    model = bench.replay(stage, data.images)
    gate_truth = ["clear" in s.labels for s in data.samples]
    variants = {
        "certified": model,
        "fixed": model.variant(fixed=True),
        "val_only": val_only(tier, stage, model, settings, size),
        "oracle": oracle(model, data, gate_truth),
    }
    return TierRun(stage, data, variants, novelty_flags(stage, data), gate_truth)


def tier_figures(run: TierRun) -> dict[str, Any]:
    """Return the four variants' figures on the tier's own test split."""
    figures: dict[str, Any] = {}
    for name, model in run.models.items():
        # "fixed" has identity calibrators: it reads the raw scores. Every variant keeps the
        # shift guard.
        outs = model.predict(run.data.images)
        judged = [
            judge(model, replace(o, novel=run.novel[s.image_id]), s, truth)
            for o, s, truth in zip(outs, run.data.samples, run.gate_truth, strict=True)
        ]
        figures[name] = summarise(judged, len(model.classes))
        if model.kind is StageKind.GATE:
            figures[name]["usable_discarded"] = usable_discarded(judged, run.gate_truth)
        figures[name]["thresholds"] = {
            c: {"positive": round(t.positive, 4), "negative": round(t.negative, 4)}
            for c, t in model.thresholds.items()
        }
    figures["ece_test"] = ece_test(run)
    figures["ece_val"] = {
        label: {k: record.get(k) for k in ("ece_before", "ece_after", "ece_after_cv")}
        for label, record in run.stage.meta_.metrics["calibration"]["labels"].items()
    }
    figures["novel"] = sum(run.novel.values())
    figures["n_test"] = len(run.data.images)
    figures["model"] = run.stage.version
    return figures


def usable_discarded(judged: Sequence[Judged], gate_truth: Sequence[bool]) -> dict[str, Any]:
    """How many usable (clear) test images a gate skipped without asking anyone."""
    usable = [j for j, clear in zip(judged, gate_truth, strict=True) if clear]
    discarded = sum(not j.pending and not all(j.right.values()) for j in usable)
    return {"n": len(usable), "discarded": discarded, "rate": _ratio(discarded, len(usable))}


def ece_test(run: TierRun) -> dict[str, dict[str, float]]:
    """Per label, the test split's ECE of the raw scores and of the deployed calibrators.

    Classifier labels and gates are scored per image; a detector class per kept box, a box
    being right when it matches a true box (the raw side keeps the same boxes).
    """
    model = run.models["certified"]
    raw = model.predict(run.data.images, calibrated=False)
    calibrated = model.predict(run.data.images)
    out: dict[str, dict[str, float]] = {}
    for label in model.classes:
        before: list[float] = []
        after: list[float] = []
        truth: list[bool] = []
        for r, c, sample, clear in zip(
            raw, calibrated, run.data.samples, run.gate_truth, strict=True
        ):
            if model.kind is StageKind.DETECTOR:
                kept = [b for b in c.boxes if b.label == label]
                hits = match_boxes(kept, [b for b in sample.boxes if b.label == label])
                by_place = {(b.x_min, b.y_min, b.x_max, b.y_max): b.score for b in r.boxes}
                before += [by_place[(b.x_min, b.y_min, b.x_max, b.y_max)] for b in kept]
                after += [b.score for b in kept]
                truth += [bool(h) for h in hits]
            else:
                before.append(r.scores[label])
                after.append(c.scores[label])
                gate = model.kind is StageKind.GATE
                truth.append(clear if gate else label in sample.labels)
        out[label] = {
            "raw": round(expected_calibration_error(before, truth), 4),
            "calibrated": round(expected_calibration_error(after, truth), 4),
            "n": len(truth),
        }
    return out


# -- the cascade ----------------------------------------------------------------------------
def end_to_end(runs: Mapping[str, TierRun]) -> dict[str, Any]:
    """Gate, then both branches, on the DSB test images (all in focus: the gate should PASS).

    An image the gate leaves to an expert never reaches the branches: every label of it is
    pending. One it skips is decided (wrongly: it was in focus), with its gate label only.
    """
    majority, minority, gate = runs["majority"], runs["minority"], runs["quality"]
    boxes = {s.image_id: s for s in minority.data.samples}
    keep = [
        (s, i)
        for s, i in zip(majority.data.samples, majority.data.images, strict=True)
        if s.image_id in boxes
    ]
    images = [i for _, i in keep]
    gate_novel = novelty_flags(gate.stage, bench.Pass([s for s, _ in keep], images))
    on_gate = bench.replay(gate.stage, images)
    out: dict[str, Any] = {"images": len(images)}
    for name in VARIANTS:
        variant = gate.models[name]
        g = replace(on_gate, calibrators=variant.calibrators, thresholds=variant.thresholds)
        m, d = majority.models[name], minority.models[name]
        g_outs = g.predict(images)
        m_outs = _by_id(m, majority.data)
        d_outs = _by_id(d, minority.data)
        judged = []
        for (sample, image), g_out in zip(keep, g_outs, strict=True):
            i = image.image_id
            jg = judge(g, replace(g_out, novel=gate_novel[i]), sample, True)
            if jg.pending:
                judged.append(Judged(("clear", *m.classes, *d.classes), {}))
            elif not jg.right["clear"]:
                judged.append(jg)
            else:
                jm = judge(m, replace(m_outs[i], novel=majority.novel[i]), sample, True)
                jd = judge(d, replace(d_outs[i], novel=minority.novel[i]), boxes[i], True)
                right = {**jg.right, **jm.right, **jd.right}
                judged.append(Judged((*jm.pending, *jd.pending), right))
        out[name] = summarise(judged, 0)
    return out


def _by_id(model: bench.Replay, data: bench.Pass) -> dict[str, StageOutput]:
    outs = model.predict(data.images)
    return {i.image_id: o for i, o in zip(data.images, outs, strict=True)}


def held_out_modality(runs: Mapping[str, TierRun], settings: Settings) -> dict[str, Any]:
    """BCCD's blood smears through the branch tiers, which never saw that modality."""
    data = bench.decode_set(bccd_set(settings, "test"))
    per_tier: dict[str, Any] = {}
    decided_any: set[str] = set()
    novel_any: set[str] = set()
    for tier in [t for t in ("majority", "minority") if t in runs]:
        stage = runs[tier].stage
        model = runs[tier].models["certified"]
        outs = list(stage.predict(data.images))
        n_decided = n_novel = 0
        for image, out in zip(data.images, outs, strict=True):
            pending = domain.pending_labels(
                model.kind,
                out,
                model.thresholds,
                model.gate_label,
                domain.exclusive_groups(model.classes),
            )
            if len(pending) < len(model.classes):
                n_decided += 1
                decided_any.add(image.image_id)
            if out.novel:
                n_novel += 1
                novel_any.add(image.image_id)
        per_tier[tier] = {"auto_decided": n_decided, "flagged_novel": n_novel}
    return {
        "modality": "brightfield blood smears (BCCD test split), never in the training of "
        f"the {' or '.join(per_tier)} tier",
        "images": len(data.images),
        "auto_decided": len(decided_any),
        "flagged_novel": len(novel_any),
        "tiers": per_tier,
    }


# -- main -----------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write ``automation.json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folds", type=int, default=3, help="cross-fitting folds (default 3)")
    parser.add_argument("--size", default="bootstrap", choices=["bootstrap", "full"])
    parser.add_argument("--only", default=",".join(TIERS), help="tiers, comma-separated")
    parser.add_argument("--keep", type=Path, default=None, help="keep the artifacts here")
    parser.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="score the champions a --keep run left in this folder instead of training "
        "(same --folds and --size); the file records their versions",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "automation.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    asked = [t for t in args.only.split(",") if t]
    tiers = sorted(asked, key=lambda t: BOOTSTRAP_ORDER.index(t) if t in BOOTSTRAP_ORDER else 9)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="automation-") as tmp:
        artifacts = args.reuse or args.keep or Path(tmp) / "artifacts"
        settings = Settings(artifacts=artifacts, home=Path(tmp))
        reuse = args.reuse is not None
        runs = {t: run_tier(t, settings, args.folds, args.size, reuse=reuse) for t in tiers}
        result: dict[str, Any] = {
            "target": TARGET,
            "delta": DELTA,
            **bench.provenance(command),
            "folds": args.folds,
            "size": args.size,
            "models_reused_from": str(args.reuse) if reuse else None,
            "tiers": {
                t: {**tier_figures(r), "cross_fit": cross_fit_folds(t, args.folds, args.size)}
                for t, r in runs.items()
            },
        }
        if set(TIERS) <= set(runs):
            result["end_to_end"] = end_to_end(runs)
        if {"majority", "minority"} & set(runs):
            result["held_out_modality"] = held_out_modality(runs, settings)
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "tiers"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
