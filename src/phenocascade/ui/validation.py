"""Pure checks of what an annotator submits; nothing here touches Kafka, Cassandra or HTTP.

Every check raises :class:`~phenocascade.errors.ValidationError` with a message that says
what was wrong and with which input, before anything is stored.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from phenocascade.config import TierSpec
from phenocascade.domain import Box, StageKind
from phenocascade.errors import ValidationError

STUDY_MAX_LEN = 200
STUDIES_PER_REQUEST = 1000
IMAGE_ID_MAX_LEN = 1024


def _finite(value: object) -> float | None:
    """Return ``value`` as a finite float, or ``None`` if it is no finite number (or a bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        return None
    return number if math.isfinite(number) else None


def task_kind(tier: TierSpec, predicted_boxes: Sequence[Mapping[str, Any]]) -> StageKind:
    """Return how a task of ``tier`` is annotated.

    A gate tier is a gate. A branch tier is a detector when its request carries boxes:
    :func:`~phenocascade.domain.route` sends a detector's image to annotation only because
    of an uncertain kept box, and a classifier never returns boxes.

    Parameters
    ----------
    tier : TierSpec
        The task's tier in the topology.
    predicted_boxes : Sequence of Mapping
        The boxes of the ``AnnotationRequest``.
    """
    if tier.role == "gate":
        return StageKind.GATE
    return StageKind.DETECTOR if predicted_boxes else StageKind.CLASSIFIER


def check_box(box: Mapping[str, Any], *, classes: Sequence[str], width: int, height: int) -> Box:
    """Return the domain :class:`~phenocascade.domain.Box` of one submitted box.

    Parameters
    ----------
    box : Mapping
        ``{"x_min", "y_min", "x_max", "y_max", "label"}`` in pixels, ``x_max``/``y_max``
        exclusive.
    classes : Sequence of str
        Labels the box may carry.
    width, height : int
        Image size in pixels; the box must lie within ``[0, width] x [0, height]``.

    Returns
    -------
    Box
        With ``score`` 1.0 (a human annotation).

    Raises
    ------
    ValidationError
        If a coordinate is missing or not finite, the box is empty or outside the image, or
        the label is not one of ``classes``.
    """
    coords: dict[str, float] = {}
    for name in ("x_min", "y_min", "x_max", "y_max"):
        value = box.get(name)
        number = _finite(value)
        if number is None:
            raise ValidationError(f"box {dict(box)}: {name} must be a finite number, got {value!r}")
        coords[name] = number
    if not coords["x_min"] < coords["x_max"] or not coords["y_min"] < coords["y_max"]:
        raise ValidationError(
            f"box {dict(box)}: needs x_min < x_max and y_min < y_max "
            "([x_min, y_min, x_max, y_max] in pixels)"
        )
    if (
        coords["x_min"] < 0
        or coords["y_min"] < 0
        or coords["x_max"] > width
        or coords["y_max"] > height
    ):
        raise ValidationError(
            f"box {dict(box)}: lies outside the {width}x{height} image "
            f"(allowed: 0 <= x <= {width}, 0 <= y <= {height})"
        )
    label = box.get("label")
    if label not in classes:
        raise ValidationError(f"box {dict(box)}: label {label!r} is not one of {list(classes)}")
    return Box(coords["x_min"], coords["y_min"], coords["x_max"], coords["y_max"], str(label), 1.0)


def check_annotation(
    *,
    kind: StageKind,
    classes: Sequence[str],
    width: int,
    height: int,
    labels: Sequence[str],
    boxes: Sequence[Mapping[str, Any]],
) -> tuple[list[str], list[Box]]:
    """Validate one annotation of a task and return what will be stored.

    Parameters
    ----------
    kind : StageKind
        How the task is annotated (:func:`task_kind`).
    classes : Sequence of str
        The task's class list (a gate's is its gate label, e.g. ``["clear"]``).
    width, height : int
        Image size in pixels.
    labels : Sequence of str
        Image-level labels present. Gate: ``["clear"]`` (usable) or ``[]`` (unclear).
    boxes : Sequence of Mapping
        Detector boxes (see :func:`check_box`); must be empty for gates and classifiers.

    Returns
    -------
    tuple of (list of str, list of Box)
        Sorted distinct labels (for a detector: those given plus every box label) and the
        boxes.

    Raises
    ------
    ValidationError
        If a label is unknown or repeated, a box is invalid, or a gate or classifier
        annotation carries boxes.
    """
    unknown = [label for label in labels if label not in classes]
    if unknown:
        raise ValidationError(f"labels {unknown} are not in this task's classes {list(classes)}")
    if len(set(labels)) != len(labels):
        raise ValidationError(f"labels {list(labels)} repeat a label")
    if kind is not StageKind.DETECTOR and boxes:
        raise ValidationError(
            f"a {kind.value} annotation takes image-level labels only, got {len(boxes)} boxes"
        )
    checked = [check_box(b, classes=classes, width=width, height=height) for b in boxes]
    present = set(labels) | {b.label for b in checked}
    return sorted(present), checked


def check_window(low: float, high: float, *, max_value: int) -> tuple[float, float]:
    """Return a display window ``(low, high)`` in raw intensity units.

    Raises
    ------
    ValidationError
        Unless ``0 <= low < high <= max_value``.
    """
    if _finite(low) is None or _finite(high) is None or not 0 <= low < high <= max_value:
        raise ValidationError(
            f"display window low={low}, high={high} is invalid: need 0 <= low < high <= {max_value}"
        )
    return low, high


def check_study(study: str) -> str:
    """Return ``study`` if it can name a study in a grant.

    A study name is 1 to 200 characters with no control character and no space at either
    end (the names images are submitted with, e.g. ``"default"``).

    Raises
    ------
    ValidationError
        Otherwise, saying what is allowed.
    """
    if (
        not 1 <= len(study) <= STUDY_MAX_LEN
        or study != study.strip()
        or any(unicodedata.category(c) in ("Cc", "Cf") for c in study)
    ):
        raise ValidationError(
            f"study name {study!r} is invalid: use 1 to {STUDY_MAX_LEN} characters, no control "
            "characters and no spaces at either end"
        )
    return study


def check_studies(studies: Iterable[str]) -> list[str]:
    """Return the distinct study names of ``studies``, sorted, each checked by :func:`check_study`.

    Raises
    ------
    ValidationError
        If a name is invalid, or there are more than 1000 names.
    """
    names = sorted(set(studies))
    if len(names) > STUDIES_PER_REQUEST:
        raise ValidationError(
            f"{len(names)} studies in one request; give at most {STUDIES_PER_REQUEST}"
        )
    return [check_study(name) for name in names]


def check_image_id(image_id: str) -> str:
    """Return ``image_id`` if it can name an image: 1 to 1024 characters, none a control one.

    Raises
    ------
    ValidationError
        Otherwise.
    """
    if not 1 <= len(image_id) <= IMAGE_ID_MAX_LEN or any(
        unicodedata.category(c) == "Cc" for c in image_id
    ):
        raise ValidationError(
            f"image id {image_id[:80]!r} is invalid: use 1 to {IMAGE_ID_MAX_LEN} characters and "
            "no control characters"
        )
    return image_id
