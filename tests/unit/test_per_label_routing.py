"""Per-label routing: what a tier decides alone is final, and only the rest goes to experts."""

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phenocascade import domain
from phenocascade.cli.cascade import automation
from phenocascade.config import load_topology
from phenocascade.consumers.joining import merge
from phenocascade.domain import Box, LabelThresholds, OutputStatus, Route, StageKind, StageOutput
from phenocascade.store.join_state import empty_state
from phenocascade.streams import events
from phenocascade.streams.serde import EventCodec, default_schema_dir

T = LabelThresholds(positive=0.9, negative=0.1)
SIZE = ["size:small", "size:medium", "size:large"]
DENSITY = ["density:sparse", "density:dense"]


def test_groups_come_from_the_tier_then_from_the_label_names() -> None:
    labels = [*SIZE, *DENSITY, "mitosis", "apoptosis"]
    groups = domain.exclusive_groups(labels, {"death": ["apoptosis", "necrosis"]})
    assert groups["size:medium"] == tuple(SIZE)
    assert groups["density:dense"] == tuple(DENSITY)
    assert groups["mitosis"] == ("mitosis",)
    # A declared group keeps only the tier's own labels.
    assert groups["apoptosis"] == ("apoptosis",)
    assert domain.exclusive_groups(["a", "b"], {"g": ["a", "b"]}) == {
        "a": ("a", "b"),
        "b": ("a", "b"),
    }


def test_only_uncertain_labels_are_asked_and_a_confident_one_settles_its_group() -> None:
    scores = {
        "size:small": 0.02,
        "size:medium": 0.5,  # uncertain: asked
        "size:large": 0.03,
        "density:sparse": 0.95,  # present: the other density labels are absent
        "density:medium": 0.5,
        "density:dense": 0.5,
    }
    output = StageOutput(scores=scores)
    thresholds = dict.fromkeys(scores, T)
    groups = domain.exclusive_groups(list(scores))
    pending = domain.pending_labels(StageKind.CLASSIFIER, output, thresholds, groups=groups)
    assert pending == ("size:medium",)
    assert domain.route(StageKind.CLASSIFIER, output, thresholds, groups=groups) is Route.ANNOTATE
    # Without groups nothing is implied: the unsure density labels are asked too.
    alone = domain.pending_labels(StageKind.CLASSIFIER, output, thresholds)
    assert alone == ("size:medium", "density:medium", "density:dense")
    # A confident size settles the image.
    settled = {**scores, "size:medium": 0.97}
    output = StageOutput(scores=settled)
    assert domain.pending_labels(StageKind.CLASSIFIER, output, thresholds, groups=groups) == ()
    assert domain.route(StageKind.CLASSIFIER, output, thresholds, groups=groups) is Route.PASS


def test_two_confident_labels_of_one_group_contradict_each_other_and_are_asked() -> None:
    scores = {"size:small": 0.95, "size:large": 0.96, "density:sparse": 0.02}
    groups = domain.exclusive_groups(list(scores))
    pending = domain.pending_labels(
        StageKind.CLASSIFIER, StageOutput(scores=scores), dict.fromkeys(scores, T), groups=groups
    )
    assert pending == ("size:small", "size:large")


def test_a_one_of_group_is_never_decided_to_hold_none_of_its_labels() -> None:
    one_of = LabelThresholds(positive=0.9, negative=0.55, one_of=True)
    scores = {"size:small": 0.45, "size:medium": 0.5, "size:large": 0.05, "density:sparse": 0.02}
    groups = domain.exclusive_groups(list(scores))
    thresholds = {**dict.fromkeys(scores, one_of), "density:sparse": T}
    output = StageOutput(scores=scores)
    # Each size label alone is below its "no" threshold, but every image has one size.
    pending = domain.pending_labels(StageKind.CLASSIFIER, output, thresholds, groups=groups)
    assert pending == ("size:small", "size:medium", "size:large")
    # A group that may hold none of its labels (no one_of) keeps the three "no"s.
    loose = {**dict.fromkeys(scores, LabelThresholds(positive=0.9, negative=0.55))}
    assert domain.pending_labels(StageKind.CLASSIFIER, output, loose, groups=groups) == ()
    # A confident member settles the group as before.
    settled = StageOutput(scores={**scores, "size:large": 0.95})
    assert domain.pending_labels(StageKind.CLASSIFIER, settled, thresholds, groups=groups) == ()
    assert LabelThresholds.from_record({"positive": 0.9, "negative": 0.5, "one_of": True}).one_of


probs = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@given(
    scores=st.fixed_dictionaries({label: probs for label in [*SIZE, *DENSITY]}),
    novel=st.booleans(),
)
def test_pending_is_empty_exactly_when_the_route_decides(
    scores: dict[str, float], novel: bool
) -> None:
    output = StageOutput(scores=scores, novel=novel)
    thresholds = dict.fromkeys(scores, T)
    groups = domain.exclusive_groups(list(scores))
    pending = domain.pending_labels(StageKind.CLASSIFIER, output, thresholds, groups=groups)
    decision = domain.route(StageKind.CLASSIFIER, output, thresholds, groups=groups)
    assert (not pending) == (decision is Route.PASS)
    if novel:
        assert set(pending) == set(scores)
        return
    for group in (SIZE, DENSITY):
        present = [g for g in group if scores[g] >= T.positive]
        for label in group:
            sure = scores[label] >= T.positive or scores[label] <= T.negative
            # Decided: sure, or absent beside exactly one confident label of its group.
            decided = (sure or present) and len(present) <= 1
            assert (label not in pending) == bool(decided), (label, scores)


def test_a_detector_leaves_only_its_unsure_classes_to_the_expert() -> None:
    thresholds = {
        "WBC": LabelThresholds(positive=0.9, negative=0.2),
        "Platelets": LabelThresholds(positive=0.9, negative=0.2),
        "RBC": LabelThresholds(positive=0.9, negative=0.2, finds_all=False),
    }
    boxes = [Box(0, 0, 10, 10, "WBC", 0.97), Box(20, 20, 30, 30, "Platelets", 0.5)]
    output = StageOutput(scores={"WBC": 0.97, "Platelets": 0.5, "RBC": 0.0}, boxes=boxes)
    # WBC: a confident box; Platelets: an unsure box; RBC: none found, and not certified
    # to be found, so "no RBC" is unknown.
    assert domain.pending_labels(StageKind.DETECTOR, output, thresholds) == ("Platelets", "RBC")
    certain = StageOutput(scores={"WBC": 0.97, "Platelets": 0.0}, boxes=boxes[:1])
    assert domain.pending_labels(StageKind.DETECTOR, certain, thresholds) == ()
    assert domain.route(StageKind.DETECTOR, certain, thresholds) is Route.PASS


def test_a_gate_asks_only_when_it_annotates() -> None:
    t = {"clear": T}
    assert domain.pending_labels(StageKind.GATE, StageOutput(scores={"clear": 0.05}), t) == ()
    assert domain.pending_labels(StageKind.GATE, StageOutput(scores={"clear": 0.5}), t) == (
        "clear",
    )


# -- through the joiner ----------------------------------------------------------------------
TOPOLOGY = load_topology()


def _result(tier: str, route_: str, scores: dict[str, float], **kw: Any) -> dict[str, Any]:
    kind = {"quality": "gate", "majority": "classifier", "minority": "detector"}[tier]
    out = {
        "image_id": "img",
        "tier": tier,
        "kind": kind,
        "route": route_,
        "scores": scores,
        "boxes": kw.get("boxes", []),
        "model_version": "v1",
        "study": "s",
        "uri": "/a.png",
    }
    if "pending" in kw:
        out["pending"] = kw["pending"]
    return out


def _join(results: list[dict[str, Any]]) -> dict[str, Any]:
    state, outputs = empty_state(), []
    for r in results:
        state, out = merge(TOPOLOGY, state, r)
        outputs += [out] if out is not None else []
    assert len(outputs) == 1
    return outputs[0]


def test_the_output_is_partial_its_pending_labels_those_the_tiers_left() -> None:
    scores = {"size:small": 0.5, "size:large": 0.02, "density:sparse": 0.97}
    output = _join(
        [
            _result("quality", "PASS", {"clear": 0.99}),
            _result("majority", "ANNOTATE", scores, pending=["size:small", "size:large"]),
            _result("minority", "PASS", {"large_nucleus": 0.0}),
        ]
    )
    assert output["status"] == "awaiting_annotation"
    assert output["pending"] == ["size:small", "size:large"]
    assert output["labels"]["density:sparse"] == 0.97  # final


def test_a_result_without_a_pending_list_leaves_every_label_of_its_tier() -> None:
    scores = {"size:small": 0.5, "density:sparse": 0.97}
    output = _join(
        [
            _result("quality", "PASS", {"clear": 0.99}),
            _result("majority", "ANNOTATE", scores),
            _result("minority", "PASS", {"large_nucleus": 0.0}),
        ]
    )
    assert output["pending"] == ["size:small", "density:sparse"]


def test_an_analyzed_output_has_nothing_pending() -> None:
    output = _join(
        [
            _result("quality", "PASS", {"clear": 0.99}),
            _result("majority", "PASS", {"size:small": 0.99}, pending=[]),
            _result("minority", "PASS", {"large_nucleus": 0.0}, pending=[]),
        ]
    )
    assert output["status"] == "analyzed"
    assert output["pending"] == []


def test_the_report_counts_automatic_images_partial_ones_and_questions() -> None:
    box = {"x_min": 0, "y_min": 0, "x_max": 1, "y_max": 1, "label": "WBC", "score": 0.99}
    awaiting = [
        {"labels": {"a": 0.99, "b": 0.5}, "boxes": [box], "pending": ["b"]},
        {"labels": {"a": 0.5}, "boxes": [], "pending": ["a"]},
        {"labels": {}, "boxes": [], "pending": []},  # an older output: one question
    ]
    summary = automation(
        {"analyzed": 5, "unusable": 2, "awaiting_annotation": 3}, awaiting, by_expert=2
    )
    assert summary == {
        "images": 5,
        "fraction": 0.5,
        "completed_by_experts": 2,
        "partial": 1,
        "expert_questions": 3,
        "per_100_images": 30.0,
    }


# -- the contracts ---------------------------------------------------------------------------
SUBMITTED = events.image_submitted("legacy-1", uri="/a.png")
OUTPUT = StageOutput(scores={"a": 0.5})
CURRENT = {
    "TierResult": events.tier_result(
        SUBMITTED,
        tier="majority",
        kind=StageKind.CLASSIFIER,
        route=Route.ANNOTATE,
        output=OUTPUT,
        model_name="m",
        model_version="v1",
        pending=["a"],
    ),
    "AnnotationRequest": events.annotation_request(
        SUBMITTED,
        b"",
        tier="majority",
        output=OUTPUT,
        classes=["a"],
        model_name="m",
        model_version="v1",
        ask=["a"],
    ),
    "ImageOutput": events.image_output(
        "legacy-1",
        status=OutputStatus.AWAITING_ANNOTATION,
        study="",
        uri=None,
        labels={"a": 0.5},
        boxes=[],
        routes={"majority": "ANNOTATE"},
        model_versions={"majority": "v1"},
        pending=["a"],
    ),
}


@pytest.mark.parametrize(
    ("name", "version", "field"),
    [
        ("TierResult", "v3", "pending"),
        ("AnnotationRequest", "v2", "ask"),
        ("ImageOutput", "v1", "pending"),
    ],
)
def test_records_from_before_per_label_routing_read_with_an_empty_list(
    tmp_path: Path, name: str, version: str, field: str
) -> None:
    old = json.loads((default_schema_dir() / "history" / f"{name}.{version}.avsc").read_text())
    assert field not in {f["name"] for f in old["fields"]}
    (tmp_path / "history").mkdir()
    (tmp_path / f"{name}.avsc").write_text(json.dumps(old))
    known = {f["name"] for f in old["fields"]}
    record = {k: v for k, v in CURRENT[name].items() if k in known}
    _, back = EventCodec().decode(EventCodec(tmp_path).encode(name, record), expected=name)
    assert back[field] == []
    # And the current writer's list round-trips.
    _, now = EventCodec().decode(EventCodec().encode(name, CURRENT[name]), expected=name)
    assert now[field] == ["a"]


def test_outputs_from_before_expert_answers_read_with_no_experts(tmp_path: Path) -> None:
    old = json.loads((default_schema_dir() / "history" / "ImageOutput.v2.avsc").read_text())
    (tmp_path / "history").mkdir()
    (tmp_path / "ImageOutput.avsc").write_text(json.dumps(old))
    known = {f["name"] for f in old["fields"]}
    record = {k: v for k, v in CURRENT["ImageOutput"].items() if k in known}
    _, back = EventCodec().decode(EventCodec(tmp_path).encode("ImageOutput", record))
    assert back["annotators"] == {} and back["expert_labels"] == []
    answered = {**CURRENT["ImageOutput"], "annotators": {"majority": "alice"}}
    _, now = EventCodec().decode(EventCodec().encode("ImageOutput", answered))
    assert now["annotators"] == {"majority": "alice"}
