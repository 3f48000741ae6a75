"""Fuzz what an annotator submits: a payload is stored as checked or refused with a reason.

The annotations router parses the JSON body into :class:`AnnotationIn` (pydantic answers
422 on a malformed body) and then runs the pure checks of
:mod:`phenocascade.ui.validation`, which raise
:class:`~phenocascade.errors.ValidationError` (answered 422 with its message). Any other
exception would be a 500.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import pydantic
from fuzzing import fuzz, outcome
from hypothesis import example, given
from hypothesis import strategies as st

from phenocascade.domain import Box, StageKind
from phenocascade.errors import ValidationError
from phenocascade.ui.routers.annotations import AnnotationIn
from phenocascade.ui.validation import (
    IMAGE_ID_MAX_LEN,
    STUDY_MAX_LEN,
    check_annotation,
    check_box,
    check_image_id,
    check_studies,
    check_study,
    check_window,
)

CLASSES = ["RBC", "WBC", "Platelets"]
WIDTH, HEIGHT = 64, 48

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.just(10**400)
    | st.floats()
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=10,
)
coordinates = st.integers(-5, 70) | st.floats(-5, 70) | json_values
box_labels = st.sampled_from([*CLASSES, "rbc", ""]) | json_values


@st.composite
def boxes(draw: st.DrawFn) -> dict[str, Any]:
    """Draw a box as a browser might send it: right keys, fuzzed values, keys dropped."""
    box = {k: draw(coordinates) for k in ("x_min", "y_min", "x_max", "y_max")}
    box["label"] = draw(box_labels)
    for key in draw(st.lists(st.sampled_from(sorted(box)), max_size=2)):
        box.pop(key, None)
    return box


@given(box=boxes() | st.dictionaries(st.text(max_size=6), json_values, max_size=5))
# Regression: an integer too large for a float raised OverflowError (a 500).
@example(box={"x_min": 10**400, "y_min": 0, "x_max": 5, "y_max": 5, "label": "WBC"})
@fuzz(150)
def test_any_box_is_checked_or_refused_with_a_validation_error(box: dict[str, Any]) -> None:
    got = outcome(
        lambda: check_box(box, classes=CLASSES, width=WIDTH, height=HEIGHT), (ValidationError,)
    )
    if isinstance(got, Box):
        assert 0 <= got.x_min < got.x_max <= WIDTH
        assert 0 <= got.y_min < got.y_max <= HEIGHT
        assert got.label in CLASSES and got.score == 1.0


@st.composite
def payloads(draw: st.DrawFn) -> str:
    """Draw a JSON body of POST /api/annotations: the right shape with fuzzed parts."""
    body: dict[str, Any] = {
        "image_id": draw(st.text(max_size=8) | json_values),
        "tier": draw(st.sampled_from(["majority", ""]) | json_values),
        "labels": draw(st.lists(st.sampled_from([*CLASSES, "x"]), max_size=4) | json_values),
        "boxes": draw(st.lists(boxes(), max_size=3) | json_values),
    }
    for key in draw(st.lists(st.sampled_from(sorted(body)), max_size=2)):
        body.pop(key, None)
    return json.dumps(body)


@given(
    payload=payloads() | st.text(max_size=40),
    kind=st.sampled_from(StageKind),
    width=st.integers(1, 100),
    height=st.integers(1, 100),
)
@example(
    payload='{"image_id": "a", "tier": "t", "boxes": [{"x_min": 1e400}]}',
    kind=StageKind.DETECTOR,
    width=8,
    height=8,
)
@fuzz(120)
def test_any_annotation_payload_is_stored_as_checked_or_refused(
    payload: str, kind: StageKind, width: int, height: int
) -> None:
    body = outcome(lambda: AnnotationIn.model_validate_json(payload), (pydantic.ValidationError,))
    if isinstance(body, pydantic.ValidationError):
        return
    got = outcome(
        lambda: check_annotation(
            kind=kind,
            classes=CLASSES,
            width=width,
            height=height,
            labels=body.labels,
            boxes=[b.model_dump() for b in body.boxes],
        ),
        (ValidationError,),
    )
    if isinstance(got, ValidationError):
        return
    labels, checked = got
    assert labels == sorted(set(labels)) and set(labels) <= set(CLASSES)
    assert kind is StageKind.DETECTOR or not checked
    for box in checked:
        assert 0 <= box.x_min < box.x_max <= width and 0 <= box.y_min < box.y_max <= height


numbers = st.floats() | st.integers(-(2**70), 2**70)


@given(low=numbers, high=numbers, max_value=st.sampled_from([1, 255, 65535]))
# Regression: an integer too large for a float raised OverflowError.
@example(low=0, high=10**400, max_value=255)
@fuzz(100)
def test_any_display_window_is_kept_or_refused(low: float, high: float, max_value: int) -> None:
    got = outcome(lambda: check_window(low, high, max_value=max_value), (ValidationError,))
    if isinstance(got, tuple):
        assert got == (low, high)
        assert math.isfinite(low) and 0 <= low < high <= max_value


names = st.text(max_size=STUDY_MAX_LEN + 2) | st.sampled_from(
    ["default", " default", "a\x00b", "a\u200bb", "x" * (STUDY_MAX_LEN + 1), "\ud800"]
)


@given(names=st.lists(names, max_size=4))
@fuzz(100)
def test_any_study_or_image_name_is_kept_or_refused(names: list[str]) -> None:
    for name in names:
        study = outcome(functools.partial(check_study, name), (ValidationError,))
        assert study == name or isinstance(study, ValidationError)
        image_id = outcome(functools.partial(check_image_id, name), (ValidationError,))
        assert image_id == name or isinstance(image_id, ValidationError)
        if image_id == name:
            assert 1 <= len(name) <= IMAGE_ID_MAX_LEN
    studies = outcome(lambda: check_studies(names), (ValidationError,))
    if isinstance(studies, list):
        assert studies == sorted(set(names))
