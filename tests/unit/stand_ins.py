"""Trained-stage stand-ins whose raw outputs the tests give: certification without a model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from phenocascade.domain import Box, DecodedImage, StageKind, StageOutput
from phenocascade.models.calibration import Calibrator


class FixedScores:
    """A classifier or gate whose raw scores are given per image id.

    ``softmax_groups`` are the label groups a real classifier would share a softmax in.
    """

    def __init__(
        self,
        kind: StageKind,
        raw: Mapping[str, Mapping[str, float]],
        softmax_groups: Sequence[Sequence[str]] = (),
    ) -> None:
        self.kind = kind
        self.raw = raw
        self.classes = tuple(next(iter(raw.values())))
        self.softmax_groups = tuple(tuple(g) for g in softmax_groups)

    def predict(
        self, images: Sequence[DecodedImage], *, calibrated: bool = True
    ) -> list[StageOutput]:
        """Return the given scores of each image."""
        return [StageOutput(scores=dict(self.raw[img.image_id])) for img in images]

    def set_calibration(
        self, calibrators: Mapping[str, Calibrator], thresholds: Mapping[str, Mapping[str, float]]
    ) -> None:
        """Keep the calibrators in ``calibrators`` and the thresholds in ``stored``."""
        self.calibrators = dict(calibrators)
        self.stored = {label: dict(t) for label, t in thresholds.items()}


class FixedBoxes:
    """A one-class (``"x"``) detector whose raw boxes are given per image id.

    Each image's class score is its best box's, as the real detectors report it.
    """

    kind = StageKind.DETECTOR
    classes = ("x",)

    def __init__(self, boxes: Mapping[str, Sequence[Box]]) -> None:
        self.boxes = boxes

    def predict(
        self, images: Sequence[DecodedImage], *, calibrated: bool = True
    ) -> list[StageOutput]:
        """Return the given boxes of each image."""
        return [
            StageOutput(
                scores={"x": max([b.score for b in self.boxes[img.image_id]], default=1e-6)},
                boxes=tuple(self.boxes[img.image_id]),
            )
            for img in images
        ]

    def set_calibration(
        self, calibrators: Mapping[str, Calibrator], thresholds: Mapping[str, Mapping[str, float]]
    ) -> None:
        """Keep the certified thresholds in ``stored``."""
        self.stored = {label: dict(t) for label, t in thresholds.items()}
