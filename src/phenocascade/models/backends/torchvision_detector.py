"""The minority detector: torchvision Faster R-CNN on a small FPN backbone."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, box_iou

from phenocascade.domain import Box, DecodedImage, Sample, StageKind, StageOutput
from phenocascade.errors import ConfigError
from phenocascade.models import artifact
from phenocascade.models.backends._common import CalibratedDetector
from phenocascade.models.base import register_backend
from phenocascade.models.evaluate import coco_ap50
from phenocascade.models.nets import build_fpn_backbone
from phenocascade.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, to_chw, to_unit_rgb
from phenocascade.models.training import (
    Loader,
    ProgressCallback,
    batched,
    fit_loop,
    seed_everything,
)

SCALE_MODES = ("short_side", "native")


class _ScaledTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform with the detector's own resize rule.

    Training images arrive already resized by :meth:`TorchvisionDetector._prepare` (and
    maybe cropped), so they pass unchanged; inference images are resized by the same
    rule, with antialiasing as in training.
    """

    def __init__(self, scale: Callable[[int, int], float], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scale = scale

    def resize(
        self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        if self.training:
            return image, target
        h, w = image.shape[-2:]
        factor = self.scale(h, w)
        if factor != 1.0:
            size = (max(1, round(h * factor)), max(1, round(w * factor)))
            image = F.interpolate(image[None], size=size, mode="bilinear", antialias=True)[0]
        return image, target


def _box(xyxy: torch.Tensor, label: str, score: float = 1.0) -> Box:
    x0, y0, x1, y1 = (float(v) for v in xyxy)
    return Box(x_min=x0, y_min=y0, x_max=x1, y_max=y1, label=label, score=score)


@register_backend("torchvision_detector")
class TorchvisionDetector(CalibratedDetector):
    """Faster R-CNN (torchvision) with a ResNet-18 or MobileNetV2 FPN; kind ``DETECTOR``.

    Boxes are returned in original-image pixels, ``[x_min, y_min, x_max, y_max]`` with the
    maxima exclusive. A class's score in :class:`StageOutput` is its best box's calibrated
    score (``1e-6`` when it has no box).

    Parameters
    ----------
    backbone : str, default "mobilenet_v2"
        ``"mobilenet_v2"`` or ``"resnet18"``.
    pretrained : str or None, default None
        See :func:`phenocascade.models.nets.resolve_pretrained`.
    min_size : int, default 320
        Shorter image side after the resize (``scale_mode="short_side"``), or the
        smallest shorter side (``"native"``: smaller images are enlarged to it).
    max_size : int, default 512
        Upper bound on the longer side after the resize, in both modes.
    scale_mode : {"short_side", "native"}, default "short_side"
        ``"short_side"`` resizes every image so that its shorter side is ``min_size``
        (torchvision's rule); ``"native"`` keeps the original pixels unless the image is
        outside those bounds, so small objects in large images stay large enough to
        detect (use it with ``crop_size`` to bound the cost of a training step).
    anchor_sizes : tuple of int, default (16, 32, 64, 128)
        One anchor size per FPN level (strides 8, 16, 32, 64), in resized pixels.
    batch_size : int, default 4
        Images per optimiser step.
    lr : float, default 5e-4
        AdamW learning rate.
    weight_decay : float, default 1e-4
        AdamW weight decay.
    score_floor : float, default 0.01
        Raw scores below this are never returned.
    detections_per_image : int, default 100
        Upper bound on boxes per image; the region proposals kept at inference follow it
        (``max(150, 2 * detections_per_image)``), so crowded images are not cut short.
    nms_iou : float, default 0.5
        IoU above which non-maximum suppression removes the lower-scored of two boxes of
        one class; lower it for objects that rarely overlap (nuclei), whose fragments
        then no longer survive beside the whole.
    freeze_backbone : bool, default False
        Keep the pretrained ImageNet body fixed and train only the FPN and the heads:
        about a third less time per step, so more steps fit a CPU budget.
    crop_size : int or None, default None
        Train on random ``crop_size`` squares of the resized images (boxes clipped; a box
        keeping under half its area is dropped) instead of whole images: a step costs
        less, so more steps fit a budget. The validation loss (early stopping) is then
        taken on one fixed crop per validation image. ``None`` uses whole images.
    early_stopping : {"loss", "ap50"}, default "loss"
        What picks the best epoch on the validation split: the detection loss, or
        ``1 - AP50`` (pycocotools, mean over the classes with validation boxes; one
        inference pass over the validation images per epoch). The loss is a weak proxy
        for AP: in a bootstrap BCCD run it was lowest after the first of six epochs, and
        that restored model reached test AP50 0.10.
    predict_batch_size : int, default 1
        Images per forward pass at inference. torchvision pads a batch to its largest
        image, so on a CPU (whose convolutions already use every core) one image at a
        time bounds peak memory to one image's activations; raise it on a GPU.
    copy_paste : int, default 0
        Objects pasted into each training image per step (copy-paste augmentation,
        Ghiasi et al., "Simple Copy-Paste is a Strong Data Augmentation Method for
        Instance Segmentation", CVPR 2021, here with box crops): each is the pixels of a
        training box, every class equally likely whatever its count, flipped at random
        and put where it overlaps no box of the image. A few dozen images then show the
        rare objects many times more often, in new surroundings.
    """

    kind = StageKind.DETECTOR
    model_name = "torchvision_detector"
    gate_label = "clear"

    def __init__(
        self,
        *,
        backbone: str = "mobilenet_v2",
        pretrained: str | None = None,
        min_size: int = 320,
        max_size: int = 512,
        scale_mode: str = "short_side",
        anchor_sizes: tuple[int, ...] = (16, 32, 64, 128),
        batch_size: int = 4,
        lr: float = 5e-4,
        weight_decay: float = 1e-4,
        score_floor: float = 0.01,
        detections_per_image: int = 100,
        nms_iou: float = 0.5,
        freeze_backbone: bool = False,
        crop_size: int | None = None,
        early_stopping: str = "loss",
        predict_batch_size: int = 1,
        copy_paste: int = 0,
    ) -> None:
        if early_stopping not in ("loss", "ap50"):
            raise ConfigError(f"early_stopping must be 'loss' or 'ap50', not {early_stopping!r}")
        if copy_paste < 0:
            raise ConfigError(f"copy_paste must be 0 or more objects, not {copy_paste}")
        self.backbone = backbone
        self.pretrained = pretrained
        self.min_size = min_size
        self.max_size = max_size
        self.scale_mode = scale_mode
        self.anchor_sizes = anchor_sizes
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.score_floor = score_floor
        self.detections_per_image = detections_per_image
        self.nms_iou = nms_iou
        self.freeze_backbone = freeze_backbone
        self.crop_size = crop_size
        self.early_stopping = early_stopping
        self.predict_batch_size = predict_batch_size
        self.copy_paste = copy_paste

    def get_config(self) -> dict[str, Any]:
        """Return the constructor arguments (stored in the artifact)."""
        return {
            "backbone": self.backbone,
            "pretrained": self.pretrained,
            "min_size": self.min_size,
            "max_size": self.max_size,
            "scale_mode": self.scale_mode,
            "anchor_sizes": list(self.anchor_sizes),
            "batch_size": self.batch_size,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "score_floor": self.score_floor,
            "detections_per_image": self.detections_per_image,
            "nms_iou": self.nms_iou,
            "freeze_backbone": self.freeze_backbone,
            "crop_size": self.crop_size,
            "early_stopping": self.early_stopping,
            "predict_batch_size": self.predict_batch_size,
            "copy_paste": self.copy_paste,
        }

    def _build(self, n_classes: int, pretrained: str | None) -> FasterRCNN:
        # Frozen batch norm keeps ImageNet statistics whenever the config is pretrained,
        # also when rebuilding for load() (which reads no ImageNet file).
        if self.scale_mode not in SCALE_MODES:
            raise ConfigError(
                f"unknown scale_mode {self.scale_mode!r}; choose one of {SCALE_MODES}"
            )
        body = build_fpn_backbone(self.backbone, pretrained, frozen_bn=self.pretrained is not None)
        if self.freeze_backbone:
            for parameter in body.body.parameters():
                parameter.requires_grad_(False)
        levels = len(self.anchor_sizes)
        anchors = AnchorGenerator(
            sizes=tuple((s,) for s in self.anchor_sizes), aspect_ratios=((0.5, 1.0, 2.0),) * levels
        )
        # A slimmer box head and fewer sampled proposals than torchvision's defaults (1024-d
        # head, 2000 proposals, 512 RoIs): CPU training gets several times faster. Inference
        # keeps enough proposals for every box the caller allows.
        head = TwoMLPHead(body.out_channels * 7 * 7, 256)
        proposals = max(150, 2 * self.detections_per_image)
        model = FasterRCNN(
            body,
            rpn_anchor_generator=anchors,
            box_head=head,
            box_predictor=FastRCNNPredictor(256, n_classes + 1),  # class 0 is background
            rpn_pre_nms_top_n_train=600,
            rpn_post_nms_top_n_train=300,
            rpn_pre_nms_top_n_test=2 * proposals,
            rpn_post_nms_top_n_test=proposals,
            rpn_batch_size_per_image=128,
            box_batch_size_per_image=128,
            box_roi_pool=MultiScaleRoIAlign(
                featmap_names=["0", "1", "2"], output_size=7, sampling_ratio=2
            ),
            min_size=self.min_size,
            max_size=self.max_size,
            image_mean=list(IMAGENET_MEAN),
            image_std=list(IMAGENET_STD),
            box_score_thresh=self.score_floor,
            box_detections_per_img=self.detections_per_image,
            box_nms_thresh=self.nms_iou,
        )
        model.transform = _ScaledTransform(
            self._scale,
            min_size=self.min_size,
            max_size=self.max_size,
            image_mean=list(IMAGENET_MEAN),
            image_std=list(IMAGENET_STD),
        )
        return model

    def _scale(self, h: int, w: int) -> float:
        """Resize factor of an ``h`` x ``w`` image (see ``scale_mode``)."""
        if self.scale_mode == "native":
            return min(max(1.0, self.min_size / min(h, w)), self.max_size / max(h, w))
        return min(self.min_size / min(h, w), self.max_size / max(h, w))

    def _prepare(
        self, sample: Sample, load: Loader
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Load, convert and pre-resize one sample to the size torchvision would use."""
        image = to_chw(to_unit_rgb(load(sample)))
        _, h, w = image.shape
        scale = self._scale(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        image = F.interpolate(image[None], size=size, mode="bilinear", antialias=True)[0]
        index = {c: i + 1 for i, c in enumerate(self.classes_)}
        boxes = []
        labels = []
        for box in sample.boxes:
            if box.label not in index:
                raise ConfigError(
                    f"sample {sample.image_id} has box label {box.label!r}, not in {self.classes_}"
                )
            boxes.append(
                [box.x_min * scale, box.y_min * scale, box.x_max * scale, box.y_max * scale]
            )
            labels.append(index[box.label])
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
        }
        return image, target

    def _crop(
        self, image: torch.Tensor, target: dict[str, torch.Tensor], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cut a random ``crop_size`` square; keep boxes with at least half their area inside."""
        _, h, w = image.shape
        side = self.crop_size
        if side is None or (h <= side and w <= side):
            return image, target
        y0 = int(torch.randint(0, max(1, h - side + 1), (1,), generator=generator))
        x0 = int(torch.randint(0, max(1, w - side + 1), (1,), generator=generator))
        crop = image[:, y0 : y0 + side, x0 : x0 + side]
        boxes = target["boxes"] - torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
        clipped = torch.stack(
            [
                boxes[:, 0].clamp(0, crop.shape[2]),
                boxes[:, 1].clamp(0, crop.shape[1]),
                boxes[:, 2].clamp(0, crop.shape[2]),
                boxes[:, 3].clamp(0, crop.shape[1]),
            ],
            dim=1,
        )

        def area(b: torch.Tensor) -> torch.Tensor:
            return (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)

        keep = area(clipped) >= 0.5 * area(boxes).clamp(min=1e-6)
        return crop, {"boxes": clipped[keep], "labels": target["labels"][keep]}

    @staticmethod
    def _paste_bank(
        data: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]],
    ) -> tuple[list[tuple[torch.Tensor, int]], torch.Tensor]:
        """Return the crop and label of every training box, and each one's draw weight.

        The weights make every class equally likely (``1 / count`` of its class); boxes
        under 2 px on a side are left out.
        """
        bank: list[tuple[torch.Tensor, int]] = []
        for image, target in data:
            for box, label in zip(target["boxes"], target["labels"], strict=True):
                x0, y0, x1, y1 = (round(float(v)) for v in box)
                if x1 - x0 >= 2 and y1 - y0 >= 2:
                    bank.append((image[:, y0:y1, x0:x1].clone(), int(label)))
        counts = Counter(label for _, label in bank)
        weights = torch.tensor([1.0 / counts[label] for _, label in bank], dtype=torch.float64)
        return bank, weights

    def _paste(
        self,
        image: torch.Tensor,
        target: dict[str, torch.Tensor],
        bank: Sequence[tuple[torch.Tensor, int]],
        weights: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Paste ``copy_paste`` objects of ``bank`` where they overlap no box; add their boxes."""
        if not self.copy_paste or not bank:
            return image, target
        _, h, w = image.shape
        image = image.clone()
        boxes, labels = target["boxes"], target["labels"]
        for _ in range(self.copy_paste):
            patch, label = bank[int(torch.multinomial(weights, 1, generator=generator))]
            for dim in (-1, -2):
                if torch.rand(1, generator=generator) < 0.5:
                    patch = patch.flip(dim)
            ph, pw = patch.shape[1:]
            if ph >= h or pw >= w:
                continue
            # A few tries at a free spot; a crowded image takes fewer pastes.
            for _try in range(10):
                y0 = int(torch.randint(0, h - ph + 1, (1,), generator=generator))
                x0 = int(torch.randint(0, w - pw + 1, (1,), generator=generator))
                new = torch.tensor([[x0, y0, x0 + pw, y0 + ph]], dtype=torch.float32)
                if not len(boxes) or float(box_iou(new, boxes).max()) == 0.0:
                    image[:, y0 : y0 + ph, x0 : x0 + pw] = patch
                    boxes = torch.cat([boxes, new])
                    labels = torch.cat([labels, torch.tensor([label], dtype=torch.int64)])
                    break
        return image, {"boxes": boxes, "labels": labels}

    @staticmethod
    def _flip(
        image: torch.Tensor, target: dict[str, torch.Tensor], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Random horizontal and vertical flips, moving the boxes with the pixels."""
        _, h, w = image.shape
        boxes = target["boxes"].clone()
        if torch.rand(1, generator=generator) < 0.5:
            image = image.flip(-1)
            boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
        if torch.rand(1, generator=generator) < 0.5:
            image = image.flip(-2)
            boxes[:, [1, 3]] = h - boxes[:, [3, 1]]
        return image, {"boxes": boxes, "labels": target["labels"]}

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
        """Train on ``train`` with early stopping on the detection loss over ``val``.

        Parameters
        ----------
        train, val : sequence of Sample
            ``Sample.boxes`` in pixels; samples without boxes are negatives.
        classes : sequence of str
            Object classes in order.
        load : callable
            ``Sample -> (H, W, C) uint8/uint16 pixels``; called once per sample.
        progress : bool, callable or None, default None
            See :func:`phenocascade.models.training.fit_loop`.
        seed : int, default 0
            Seeds weight init, shuffling and flips.
        device : str, default "cpu"
            Torch device.
        max_epochs : int, default 10
            Upper bound on epochs.
        patience : int, default 3
            Epochs without validation improvement before stopping.

        Returns
        -------
        Self
            With ``model_``, ``classes_``, ``history_`` (training loss per step),
            ``val_history_``, ``calibrators_`` (temperature 1.0) and ``thresholds_`` (fallback).
        """
        if not train or not val:
            raise ConfigError("fit needs at least one training and one validation sample")
        generator = seed_everything(seed)
        rng = np.random.default_rng(seed)
        self.classes_ = list(classes)
        model = self._build(len(self.classes_), self.pretrained).to(device)
        train_data = [self._prepare(s, load) for s in train]
        # With crops, validation uses one crop per image, drawn once: the early-stopping
        # signal then costs what a training step does, not a full-resolution pass.
        val_crops = torch.Generator().manual_seed(seed + 1)
        val_data = [self._crop(*self._prepare(s, load), val_crops) for s in val]
        bank, weights = self._paste_bank(train_data) if self.copy_paste else ([], torch.zeros(0))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

        def losses(batch: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> torch.Tensor:
            images = [img.to(device) for img, _ in batch]
            targets = [{k: v.to(device) for k, v in t.items()} for _, t in batch]
            loss_dict: dict[str, torch.Tensor] = model(images, targets)
            return sum(loss_dict.values(), torch.zeros((), device=device))

        def augment(i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            image, target = self._paste(*train_data[i], bank, weights, generator)
            image, target = self._crop(image, target, generator)
            return self._flip(image, target, generator)

        def epoch_batches(_epoch: int) -> list[list[tuple[torch.Tensor, dict[str, torch.Tensor]]]]:
            return [
                [augment(int(i)) for i in idx]
                for idx in batched(rng.permutation(len(train_data)), self.batch_size)
            ]

        def val_loss() -> float:
            # torchvision detectors only compute losses in training mode; batch norm is put
            # in eval mode so validation does not update its running statistics.
            model.train()
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
            total = 0.0
            with torch.no_grad():
                for idx in batched(np.arange(len(val_data)), self.batch_size):
                    total += float(losses([val_data[i] for i in idx])) * len(idx)
            return total / len(val_data)

        def val_ap_loss() -> float:
            # 1 - AP50 on the prepared (resized, cropped) val images, in their own pixels.
            model.eval()
            outputs, truths = [], []
            with torch.inference_mode():
                for i, (image, target) in enumerate(val_data):
                    det = model([image.to(device)])[0]
                    outputs.append(
                        StageOutput(
                            scores={},
                            boxes=tuple(
                                _box(xyxy, self.classes_[int(k) - 1], float(p))
                                for xyxy, k, p in zip(
                                    det["boxes"].cpu(),
                                    det["labels"].cpu(),
                                    det["scores"].cpu(),
                                    strict=True,
                                )
                            ),
                        )
                    )
                    truths.append(
                        Sample(
                            str(i),
                            None,
                            boxes=tuple(
                                _box(xyxy, self.classes_[int(k) - 1])
                                for xyxy, k in zip(target["boxes"], target["labels"], strict=True)
                            ),
                        )
                    )
            sizes = [(int(img.shape[1]), int(img.shape[2])) for img, _ in val_data]
            ap = [
                v
                for v in coco_ap50(outputs, truths, sizes, self.classes_).values()
                if v is not None
            ]
            # No val boxes at all: AP is undefined, so the loss decides.
            return 1.0 - float(np.mean(ap)) if ap else val_loss()

        result = fit_loop(
            model,
            optimizer=optimizer,
            epoch_batches=epoch_batches,
            train_step=losses,
            val_loss=val_ap_loss if self.early_stopping == "ap50" else val_loss,
            max_epochs=max_epochs,
            patience=patience,
            progress=progress,
            description=f"{self.model_name}/{self.backbone}",
        )
        self.model_ = model.eval()
        self.device_ = device
        self.history_ = result.train_loss
        self.val_history_ = result.val_loss
        self.best_epoch_ = result.best_epoch
        self._neutral_calibration()
        return self

    def predict(
        self, images: Sequence[DecodedImage], *, calibrated: bool = True
    ) -> list[StageOutput]:
        """Detect objects in a batch of images.

        Parameters
        ----------
        images : sequence of DecodedImage
            Pixels ``(H, W, C)``, ``uint8`` or ``uint16``, grey or RGB.
        calibrated : bool, default True
            ``True`` applies the fitted calibrators and drops boxes at or below each
            class's keep threshold (``negative``); ``False`` returns every raw box above
            ``score_floor``.

        Returns
        -------
        list of StageOutput
            One per image. Boxes are ``[x_min, y_min, x_max, y_max]`` in original pixels,
            clipped to the image; ``scores`` has every class.
        """
        outputs: list[StageOutput] = []
        self.model_.eval()
        for start in range(0, len(images), self.predict_batch_size):
            chunk = images[start : start + self.predict_batch_size]
            tensors = [to_chw(to_unit_rgb(img.pixels)).to(self.device_) for img in chunk]
            with torch.inference_mode():
                detections = self.model_(tensors)
            for img, det in zip(chunk, detections, strict=True):
                outputs.append(self._to_output(img, det, calibrated))
        return outputs

    def _to_output(
        self, img: DecodedImage, det: Mapping[str, torch.Tensor], calibrated: bool
    ) -> StageOutput:
        boxes = det["boxes"].cpu().double().numpy()
        labels = det["labels"].cpu().numpy()
        raw = det["scores"].cpu().double().numpy()
        # Label 0 is the background class, so class i of ``classes_`` is label i + 1.
        return self._boxes_output(
            img,
            (
                (x0, y0, x1, y1, self.classes_[int(label_index) - 1], score)
                for (x0, y0, x1, y1), label_index, score in zip(boxes, labels, raw, strict=True)
            ),
            calibrated,
        )

    def _artifact_network(self) -> tuple[torch.nn.Module, int]:
        return self.model_, self.min_size

    @classmethod
    def restore(
        cls,
        config: Mapping[str, Any],
        classes: Sequence[str],
        state: Mapping[str, Any],
        device: str = "cpu",
    ) -> Self:
        """Rebuild a trained network from its config, classes and state dict (no ImageNet file).

        Calibration is left neutral (temperature 1.0, fallback thresholds).
        """
        config = dict(config)
        config["anchor_sizes"] = tuple(config.get("anchor_sizes", (16, 32, 64, 128)))
        stage = cls(**config)
        stage.classes_ = list(classes)
        model = stage._build(len(stage.classes_), None)
        model.load_state_dict(dict(state))
        stage.model_ = model.to(device).eval()
        stage.device_ = device
        stage._neutral_calibration()
        return stage

    @classmethod
    def load(cls, folder: Path, device: str = "cpu") -> Self:
        """Rebuild a trained detector from an artifact folder (``weights_only=True``)."""
        meta = artifact.read_meta(folder, cls.model_name)
        state = artifact.load_weights(folder, device="cpu")
        stage = cls.restore(meta.config, meta.classes, state, device)
        stage._adopt_meta(meta)
        return stage
