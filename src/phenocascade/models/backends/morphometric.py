"""Image labels from measured objects: segment every object, then classify its morphometry.

Many image-level phenotypes are statements about the objects in the field: how many
nuclei, how large they are, how much of the field they cover (DSB 2018's ``nucleus_size``
and ``density`` groups are exactly the median nucleus area and the nucleus count, cut into
tertiles). A CNN on a resized field must learn to count and to measure in absolute pixels,
which resizing hides. This backend measures instead: an instance segmenter
(:class:`~phenocascade.models.segmentation.NucleusSegmenter`) finds every object, and a
linear head (a softmax per exclusive group, as in :mod:`._classifier`) reads the labels off
a handful of scale-aware measurements (:data:`FEATURES`).

On the DSB 2018 test split, with a segmenter trained in the bootstrap budget, such a head
reached a macro-F1 of 0.88 for each group, against 0.85 and 0.81 for the bootstrap
``multilabel_cnn`` (``/tmp`` script of session 8, not committed; ``benchmarks/models.py``
measures the committed backend).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
import numpy.typing as npt
import torch

from phenocascade.domain import DecodedImage, Sample, StageKind
from phenocascade.errors import ConfigError
from phenocascade.models import artifact
from phenocascade.models.backends._classifier import GroupedClassifier
from phenocascade.models.base import ArtifactMeta, get_backend, register_backend
from phenocascade.models.nets import MobileNetUNet
from phenocascade.models.segmentation import DESCRIPTION_SIZE, Instance, NucleusSegmenter
from phenocascade.models.training import Loader, ProgressCallback, seed_everything

FEATURES = (
    "log_count",
    "log_count_per_megapixel",
    "log_median_area",
    "log_q25_area",
    "log_q75_area",
    "covered_fraction",
    "log_image_area",
    "mean_confidence",
)


def morphometry(objects: Sequence[Instance], height: int, width: int) -> npt.NDArray[np.float64]:
    """Measure one image's objects: the :data:`FEATURES`, in order.

    Areas are in pixels of the original image; an image without objects has count 0 and
    areas of 1 pixel (log 0), so that it is far from every image with objects.

    Parameters
    ----------
    objects : sequence of Instance
        The segmented objects.
    height, width : int
        The image's size in pixels.

    Returns
    -------
    numpy.ndarray
        ``(len(FEATURES),)``, ``float64``.
    """
    areas = np.array([o.area for o in objects], dtype=np.float64)
    image_area = float(height * width)
    if not len(areas):
        areas = np.ones(1)
        count = 0
    else:
        count = len(areas)
    q25, median, q75 = np.percentile(areas, [25, 50, 75])
    confidence = float(np.mean([o.box.score for o in objects])) if objects else 0.0
    return np.array(
        [
            np.log1p(count),
            np.log1p(count * 1e6 / image_area),
            np.log(median),
            np.log(q25),
            np.log(q75),
            float(areas.sum() * (count > 0)) / image_area,
            np.log(image_area),
            confidence,
        ]
    )


def donor_segmenter(folder: Path, device: str = "cpu") -> tuple[NucleusSegmenter, dict[str, Any]]:
    """Load the trained nucleus segmenter of another artifact, and its arguments.

    Parameters
    ----------
    folder : pathlib.Path
        Artifact folder of a model that holds a ``segmenter_`` (the
        ``nucleus_mask_outlier_detector`` and ``morphometric_classifier`` backends).
    device : str, default "cpu"
        Torch device.

    Raises
    ------
    ConfigError
        If the folder holds no artifact, or its model has no nucleus segmenter.
    """
    if not (folder / "metadata.json").is_file():
        raise ConfigError(
            f"segmenter_from={str(folder)!r} is not a model artifact folder; name a trained "
            "model's folder, e.g. <artifacts>/minority/<version>"
        )
    meta = ArtifactMeta.read(folder)
    donor = get_backend(meta.backend).load(folder, device=device)
    segmenter = getattr(donor, "segmenter_", None)
    if not isinstance(segmenter, NucleusSegmenter):
        raise ConfigError(
            f"{folder} holds a {meta.backend} model, which has no nucleus segmenter to share; "
            "name a nucleus_mask_outlier_detector or morphometric_classifier artifact"
        )
    return segmenter, dict(getattr(donor, "segmenter", None) or {})


class _Morphometric(torch.nn.Module):
    """The artifact's network: the segmenter's U-Net, the feature scaling and the head."""

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, unet: MobileNetUNet, n_classes: int) -> None:
        super().__init__()
        self.unet = unet
        self.register_buffer("mean", torch.zeros(len(FEATURES), dtype=torch.float64))
        self.register_buffer("scale", torch.ones(len(FEATURES), dtype=torch.float64))
        self.head = torch.nn.Linear(len(FEATURES), n_classes).double()

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Return ``(N, classes)`` logits of ``(N, len(FEATURES))`` raw measurements."""
        scaled: torch.Tensor = (features - self.mean) / self.scale
        out: torch.Tensor = self.head(scaled)
        return out


@register_backend("morphometric_classifier")
class MorphometricClassifier(GroupedClassifier):
    """Instance segmenter plus a linear head on the objects' measurements; kind ``CLASSIFIER``.

    ``fit`` trains the segmenter on the objects of the training samples (``Sample.mask``,
    an instance label image, else ``Sample.boxes``, see
    :meth:`~phenocascade.models.segmentation.NucleusSegmenter.fit`), measures every
    training image (:func:`morphometry`) and fits the head on those measurements and the
    image labels with the loss of :class:`~._classifier.GroupedClassifier` (weight decay
    ``weight_decay``, full batch). Labels that exclude each other share a softmax.

    With ``segmenter_from``, ``fit`` trains no segmenter: it adopts the trained one of
    another artifact (:func:`donor_segmenter`), e.g. the rare-nucleus detector's, so that
    two tiers that measure the same objects pay for one segmenter's training. Its
    arguments become ``segmenter``, and ``fit`` clears ``segmenter_from`` (the artifact
    holds a copy of the weights).

    Parameters
    ----------
    segmenter : mapping or None, default None
        Arguments of the inner :class:`~phenocascade.models.segmentation.NucleusSegmenter`.
    segmenter_from : str or None, default None
        Artifact folder of a trained model with a nucleus segmenter to adopt instead of
        training one. The head's calibration images must be images that segmenter never
        trained on (the recipes see to that).
    weight_decay : float, default 1e-3
        L2 penalty of the head's weights.
    head_steps : int, default 500
        Full-batch Adam steps of the head.
    softmax_groups, declared_groups
        See :class:`~._classifier.GroupedClassifier`.
    """

    kind = StageKind.CLASSIFIER
    model_name = "morphometric_classifier"
    # The pixels of the last batch measured (held, so their identity stays theirs) and
    # its measurements; see :meth:`measurements`.
    _last: tuple[list[npt.NDArray[Any]], npt.NDArray[np.float64]] | None = None

    def __init__(
        self,
        *,
        segmenter: Mapping[str, Any] | None = None,
        segmenter_from: str | None = None,
        weight_decay: float = 1e-3,
        head_steps: int = 500,
        softmax_groups: Sequence[Sequence[str]] | None = None,
        declared_groups: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        super().__init__(softmax_groups=softmax_groups, declared_groups=declared_groups)
        self.segmenter = dict(segmenter) if segmenter is not None else None
        self.segmenter_from = segmenter_from
        self.weight_decay = weight_decay
        self.head_steps = head_steps

    def get_config(self) -> dict[str, Any]:
        """Return the constructor arguments (stored in the artifact).

        ``segmenter_from`` only until ``fit`` has adopted it: the artifact holds the
        weights, and the donor's folder need not exist where the artifact is loaded.
        """
        adopted = {} if self.segmenter_from is None else {"segmenter_from": self.segmenter_from}
        return {
            "segmenter": None if self.segmenter is None else dict(self.segmenter),
            **adopted,
            "weight_decay": self.weight_decay,
            "head_steps": self.head_steps,
            **self._group_config(),
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
        """Train (or adopt) the segmenter, then the head on the samples' measurements.

        Parameters
        ----------
        train, val : sequence of Sample
            Labelled samples (``Sample.labels``) whose objects are given by ``Sample.mask``
            or ``Sample.boxes`` (not needed with ``segmenter_from``); ``val`` stops the
            segmenter's training early.
        classes : sequence of str
            Output labels in order.
        load : callable
            ``Sample -> (H, W, C) uint8/uint16 pixels``.
        progress, seed, device, max_epochs, patience
            Passed to :meth:`NucleusSegmenter.fit`.

        Returns
        -------
        Self
            With ``segmenter_``, ``net_``, ``classes_``, ``history_`` and ``val_history_``
            (the segmenter's losses), ``head_history_`` (the head's loss per step),
            ``calibrators_`` (temperature 1.0) and ``thresholds_`` (fallback).

        Raises
        ------
        ConfigError
            If no training sample has an object outline (mask) or box to learn from and
            there is no ``segmenter_from``, or that artifact has no nucleus segmenter.
        """
        if not train or not val:
            raise ConfigError("fit needs at least one training and one validation sample")
        if self.segmenter_from is None and not any(s.mask is not None or s.boxes for s in train):
            raise ConfigError(
                "morphometric_classifier measures objects and learns them from instance "
                "masks or boxes, but no training sample has any; import the dataset with its "
                "masks (e.g. `data import masks` or `class-masks`) or use multilabel_cnn"
            )
        generator = seed_everything(seed)
        self.classes_ = list(classes)
        self.softmax_groups = self._find_softmax_groups([*train, *val])
        if self.segmenter_from is not None:
            self.segmenter_, config = donor_segmenter(Path(self.segmenter_from), device)
            self.segmenter, self.segmenter_from = dict(config), None
        else:
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
        self.device_ = device
        self.net_ = _Morphometric(self.segmenter_.network_, len(self.classes_))
        x = torch.from_numpy(np.stack([self._measure(load(s)) for s in train]))
        y = self._encode(train)
        self.net_.mean.copy_(x.mean(0))
        self.net_.scale.copy_(x.std(0).clamp(min=1e-6))
        positives = y.sum(0)
        pos_weight = ((len(y) - positives) / positives.clamp(min=1)).clamp(1.0, 50.0)
        loss = self._grouped_loss(pos_weight.double())
        head = self.net_.head
        torch.nn.init.normal_(head.weight, std=0.01, generator=generator)
        torch.nn.init.zeros_(head.bias)
        optimizer = torch.optim.Adam(head.parameters(), lr=0.05, weight_decay=self.weight_decay)
        weights = torch.ones_like(y, dtype=torch.float64)
        self.head_history_: list[float] = []
        for _ in range(self.head_steps):
            optimizer.zero_grad()
            step = loss(self.net_.logits(x), y.double(), weights)
            step.backward()
            optimizer.step()
            self.head_history_.append(float(step.detach()))
        self.history_ = list(getattr(self.segmenter_, "history_", []))
        self.val_history_ = list(getattr(self.segmenter_, "val_history_", []))
        self.net_.eval()
        self._neutral_calibration()
        return self

    def _measure(self, pixels: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
        return morphometry(self.segmenter_.segment(pixels), *pixels.shape[:2])

    def measurements(self, images: Sequence[DecodedImage]) -> npt.NDArray[np.float64]:
        """Return each image's :func:`morphometry`, shape ``(len(images), len(FEATURES))``.

        The last batch's are kept: a worker's shift detector reads :meth:`embed` of the
        batch it has just scored, and segmenting it again would double the cost per image.
        """
        if not images:
            return np.zeros((0, len(FEATURES)))
        last = self._last
        if (
            last is not None
            and len(last[0]) == len(images)
            and all(a is img.pixels for a, img in zip(last[0], images, strict=True))
        ):
            return last[1]
        found = np.stack([self._measure(img.pixels) for img in images])
        self._last = ([img.pixels for img in images], found)
        return found

    def decision_logits(self, images: Sequence[DecodedImage]) -> npt.NDArray[np.float64]:
        """Uncalibrated logits of the measurements, shape ``(len(images), len(classes))``."""
        with torch.inference_mode():
            logits = self.net_.logits(torch.from_numpy(self.measurements(images)))
        out: npt.NDArray[np.float64] = logits.numpy()
        return out

    def embed(self, images: Sequence[DecodedImage]) -> npt.NDArray[np.float64]:
        """Scaled measurements and the segmenter's view of each image, for shift detection.

        Shape ``(len(images), len(FEATURES) + 976)``: the :func:`morphometry` scaled as the
        head reads it, then :meth:`NucleusSegmenter.describe
        <phenocascade.models.segmentation.NucleusSegmenter.describe>`. The shift detector
        (:mod:`phenocascade.models.novelty`) reads them beside the pixel descriptor: an
        image whose objects measure unlike any calibration image's is novel, and so is one
        of another modality whose objects happen to measure alike (blood smears' red cells
        segment like nuclei).
        """
        if not images:
            return np.zeros((0, len(FEATURES) + DESCRIPTION_SIZE))
        scaled = (self.measurements(images) - self.net_.mean.numpy()) / self.net_.scale.numpy()
        described = np.stack([self.segmenter_.describe(img.pixels) for img in images])
        out: npt.NDArray[np.float64] = np.concatenate([scaled, described], axis=1)
        return out

    def _artifact_network(self) -> tuple[torch.nn.Module, int]:
        return self.net_, self.segmenter_.crop_size

    @classmethod
    def load(cls, folder: Path, device: str = "cpu") -> Self:
        """Rebuild from an artifact folder (weights read with ``weights_only=True``)."""
        meta = artifact.read_meta(folder, cls.model_name)
        stage = cls(**meta.config)
        if stage.softmax_groups is None:
            stage.softmax_groups = ()
        net = _Morphometric(MobileNetUNet(3, None), len(meta.classes))
        net.load_state_dict(artifact.load_weights(folder, device="cpu"))
        stage.segmenter_ = NucleusSegmenter.restore(
            stage.segmenter or {}, net.unet.state_dict(), device
        )
        net.unet = stage.segmenter_.network_
        stage.net_ = net.eval()
        stage.device_ = device
        stage._adopt_meta(meta)
        return stage
