"""``diff``: which images changed route, labels or boxes between two sets of model versions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from phenocascade.errors import ValidationError
from phenocascade.store.output_diff import (
    box_changes,
    diff_outputs,
    matches,
    parse_versions,
    pick,
)

T0 = datetime(2026, 12, 1, tzinfo=UTC)


def _box(x: float, label: str = "giant", score: float = 0.9) -> dict[str, Any]:
    return {
        "x_min": x,
        "y_min": 0.0,
        "x_max": x + 10,
        "y_max": 10.0,
        "label": label,
        "score": score,
    }


def _output(
    image_id: str,
    versions: dict[str, str],
    *,
    minute: int = 0,
    routes: dict[str, str] | None = None,
    labels: dict[str, float] | None = None,
    boxes: list[dict[str, Any]] | None = None,
    status: str = "analyzed",
    annotators: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "image_id": image_id,
        "study": "s",
        "status": status,
        "model_versions": versions,
        "routes": routes or dict.fromkeys(versions, "PASS"),
        "labels": labels or {},
        "boxes": boxes or [],
        "produced_at": T0 + timedelta(minutes=minute),
        "annotators": annotators or {},
    }


OLD = {"quality": "q1", "majority": "m1", "minority": "d1"}
NEW = {"quality": "q1", "majority": "m1", "minority": "d2"}


def test_versions_specs_parse_and_refuse_what_is_not_one() -> None:
    assert parse_versions("majority=m1;quality=q1") == {"majority": "m1", "quality": "q1"}
    assert parse_versions(" minority=20261201T101500-3fa2 ; ") == {
        "minority": "20261201T101500-3fa2"
    }
    for bad, message in [
        ("", "is empty"),
        ("minority", "is not tier=version"),
        ("minority=", "is not tier=version"),
        ("mi nority=d1", "is not tier=version"),
        ("minority=d 1", "is not tier=version"),
        ("quality=q1;quality=q2", "given twice"),
        ("quality=q1;quality@expert=alice", "names an expert"),
    ]:
        with pytest.raises(ValidationError, match=message):
            parse_versions(bad, option="--from")


def test_an_output_matches_a_spec_on_the_tiers_they_share() -> None:
    assert matches(OLD, OLD) and not matches(OLD, NEW)
    assert matches({"minority": "d2"}, NEW)
    # A skipped image names only the gate: under both full specs it is the same output.
    assert matches(OLD, {"quality": "q1"}) and matches(NEW, {"quality": "q1"})
    assert not matches({"minority": "d1"}, {"quality": "q1"})


def test_pick_takes_the_newest_model_output_and_never_an_experts() -> None:
    outputs = [
        _output("a", {"quality": "q0", **NEW}, minute=1),
        _output("a", NEW, minute=2),
        _output("a", NEW, minute=3, annotators={"minority": "alice"}),
    ]
    picked = pick(outputs, {"minority": "d2"})
    assert picked is not None and picked["produced_at"] == T0 + timedelta(minutes=2)
    assert pick(outputs, {"minority": "d9"}) is None


def test_boxes_are_compared_as_objects_not_coordinates() -> None:
    assert box_changes([_box(0), _box(50)], [_box(1, score=0.6), _box(50)]) == ([], [])
    added, removed = box_changes([_box(0), _box(50)], [_box(0), _box(80)])
    assert [b["x_min"] for b in added] == [80] and [b["x_min"] for b in removed] == [50]
    added, removed = box_changes([_box(0, "giant")], [_box(0, "small")])
    assert [b["label"] for b in added] == ["small"] and [b["label"] for b in removed] == ["giant"]
    added, removed = box_changes([_box(0)], [_box(0), _box(0)])
    assert len(added) == 1 and removed == []


def test_the_diff_lists_exactly_the_images_whose_route_labels_or_boxes_changed() -> None:
    outputs = [
        # Unchanged: scores moved without crossing 0.5, boxes moved a little.
        _output("same", OLD, labels={"mitotic": 0.8, "apoptotic": 0.1}, boxes=[_box(0)]),
        _output("same", NEW, minute=5, labels={"mitotic": 0.7, "apoptotic": 0.3}, boxes=[_box(1)]),
        # The detector found one more object.
        _output("boxes", OLD, boxes=[_box(0)]),
        _output("boxes", NEW, minute=5, boxes=[_box(0), _box(40, "small")]),
        # A label given, one taken away.
        _output("labels", OLD, labels={"mitotic": 0.6, "apoptotic": 0.2}),
        _output("labels", NEW, minute=5, labels={"mitotic": 0.4, "apoptotic": 0.9}),
        # The detector is unsure now: the image goes to an expert.
        _output("route", OLD),
        _output(
            "route",
            NEW,
            minute=5,
            status="awaiting_annotation",
            routes={"quality": "PASS", "majority": "PASS", "minority": "ANNOTATE"},
        ),
        # Skipped by the gate: one output, under both specs.
        _output("skipped", {"quality": "q1"}, status="unusable", routes={"quality": "SKIP"}),
        # Not re-scored yet, and scored only after the promotion.
        _output("old-only", OLD),
        _output("new-only", NEW),
        # Another promotion altogether: in neither.
        _output("elsewhere", {"quality": "q7"}),
    ]
    diff = diff_outputs(outputs, OLD, NEW)
    assert diff.compared == 5
    assert {c.image_id: c.what for c in diff.changed} == {
        "boxes": ["boxes"],
        "labels": ["labels"],
        "route": ["route"],
    }
    by_id = {c.image_id: c for c in diff.changed}
    assert [b["label"] for b in by_id["boxes"].boxes_added] == ["small"]
    assert (by_id["labels"].labels_added, by_id["labels"].labels_removed) == (
        ["apoptotic"],
        ["mitotic"],
    )
    assert by_id["route"].status == ("analyzed", "awaiting_annotation")
    assert by_id["route"].routes == {"minority": ("PASS", "ANNOTATE")}
    assert by_id["route"].from_key == "majority=m1;minority=d1;quality=q1"
    assert by_id["route"].to_key == "majority=m1;minority=d2;quality=q1"
    assert (diff.only_from, diff.only_to) == (["old-only"], ["new-only"])
    data = diff.as_dict()
    assert data["unchanged"] == 2
    assert data["changed"][2]["routes"] == {"minority": ["PASS", "ANNOTATE"]}


def test_a_gate_promotion_shows_images_it_now_skips_as_route_changes() -> None:
    outputs = [
        _output("a", OLD, labels={"mitotic": 0.9}, boxes=[_box(0)]),
        _output("a", {"quality": "q2"}, minute=5, status="unusable", routes={"quality": "SKIP"}),
    ]
    diff = diff_outputs(outputs, OLD, {**OLD, "quality": "q2"})
    (change,) = diff.changed
    assert change.what == ["route", "labels", "boxes"]
    assert change.routes == {
        "majority": ("PASS", None),
        "minority": ("PASS", None),
        "quality": ("PASS", "SKIP"),
    }
