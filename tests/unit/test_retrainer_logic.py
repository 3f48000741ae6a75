"""The pure parts of the retraining loop: annotations -> samples, newest label, metrics."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from phenocascade.consumers.retrainer import (
    HOLDOUT_REASON,
    annotation_samples,
    image_key,
    newest_per_image,
)
from phenocascade.domain import Box
from phenocascade.models.evaluate import summary_metrics


def _ann(aid: str, image_id: str, uri: str | None, **kw: object) -> dict[str, object]:
    return {
        "annotation_id": aid,
        "image_id": image_id,
        "tier": "t",
        "labels": [],
        "boxes": [],
        "uri": uri,
        "created_at": datetime(2026, 1, 1, tzinfo=UTC),
        **kw,
    }


def test_samples_leave_out_holdout_foreign_unknown_and_missing_images(tmp_path: Path) -> None:
    inside = tmp_path / "inside"
    inside.mkdir()
    a, b = inside / "a.png", inside / "b.png"
    a.write_bytes(b"pixels of a")
    b.write_bytes(b"pixels of b")
    copy_of_b = inside / "copy-of-b.png"
    copy_of_b.write_bytes(b"pixels of b")
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"elsewhere")
    annotations = [
        _ann("1", "a", str(a), labels=["clear"]),
        _ann("2", "b", str(b)),
        _ann("2c", "b2", str(copy_of_b)),
        _ann("3", "c", str(outside)),
        _ann("4", "d", str(a), labels=["blurry"]),
        _ann("5", "e", None),
        _ann("6", "f", None),
        _ann("7", "g", str(inside / "gone.png")),
    ]
    samples, excluded = annotation_samples(
        annotations,
        classes=["clear"],
        holdout_keys=frozenset({image_key(b"pixels of b")}),
        roots=[inside],
        inline_bytes=lambda ann: b"inline pixels" if ann["image_id"] == "e" else None,
        cache_dir=tmp_path / "cache",
    )
    assert [(s.image_id, s.labels) for s in samples] == [
        ("a", frozenset({"clear"})),
        ("e", frozenset()),
    ]
    assert samples[0].path == a.resolve()
    assert samples[1].path is not None and samples[1].path.read_bytes() == b"inline pixels"
    # the holdout is recognised by content, whatever the file is called
    assert excluded["2"] == excluded["2c"] == HOLDOUT_REASON
    assert "outside the allowed roots" in excluded["3"]
    assert "blurry" in excluded["4"]
    assert "no URI and no inline bytes" in excluded["6"]
    assert "cannot read" in excluded["7"]
    assert set(excluded) == {"2", "2c", "3", "4", "6", "7"}


def test_a_tile_trains_on_its_own_pixels_never_its_slide(tmp_path: Path) -> None:
    slide = tmp_path / "slide.ome.tif"
    slide.write_bytes(b"the whole slide, gigabytes of it")
    tile = _ann("1", "s#tile-3", str(slide), labels=["clear"])
    samples, excluded = annotation_samples(
        [tile],
        classes=["clear"],
        holdout_keys=frozenset(),
        roots=[tmp_path],
        inline_bytes=lambda _: b"the tile, read from the slide",
        cache_dir=tmp_path / "cache",
    )
    assert excluded == {} and samples[0].path is not None
    assert samples[0].path.read_bytes() == b"the tile, read from the slide"


def test_detector_annotations_keep_their_boxes_as_human_boxes(tmp_path: Path) -> None:
    image = tmp_path / "img.png"
    image.write_bytes(b"x")
    box = {"x_min": 1.0, "y_min": 2.0, "x_max": 5.0, "y_max": 9.0, "label": "WBC", "score": 0.4}
    samples, excluded = annotation_samples(
        [_ann("1", "i", str(image), labels=["WBC"], boxes=[box])],
        classes=["WBC", "Platelets"],
        holdout_keys=frozenset(),
        roots=[tmp_path],
        inline_bytes=lambda _: None,
        cache_dir=tmp_path / "cache",
    )
    assert excluded == {}
    assert samples[0].boxes == (Box(1.0, 2.0, 5.0, 9.0, "WBC", 1.0),)
    assert samples[0].labels == frozenset({"WBC"})


def test_a_box_label_outside_the_classes_is_left_out(tmp_path: Path) -> None:
    image = tmp_path / "img.png"
    image.write_bytes(b"x")
    box = {"x_min": 1.0, "y_min": 2.0, "x_max": 5.0, "y_max": 9.0, "label": "RBC", "score": 1.0}
    samples, excluded = annotation_samples(
        [_ann("1", "i", str(image), boxes=[box])],
        classes=["WBC"],
        holdout_keys=frozenset(),
        roots=[tmp_path],
        inline_bytes=lambda _: None,
        cache_dir=tmp_path / "cache",
    )
    assert samples == [] and "RBC" in excluded["1"]


def test_newest_annotation_of_an_image_wins() -> None:
    old = _ann("old", "img", None, created_at=datetime(2026, 1, 1, tzinfo=UTC))
    new = _ann("new", "img", None, created_at=datetime(2026, 1, 2, tzinfo=UTC))
    other = _ann("other", "img2", None)
    kept, superseded = newest_per_image([other, new, old])
    assert [a["annotation_id"] for a in kept] == ["new", "other"]  # by image id
    assert superseded == {"old": "superseded by new"}


def test_summary_metrics_pick_the_tier_metrics_and_drop_missing_ones() -> None:
    classifier = {"macro_auroc": 0.9, "mean_ap": 0.8, "macro_f1": 0.7, "per_label": {}}
    assert summary_metrics(classifier) == {"auroc": 0.9, "mean_ap": 0.8, "macro_f1": 0.7}
    # the keys of evaluate_stage's detector report
    detector = {
        "ap50": 0.4,
        "ap50_per_class": {"a": 0.5, "b": None, "c": 0.3},
        "recall_at_1fp": 0.25,
    }
    assert summary_metrics(detector) == {"ap50": 0.4, "recall_at_1fp": 0.25}
    no_boxes = {"ap50": None, "ap50_per_class": {"a": None}, "recall_at_1fp": None}
    assert summary_metrics(no_boxes) == {}
    assert summary_metrics({"macro_auroc": float("nan")}) == {}
