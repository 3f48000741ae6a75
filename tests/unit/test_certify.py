"""calibrate_stage: which threshold mode it uses and what it records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from stand_ins import FixedBoxes, FixedScores

from phenocascade.domain import (
    Box,
    DecodedImage,
    LabelThresholds,
    Route,
    Sample,
    StageKind,
    StageOutput,
    route,
)
from phenocascade.models.calibration import (
    Temperature,
    expected_calibration_error,
    logit,
    sigmoid,
)
from phenocascade.models.certify import (
    calibrate_stage,
    certify_outputs,
    default_threshold_mode,
    group_folds,
)


def _two_label_set() -> tuple[FixedScores, list[DecodedImage], list[Sample]]:
    # 60 images; label "a" present in the first 30, label "b" in the last 30. Raw scores
    # separate both labels perfectly, so every decision is right, but each label has only
    # 30 positives and 30 negatives: fewer than the 45 a 95 % certificate needs.
    rng = np.random.default_rng(0)
    raw: dict[str, dict[str, float]] = {}
    samples = []
    for i in range(60):
        present = "a" if i < 30 else "b"
        high, low = rng.uniform(0.7, 0.95), rng.uniform(0.05, 0.3)
        raw[f"im{i}"] = {"a": high if present == "a" else low, "b": high if present == "b" else low}
        samples.append(Sample(f"im{i}", Path(f"im{i}.png"), labels=frozenset({present})))
    images = [DecodedImage(s.image_id, np.zeros((4, 4, 1), np.uint8)) for s in samples]
    return FixedScores(StageKind.CLASSIFIER, raw), images, samples


def test_default_mode_pools_multi_label_classifiers_only() -> None:
    assert default_threshold_mode(StageKind.CLASSIFIER, ["a", "b"]) == "pooled"
    assert default_threshold_mode(StageKind.CLASSIFIER, ["a"]) == "per_label"
    assert default_threshold_mode(StageKind.GATE, ["clear"]) == "per_label"
    assert default_threshold_mode(StageKind.DETECTOR, ["x", "y"]) == "per_label"


def test_pooled_mode_lets_a_classifier_pass_images_per_label_mode_cannot() -> None:
    stage, images, samples = _two_label_set()
    per_label = calibrate_stage(
        stage, images, samples, target_precision=0.95, delta=0.1, threshold_mode="per_label"
    )
    assert all(t["positive"] == 1.0 and t["negative"] == 0.0 for t in stage.stored.values())
    assert per_label.metrics["threshold_mode"] == "per_label"
    assert per_label.metrics["pooled"] is None

    pooled = calibrate_stage(stage, images, samples, target_precision=0.95, delta=0.1)
    record = pooled.metrics["pooled"]
    assert pooled.metrics["threshold_mode"] == "pooled"
    assert record["n"] == 120 and record["n_pos"] == 60 and record["n_neg"] == 60
    assert record["achieved_precision_pos"] == 1.0 and record["achieved_precision_neg"] == 1.0
    assert {(t["positive"], t["negative"]) for t in stage.stored.values()} == {
        (record["positive"], record["negative"])
    }
    assert pooled.metrics["labels"]["a"]["n"] == 60
    assert pooled.metrics["labels"]["a"]["positives"] == 30
    assert pooled.certification == {
        "method": "ltt-binomial",
        "n": 60,
        "cross_fit": 0,
        "calibration_folds": 5,
    }
    # With the shared pair every validation image is decided on both labels: PASS.
    thresholds = {
        label: LabelThresholds(positive=t["positive"], negative=t["negative"])
        for label, t in stage.stored.items()
    }
    for img in images:
        scores = {
            label: float(pooled.calibrators[label](logit(p))[()])
            for label, p in stage.raw[img.image_id].items()
        }
        assert route(StageKind.CLASSIFIER, StageOutput(scores), thresholds) is Route.PASS


def test_unknown_mode_is_refused() -> None:
    stage, images, samples = _two_label_set()
    with pytest.raises(ValueError, match="threshold_mode"):
        calibrate_stage(stage, images, samples, threshold_mode="joint")  # type: ignore[arg-type]


@pytest.mark.parametrize("proposed", [100, 90])
def test_true_boxes_never_proposed_count_as_missed(proposed: int) -> None:
    # 100 images with one true box each; the detector proposes a matching box (scores
    # 0.60-0.95) in the first `proposed` images and nothing in the rest, beside two false
    # boxes (0.02-0.3) in every image. At 95 % the keep threshold may drop at most
    # k = floor(101 * 0.05) = 5 true boxes: with 10 never proposed, the 5th lowest true
    # score is 0, so an image without a box is not declared free of the class; the keep
    # threshold still bounds the misses among the 90 proposed boxes.
    rng = np.random.default_rng(0)
    truth = Box(10.0, 10.0, 30.0, 30.0, "x")
    samples = [Sample(f"im{i}", Path(f"im{i}.png"), boxes=(truth,)) for i in range(100)]
    images = [DecodedImage(s.image_id, np.zeros((40, 40, 1), np.uint8)) for s in samples]
    boxes = {
        s.image_id: (
            [Box(11.0, 10.0, 30.0, 31.0, "x", float(rng.uniform(0.6, 0.95)))]
            if i < proposed
            else []
        )
        # and two false boxes per image, scoring lower than every true one
        + [Box(0.0, 0.0, 8.0, 8.0, "x", float(rng.uniform(0.02, 0.3))) for _ in range(2)]
        for i, s in enumerate(samples)
    }
    stage = FixedBoxes(boxes)
    result = calibrate_stage(stage, images, samples, target_precision=0.95, delta=0.1)
    assert result.metrics["labels"]["x"]["unfound"] == 100 - proposed
    stored = stage.stored["x"]
    assert stored["finds_all"] is (proposed == 100)
    # Both drop the false boxes (0.02-0.3) and keep every proposed true one (>= 0.6).
    true_scores = result.calibrators["x"](logit(np.array([0.6])))
    false_scores = result.calibrators["x"](logit(np.array([0.02])))
    assert false_scores[0] <= stored["negative"] < true_scores[0]
    # Every calibration image holds the class, so no image certifies "none here": an
    # image without a box goes to a person (tests/unit/test_label_groups.py certifies it).
    assert stored["absent"] == 0.0
    t = {"x": LabelThresholds.from_record(stored)}
    empty = StageOutput(scores={"x": 1e-6})
    assert route(StageKind.DETECTOR, empty, t) is Route.ANNOTATE


def _shifted_detector(
    n_images: int, seed: int
) -> tuple[FixedBoxes, list[DecodedImage], list[Sample], np.ndarray, np.ndarray]:
    """Four boxes per image on a grid; box ``j`` is a true object with probability
    ``sigmoid(z_j)``, but the detector reports ``sigmoid(z_j + 2.5)``: every score too high.

    Also returns every box's raw score and whether it is a true object.
    """
    rng = np.random.default_rng(seed)
    samples, boxes, scores, hits = [], {}, [], []
    cells = [(20.0 * j, 0.0, 20.0 * j + 15.0, 15.0) for j in range(4)]
    for i in range(n_images):
        z = rng.normal(0.0, 2.0, 4)
        hit = rng.random(4) < sigmoid(z)
        raw = sigmoid(z + 2.5)
        boxes[f"im{i}"] = [Box(*c, "x", float(p)) for c, p in zip(cells, raw, strict=True)]
        truth = tuple(Box(*c, "x") for c, h in zip(cells, hit, strict=True) if h)
        samples.append(Sample(f"im{i}", Path(f"im{i}.png"), boxes=truth))
        scores.extend(raw)
        hits.extend(hit.astype(int))
    images = [DecodedImage(s.image_id, np.zeros((20, 80, 1), np.uint8)) for s in samples]
    return FixedBoxes(boxes), images, samples, np.array(scores), np.array(hits)


def test_a_detector_scoring_too_high_gets_an_offset() -> None:
    stage, images, samples, scores, hits = _shifted_detector(300, 1)
    result = calibrate_stage(stage, images, samples, target_precision=0.95, delta=0.1)
    label = result.metrics["labels"]["x"]
    assert label["calibrator"] in ("platt", "isotonic")
    assert label["cv_log_loss"][label["calibrator"]] < label["cv_log_loss"]["temperature"]
    # Before: scores far too high; after, also on held-out folds, within a few hundredths.
    assert label["ece_before"] > 0.15
    assert label["ece_after_cv"] < 0.06 and label["ece_after"] < 0.06
    # A temperature alone cannot remove the shift.
    temperature = Temperature.fit(logit(scores), hits)
    assert expected_calibration_error(temperature(logit(scores)), hits) > 2 * label["ece_after"]


def test_p_value_and_folds_are_recorded() -> None:
    stage, images, samples = _two_label_set()
    result = calibrate_stage(stage, images, samples, p_value="hoeffding-bentkus")
    assert result.certification["method"] == "ltt-hoeffding-bentkus"
    raw = stage.predict(images, calibrated=False)
    folds = np.arange(60) % 3
    crossed = certify_outputs(stage, raw, samples, folds, cross_fit=3)
    assert crossed.certification == {
        "method": "ltt-binomial",
        "n": 60,
        "cross_fit": 3,
        "calibration_folds": 3,
    }
    assert crossed.novelty is None


def test_group_folds_keep_groups_together_and_balance_them() -> None:
    samples = [
        Sample(f"im{i}", Path(f"im{i}.png"), group=f"src{i // 3}" if i < 30 else "")
        for i in range(40)
    ]
    folds = group_folds(samples, 4, seed=0)
    for start in range(0, 30, 3):
        assert len(set(folds[start : start + 3])) == 1  # three copies of one source
    # 10 sources and 10 ungrouped images: 20 groups, 5 per fold.
    groups_per_fold = [
        len({(s.group or s.image_id) for s, f in zip(samples, folds, strict=True) if f == k})
        for k in range(4)
    ]
    assert groups_per_fold == [5, 5, 5, 5]
    np.testing.assert_array_equal(group_folds(samples, 4, seed=0), folds)
    assert not np.array_equal(group_folds(samples, 4, seed=1), folds)
    with pytest.raises(ValueError, match="folds"):
        group_folds(samples, 0)


DARK = 0.08


def _gate_on_a_mostly_unusable_mix(rng: np.random.Generator) -> tuple[dict[str, float], list[int]]:
    # A gate's calibration mix as the bundled one is built: each clear field beside two
    # degraded copies. Most clear fields score near 1 and most degraded ones near 0; in
    # between lie the mildly degraded copies and the clear fields that are dark, like the
    # fluorescence fields of a dim scanner (8 %).
    scores, truths = {}, []
    for i in range(1200):
        usable = i % 3 == 0
        if usable:
            score = rng.uniform(0.2, 0.95) if rng.random() < DARK else rng.uniform(0.98, 0.999)
        else:
            score = rng.uniform(0.2, 0.95) if rng.random() < 0.15 else rng.uniform(0.001, 0.2)
        scores[f"im{i}"] = score
        truths.append(int(usable))
    return scores, truths


def _clear_stream(rng: np.random.Generator, n: int) -> npt.NDArray[np.float64]:
    dark = rng.random(n) < DARK
    return np.where(dark, rng.uniform(0.2, 0.95, n), rng.uniform(0.98, 0.999, n))


def test_a_gate_discards_at_most_one_percent_of_usable_images_whatever_the_mix() -> None:
    rng = np.random.default_rng(0)
    raw, truths = _gate_on_a_mostly_unusable_mix(rng)
    samples = [
        Sample(image_id, Path(f"{image_id}.png"), labels=frozenset({"clear"} if y else set()))
        for image_id, y in zip(raw, truths, strict=True)
    ]
    images = [DecodedImage(s.image_id, np.zeros((4, 4, 1), np.uint8)) for s in samples]
    outcomes = {}
    for rate in (0.5, 0.01):
        stage = FixedScores(StageKind.GATE, {k: {"clear": v} for k, v in raw.items()})
        result = calibrate_stage(
            stage, images, samples, target_precision=0.95, delta=0.1, discard_rate=rate
        )
        record = result.thresholds["clear"]
        assert result.metrics["discard_rate"] == rate
        assert record["negative"] <= record["discard_cap"]
        # A stream of clear fields only, from the same scanner: what does the gate discard?
        stream = stage.calibrators["clear"](logit(_clear_stream(np.random.default_rng(1), 4000)))
        outcomes[rate] = float((stream <= record["negative"]).mean()), record
    loose, capped = outcomes[0.5], outcomes[0.01]
    # Certified on precision alone (a cap that binds nowhere), SKIP precision holds on the
    # mix, yet the gate discards the dark clear fields of a clear stream.
    assert loose[1]["achieved_precision_neg"] >= 0.95
    assert loose[0] > 0.05
    # Capped, it discards at most about 1 % of them (conformal: in expectation over the
    # calibration draw) and still skips most of the unusable images of the mix.
    assert capped[0] <= 0.02
    assert capped[1]["n_neg"] >= 600
