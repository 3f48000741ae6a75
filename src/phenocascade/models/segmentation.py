"""Nucleus instance segmentation: per-pixel background / interior / boundary, then instances.

A U-Net (:class:`~phenocascade.models.nets.MobileNetUNet`) learns three classes per pixel
from instance label images: background, the *interior* of an object, and its one-pixel
*boundary* (where it meets the background or another object). Interior pixels split into
connected components, one per object even where objects touch, and each component grows
back over the neighbouring foreground by the boundary's width. This is the classical
recipe of the DSB 2018 nucleus challenge; unlike a box detector it measures each object's
area in pixels, which is exactly what a relative-size phenotype is defined on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Self

import cv2
import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812

from phenocascade.domain import Box, Sample
from phenocascade.errors import ConfigError
from phenocascade.models.nets import MobileNetUNet
from phenocascade.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, normalize, to_unit_rgb
from phenocascade.models.training import Loader, ProgressCallback, fit_loop, seed_everything

BACKGROUND, INTERIOR, BOUNDARY = 0, 1, 2
# Target value of pixels that carry no label (outside an annotated object's ellipse).
IGNORE = -1
_KERNEL = np.ones((3, 3), np.uint8)
# Side of the square view that :meth:`NucleusSegmenter.describe` reads.
DESCRIBE_SIDE = 224
# Length of its output: a mean and a standard deviation per encoder channel.
DESCRIPTION_SIZE = 2 * (16 + 24 + 32 + 96 + 320)


@dataclasses.dataclass(frozen=True)
class Instance:
    """One segmented object.

    Attributes
    ----------
    box : Box
        Its bounding box in pixels (maxima exclusive), with ``score`` its confidence.
    area : int
        Its pixel count.
    """

    box: Box
    area: int


def mask_targets(labels: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.int64]:
    """Return per-pixel classes for an instance label image (0 = background).

    A pixel of an object is :data:`BOUNDARY` when its 3x3 neighbourhood holds another
    value (background or another object), else :data:`INTERIOR`.
    """
    lab = labels.astype(np.float32)  # exact for ids up to 2**24
    high, low = cv2.dilate(lab, _KERNEL), cv2.erode(lab, _KERNEL)
    target = np.zeros(labels.shape, np.int64)
    inside = labels > 0
    target[inside] = INTERIOR
    target[inside & ((high != lab) | (low != lab))] = BOUNDARY
    return target


def box_targets(shape: tuple[int, int], boxes: Sequence[Box]) -> npt.NDArray[np.int64]:
    """Return per-pixel classes for an image annotated with boxes only.

    Each box holds the ellipse inscribed in it (interior with a one-pixel boundary); the
    rest of the box is :data:`IGNORE` (the object's true outline is unknown there), and
    everything outside the boxes is background.
    """
    target = np.zeros(shape, np.int64)
    for b in boxes:
        x0, y0 = max(int(b.x_min), 0), max(int(b.y_min), 0)
        x1, y1 = min(round(b.x_max), shape[1]), min(round(b.y_max), shape[0])
        if x1 <= x0 or y1 <= y0:
            continue
        target[y0:y1, x0:x1] = IGNORE
    for b in boxes:
        center = (round((b.x_min + b.x_max) / 2 - 0.5), round((b.y_min + b.y_max) / 2 - 0.5))
        axes = (
            max(round((b.x_max - b.x_min) / 2 - 0.5), 1),
            max(round((b.y_max - b.y_min) / 2 - 0.5), 1),
        )
        canvas = np.zeros(shape, np.uint8)
        cv2.ellipse(canvas, center, axes, 0, 0, 360, 1, thickness=-1)
        target[canvas == 1] = INTERIOR
        cv2.ellipse(canvas, center, axes, 0, 0, 360, 2, thickness=1)
        target[canvas == 2] = BOUNDARY
    return target


def instances(
    probs: npt.NDArray[np.floating[Any]], *, grow: int = 2, min_area: int = 10
) -> list[Instance]:
    """Split per-pixel class probabilities ``(3, H, W)`` into objects.

    Parameters
    ----------
    probs : ndarray
        Softmax probabilities of background, interior and boundary.
    grow : int, default 2
        Pixels by which each interior component grows back over the foreground
        (interior or boundary probability above one half).
    min_area : int, default 10
        Smaller objects are speckle and are left out.

    Returns
    -------
    list of Instance
        Each object's box, with its mean foreground probability as score, and its area.
    """
    foreground = probs[INTERIOR] + probs[BOUNDARY]
    seeds = (probs[INTERIOR] > 0.5).astype(np.uint8)
    n, labels = cv2.connectedComponents(seeds, connectivity=4)
    mask = foreground > 0.5
    for _ in range(grow):
        grown = cv2.dilate(labels.astype(np.float32), _KERNEL).astype(np.int32)
        labels = np.where((labels == 0) & mask, grown, labels)
    ys, xs = np.nonzero(labels)
    ids = labels[ys, xs]
    area = np.bincount(ids, minlength=n)
    confidence = np.bincount(ids, weights=foreground[ys, xs], minlength=n)
    lo_x, lo_y = np.full(n, np.iinfo(np.int64).max), np.full(n, np.iinfo(np.int64).max)
    hi_x, hi_y = np.full(n, -1), np.full(n, -1)
    np.minimum.at(lo_x, ids, xs)
    np.minimum.at(lo_y, ids, ys)
    np.maximum.at(hi_x, ids, xs)
    np.maximum.at(hi_y, ids, ys)
    found = []
    for k in range(1, n):
        if area[k] < min_area:
            continue
        box = Box(
            float(lo_x[k]),
            float(lo_y[k]),
            float(hi_x[k] + 1),
            float(hi_y[k] + 1),
            "object",
            float(confidence[k] / area[k]),
        )
        found.append(Instance(box, int(area[k])))
    return found


def read_mask(sample: Sample) -> npt.NDArray[np.int64]:
    """Read a sample's instance label image (``Sample.mask``), 0 = background.

    Raises
    ------
    ConfigError
        If the sample has no mask, or it is not a single-channel image.
    """
    if sample.mask is None:
        raise ConfigError(f"sample {sample.image_id} has no instance mask")
    if sample.mask.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        labels = np.asarray(tifffile.imread(sample.mask))
    else:
        from PIL import Image

        with Image.open(sample.mask) as img:
            labels = np.asarray(img)
    if labels.ndim != 2:
        raise ConfigError(f"{sample.mask} is not a single-channel instance label image")
    return labels.astype(np.int64)


def sample_targets(sample: Sample, shape: tuple[int, int]) -> npt.NDArray[np.int64]:
    """Per-pixel classes of a training sample: from its mask if it has one, else its boxes."""
    if sample.mask is None:
        return box_targets(shape, sample.boxes)
    labels = read_mask(sample)
    if labels.shape != shape:
        raise ConfigError(
            f"mask {sample.mask} is {labels.shape[1]}x{labels.shape[0]} px, its image "
            f"{shape[1]}x{shape[0]} px"
        )
    return mask_targets(labels)


def _crop(
    image: npt.NDArray[np.float32],
    target: npt.NDArray[np.int64],
    size: int,
    rng: np.random.Generator | None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Cut a ``size`` crop (random, or the centre when ``rng`` is None), padding small images.

    Padding mirrors the image and marks its pixels :data:`IGNORE`; a random crop is also
    flipped and turned by a multiple of 90 degrees (microscopy has no preferred orientation).
    """
    h, w = target.shape
    pad_h, pad_w = max(size - h, 0), max(size - w, 0)
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="symmetric")
        target = np.pad(target, ((0, pad_h), (0, pad_w)), constant_values=IGNORE)
        h, w = target.shape
    if rng is None:
        y, x = (h - size) // 2, (w - size) // 2
    else:
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    image, target = image[y : y + size, x : x + size], target[y : y + size, x : x + size]
    if rng is not None:
        turns = int(rng.integers(0, 4))
        image, target = np.rot90(image, turns), np.rot90(target, turns)
        if rng.random() < 0.5:
            image, target = image[:, ::-1], target[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(target)


class NucleusSegmenter:
    """Train a :class:`~phenocascade.models.nets.MobileNetUNet` and segment object instances.

    Parameters
    ----------
    pretrained : str or None, default None
        ImageNet weights of the encoder (see :func:`~phenocascade.models.nets.resolve_pretrained`).
    crop_size : int, default 256
        Side of the random training crops.
    batch_size : int, default 8
        Crops per step.
    steps_per_epoch : int, default 25
        Optimiser steps between two validation passes.
    lr : float, default 1e-3
        AdamW learning rate.
    boundary_weight : float, default 3.0
        Loss weight of boundary pixels (they are few, and they keep touching objects apart).
    min_area : int, default 10
        Smallest object, in pixels.
    """

    def __init__(
        self,
        *,
        pretrained: str | None = None,
        crop_size: int = 256,
        batch_size: int = 8,
        steps_per_epoch: int = 25,
        lr: float = 1e-3,
        boundary_weight: float = 3.0,
        min_area: int = 10,
    ) -> None:
        self.pretrained = pretrained
        self.crop_size = crop_size
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.lr = lr
        self.boundary_weight = boundary_weight
        self.min_area = min_area

    def get_config(self) -> dict[str, Any]:
        """Return the constructor arguments."""
        return {
            "pretrained": self.pretrained,
            "crop_size": self.crop_size,
            "batch_size": self.batch_size,
            "steps_per_epoch": self.steps_per_epoch,
            "lr": self.lr,
            "boundary_weight": self.boundary_weight,
            "min_area": self.min_area,
        }

    def _batch(self, images: Sequence[npt.NDArray[np.float32]]) -> torch.Tensor:
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
        return normalize(x, IMAGENET_MEAN, IMAGENET_STD).to(self.device_)

    def _loss(
        self, images: Sequence[npt.NDArray[np.float32]], targets: torch.Tensor
    ) -> torch.Tensor:
        weight = torch.tensor([1.0, 1.0, self.boundary_weight], device=self.device_)
        logits = self.network_(self._batch(images))
        return F.cross_entropy(logits, targets.to(self.device_), weight=weight, ignore_index=IGNORE)

    def fit(
        self,
        train: Sequence[Sample],
        val: Sequence[Sample],
        *,
        load: Loader,
        progress: bool | ProgressCallback | None = None,
        seed: int = 0,
        device: str = "cpu",
        max_epochs: int = 16,
        patience: int = 3,
    ) -> Self:
        """Train on instance masks (``Sample.mask``) or, without one, on ``Sample.boxes``.

        Early stopping reads one centre crop per validation sample; the weights of the
        epoch with the lowest validation loss are kept.

        Returns
        -------
        Self
            With ``network_``, ``history_`` (loss per step) and ``val_history_``.
        """
        if not train or not val:
            raise ConfigError("fit needs at least one training and one validation sample")
        seed_everything(seed)
        rng = np.random.default_rng(seed)
        self.device_ = device
        self.network_ = MobileNetUNet(3, self.pretrained).to(device)

        def prepared(
            samples: Sequence[Sample],
        ) -> list[tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]]:
            out = []
            for s in samples:
                image = to_unit_rgb(load(s))
                out.append((image, sample_targets(s, image.shape[:2])))
            return out

        data = prepared(train)
        val_crops = [_crop(image, target, self.crop_size, None) for image, target in prepared(val)]

        def epoch_batches(epoch: int) -> list[tuple[list[Any], torch.Tensor]]:
            del epoch
            batches = []
            for _ in range(self.steps_per_epoch):
                picks = rng.integers(0, len(data), self.batch_size)
                crops = [_crop(data[i][0], data[i][1], self.crop_size, rng) for i in picks]
                batches.append(
                    ([c[0] for c in crops], torch.from_numpy(np.stack([c[1] for c in crops])))
                )
            return batches

        def train_step(batch: tuple[list[Any], torch.Tensor]) -> torch.Tensor:
            return self._loss(*batch)

        def val_loss() -> float:
            self.network_.eval()
            losses = []
            with torch.inference_mode():
                for start in range(0, len(val_crops), self.batch_size):
                    chunk = val_crops[start : start + self.batch_size]
                    targets = torch.from_numpy(np.stack([c[1] for c in chunk]))
                    losses.append(float(self._loss([c[0] for c in chunk], targets)) * len(chunk))
            return sum(losses) / len(val_crops)

        optimizer = torch.optim.AdamW(self.network_.parameters(), lr=self.lr, weight_decay=1e-4)
        result = fit_loop(
            self.network_,
            optimizer=optimizer,
            epoch_batches=epoch_batches,
            train_step=train_step,
            val_loss=val_loss,
            max_epochs=max_epochs,
            patience=patience,
            progress=progress,
            description="nucleus segmenter",
        )
        self.history_ = result.train_loss
        self.val_history_ = result.val_loss
        self.network_.eval()
        return self

    def probabilities(
        self, pixels: npt.NDArray[np.uint8] | npt.NDArray[np.uint16]
    ) -> npt.NDArray[np.float32]:
        """Return per-pixel class probabilities ``(3, H, W)`` of one whole image."""
        image = to_unit_rgb(pixels)
        h, w = image.shape[:2]
        x = self._batch([image])
        x = F.pad(x, (0, -w % 32, 0, -h % 32), mode="replicate")
        with torch.inference_mode():
            # The softmax in fp32 whatever the network computed in (bf16 under autocast).
            probs = torch.softmax(self.network_(x).float(), dim=1)[0, :, :h, :w]
        out: npt.NDArray[np.float32] = probs.cpu().numpy()
        return out

    def describe(
        self, pixels: npt.NDArray[np.uint8] | npt.NDArray[np.uint16], side: int = DESCRIBE_SIDE
    ) -> npt.NDArray[np.float64]:
        """Return what the encoder sees of one whole image, for shift detection.

        The image is resized to ``side`` x ``side`` and the encoder's per-channel means and
        standard deviations are read (:meth:`MobileNetUNet.encoder_statistics`). Features
        of the 532 DSB 2018 train and val images flagged all 60 BCCD test smears at a 1 %
        false-alarm rate, and 1 of 132 DSB test images; the segmenter's measurements alone
        flagged none of the smears, whose red cells segment like nuclei.

        Returns
        -------
        numpy.ndarray
            Shape ``(DESCRIPTION_SIZE,)`` = ``(976,)``, ``float64``.
        """
        resized = cv2.resize(to_unit_rgb(pixels), (side, side), interpolation=cv2.INTER_AREA)
        image: npt.NDArray[np.float32] = np.asarray(resized, dtype=np.float32)
        with torch.inference_mode():
            stats = self.network_.encoder_statistics(self._batch([image]))
        out: npt.NDArray[np.float64] = stats[0].double().cpu().numpy()
        return out

    def segment(self, pixels: npt.NDArray[np.uint8] | npt.NDArray[np.uint16]) -> list[Instance]:
        """Return the objects of one image (see :func:`instances`)."""
        return instances(self.probabilities(pixels), min_area=self.min_area)

    @classmethod
    def restore(cls, config: dict[str, Any], state: dict[str, torch.Tensor], device: str) -> Self:
        """Rebuild a trained segmenter from its configuration and network state dict."""
        segmenter = cls(**config)
        # The state dict replaces every weight: no pretrained file is read here.
        network = MobileNetUNet(3, None)
        network.load_state_dict(state)
        segmenter.network_ = network.to(device).eval()
        segmenter.device_ = device
        return segmenter
