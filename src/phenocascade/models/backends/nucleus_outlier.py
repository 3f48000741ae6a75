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

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch

from phenocascade.domain import Box, DecodedImage, Sample, StageKind, StageOutput
from phenocascade.errors import ConfigError
from phenocascade.models import artifact
from phenocascade.models.backends._common import CalibratedDetector
from phenocascade.models.backends.torchvision_detector import TorchvisionDetector
from phenocascade.models.base import register_backend
from phenocascade.models.calibration import SCORE_CLIP
from phenocascade.models.training import Loader, ProgressCallback

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


def complete_objects(
    expert: Sequence[Box], detected: Sequence[Box], *, min_score: float, max_overlap: float
) -> list[Box]:
    """Return an image's object boxes: the expert's, plus confident detections elsewhere.

    An expert who annotates the rare phenotype marks only the rare objects; training an
    every-object detector on those alone would teach it that the image's other objects are
    background. The image's other objects are taken from a trained detector instead
    (pseudo-labels), and the expert's boxes are authoritative where they lie.

    Parameters
    ----------
    expert : sequence of Box
        The expert's boxes of the image (every rare object), in pixels.
    detected : sequence of Box
        Every object a trained detector found in the image, with raw scores.
    min_score : float
        Detections scoring below this are left out (not confident enough to train on).
    max_overlap : float
        A detection covering more than this fraction of its own area with an expert box
        is the same object (or a fragment of it) and is left out.

    Returns
    -------
    list of Box
        The expert's boxes, then the kept detections, all labelled :data:`OBJECT_LABEL`.
    """
    objects = [replace(b, label=OBJECT_LABEL, score=1.0) for b in expert]
    for d in detected:
        if d.score < min_score:
            continue
        area = (d.x_max - d.x_min) * (d.y_max - d.y_min)
        covered = max(
            (
                max(0.0, min(d.x_max, e.x_max) - max(d.x_min, e.x_min))
                * max(0.0, min(d.y_max, e.y_max) - max(d.y_min, e.y_min))
                for e in expert
            ),
            default=0.0,
        )
        if area > 0 and covered / area <= max_overlap:
            objects.append(replace(d, label=OBJECT_LABEL))
    return objects


class SizeOutlierComposite(CalibratedDetector):
    """Size outliers, as one output class, of a model that finds every object.

    What the nucleus composites share. A subclass trains its inner model in ``fit`` (after
    :meth:`_check_classes`), and implements :meth:`_inner`, :meth:`_candidates` (each
    image's outliers with raw scores), :meth:`_objects` (every object of one image, with
    its confidence as score) and :attr:`_confident` (the score from which an object is
    taken as a pseudo-label by :meth:`complete_annotations`).
    """

    kind = StageKind.DETECTOR
    gate_label = "clear"

    @abstractmethod
    def _inner(self) -> Any:
        """Return the trained inner model (it has ``history_`` and ``val_history_``)."""

    @abstractmethod
    def _candidates(self, images: Sequence[DecodedImage]) -> list[list[Box]]:
        """Return each image's outlier candidates, with raw scores."""

    @abstractmethod
    def _objects(self, sample: Sample, load: Loader) -> list[Box]:
        """Return every object of one sample's image, its confidence as score."""

    @property
    @abstractmethod
    def _confident(self) -> float:
        """Return the score from which an object is confident enough to train on."""

    @property
    def history_(self) -> list[float]:
        """Training loss per step of the inner model."""
        history: list[float] = self._inner().history_
        return history

    @property
    def val_history_(self) -> list[float]:
        """Validation loss per epoch of the inner model."""
        history: list[float] = self._inner().val_history_
        return history

    def _check_classes(self, classes: Sequence[str]) -> None:
        """Refuse anything but one class (the outliers' label) and remember it."""
        if len(classes) != 1:
            raise ConfigError(
                f"{self.model_name} labels size outliers with one class, got {list(classes)}"
            )
        self.classes_ = list(classes)

    def predict(
        self, images: Sequence[DecodedImage], *, calibrated: bool = True
    ) -> list[StageOutput]:
        """Detect the size-outlier objects in a batch of images.

        Parameters
        ----------
        images : sequence of DecodedImage
            Pixels ``(H, W, C)``, ``uint8`` or ``uint16``, grey or RGB.
        calibrated : bool, default True
            ``True`` applies the fitted calibrator and drops boxes at or below the keep
            threshold (``negative``), and every box of an image certified free of the
            class (``absent``); ``False`` returns every outlier with its raw score.

        Returns
        -------
        list of StageOutput
            One per image; only outlier boxes, labelled ``classes[0]``, in original
            pixels ``[x_min, y_min, x_max, y_max]``, clipped to the image.
        """
        label = self.classes_[0]
        outputs = []
        for candidates in self._candidates(images):
            best = SCORE_CLIP
            kept: list[Box] = []
            for box in candidates:
                p, keep = self._box_score(label, box.score, calibrated)
                best = max(best, p)
                if not keep:
                    continue
                kept.append(replace(box, label=label, score=p))
            outputs.append(
                self._decided(StageOutput(scores={label: best}, boxes=tuple(kept)), calibrated)
            )
        return outputs

    def complete_annotations(
        self, samples: Sequence[Sample], *, load: Loader, max_overlap: float = 0.5
    ) -> list[Sample]:
        """Turn rare-box annotations into every-object training samples for ``fit``.

        Each sample's boxes are the expert's rare boxes; this model adds the image's other
        confident objects that do not overlap an expert box (see :func:`complete_objects`).
        A challenger trained on the result learns the objects the expert added (e.g. a
        large nucleus the champion missed) without learning the unannotated ordinary
        objects as background. The samples keep no instance mask: it would not hold the
        added objects.

        Parameters
        ----------
        samples : sequence of Sample
            Annotated images; ``boxes`` are every rare object of the image.
        load : callable
            ``Sample -> (H, W, C) uint8/uint16 pixels``.
        max_overlap : float, default 0.5
            See :func:`complete_objects`.

        Returns
        -------
        list of Sample
            The samples with every object as a box, labelled :data:`OBJECT_LABEL`.
        """
        completed = []
        for s in samples:
            boxes = complete_objects(
                s.boxes, self._objects(s, load), min_score=self._confident, max_overlap=max_overlap
            )
            completed.append(replace(s, boxes=tuple(boxes), mask=None))
        return completed


@register_backend("nucleus_outlier_detector")
class NucleusOutlierDetector(SizeOutlierComposite):
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
    score, kept or dropped (``1e-6`` when it has no box).

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

    model_name = "nucleus_outlier_detector"

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
            labels are ignored. Not the rare boxes: the rule derives those (annotations
            of rare boxes go through :meth:`complete_annotations` first).
        classes : sequence of str
            Exactly one class: the label given to outliers, e.g. ``("large_nucleus",)``.
        load : callable
            ``Sample -> (H, W, C) uint8/uint16 pixels``.
        progress, seed, device, max_epochs, patience
            Passed to :meth:`TorchvisionDetector.fit`.

        Returns
        -------
        Self
            With ``detector_`` (the fitted inner detector), ``classes_``, ``calibrators_``
            (temperature 1.0) and ``thresholds_`` (fallback).

        Raises
        ------
        ConfigError
            If ``classes`` does not hold exactly one class.
        """
        self._check_classes(classes)

        def as_objects(samples: Sequence[Sample]) -> list[Sample]:
            return [
                replace(s, boxes=tuple(replace(b, label=OBJECT_LABEL) for b in s.boxes))
                for s in samples
            ]

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
        self._neutral_calibration()
        return self

    def _inner(self) -> TorchvisionDetector:
        return self.detector_

    def _candidates(self, images: Sequence[DecodedImage]) -> list[list[Box]]:
        candidates = []
        for objects in self.detector_.predict(images, calibrated=False):
            boxes = list(objects.boxes)
            outliers = size_outliers(
                boxes,
                ratio=self.ratio,
                min_objects=self.min_objects,
                count_score=self.count_score,
            )
            candidates.append([boxes[i] for i in outliers])
        return candidates

    def _objects(self, sample: Sample, load: Loader) -> list[Box]:
        found = self.detector_.predict(
            [DecodedImage(sample.image_id, load(sample))], calibrated=False
        )
        return list(found[0].boxes)

    @property
    def _confident(self) -> float:
        # The detections the median counts.
        return self.count_score

    def _artifact_network(self) -> tuple[torch.nn.Module, int]:
        return self.detector_.model_, self.detector_.min_size

    @classmethod
    def load(cls, folder: Path, device: str = "cpu") -> Self:
        """Rebuild from an artifact folder (weights read with ``weights_only=True``)."""
        meta = artifact.read_meta(folder, cls.model_name)
        stage = cls(**meta.config)
        stage.detector_ = TorchvisionDetector.restore(
            stage._detector_config(),
            (OBJECT_LABEL,),
            artifact.load_weights(folder, device="cpu"),
            device,
        )
        stage._adopt_meta(meta)
        return stage
