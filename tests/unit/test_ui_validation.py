"""Pure checks of the annotation app: submissions, display windows, sessions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from phenocascade.config import load_topology
from phenocascade.domain import Box, StageKind
from phenocascade.errors import ValidationError
from phenocascade.ui import images as ui_images
from phenocascade.ui.images import window
from phenocascade.ui.routers.session import local_target
from phenocascade.ui.security import (
    SessionCodec,
    SessionData,
    check_role,
    check_username,
    csrf_matches,
    new_session,
)
from phenocascade.ui.validation import check_annotation, check_box, check_window, task_kind

CLASSES = ["RBC", "WBC", "Platelets"]


def box(x0: float, y0: float, x1: float, y1: float, label: str = "WBC") -> dict[str, object]:
    return {"x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1, "label": label}


def test_a_box_inside_the_image_becomes_a_human_box() -> None:
    assert check_box(box(0, 0, 640, 480), classes=CLASSES, width=640, height=480) == Box(
        0.0, 0.0, 640.0, 480.0, "WBC", 1.0
    )


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (box(10, 10, 10, 20), "x_min < x_max"),
        (box(30, 10, 20, 20), "x_min < x_max"),
        (box(10, 20, 20, 20), "y_min < y_max"),
        (box(-1, 0, 10, 10), "outside"),
        (box(0, 0, 641, 10), "outside"),
        (box(0, 0, 10, 481), "outside"),
        (box(0, 0, 10, 10, label="Neutrophil"), "not one of"),
        (box(math.nan, 0, 10, 10), "finite"),
        (box(0, 0, math.inf, 10), "finite"),
        ({"x_min": 0, "y_min": 0, "x_max": 5, "label": "WBC"}, "y_max"),
        ({"x_min": "0", "y_min": 0, "x_max": 5, "y_max": 5, "label": "WBC"}, "x_min"),
        ({"x_min": True, "y_min": 0, "x_max": 5, "y_max": 5, "label": "WBC"}, "x_min"),
    ],
)
def test_an_invalid_box_is_refused_with_the_reason(bad: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        check_box(bad, classes=CLASSES, width=640, height=480)


def test_gate_annotation_is_clear_or_nothing() -> None:
    kwargs = {"kind": StageKind.GATE, "classes": ["clear"], "width": 64, "height": 64, "boxes": []}
    assert check_annotation(labels=["clear"], **kwargs) == (["clear"], [])  # type: ignore[arg-type]
    assert check_annotation(labels=[], **kwargs) == ([], [])  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="not in this task's classes"):
        check_annotation(labels=["usable"], **kwargs)  # type: ignore[arg-type]


def test_image_level_annotations_take_no_boxes() -> None:
    for kind in (StageKind.GATE, StageKind.CLASSIFIER):
        with pytest.raises(ValidationError, match="image-level labels only"):
            check_annotation(
                kind=kind, classes=CLASSES, width=64, height=64, labels=[], boxes=[box(0, 0, 5, 5)]
            )


def test_classifier_labels_must_be_known_and_distinct() -> None:
    kwargs = {"kind": StageKind.CLASSIFIER, "classes": CLASSES, "width": 64, "height": 64}
    assert check_annotation(labels=["WBC", "RBC"], boxes=[], **kwargs) == (["RBC", "WBC"], [])  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="repeat"):
        check_annotation(labels=["WBC", "WBC"], boxes=[], **kwargs)  # type: ignore[arg-type]


def test_detector_labels_include_every_box_label_and_one_bad_box_refuses_all() -> None:
    labels, boxes = check_annotation(
        kind=StageKind.DETECTOR,
        classes=CLASSES,
        width=100,
        height=100,
        labels=[],
        boxes=[box(1, 2, 30, 40, "WBC"), box(50, 50, 60, 70, "Platelets")],
    )
    assert labels == ["Platelets", "WBC"]
    assert [b.as_list() for b in boxes] == [[1, 2, 30, 40], [50, 50, 60, 70]]
    with pytest.raises(ValidationError, match="outside"):
        check_annotation(
            kind=StageKind.DETECTOR,
            classes=CLASSES,
            width=100,
            height=100,
            labels=[],
            boxes=[box(1, 2, 30, 40), box(90, 90, 101, 95)],
        )


def test_task_kind_follows_the_topology_and_the_routing_contract() -> None:
    topology = load_topology()
    some_box = [{"x_min": 0, "y_min": 0, "x_max": 1, "y_max": 1, "label": "x", "score": 0.5}]
    assert task_kind(topology.tier("quality"), []) is StageKind.GATE
    assert task_kind(topology.tier("majority"), []) is StageKind.CLASSIFIER
    assert task_kind(topology.tier("minority"), some_box) is StageKind.DETECTOR


def test_display_window_bounds() -> None:
    assert check_window(100, 3000, max_value=65535) == (100, 3000)
    for low, high in [(10, 10), (20, 10), (-1, 10), (0, 256), (math.nan, 5)]:
        with pytest.raises(ValidationError, match="display window"):
            check_window(low, high, max_value=255)


def test_window_maps_low_to_black_and_high_to_white_keeping_16_bit_detail() -> None:
    pixels = np.array([[[100], [1000], [1550], [3000], [60000]]], dtype=np.uint16)
    out = window(pixels, 1000, 2100)
    assert out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_window_equals_the_linear_map_on_every_value_without_a_float_copy() -> None:
    rng = np.random.default_rng(0)
    for dtype, top in ((np.uint8, 255), (np.uint16, 65535)):
        pixels = rng.integers(0, top + 1, (64, 48, 3)).astype(dtype)
        low, high = top * 0.1, top * 0.7
        expected = np.clip(
            np.rint((pixels.astype(np.float64) - low) * (255.0 / (high - low))), 0, 255
        )
        assert np.array_equal(window(pixels, low, high), expected.astype(np.uint8))


def test_the_pixel_cache_keeps_within_its_bytes_and_never_keeps_a_huge_image(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decoded: list[str] = []

    def fake_pixels(settings: object, task: dict[str, str]) -> np.ndarray:
        decoded.append(task["image_id"])
        side = 200 if task["image_id"] == "huge" else 10
        return np.zeros((side, side, 3), np.uint8)  # 300 bytes, or 120 000

    monkeypatch.setattr(ui_images, "task_pixels", fake_pixels)
    cache = ui_images.PixelCache(settings=None, size=8, max_bytes=1000)  # type: ignore[arg-type]
    for name in ("a", "b", "c", "a", "d"):
        cache.get({"tier": "t", "image_id": name})
    # 3 images of 300 bytes fit in 1000: "b" was the least recently used when "d" came.
    assert decoded == ["a", "b", "c", "d"]
    cache.get({"tier": "t", "image_id": "b"})
    assert decoded[-1] == "b"
    cache.get({"tier": "t", "image_id": "huge"})
    cache.get({"tier": "t", "image_id": "huge"})
    assert decoded.count("huge") == 2


def test_session_cookie_is_refused_when_tampered_or_signed_with_another_secret() -> None:
    codec = SessionCodec("s" * 48)
    value = codec.dumps(SessionData(csrf="tok", username="ann", epoch="e1"))
    assert codec.loads(value) == SessionData(csrf="tok", username="ann", epoch="e1")
    assert codec.loads(value[:-2] + ("A" if value[-2] != "A" else "B") + value[-1]) is None
    assert SessionCodec("t" * 48).loads(value) is None
    assert codec.loads(None) is None
    assert SessionCodec("s" * 48, max_age_s=-1).loads(value) is None


def test_csrf_token_must_match_the_session() -> None:
    session = new_session("ann")
    assert csrf_matches(session, session.csrf)
    assert not csrf_matches(session, new_session("ann").csrf)
    assert not csrf_matches(session, None)
    assert not csrf_matches(None, session.csrf)


def test_user_names_roles_and_login_targets() -> None:
    assert check_username("ann.lee_2") == "ann.lee_2"
    for bad in ["", "ann lee", "a/b", "x" * 65]:
        with pytest.raises(ValidationError):
            check_username(bad)
    assert check_role("reviewer").value == "reviewer"
    with pytest.raises(ValidationError, match="unknown role"):
        check_role("root")
    assert local_target("/tasks/quality/img?tier=quality") == "/tasks/quality/img?tier=quality"
    assert local_target("//evil.example/x") == "/queue"
    assert local_target("https://evil.example/") == "/queue"
