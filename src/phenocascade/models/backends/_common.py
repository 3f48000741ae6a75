"""What every backend shares: calibration state, the Stage attributes and the artifact format.

Not a registered backend itself: :class:`CalibratedStage` is the base of the image
classifiers and :class:`CalibratedDetector` that of the box detectors. Both keep the
learned calibration (``calibrators_``, ``thresholds_``, ``novelty_``) and write it with the
weights, so every artifact has the same ``weights.pt`` + ``metadata.json`` (+
``novelty.npz``) layout.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from phenocascade.domain import Box, DecodedImage, LabelThresholds, StageKind, StageOutput
from phenocascade.models import artifact
from phenocascade.models.base import ArtifactMeta
from phenocascade.models.calibration import (
    SCORE_CLIP,
    Calibrator,
    Temperature,
    calibrator_from_dict,
    logit,
)
from phenocascade.models.novelty import StageNovelty
from phenocascade.models.preprocess import IMAGENET_MEAN, IMAGENET_STD
from phenocascade.models.thresholds import fallback_record


class CalibratedStage(ABC):
    """Calibration state, Stage attributes and artifact persistence of a backend.

    A subclass sets ``kind`` and ``model_name``, implements :meth:`get_config` and
    :meth:`_artifact_network`, and overrides ``normalization`` when its network does not
    take ImageNet-normalised input.

    Attributes
    ----------
    normalization : tuple of (mean, std)
        Per-channel mean and standard deviation the network applies after scaling pixels
        to ``[0, 1]``; stored in the artifact's metadata.
    classes_ : list of str
        Output labels in order (set by ``fit`` or ``load``).
    calibrators_ : dict
        Calibrator per label (:mod:`phenocascade.models.calibration`), a map from the raw
        logit to the calibrated probability.
    thresholds_ : dict
        Threshold record per label (see :meth:`ThresholdRecord.as_dict
        <phenocascade.models.thresholds.ThresholdRecord.as_dict>`).
    novelty_ : StageNovelty or None
        Shift detector fitted on the validation images, saved as ``novelty.npz``; ``None``
        until :meth:`set_novelty` (a loaded artifact's is read by
        :func:`~phenocascade.models.base.load_stage`).
    """

    kind: ClassVar[StageKind]
    model_name: ClassVar[str]
    normalization: ClassVar[tuple[tuple[float, ...], tuple[float, ...]]] = (
        IMAGENET_MEAN,
        IMAGENET_STD,
    )

    classes_: list[str]
    calibrators_: dict[str, Calibrator]
    thresholds_: dict[str, dict[str, float]]
    novelty_: StageNovelty | None = None
    version_: str
    meta_: ArtifactMeta

    @abstractmethod
    def get_config(self) -> dict[str, Any]:
        """Return the constructor arguments (stored in the artifact)."""

    @abstractmethod
    def _artifact_network(self) -> tuple[torch.nn.Module, int]:
        """Return the network whose state dict is saved, and the input size to record."""

    # -- Stage attributes ----------------------------------------------------------------
    @property
    def classes(self) -> tuple[str, ...]:
        """Output labels (object classes for detectors), in order (known after fit or load)."""
        return tuple(self.classes_)

    @property
    def version(self) -> str:
        """Artifact version; ``""`` until saved or loaded."""
        return getattr(self, "version_", "")

    @property
    def thresholds(self) -> dict[str, LabelThresholds]:
        """Routing thresholds per label.

        For detectors, ``negative`` is the keep threshold (boxes at or below it are
        dropped) and ``positive`` the confident one.
        """
        return {label: LabelThresholds.from_record(t) for label, t in self.thresholds_.items()}

    # -- calibration ---------------------------------------------------------------------
    def _neutral_calibration(self) -> None:
        """Temperature 1.0 and fallback thresholds (certify nothing) for every class."""
        self.calibrators_ = {label: Temperature(1.0) for label in self.classes_}
        fallback = fallback_record(0.99, 0.1).as_dict()
        self.thresholds_ = {label: dict(fallback) for label in self.classes_}
        self.novelty_ = None

    def set_calibration(
        self,
        calibrators: Mapping[str, Calibrator],
        thresholds: Mapping[str, Mapping[str, float]],
    ) -> None:
        """Store fitted calibrators and certified thresholds (see :mod:`..certify`)."""
        self.calibrators_ = {label: calibrators[label] for label in self.classes_}
        self.thresholds_ = {label: dict(thresholds[label]) for label in self.classes_}

    def set_novelty(self, novelty: StageNovelty) -> None:
        """Store the shift detector fitted on the validation images (see :mod:`..certify`)."""
        self.novelty_ = novelty

    # -- persistence -------------------------------------------------------------------------
    def save(
        self,
        folder: Path,
        *,
        tier: str = "",
        metrics: Mapping[str, Any] | None = None,
        data_fingerprint: str = "",
        parent_version: str = "",
    ) -> ArtifactMeta:
        """Write the weights, the metadata and the novelty state; the version is ``folder.name``.

        ``weights.pt`` holds the network's state dict (a composite's inner network);
        ``novelty.npz`` the shift detector, when one was fitted, summarised in the
        metadata's ``calibration["novelty"]``. The calibrators are JSON records in the
        metadata's ``calibration["calibrators"]`` (:func:`calibrator_from_dict`).
        """
        network, input_size = self._artifact_network()
        weights_sha256 = artifact.save_weights(folder, network.state_dict())
        calibration: dict[str, Any] = {
            "calibrators": {label: c.as_dict() for label, c in self.calibrators_.items()}
        }
        if self.novelty_ is not None:
            calibration["novelty"] = self.novelty_.save(folder)
        mean, std = self.normalization
        meta = ArtifactMeta(
            backend=self.model_name,
            tier=tier,
            version=folder.name,
            kind=self.kind.value,
            classes=list(self.classes_),
            input_size=input_size,
            normalization={"mean": list(mean), "std": list(std)},
            calibration=calibration,
            thresholds={k: dict(v) for k, v in self.thresholds_.items()},
            metrics=dict(metrics or {}),
            data_fingerprint=data_fingerprint,
            code_version=artifact.code_version(),
            created_at=artifact.utc_now(),
            parent_version=parent_version,
            config=self.get_config(),
            weights_sha256=weights_sha256,
        )
        meta.write(folder)
        self.version_ = folder.name
        self.meta_ = meta
        return meta

    def _adopt_meta(self, meta: ArtifactMeta) -> None:
        """Take classes, calibration, thresholds and version from a loaded artifact.

        Artifacts from before the calibrators were chosen per label hold a temperature per
        label (``calibration["temperature"]``) instead.
        """
        self.classes_ = list(meta.classes)
        records = meta.calibration.get("calibrators")
        if records is None:
            temperatures = meta.calibration.get("temperature", {})
            records = {
                k: {"method": "temperature", "temperature": t} for k, t in temperatures.items()
            }
        self.calibrators_ = {label: calibrator_from_dict(r) for label, r in records.items()}
        self.thresholds_ = {k: dict(v) for k, v in meta.thresholds.items()}
        self.version_ = meta.version
        self.meta_ = meta


class CalibratedDetector(CalibratedStage):
    """A :class:`CalibratedStage` whose outputs are boxes with a calibrated score each."""

    def calibrated_score(self, label: str, raw_score: float) -> float:
        """Map a raw box score of ``label`` through its calibrator; in ``[1e-6, 1 - 1e-6]``."""
        p = float(self.calibrators_[label](logit(raw_score)))
        return min(max(p, SCORE_CLIP), 1.0 - SCORE_CLIP)

    def _box_score(self, label: str, raw_score: float, calibrated: bool) -> tuple[float, bool]:
        """Score to report for a raw box of ``label``, and whether the box is kept.

        ``calibrated=True`` maps the score through :meth:`calibrated_score` and keeps the
        box only above the class's keep threshold (``negative``); ``False`` keeps every
        box, its raw score clipped to ``[1e-6, 1 - 1e-6]``.
        """
        if not calibrated:
            return min(max(float(raw_score), SCORE_CLIP), 1.0 - SCORE_CLIP), True
        p = self.calibrated_score(label, raw_score)
        return p, p > self.thresholds_[label]["negative"]

    def _decided(self, output: StageOutput, calibrated: bool) -> StageOutput:
        """Drop the boxes of every class that ``output`` is certified free of.

        A class whose image-level score (its best box, kept or dropped) is at most its
        ``absent`` threshold is decided absent from the image (certified on images,
        :mod:`phenocascade.models.certify`), so none of its boxes is shown, even one above
        the keep threshold. Raw outputs (``calibrated=False``) are returned unchanged.
        """
        if not calibrated:
            return output
        absent = {
            label
            for label, score in output.scores.items()
            if score <= float(self.thresholds_.get(label, {}).get("absent") or 0.0)
        }
        if not absent:
            return output
        return replace(output, boxes=tuple(b for b in output.boxes if b.label not in absent))

    def _boxes_output(
        self,
        img: DecodedImage,
        detections: Iterable[tuple[float, float, float, float, str, float]],
        calibrated: bool,
    ) -> StageOutput:
        """Turn one image's raw detections into its :class:`StageOutput`.

        Parameters
        ----------
        img : DecodedImage
            The image, for clipping boxes to ``[0, width] x [0, height]``.
        detections : iterable of (x_min, y_min, x_max, y_max, label, raw_score)
            Boxes in original-image pixels, maxima exclusive.
        calibrated : bool
            See :meth:`_box_score`.

        Returns
        -------
        StageOutput
            The kept boxes, clipped to the image; each class scored by its best box,
            kept or dropped (``1e-6`` when it has none): the image-level score that the
            class's absence certificate (``absent``) reads.
        """
        best = {c: SCORE_CLIP for c in self.classes_}
        kept: list[Box] = []
        for x0, y0, x1, y1, label, score in detections:
            p, keep = self._box_score(label, score, calibrated)
            best[label] = max(best[label], p)
            if not keep:
                continue
            kept.append(
                Box(
                    x_min=float(np.clip(x0, 0, img.width)),
                    y_min=float(np.clip(y0, 0, img.height)),
                    x_max=float(np.clip(x1, 0, img.width)),
                    y_max=float(np.clip(y1, 0, img.height)),
                    label=label,
                    score=p,
                )
            )
        return self._decided(StageOutput(scores=best, boxes=tuple(kept)), calibrated)
