"""Majority backends side by side on the DSB 2018 test split: accuracy and automation.

A recipe outside the library. Each given artifact folder holds a trained majority model
(``phenocascade train majority [--backend morphometric_classifier]``, any home); every
model scores the same 132 test images in one run, beside the CellProfiler-style classical
baseline (:mod:`classical_majority`), and is routed per label with its own certified
thresholds and shift detector (:func:`phenocascade.domain.pending_labels`), as the
cascade's worker routes.

Usage::

    .venv/bin/python benchmarks/majority_backends.py ARTIFACT [ARTIFACT ...]

Writes ``benchmarks/results/majority_backends.json``: per model (its backend and version)
``groups.<group>.macro_f1`` (the argmax of the group's calibrated scores), and
``automation``: ``labels_decided`` and ``labels_wrong`` (label decisions made without an
expert, and how many of them are wrong), ``images_decided`` (every label decided),
``novel`` (images the shift detector left to experts), ``target_precision``; and
``classical.<group>.macro_f1``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import classical_majority
from models import provenance
from phenocascade.config import Settings
from phenocascade.data.labelled import load_pixels
from phenocascade.domain import DecodedImage, StageKind, exclusive_groups, pending_labels
from phenocascade.models.base import ArtifactMeta, load_stage
from phenocascade.recipes.bundled_data import majority_set

RESULTS = Path(__file__).parent / "results"
GROUPS = ("nucleus_size", "density")


def macro_f1(truth: Sequence[str], said: Sequence[str]) -> float:
    """Macro-averaged F1 over the values of ``truth``."""
    scores = []
    for value in sorted(set(truth)):
        tp = sum(t == value and s == value for t, s in zip(truth, said, strict=True))
        fp = sum(t != value and s == value for t, s in zip(truth, said, strict=True))
        fn = sum(t == value and s != value for t, s in zip(truth, said, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return round(sum(scores) / len(scores), 4)


def measure(
    folder: Path, images: list[DecodedImage], truth: list[frozenset[str]]
) -> dict[str, Any]:
    """Score one artifact on the test images: group macro-F1 and per-label automation."""
    stage = load_stage(folder.parent.parent, folder.parent.name, folder.name)
    outputs = []
    for start in range(0, len(images), 8):
        outputs += stage.predict(images[start : start + 8])
    groups = exclusive_groups(list(stage.classes))
    thresholds = stage.thresholds
    decided = wrong = whole = novel = 0
    for out, labels in zip(outputs, truth, strict=True):
        pending = pending_labels(StageKind.CLASSIFIER, out, thresholds, groups=groups)
        novel += out.novel
        whole += not pending
        for label in stage.classes:
            if label not in pending:
                decided += 1
                wrong += (out.scores[label] >= thresholds[label].positive) != (label in labels)
    result: dict[str, Any] = {
        "backend": stage.model_name,
        "version": stage.version,
        "groups": {},
        "automation": {
            "images": len(images),
            "labels": len(images) * len(stage.classes),
            "labels_decided": decided,
            "labels_wrong": wrong,
            "images_decided": whole,
            "novel": novel,
            "target_precision": ArtifactMeta.read(folder).metrics["calibration"][
                "target_precision"
            ],
        },
    }
    for group in GROUPS:
        said = [
            max((c for c in out.scores if c.startswith(group)), key=lambda c: out.scores[c])
            for out in outputs
        ]
        values = [next(label for label in labels if label.startswith(group)) for labels in truth]
        result["groups"][group] = {"macro_f1": macro_f1(values, said)}
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Measure each artifact and the classical baseline; write the JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", type=Path, help="majority artifact folders")
    parser.add_argument("--out", type=Path, default=RESULTS / "majority_backends.json")
    args = parser.parse_args(argv)
    test = majority_set(Settings(), "test")
    images = [DecodedImage(s.image_id, load_pixels(s)) for s in test.samples]
    truth = [s.labels for s in test.samples]
    classical = [
        classical_majority.group_labels(classical_majority.find_objects(i.pixels)) for i in images
    ]
    models = [measure(folder, images, truth) for folder in args.artifacts]
    result: dict[str, Any] = {
        **provenance(shlex.join(["python", "benchmarks/majority_backends.py", *sys.argv[1:]])),
        "split": "dsb2018 test",
        "models": models,
        "classical": {
            group: {
                "macro_f1": macro_f1(
                    [next(lb for lb in labels if lb.startswith(group)) for labels in truth],
                    [c[group] for c in classical],
                )
            }
            for group in GROUPS
        },
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
