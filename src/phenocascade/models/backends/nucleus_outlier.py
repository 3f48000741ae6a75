"""The rare large-nucleus detector as a composite: detect every nucleus, flag size outliers.

The DSB 2018 rare phenotype is *relative*: a nucleus larger than ``ratio`` times the
median nucleus area of its own image, in images with at least ``min_objects`` nuclei
(``dsb2018/derived_stage3_rare_large_nuclei.csv``). A box detector trained on the rare
boxes alone sees few examples (58 positive DSB training images) and must judge "large"
from a 7x7 region feature without the image's other nuclei, which it cannot. This backend
instead trains an ordinary object detector on *every* object box (about 40 nuclei per
image: far more signal per image) and applies the dataset's own rule to its detections.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Self

import numpy as np
import numpy.typing as npt

from phenocascade.domain import Box, DecodedImage, LabelThresholds, Sample, StageKind, StageOutput
from phenocascade.errors import ConfigError
from phenocascade.models import artifact
from phenocascade.models.backends._classifier import SCORE_CLIP
from phenocascade.models.backends.torchvision_detector import TorchvisionDetector
from phenocascade.models.base import ArtifactMeta, register_backend
from phenocascade.models.calibration import calibrate_probability
from phenocascade.models.preprocess import IMAGENET_MEAN, IMAGENET_STD
from phenocascade.models.thresholds import fallback_record
from phenocascade.models.training import ProgressCallback

Loader = Callable[[Sample], npt.NDArray[np.uint8] | npt.NDArray[np.uint16]]

# The inner detector's single class: any object, whatever the samples' box labels were.
OBJECT_LABEL = "object"


def size_outliers(
    boxes: Sequence[Box], *, ratio: float, min_objects: int, count_score: float
) -> list[int]:
    """Return the indices of boxes larger than ``ratio`` x their image's median object area.

    Parameters
    ----------
    boxes : sequence of Box
        Every object detected in one image, ``[x_min, y_min, x_max, y_max]`` pixels with
        raw detector scores.
    ratio : float
        A box is an outlier when its area exceeds ``ratio`` times the median.
    min_objects : int
        Fewer boxes scoring ``>= count_score`` than this: no outliers (the median of a
        handful of objects says nothing about "typical").
    count_score : float
        Boxes scoring at least this are the image's objects, counted for the median;
        every box, confident or not, may be an outlier.

    Returns
    -------
    list of int
        Indices into ``boxes``, in input order.
    """
    areas = np.array([(b.x_max - b.x_min) * (b.y_max - b.y_min) for b in boxes], dtype=float)
    counted = np.array([b.score >= count_score for b in boxes], dtype=bool)
    if int(counted.sum()) < min_objects:
        return []
    median = float(np.median(areas[counted]))
    return [i for i, a in enumerate(areas) if a > ratio * median]


@register_backend("nucleus_outlier_detector")
class NucleusOutlierDetector:
    """Object detector plus the relative-size rule; kind ``DETECTOR``, one output class.

    ``fit`` trains a :class:`TorchvisionDetector` on every box of the training samples,
    whatever their labels (for DSB 2018: every nucleus of ``boxes.csv``). ``predict`` runs
    it and labels ``classes[0]`` (``"large_nucleus"`` for DSB) each detected object whose
    box area exceeds ``ratio`` times the median box area of the image's detected objects
    (those scoring ``>= count_score``), when there are at least ``min_objects`` of them:
    the rule that defines the dataset's rare boxes, applied to detections instead of
    expert masks (box areas stand in for mask areas; their ratios agree for round nuclei).
    An outlier's score is the detector's confidence in that object, calibrated per class by
    :func:`phenocascade.models.certify.calibrate_stage` against the rare boxes. On the
    ground-truth boxes of the DSB validation split the rule reaches AP50 0.85 against the
    rare boxes (the mask/box-area difference): the ceiling of this backend.

    Boxes are returned in original-image pixels, ``[x_min, y_min, x_max, y_max]`` with the
    maxima exclusive. A class's score in :class:`StageOutput` is its best box's calibrated
    score (``1e-6`` when it has no box).

    Parameters
    ----------
    detector : dict or None, default None
        Arguments of the inner :class:`TorchvisionDetector`; ``None`` uses its defaults
        with ``detections_per_image=400`` (DSB images hold up to 375 nuclei).
    ratio : float, default 3.0
        Area ratio to the image's median that makes an object an outlier.
    min_objects : int, default 5
        Fewest counted objects for an image to have outliers.
    count_score : float, default 0.5
        Raw detector score from which a detection counts as an object for the median.
    """

    kind = StageKind.DETECTOR
    model_name = "nucleus_outlier_detector"
    gate_label = "clear"

    def __init__(
        self,
        *,
        detector: Mapping[str, Any] | None = None,
        ratio: float = 3.0,
        min_objects: int = 5,
        count_score: float = 0.5,
    ) -> None:
        self.detector = dict(detector) if detector is not None else None
        self.ratio = ratio
        self.min_objects = min_objects
        self.count_score = count_score

    def get_config(self) -> dict[str, Any]:
        """Return the constructor arguments (stored in the artifact)."""
        return {
            "detector": None if self.detector is None else dict(self.detector),
            "ratio": self.ratio,
            "min_objects": self.min_objects,
            "count_score": self.count_score,
        }

    def _detector_config(self) -> dict[str, Any]:
        return dict(self.detector) if self.detector is not None else {"detections_per_image": 400}

    @property
    def classes(self) -> tuple[str, ...]:
        """The one output class (known after ``fit`` or ``load``)."""
        return tuple(self.classes_)

    @property
    def version(self) -> str:
        """Artifact version; ``""`` until saved or loaded."""
        return getattr(self, "version_", "")

    @property
    def thresholds(self) -> dict[str, LabelThresholds]:
        """Keep (``negative``) and confident (``positive``) box thresholds per class."""
        return {
            label: LabelThresholds(positive=t["positive"], negative=t["negative"])
            for label, t in self.thresholds_.items()
        }

    @property
    def history_(self) -> list[float]:
        """Training loss per step of the inner detector."""
        return self.detector_.history_

    @property
    def val_history_(self) -> list[float]:
        """Validation loss per epoch of the inner detector."""
        return self.detector_.val_history_

    def fit(
        self,
        train: Sequence[Sample],
        val: Sequence[Sample],
        *,
        classes: Sequence[str],
        load: Loader,
        progress: bool | ProgressCallback | None = None,
        seed: int = 0,
        device: str = "cpu",
        max_epochs: int = 10,
        patience: int = 3,
    ) -> Self:
        """Train the inner object detector on every box of ``train`` (labels ignored).

        Parameters
        ----------
        train, val : sequence of Sample
            ``Sample.boxes`` are *all* objects (e.g. every nucleus), in pixels; their
            labels are ignored. Not the rare boxes: the rule derives those.
        classes : sequence of str
            Exactly one class: the label given to outliers, e.g. ``("large_nucleus",)``.
        load : callable
            ``Sample -> (H, W, C) uint8/uint16 pixels``.
        progress, seed, device, max_epochs, patience
            Passed to :meth:`TorchvisionDetector.fit`.

        Returns
        -------
        Self
            With ``detector_`` (the fitted inner detector), ``classes_``, ``temperature_``
            (1.0) and ``thresholds_`` (fallback).

        Raises
        ------
        ConfigError
            If ``classes`` does not hold exactly one class.
        """
        if len(classes) != 1:
            raise ConfigError(
                f"{self.model_name} labels size outliers with one class, got {list(classes)}"
            )

        def as_objects(samples: Sequence[Sample]) -> list[Sample]:
            return [
                replace(s, boxes=tuple(replace(b, label=OBJECT_LABEL) for b in s.boxes))
                for s in samples
            ]

        self.classes_ = list(classes)
        self.detector_ = TorchvisionDetector(**self._detector_config()).fit(
            as_objects(train),
            as_objects(val),
            classes=(OBJECT_LABEL,),
            load=load,
            progress=progress,
            seed=seed,
            device=device,
            max_epochs=max_epochs,
            patience=patience,
        )
        self.temperature_ = {label: 1.0 for label in self.classes_}
        fallback = fallback_record(0.99, 0.1).as_dict()
        self.thresholds_ = {label: dict(fallback) for label in self.classes_}
        return self

    def predict(
        self, images: Sequence[DecodedImage], *, calibrated: bool = True
    ) -> list[StageOutput]:
        """Detect the size-outlier objects in a batch of images.

        Parameters
        ----------
        images : sequence of DecodedImage
            Pixels ``(H, W, C)``, ``uint8`` or ``uint16``, grey or RGB.
        calibrated : bool, default True
            ``True`` applies the fitted temperature and drops boxes at or below the keep
            threshold (``negative``); ``False`` returns every outlier with its raw score.

        Returns
        -------
        list of StageOutput
            One per image; only outlier boxes, labelled ``classes[0]``, in original
            pixels ``[x_min, y_min, x_max, y_max]``, clipped to the image.
        """
        label = self.classes_[0]
        outputs = []
        for objects in self.detector_.predict(images, calibrated=False):
            boxes = list(objects.boxes)
            best = SCORE_CLIP
            kept: list[Box] = []
            for i in size_outliers(
                boxes,
                ratio=self.ratio,
                min_objects=self.min_objects,
                count_score=self.count_score,
            ):
                p = self.calibrated_score(label, boxes[i].score) if calibrated else boxes[i].score
                if calibrated and p <= self.thresholds_[label]["negative"]:
                    continue
                best = max(best, p)
                kept.append(replace(boxes[i], label=label, score=p))
            outputs.append(StageOutput(scores={label: best}, boxes=tuple(kept)))
        return outputs

    def calibrated_score(self, label: str, raw_score: float) -> float:
        """Map a raw box score of ``label`` through its temperature; in ``[1e-6, 1 - 1e-6]``."""
        p = float(calibrate_probability(raw_score, self.temperature_[label]))
        return min(max(p, SCORE_CLIP), 1.0 - SCORE_CLIP)

    def set_calibration(
        self, temperature: Mapping[str, float], thresholds: Mapping[str, Mapping[str, float]]
    ) -> None:
        """Store fitted temperatures and certified thresholds (see :mod:`..certify`)."""
        self.temperature_ = {label: float(temperature[label]) for label in self.classes_}
        self.thresholds_ = {label: dict(thresholds[label]) for label in self.classes_}

    def save(
        self,
        folder: Path,
        *,
        tier: str = "",
        metrics: Mapping[str, Any] | None = None,
        data_fingerprint: str = "",
        parent_version: str = "",
    ) -> ArtifactMeta:
        """Write the inner detector's ``weights.pt`` and ``metadata.json``."""
        artifact.save_weights(folder, self.detector_.model_.state_dict())
        meta = ArtifactMeta(
            backend=self.model_name,
            tier=tier,
            version=folder.name,
            kind=self.kind.value,
            classes=list(self.classes_),
            input_size=self.detector_.min_size,
            normalization={"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            calibration={"temperature": dict(self.temperature_)},
            thresholds={k: dict(v) for k, v in self.thresholds_.items()},
            metrics=dict(metrics or {}),
            data_fingerprint=data_fingerprint,
            code_version=artifact.code_version(),
            created_at=artifact.utc_now(),
            parent_version=parent_version,
            config=self.get_config(),
        )
        meta.write(folder)
        self.version_ = folder.name
        self.meta_ = meta
        return meta

    @classmethod
    def load(cls, folder: Path, device: str = "cpu") -> Self:
        """Rebuild from an artifact folder (weights read with ``weights_only=True``)."""
        meta = artifact.read_meta(folder, cls.model_name)
        stage = cls(**meta.config)
        stage.classes_ = list(meta.classes)
        stage.detector_ = TorchvisionDetector.restore(
            stage._detector_config(),
            (OBJECT_LABEL,),
            artifact.load_weights(folder, device="cpu"),
            device,
        )
        stage.temperature_ = dict(meta.calibration.get("temperature", {}))
        stage.thresholds_ = {k: dict(v) for k, v in meta.thresholds.items()}
        stage.version_ = meta.version
        stage.meta_ = meta
        return stage
