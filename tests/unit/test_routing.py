import pytest
from hypothesis import given
from hypothesis import strategies as st

from phenocascade.domain import Box, LabelThresholds, Route, StageKind, StageOutput, route

probs = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@st.composite
def thresholds(draw: st.DrawFn) -> LabelThresholds:
    a, b = sorted((draw(probs), draw(probs)))
    return LabelThresholds(positive=b, negative=a)


@given(p=probs, t=thresholds())
def test_gate_routes_by_the_two_thresholds(p: float, t: LabelThresholds) -> None:
    r = route(StageKind.GATE, StageOutput(scores={"clear": p}), {"clear": t})
    if p >= t.positive:
        assert r is Route.PASS
    elif p <= t.negative:
        assert r is Route.SKIP
    else:
        assert r is Route.ANNOTATE


@given(p=probs, q=probs, t=thresholds())
def test_gate_is_monotone_in_the_clear_probability(p: float, q: float, t: LabelThresholds) -> None:
    order = {Route.SKIP: 0, Route.ANNOTATE: 1, Route.PASS: 2}
    lo, hi = sorted((p, q))
    r_lo = route(StageKind.GATE, StageOutput(scores={"clear": lo}), {"clear": t})
    r_hi = route(StageKind.GATE, StageOutput(scores={"clear": hi}), {"clear": t})
    assert order[r_lo] <= order[r_hi]


@given(scores=st.dictionaries(st.sampled_from(["a", "b", "c"]), probs, min_size=1), t=thresholds())
def test_classifier_passes_only_when_every_label_is_decided(
    scores: dict[str, float], t: LabelThresholds
) -> None:
    r = route(StageKind.CLASSIFIER, StageOutput(scores=scores), {k: t for k in "abc"})
    decided = all(p >= t.positive or p <= t.negative for p in scores.values())
    assert r is (Route.PASS if decided else Route.ANNOTATE)
    assert r is not Route.SKIP


def test_classifier_label_without_thresholds_is_never_confident() -> None:
    t = LabelThresholds(positive=0.9, negative=0.1)
    assert (
        route(StageKind.CLASSIFIER, StageOutput(scores={"a": 0.99, "new": 0.0}), {"a": t})
        is Route.ANNOTATE
    )


@given(score=probs, t=thresholds())
def test_detector_annotates_uncertain_boxes(score: float, t: LabelThresholds) -> None:
    box = Box(0, 0, 10, 10, "large_nucleus", score)
    r = route(StageKind.DETECTOR, StageOutput(scores={}, boxes=[box]), {"large_nucleus": t})
    assert r is (Route.PASS if score >= t.positive else Route.ANNOTATE)


def test_detector_without_boxes_passes_only_if_it_is_certified_to_find_the_class() -> None:
    t = LabelThresholds(positive=0.9, negative=0.3)
    assert route(StageKind.DETECTOR, StageOutput(scores={"x": 1e-6}), {"x": t}) is Route.PASS
    # nothing certifies that the detector finds x, so "no box" is unknown
    unsure = LabelThresholds(positive=0.9, negative=0.3, finds_all=False)
    assert route(StageKind.DETECTOR, StageOutput(scores={"x": 1e-6}), {"x": unsure}) is (
        Route.ANNOTATE
    )
    # a confident box decides the image all the same
    box = Box(0, 0, 10, 10, "x", 0.95)
    output = StageOutput(scores={"x": 0.95}, boxes=[box])
    assert route(StageKind.DETECTOR, output, {"x": unsure}) is Route.PASS
    # a class without thresholds is never confident
    assert route(StageKind.DETECTOR, StageOutput(scores={"y": 1e-6}), {"x": t}) is Route.ANNOTATE


def test_stored_thresholds_without_finds_all_find_all() -> None:
    assert LabelThresholds.from_record({"positive": 0.9, "negative": 0.2}).finds_all
    record = {"positive": 0.9, "negative": 0.2, "finds_all": False}
    assert not LabelThresholds.from_record(record).finds_all


def test_gate_without_score_is_uncertain() -> None:
    t = LabelThresholds(positive=0.9, negative=0.1)
    assert route(StageKind.GATE, StageOutput(scores={}), {"clear": t}) is Route.ANNOTATE


def test_thresholds_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="negative <= positive"):
        LabelThresholds(positive=0.2, negative=0.8)


@given(
    kind=st.sampled_from(list(StageKind)),
    scores=st.dictionaries(st.sampled_from(["clear", "a", "x"]), probs),
    box_scores=st.lists(probs, max_size=3),
    t=thresholds(),
)
def test_a_novel_image_goes_to_a_person_whatever_its_scores(
    kind: StageKind, scores: dict[str, float], box_scores: list[float], t: LabelThresholds
) -> None:
    boxes = [Box(0, 0, 10, 10, "x", s) for s in box_scores]
    table = {label: t for label in ("clear", "a", "x")}
    novel = StageOutput(scores=scores, boxes=boxes, novel=True)
    assert route(kind, novel, table) is Route.ANNOTATE


def test_a_confidently_unusable_novel_image_is_not_skipped() -> None:
    # The EM slices of issue 10: the gate was sure they were unusable and discarded them.
    t = {"clear": LabelThresholds(positive=0.9, negative=0.4)}
    unclear = StageOutput(scores={"clear": 0.01})
    assert route(StageKind.GATE, unclear, t) is Route.SKIP
    assert route(StageKind.GATE, StageOutput(scores={"clear": 0.01}, novel=True), t) is (
        Route.ANNOTATE
    )
