"""Core value types of the cascade and the pure routing function.

Box convention everywhere: ``[x_min, y_min, x_max, y_max]`` in pixels of the original
image, ``x_max``/``y_max`` exclusive (half-open), origin at the top-left corner.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

# The model version a tier records while it has no model yet (cold start): every image it
# receives goes to annotation.
NO_MODEL_VERSION = "none"


class Route(enum.StrEnum):
    """Where a tier sends an image."""

    PASS = "PASS"
    SKIP = "SKIP"
    ANNOTATE = "ANNOTATE"


class StageKind(enum.StrEnum):
    """What a stage predicts, which decides how its scores are routed."""

    GATE = "gate"
    CLASSIFIER = "classifier"
    DETECTOR = "detector"


class OutputStatus(enum.StrEnum):
    """Terminal status of one submitted image."""

    ANALYZED = "analyzed"
    UNUSABLE = "unusable"
    AWAITING_ANNOTATION = "awaiting_annotation"


@dataclass(frozen=True, slots=True)
class Box:
    """One detected or annotated object.

    Attributes
    ----------
    x_min, y_min, x_max, y_max : float
        Pixel coordinates, ``x_max``/``y_max`` exclusive.
    label : str
        Class name, one of the stage's classes.
    score : float
        Calibrated confidence in ``[0, 1]``; 1.0 for human annotations.
    """

    x_min: float
    y_min: float
    x_max: float
    y_max: float
    label: str
    score: float = 1.0

    def as_list(self) -> list[float]:
        """Return ``[x_min, y_min, x_max, y_max]``."""
        return [self.x_min, self.y_min, self.x_max, self.y_max]


def box_iou(a: npt.ArrayLike, b: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """IoU matrix between ``(n, 4)`` and ``(m, 4)`` boxes ``[x_min, y_min, x_max, y_max]``."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


@dataclass(frozen=True, slots=True)
class ImageMeta:
    """Acquisition metadata carried with every submitted image."""

    study: str = ""
    specimen: str = ""
    modality: str = ""
    stain: str = ""
    scanner: str = ""
    acquired_at: str = ""


@dataclass(frozen=True, slots=True)
class DecodedImage:
    """A decoded image ready for a stage.

    Attributes
    ----------
    image_id : str
        Stable identifier of the submission.
    pixels : numpy.ndarray
        Array of shape ``(H, W, C)`` with ``C`` in ``{1, 3}`` and dtype ``uint8`` or
        ``uint16``; never rescaled, so a stage decides its own normalisation.
    """

    image_id: str
    pixels: npt.NDArray[np.uint8] | npt.NDArray[np.uint16]

    @property
    def height(self) -> int:
        """Image height in pixels."""
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        """Image width in pixels."""
        return int(self.pixels.shape[1])


@dataclass(frozen=True, slots=True)
class StageOutput:
    """What a stage returns for one image.

    Attributes
    ----------
    scores : Mapping[str, float]
        Calibrated probability per label, each in ``[0, 1]``. A gate scores its
        positive label (e.g. ``"clear"``); a detector scores, per class, its best box.
    boxes : Sequence[Box]
        Boxes kept at the stage's keep threshold (detectors only, else empty).
    novel : bool
        The image lies beyond what the stage was calibrated on (its novelty detector's
        false-alarm threshold): its scores carry no guarantee, so :func:`route` sends it
        to a person.
    """

    scores: Mapping[str, float]
    boxes: Sequence[Box] = field(default_factory=tuple)
    novel: bool = False


@dataclass(frozen=True, slots=True)
class LabelThresholds:
    """Two thresholds on one calibrated probability.

    ``p >= positive`` is a confident yes, ``p <= negative`` a confident no, anything
    between is uncertain. For detectors, ``negative`` is the keep threshold of boxes, and
    an image without a confident box of the class is confidently free of it when its
    image-level score (the best box, kept or dropped) is at most ``absent``: a threshold
    certified on images (:mod:`phenocascade.models.certify`), below ``positive``; such an
    image shows no box of the class, even one above ``negative``.
    Records without ``absent`` (older artifacts) fall back to ``finds_all``: ``True``
    reads "no kept box" as absent, ``False`` never decides absence. ``one_of`` marks a
    classifier label of a group of which every image holds exactly one label (a softmax
    group): such a group is never decided to hold none (:func:`pending_labels`).
    """

    positive: float
    negative: float
    finds_all: bool = True
    absent: float | None = None
    one_of: bool = False

    @classmethod
    def from_record(cls, record: Mapping[str, float]) -> LabelThresholds:
        """Build from a stored thresholds record (``finds_all`` defaults to ``True``)."""
        absent = record.get("absent")
        return cls(
            positive=record["positive"],
            negative=record["negative"],
            finds_all=bool(record.get("finds_all", True)),
            absent=None if absent is None else float(absent),
            one_of=bool(record.get("one_of", False)),
        )

    def __post_init__(self) -> None:
        if not 0.0 <= self.negative <= self.positive <= 1.0:
            raise ValueError(
                f"thresholds must satisfy 0 <= negative <= positive <= 1, got "
                f"negative={self.negative}, positive={self.positive}"
            )
        if self.absent is not None and not 0.0 <= self.absent < self.positive:
            raise ValueError(
                f"the absence threshold must satisfy 0 <= absent < positive, got "
                f"absent={self.absent}, positive={self.positive}"
            )

    def decides_absent(self, score: float) -> bool:
        """Whether a detector class scoring ``score`` at best in an image is decided absent.

        Only meaningful when the image has no confident box of the class.
        """
        if self.absent is None:
            return self.finds_all
        return score <= self.absent


def route(
    kind: StageKind,
    output: StageOutput,
    thresholds: Mapping[str, LabelThresholds],
    gate_label: str = "clear",
    groups: Mapping[str, Sequence[str]] | None = None,
) -> Route:
    """Decide where one image goes from its calibrated scores.

    Parameters
    ----------
    kind : StageKind
        The stage kind.
    output : StageOutput
        The stage's output for the image.
    thresholds : Mapping[str, LabelThresholds]
        Per-label thresholds. A label without an entry is never confident.
    gate_label : str, default "clear"
        The label whose presence means "usable" (gates only).
    groups : Mapping[str, Sequence[str]] or None, default None
        For classifiers, each label's group of exclusive labels (see
        :func:`pending_labels`).

    Returns
    -------
    Route
        A novel image (``output.novel``: unlike the calibration data, so no certificate
        covers its scores) is ``ANNOTATE`` for every kind, never ``PASS`` or ``SKIP``.
        Otherwise, gate: ``PASS`` if the gate label is confidently present, ``SKIP`` if
        confidently absent, else ``ANNOTATE``. Classifier: ``PASS`` if every label is
        decided (:func:`pending_labels`: confidently present or absent, or absent because
        an exclusive label is confidently present), else ``ANNOTATE``. Detector:
        ``ANNOTATE`` if any kept box scores between its class's keep and confident
        thresholds, or if a class without a confident box is not certified absent from
        the image (:meth:`LabelThresholds.decides_absent`), else ``PASS``. Tiers 2 and 3
        never ``SKIP``.
    """
    if output.novel:
        return Route.ANNOTATE
    if kind is StageKind.GATE:
        p = output.scores.get(gate_label)
        t = thresholds.get(gate_label)
        if p is None or t is None:
            return Route.ANNOTATE
        if p >= t.positive:
            return Route.PASS
        if p <= t.negative:
            return Route.SKIP
        return Route.ANNOTATE
    pending = pending_labels(kind, output, thresholds, gate_label, groups)
    return Route.ANNOTATE if pending else Route.PASS


def exclusive_groups(
    labels: Sequence[str], declared: Mapping[str, Sequence[str]] | None = None
) -> dict[str, tuple[str, ...]]:
    """Return, for each label, the labels it is decided together with (itself included).

    Parameters
    ----------
    labels : Sequence[str]
        A tier's labels.
    declared : Mapping[str, Sequence[str]] or None, default None
        Named groups of labels that exclude each other (a tier's ``groups:``, written by
        ``phenocascade plan`` from the dataset's groups).

    Returns
    -------
    dict of str to tuple of str
        A declared group's labels share one entry. An undeclared label named ``G:V`` is
        grouped with the other ``G:...`` labels (the CSV importer's column labels and the
        bundled majority's); any other label stands alone.
    """
    out: dict[str, tuple[str, ...]] = {}
    for members in (declared or {}).values():
        kept = tuple(m for m in members if m in labels)
        for label in kept:
            out[label] = kept
    by_prefix: dict[tuple[str, bool], list[str]] = {}
    for label in labels:
        if label not in out:
            prefix, sep, _ = label.partition(":")
            by_prefix.setdefault((prefix, True) if sep else (label, False), []).append(label)
    for members in by_prefix.values():
        for label in members:
            out[label] = tuple(members)
    return out


def pending_labels(
    kind: StageKind,
    output: StageOutput,
    thresholds: Mapping[str, LabelThresholds],
    gate_label: str = "clear",
    groups: Mapping[str, Sequence[str]] | None = None,
) -> tuple[str, ...]:
    """Return the labels of one image whose decision is not final: an expert is asked them.

    Parameters
    ----------
    kind, output, thresholds, gate_label
        As for :func:`route`.
    groups : Mapping[str, Sequence[str]] or None, default None
        For classifiers, each label's group of labels that exclude each other
        (:func:`exclusive_groups`). ``None``: every label stands alone.

    Returns
    -------
    tuple of str
        Empty exactly when :func:`route` says ``PASS`` or ``SKIP`` (every label decided).
        A novel image has every label pending. A gate's only label is pending when it
        routes to ``ANNOTATE``. A classifier label is pending when its score lies between
        its thresholds, unless another label of its group is confidently present (then it
        is absent: the labels exclude each other); every label of a group with two
        confidently present labels is pending, and so is every label of a group whose
        labels are all ``one_of`` (exactly one per image) and all confidently absent:
        "none of them" contradicts the group. A detector class is pending when one
        of its kept boxes scores below its confident threshold, or when it has no
        confident box and its image-level score is not certified absent
        (:meth:`LabelThresholds.decides_absent`). The order is that of ``output.scores``,
        then of the boxes.
    """
    labels = list(dict.fromkeys([*output.scores, *(b.label for b in output.boxes)]))
    if output.novel:
        return tuple(labels)
    if kind is StageKind.GATE:
        return (
            ()
            if route(kind, output, thresholds, gate_label) is not Route.ANNOTATE
            else (gate_label,)
        )
    uncertain: set[str] = set()
    if kind is StageKind.CLASSIFIER:
        present = {
            label
            for label, p in output.scores.items()
            if (t := thresholds.get(label)) is not None and p >= t.positive
        }
        for label, p in output.scores.items():
            t = thresholds.get(label)
            said = [o for o in (groups or {}).get(label, (label,)) if o in present]
            unsure = t is None or t.negative < p < t.positive
            # Two exclusive labels confidently present contradict each other: ask.
            if len(said) > 1 or (unsure and not said):
                uncertain.add(label)
        for members in {tuple((groups or {}).get(label, (label,))) for label in output.scores}:
            marked = [thresholds.get(m) for m in members]
            none_of_one = all(t is not None and t.one_of for t in marked) and not (
                set(members) & (present | uncertain)
            )
            if len(members) > 1 and none_of_one:
                uncertain.update(members)
    else:
        for box in output.boxes:
            t = thresholds.get(box.label)
            if t is None or box.score < t.positive:
                uncertain.add(box.label)
        for label, p in output.scores.items():
            t = thresholds.get(label)
            if t is None or (p < t.positive and not t.decides_absent(p)):
                uncertain.add(label)
    return tuple(label for label in labels if label in uncertain)


@dataclass(frozen=True, slots=True)
class Sample:
    """One labelled training or evaluation example.

    Attributes
    ----------
    image_id : str
        Identifier, unique within its dataset.
    path : pathlib.Path or None
        Where the pixels are read from; ``None`` when ``pixels`` is given.
    labels : frozenset of str
        Image-level labels that are present (multi-label); for a gate ``{"clear"}`` or empty.
    boxes : tuple of Box
        Object boxes in pixels (detectors).
    group : str
        Source image the sample derives from; degraded copies share their source's group,
        so that a split never separates them.
    degradation : str
        Name of the synthetic degradation applied at load time, ``""`` for none.
    seed : int
        Seed of that degradation.
    mask : pathlib.Path or None
        Instance label image of the objects (one id per object, 0 = background), for
        backends that learn object outlines; ``None`` when only boxes are known.
    page : int
        Page of a multi-page TIFF at ``path`` that holds this sample's plane, from 0
        (z-slices or time points of one field; the importers name such samples
        ``<stem>@p<page>``); 0 for every single-plane image.
    """

    image_id: str
    path: Path | None
    labels: frozenset[str] = frozenset()
    boxes: tuple[Box, ...] = ()
    group: str = ""
    degradation: str = ""
    seed: int = 0
    mask: Path | None = None
    page: int = 0
