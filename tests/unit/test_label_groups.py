"""Softmax label groups and the certificates that decide a whole group, or a class's absence.

Labels that exclude each other, one of them in every image, share one softmax; the
certificate then decides the group's best label at the target precision, so a group is
decided by one confident label. A detector decides "none of this class here" on an image
certificate, not a box-level one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from stand_ins import FixedBoxes, FixedScores

from phenocascade.domain import (
    Box,
    DecodedImage,
    LabelThresholds,
    Sample,
    StageKind,
    StageOutput,
    exclusive_groups,
    pending_labels,
)
from phenocascade.models.backends._common import CalibratedDetector
from phenocascade.models.backends.multilabel_cnn import MultiLabelCNN
from phenocascade.models.calibration import Temperature
from phenocascade.models.certify import calibrate_stage

CLASSES = ("size:small", "size:medium", "size:large", "mitotic")


def _pixels(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"s{i}": (rng.random((24, 24, 1)) * 255).astype(np.uint8) for i in range(n)}


def _fit(samples: Sequence[Sample], pixels: Mapping[str, np.ndarray]) -> MultiLabelCNN:
    stage = MultiLabelCNN(backbone="small_cnn", input_size=16, batch_size=4)
    return stage.fit(
        samples[:-2],
        samples[-2:],
        classes=CLASSES,
        load=lambda s: pixels[s.image_id],
        max_epochs=1,
        patience=1,
    )


def test_a_group_with_one_label_per_image_becomes_a_softmax(tmp_path: Path) -> None:
    pixels = _pixels(8)
    samples = [
        Sample(sid, None, labels=frozenset({CLASSES[i % 3]} | ({"mitotic"} if i % 2 else set())))
        for i, sid in enumerate(pixels)
    ]
    stage = _fit(samples, pixels)
    assert stage.softmax_groups == (("size:small", "size:medium", "size:large"),)
    images = [DecodedImage(sid, px) for sid, px in pixels.items()]
    raw = stage.predict(images, calibrated=False)
    for out in raw:
        # The group's scores compete (sum to 1); the multi-label one stands alone.
        assert sum(out.scores[c] for c in CLASSES[:3]) == pytest.approx(1.0, abs=1e-5)
    stage.save(tmp_path / "v1", tier="majority")
    loaded = MultiLabelCNN.load(tmp_path / "v1")
    assert loaded.softmax_groups == stage.softmax_groups
    again = loaded.predict(images, calibrated=False)
    for a, b in zip(raw, again, strict=True):
        assert a.scores == pytest.approx(b.scores)


def test_a_group_some_image_lacks_stays_sigmoid_and_old_artifacts_load_as_sigmoid(
    tmp_path: Path,
) -> None:
    pixels = _pixels(8, seed=1)
    # s0 has no size label: "one per image" does not hold, so no softmax.
    samples = [
        Sample(sid, None, labels=frozenset({CLASSES[i % 3]} if i else {"mitotic"}))
        for i, sid in enumerate(pixels)
    ]
    stage = _fit(samples, pixels)
    assert stage.softmax_groups == ()
    stage.save(tmp_path / "v1", tier="majority")
    # An artifact written before softmax groups has no such key: every label a sigmoid.
    meta_path = tmp_path / "v1" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["config"].pop("softmax_groups", None)
    meta_path.write_text(json.dumps(meta))
    assert MultiLabelCNN.load(tmp_path / "v1").softmax_groups == ()


def test_a_group_is_certified_on_its_best_label_and_decided_by_it() -> None:
    # 400 images, one of three sizes each. The softmax puts 0.5-0.99 on the true size in
    # 85 % of images and on a wrong one in the rest, where it is never above 0.7: above
    # that score every decision is right, below it some are wrong.
    rng = np.random.default_rng(0)
    group = CLASSES[:3]
    raw, samples = {}, []
    for i in range(400):
        truth = int(rng.integers(3))
        right = rng.random() < 0.85
        top = truth if right else (truth + 1) % 3
        p = float(rng.uniform(0.5, 0.99) if right else rng.uniform(0.4, 0.7))
        scores = dict.fromkeys(group, (1.0 - p) / 2)
        scores[group[top]] = p
        raw[f"im{i}"] = scores
        samples.append(Sample(f"im{i}", Path("x.png"), labels=frozenset({group[truth]})))
    stage = FixedScores(StageKind.CLASSIFIER, raw, softmax_groups=[group])
    images = [DecodedImage(s.image_id, np.zeros((4, 4, 1), np.uint8)) for s in samples]
    result = calibrate_stage(stage, images, samples, target_precision=0.95, novelty_alpha=None)
    record = result.metrics["groups"]["|".join(group)]
    assert 0.5 < record["positive"] < 1.0
    assert record["decided"] > 100 and record["precision"] >= 0.95
    thresholds = {c: LabelThresholds.from_record(t) for c, t in stage.stored.items()}
    assert {t.positive for t in thresholds.values()} == {record["positive"]}
    assert all(t.one_of for t in thresholds.values())  # every image holds one size
    # One confident size decides the whole group; a split decision asks all three.
    groups = exclusive_groups(group)
    sure = StageOutput(scores={"size:small": 0.999, "size:medium": 5e-4, "size:large": 5e-4})
    assert pending_labels(StageKind.CLASSIFIER, sure, thresholds, groups=groups) == ()
    split = StageOutput(scores={"size:small": 0.45, "size:medium": 0.45, "size:large": 0.1})
    assert set(pending_labels(StageKind.CLASSIFIER, split, thresholds, groups=groups)) >= {
        "size:small",
        "size:medium",
    }


@pytest.mark.parametrize(("unproposed", "certified"), [(0, True), (30, False)])
def test_absence_is_certified_on_images_not_on_boxes(unproposed: int, certified: bool) -> None:
    # 300 images: 60 hold one true object, scored 0.6-0.95 when the detector proposes it;
    # every image also has a false box at 0.02-0.3. With every object proposed, images
    # whose best box is low are free of the class. With half of them never proposed,
    # those images look like empty ones, and "none here" cannot be certified.
    rng = np.random.default_rng(0)
    truth = Box(10.0, 10.0, 30.0, 30.0, "x")
    samples, boxes = [], {}
    for i in range(300):
        holds = i < 60
        samples.append(Sample(f"im{i}", Path("x.png"), boxes=(truth,) if holds else ()))
        found = [Box(11.0, 10.0, 30.0, 31.0, "x", float(rng.uniform(0.6, 0.95)))]
        boxes[f"im{i}"] = (found if holds and i >= unproposed else []) + [
            Box(0.0, 0.0, 8.0, 8.0, "x", float(rng.uniform(0.02, 0.3)))
        ]
    stage = FixedBoxes(boxes)
    images = [DecodedImage(s.image_id, np.zeros((40, 40, 1), np.uint8)) for s in samples]
    calibrate_stage(stage, images, samples, target_precision=0.95, novelty_alpha=None)
    stored = stage.stored["x"]
    t = {"x": LabelThresholds.from_record(stored)}
    assert 0.0 <= stored["absent"] < stored["positive"]
    low = StageOutput(scores={"x": 1e-6})
    if certified:
        assert stored["absent_images"] >= 200 and stored["absent_precision"] >= 0.95
        assert pending_labels(StageKind.DETECTOR, low, t) == ()
    else:
        assert stored["absent"] == 0.0 and stored["absent_images"] == 0
        assert pending_labels(StageKind.DETECTOR, low, t) == ("x",)


def test_absence_is_certified_on_images_when_the_box_level_skip_rule_is_not() -> None:
    # 300 images, each with two false boxes at one raw score; 60 also hold two true
    # objects: one proposed with a high score, one at that same low score. The low tie
    # holds 60 true boxes of 660 (9 %), so no box-level keep threshold is certified at
    # 0.95; yet every image whose best box is that low is free of the class.
    rng = np.random.default_rng(1)
    truths = (Box(10.0, 10.0, 30.0, 30.0, "x"), Box(50.0, 50.0, 70.0, 70.0, "x"))
    samples, boxes = [], {}
    for i in range(300):
        holds = i < 60
        samples.append(Sample(f"im{i}", Path("x.png"), boxes=truths if holds else ()))
        false = [Box(0.0, 0.0, 8.0, 8.0, "x", 0.05), Box(80.0, 0.0, 88.0, 8.0, "x", 0.05)]
        found = [
            Box(11.0, 10.0, 30.0, 31.0, "x", float(rng.uniform(0.6, 0.95))),
            Box(50.0, 51.0, 70.0, 70.0, "x", 0.05),
        ]
        boxes[f"im{i}"] = false + (found if holds else [])
    stage = FixedBoxes(boxes)
    images = [DecodedImage(s.image_id, np.zeros((90, 90, 1), np.uint8)) for s in samples]
    calibrate_stage(stage, images, samples, target_precision=0.95, novelty_alpha=None)
    stored = stage.stored["x"]
    assert stored["negative"] == 0.0  # no box is dropped
    assert stored["negative"] < stored["absent"] < stored["positive"]
    assert stored["absent_images"] >= 200 and stored["absent_precision"] >= 0.95


class _Detector(CalibratedDetector):
    """A one-class detector with an identity calibrator and given thresholds."""

    kind = StageKind.DETECTOR
    model_name = "stand-in"

    def __init__(self, thresholds: dict[str, float]) -> None:
        self.classes_ = ["x"]
        self.calibrators_ = {"x": Temperature(1.0)}
        self.thresholds_ = {"x": thresholds}

    def get_config(self) -> dict[str, object]:
        return {}

    def _artifact_network(self) -> tuple[torch.nn.Module, int]:
        raise NotImplementedError


def test_an_image_certified_free_of_a_class_shows_none_of_its_boxes() -> None:
    detector = _Detector({"positive": 0.9, "negative": 0.1, "absent": 0.3})
    image = DecodedImage("a", np.zeros((40, 40, 1), np.uint8))
    low = detector._boxes_output(image, [(0, 0, 8, 8, "x", 0.2), (9, 9, 20, 20, "x", 0.05)], True)
    # Its best box (0.2) is kept by the box rule but the image is decided free of "x".
    assert low.boxes == () and low.scores["x"] == pytest.approx(0.2)
    pending = pending_labels(StageKind.DETECTOR, low, detector.thresholds)
    assert pending == ()
    high = detector._boxes_output(image, [(0, 0, 8, 8, "x", 0.2), (9, 9, 20, 20, "x", 0.5)], True)
    assert [b.score for b in high.boxes] == pytest.approx([0.2, 0.5])  # asked, both shown
    assert pending_labels(StageKind.DETECTOR, high, detector.thresholds) == ("x",)
    raw = detector._boxes_output(image, [(0, 0, 8, 8, "x", 0.2)], False)
    assert len(raw.boxes) == 1  # uncalibrated outputs keep every box


def test_absence_threshold_is_checked_and_old_records_keep_finds_all() -> None:
    with pytest.raises(ValueError, match="absent"):
        LabelThresholds(positive=0.9, negative=0.2, absent=0.9)
    assert LabelThresholds(positive=0.9, negative=0.2, absent=0.3).decides_absent(0.25)
    old = LabelThresholds.from_record({"positive": 0.9, "negative": 0.2, "finds_all": True})
    assert old.absent is None and old.decides_absent(0.15)
    blind = LabelThresholds.from_record({"positive": 0.9, "negative": 0.2, "finds_all": False})
    assert not blind.decides_absent(1e-6)
    new = LabelThresholds.from_record({"positive": 0.9, "negative": 0.2, "absent": 0.1})
    assert new.decides_absent(0.1) and not new.decides_absent(0.15)
