"""The rare large-nucleus detector on segmented nuclei: measure every nucleus, flag outliers.

Like :mod:`.nucleus_outlier`, this backend applies the DSB 2018 definition of the rare
phenotype (a nucleus larger than ``ratio`` times its image's median nucleus area) to every
nucleus it finds. It finds them by instance segmentation
(:class:`~phenocascade.models.segmentation.NucleusSegmenter`) instead of a box detector, so
areas are pixel counts of the outlines, as in the definition, rather than box areas. On the
DSB validation split a box detector trained in the same CPU budget missed most small
nuclei (which inflates the median) and found only 6 of the 21 rare nuclei of the
colour-stained images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Self

import numpy as np
import numpy.typing as npt
import torch

from phenocascade.domain import Box, DecodedImage, Sample
from phenocascade.models import artifact
from phenocascade.models.backends.nucleus_outlier import SizeOutlierComposite
from phenocascade.models.base import register_backend
from phenocascade.models.segmentation import DESCRIPTION_SIZE, NucleusSegmenter
from phenocascade.models.training import Loader, ProgressCallback


def outlier_scores(
    areas: Sequence[int], *, ratio: float, min_objects: int, sharpness: float
) -> list[tuple[int, float]]:
    """Score how clearly each object exceeds ``ratio`` times its image's median area.

    The score is ``1 / (1 + (ratio * median / area) ** sharpness)``: one half exactly at
    the rule's line, towards 1 far above it and towards 0 below it, so that objects near
    the line (where segmentation errors decide) are the uncertain ones. Only objects above
    half the line are returned.

    Parameters
    ----------
    areas : sequence of int
        Every object's area in one image, in pixels.
    ratio : float
        The rule's area ratio to the median.
    min_objects : int
        With fewer objects, none is an outlier (the median of a handful says nothing).
    sharpness : float
        Exponent of the score's rise around the line.

    Returns
    -------
    list of (int, float)
        ``(index into areas, score)`` pairs, in input order.
    """
    if len(areas) < min_objects:
        return []
    line = ratio * float(np.median(np.asarray(areas, dtype=float)))
    return [(i, 1.0 / (1.0 + (line / a) ** sharpness)) for i, a in enumerate(areas) if a > line / 2]


@register_backend("nucleus_mask_outlier_detector")
class NucleusMaskOutlierDetector(SizeOutlierComposite):
    """Instance segmenter plus the relative-size rule; kind ``DETECTOR``, one output class.

    ``fit`` trains the segmenter on the samples' instance masks (``Sample.mask``; samples
    without one teach the ellipses inscribed in their boxes, see
    :func:`~phenocascade.models.segmentation.box_targets`). ``predict`` segments each
    image and labels ``classes[0]`` each object with its :func:`outlier_scores` score,
    calibrated per class by :func:`phenocascade.models.certify.calibrate_stage` against the
    rare boxes. (In a one-off check on the DSB validation split, weighting it by the
    segmenter's mean foreground probability over the object ranked the outliers worse:
    AP50 0.110 against 0.119.)

    Boxes are returned in original-image pixels, ``[x_min, y_min, x_max, y_max]`` with the
    maxima exclusive. A class's score in :class:`StageOutput` is its best box's calibrated
    score (``1e-6`` when it has no box).

    Parameters
    ----------
    segmenter : dict or None, default None
        Arguments of the inner :class:`~phenocascade.models.segmentation.NucleusSegmenter`.
    ratio : float, default 3.0
        Area ratio to the image's median that makes an object an outlier.
    min_objects : int, default 5
        Fewest objects for an image to have outliers.
    sharpness : float, default 4.0
        See :func:`outlier_scores`.
    """

    model_name = "nucleus_mask_outlier_detector"

    def __init__(
        self,
        *,
        segmenter: Mapping[str, Any] | None = None,
        ratio: float = 3.0,
        min_objects: int = 5,
        sharpness: float = 4.0,
    ) -> None:
        self.segmenter = dict(segmenter) if segmenter is not None else None
        self.ratio = ratio
        self.min_objects = min_objects
        self.sharpness = sharpness

    def get_config(self) -> dict[str, Any]:
        """Return the constructor arguments (stored in the artifact)."""
        return {
            "segmenter": None if self.segmenter is None else dict(self.segmenter),
            "ratio": self.ratio,
            "min_objects": self.min_objects,
            "sharpness": self.sharpness,
        }

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
        max_epochs: int = 16,
        patience: int = 3,
    ) -> Self:
        """Train the segmenter on every object of ``train`` (box labels are ignored).

        Parameters
        ----------
        train, val : sequence of Sample
            Every object of each image: ``Sample.mask`` (instance label image) when known,
            else ``Sample.boxes``. Not the rare boxes: annotations of rare boxes go
            through :meth:`complete_annotations` first.
        classes : sequence of str
            Exactly one class: the label given to outliers, e.g. ``("large_nucleus",)``.
        load : callable
            ``Sample -> (H, W, C) uint8/uint16 pixels``.
        progress, seed, device, max_epochs, patience
            Passed to :meth:`NucleusSegmenter.fit`.

        Returns
        -------
        Self
            With ``segmenter_``, ``classes_``, ``calibrators_`` (temperature 1.0) and
            ``thresholds_`` (fallback).

        Raises
        ------
        ConfigError
            If ``classes`` does not hold exactly one class.
        """
        self._check_classes(classes)
        self.segmenter_ = NucleusSegmenter(**(self.segmenter or {})).fit(
            train,
            val,
            load=load,
            progress=progress,
            seed=seed,
            device=device,
            max_epochs=max_epochs,
            patience=patience,
        )
        self._neutral_calibration()
        return self

    def _inner(self) -> NucleusSegmenter:
        return self.segmenter_

    def _candidates(self, images: Sequence[DecodedImage]) -> list[list[Box]]:
        candidates = []
        for img in images:
            objects = self.segmenter_.segment(img.pixels)
            scored = outlier_scores(
                [o.area for o in objects],
                ratio=self.ratio,
                min_objects=self.min_objects,
                sharpness=self.sharpness,
            )
            candidates.append([replace(objects[i].box, score=p) for i, p in scored])
        return candidates

    def embed(self, images: Sequence[DecodedImage]) -> npt.NDArray[np.float64]:
        """Return the segmenter's view of each image, ``(len(images), DESCRIPTION_SIZE)``.

        See :meth:`NucleusSegmenter.describe
        <phenocascade.models.segmentation.NucleusSegmenter.describe>`; the shift detector
        reads it beside the pixel descriptor.
        """
        if not images:
            return np.zeros((0, DESCRIPTION_SIZE))
        return np.stack([self.segmenter_.describe(img.pixels) for img in images])

    def _objects(self, sample: Sample, load: Loader) -> list[Box]:
        # The challenger learns these, as the expert's boxes, as the ellipses inscribed in
        # their boxes (annotations carry no outlines).
        return [o.box for o in self.segmenter_.segment(load(sample))]

    @property
    def _confident(self) -> float:
        # Mean foreground probability of at least one half.
        return 0.5

    def _artifact_network(self) -> tuple[torch.nn.Module, int]:
        return self.segmenter_.network_, self.segmenter_.crop_size

    @classmethod
    def load(cls, folder: Path, device: str = "cpu") -> Self:
        """Rebuild from an artifact folder (weights read with ``weights_only=True``)."""
        meta = artifact.read_meta(folder, cls.model_name)
        stage = cls(**meta.config)
        stage.segmenter_ = NucleusSegmenter.restore(
            stage.segmenter or {}, artifact.load_weights(folder, device="cpu"), device
        )
        stage._adopt_meta(meta)
        return stage
