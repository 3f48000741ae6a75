"""The minority tier: detection metrics, the size-outlier rule, keep thresholds, recipes."""

from pathlib import Path

import numpy as np
import pytest

from phenocascade.config import Settings
from phenocascade.domain import Box, DecodedImage, Sample, StageOutput
from phenocascade.errors import ConfigError
from phenocascade.models.backends.nucleus_outlier import complete_objects, size_outliers
from phenocascade.models.certify import keep_threshold_cap
from phenocascade.models.evaluate import coco_ap50, recall_at_fp_per_image
from phenocascade.recipes import recipe, tier_data, train_tier
from phenocascade.recipes.bundled_data import nuclei_set

LABEL = "large_nucleus"


def _truths() -> tuple[list[Sample], list[DecodedImage]]:
    """Three 100x80 images holding 2, 1 and 0 truth boxes."""
    boxes = [
        (Box(10, 10, 30, 40, LABEL), Box(50, 20, 90, 60, LABEL)),
        (Box(5, 5, 25, 25, LABEL),),
        (),
    ]
    samples = [Sample(f"img{i}", None, boxes=b) for i, b in enumerate(boxes)]
    images = [DecodedImage(s.image_id, np.zeros((80, 100, 1), np.uint8)) for s in samples]
    return samples, images


def _predict(samples: list[Sample], shift: float, score: float = 0.9) -> list[StageOutput]:
    return [
        StageOutput(
            {LABEL: score},
            tuple(
                Box(b.x_min + shift, b.y_min, b.x_max + shift, b.y_max, LABEL, score)
                for b in s.boxes
            ),
        )
        for s in samples
    ]


def test_perfect_boxes_score_ap50_and_recall_of_one() -> None:
    samples, images = _truths()
    outputs = _predict(samples, shift=0.0)
    assert coco_ap50(outputs, samples, [(i.height, i.width) for i in images], [LABEL]) == {
        LABEL: pytest.approx(1.0)
    }
    assert recall_at_fp_per_image(outputs, samples) == pytest.approx(1.0)


def test_boxes_missing_by_more_than_half_score_zero() -> None:
    samples, images = _truths()
    # Shifted by their own width: IoU 0 with every truth.
    outputs = _predict(samples, shift=45.0)
    assert coco_ap50(outputs, samples, [(i.height, i.width) for i in images], [LABEL])[
        LABEL
    ] == pytest.approx(0.0)
    assert recall_at_fp_per_image(outputs, samples) == 0.0


def test_false_positives_ranked_first_lower_ap50_but_not_recall_at_one_fp() -> None:
    samples, images = _truths()
    outputs = _predict(samples, shift=0.0, score=0.5)
    # One confident false box in the empty image outranks every true box.
    outputs[2] = StageOutput({LABEL: 0.99}, (Box(60, 60, 80, 80, LABEL, 0.99),))
    ap = coco_ap50(outputs, samples, [(i.height, i.width) for i in images], [LABEL])[LABEL]
    assert ap is not None and 0.3 < ap < 0.9
    assert recall_at_fp_per_image(outputs, samples) == pytest.approx(1.0)


def _square(x: float, side: float, score: float = 0.9) -> Box:
    return Box(x, 0.0, x + side, side, "object", score)


def test_size_outliers_flags_boxes_above_ratio_times_the_median_area() -> None:
    boxes = [_square(20.0 * i, 10.0) for i in range(6)] + [_square(200, 18), _square(300, 17)]
    # Median area 100: 324 > 300 is an outlier, 289 is not.
    assert size_outliers(boxes, ratio=3.0, min_objects=5, count_score=0.5) == [6]


def test_size_outliers_needs_enough_confident_objects_for_a_median() -> None:
    confident = [_square(20.0 * i, 10.0) for i in range(4)]
    doubtful = [_square(100.0 + 20 * i, 10.0, score=0.2) for i in range(4)]
    big = _square(300, 40.0, score=0.3)
    assert size_outliers([*confident, big], ratio=3.0, min_objects=5, count_score=0.5) == []
    # Unconfident boxes do not count for the median but may still be outliers.
    boxes = [*confident, _square(90, 10.0), *doubtful, big]
    assert size_outliers(boxes, ratio=3.0, min_objects=5, count_score=0.5) == [9]


def test_keep_threshold_cap_drops_at_most_the_miss_rate_of_true_boxes() -> None:
    rng = np.random.default_rng(0)
    true_scores = rng.uniform(0.05, 0.9, 99)
    cap = keep_threshold_cap(true_scores, 0.05)
    # k = floor(100 * 0.05) = 5: boxes strictly below the 5th lowest true score go.
    assert int((true_scores <= cap).sum()) == 4
    assert cap < np.sort(true_scores)[4]


def test_keep_threshold_cap_keeps_every_box_without_enough_true_boxes() -> None:
    # A weak detector: 10 matched boxes cannot bound a 5 % miss rate, so nothing is dropped.
    assert keep_threshold_cap(np.linspace(0.1, 0.2, 10), 0.05) == 0.0
    assert keep_threshold_cap(np.array([]), 0.05) == 0.0


def test_minority_recipes_per_dataset_and_backend() -> None:
    dsb = recipe("minority", "bootstrap")
    assert dsb.backend == "nucleus_mask_outlier_detector" and dsb.train_data == "dsb2018_nuclei"
    boxes = recipe("minority", "bootstrap", backend="nucleus_outlier_detector")
    assert boxes.backend == "nucleus_outlier_detector" and boxes.train_data == "dsb2018_nuclei"
    blood = recipe("minority", "bootstrap", dataset="bccd")
    assert blood.backend == "torchvision_detector" and blood.train_data is None
    yolo = recipe("minority", "bootstrap", backend="yolo")
    # From its YAML, YOLO's val mAP is zero for its first epochs: a short patience stops it
    # there (the old 6-epoch, patience-3 recipe measured AP50 0.000 on BCCD).
    assert yolo.backend == "yolo" and yolo.patience >= 10 and yolo.max_epochs > yolo.patience
    for composite in ("nucleus_outlier_detector", "nucleus_mask_outlier_detector"):
        with pytest.raises(ConfigError, match="no BCCD recipe"):
            recipe("minority", "bootstrap", backend=composite, dataset="bccd")


@pytest.fixture(scope="module")
def root() -> Path:
    path = Settings().datasets
    if not (path / "README.md").is_file():
        pytest.skip(f"shared datasets not found at {path} (set PHENOCASCADE_DATASETS)")
    return path


def test_minority_data_of_both_datasets(root: Path) -> None:
    settings = Settings(datasets=root)
    nuclei = [nuclei_set(settings, s) for s in ("train", "val", "test")]
    assert sum(len(s.boxes) for n in nuclei for s in n.samples) == 28986
    assert [len(n) for n in nuclei] == [399, 133, 132]
    blood = tier_data("minority", settings, "train", dataset="bccd")
    assert blood.classes == ("WBC", "Platelets") and len(blood) == 205
    assert all(b.x_max > b.x_min and b.y_max > b.y_min for s in blood.samples for b in s.boxes)
    with pytest.raises(ConfigError, match="unknown dataset"):
        tier_data("minority", settings, "train", dataset="coco")


def test_the_nucleus_composite_needs_its_parent_to_learn_from_rare_box_annotations(
    tmp_path: Path,
) -> None:
    annotated = Sample("a", None, boxes=(Box(1.0, 1.0, 9.0, 9.0, "large_nucleus"),))
    with pytest.raises(ConfigError, match="parent_version"):
        train_tier(
            "minority",
            settings=Settings(artifacts=tmp_path),
            extra_samples=[annotated],
            progress=False,
        )


def test_rare_annotations_are_completed_with_confident_detections_elsewhere() -> None:
    expert = [Box(10.0, 10.0, 50.0, 50.0, "large_nucleus", 1.0)]
    detected = [
        Box(12.0, 12.0, 48.0, 48.0, "object", 0.9),  # the expert's nucleus: expert wins
        Box(20.0, 20.0, 30.0, 30.0, "object", 0.8),  # a fragment inside it
        Box(45.0, 45.0, 65.0, 65.0, "object", 0.9),  # 25/400 of it under the expert box
        Box(70.0, 70.0, 80.0, 80.0, "object", 0.6),  # another nucleus
        Box(90.0, 90.0, 99.0, 99.0, "object", 0.4),  # not confident
    ]
    objects = complete_objects(expert, detected, min_score=0.5, max_overlap=0.5)
    assert [(b.x_min, b.y_min, b.label, b.score) for b in objects] == [
        (10.0, 10.0, "object", 1.0),
        (45.0, 45.0, "object", 0.9),
        (70.0, 70.0, "object", 0.6),
    ]
    # without expert boxes, the confident detections are the image's objects
    assert len(complete_objects([], detected, min_score=0.5, max_overlap=0.5)) == 4
