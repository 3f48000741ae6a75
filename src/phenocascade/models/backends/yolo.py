"""An Ultralytics YOLO detector built from its YAML (no ``.pt`` download), trained offline.

Ultralytics is imported lazily and only after its side effects are switched off: a
private ``YOLO_CONFIG_DIR``, ``YOLO_OFFLINE=1``, and every logging integration, hub sync
and analytics event disabled in its settings. Training writes a YOLO-format copy of the
samples to a temporary folder, which is deleted afterwards. The artifact holds only the
model's state dict; :meth:`YOLODetector.load` rebuilds the network from the YAML and reads
the weights with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812
import yaml
from PIL import Image

from phenocascade.domain import DecodedImage, Sample, StageKind, StageOutput
from phenocascade.errors import ConfigError
from phenocascade.models import artifact
from phenocascade.models.backends._common import CalibratedDetector
from phenocascade.models.base import register_backend
from phenocascade.models.preprocess import to_chw, to_unit_rgb
from phenocascade.models.training import (
    Loader,
    ProgressCallback,
    report_epoch,
    seed_everything,
)

_INTEGRATIONS = (
    "clearml",
    "comet",
    "dvc",
    "hub",
    "mlflow",
    "neptune",
    "raytune",
    "tensorboard",
    "wandb",
)


def _quiet_ultralytics() -> Any:
    """Import ultralytics with every network and logging side effect switched off."""
    os.environ["YOLO_OFFLINE"] = "1"
    # A private settings folder, so the user's own Ultralytics settings are never touched.
    os.environ.setdefault(
        "YOLO_CONFIG_DIR",
        str(Path(tempfile.gettempdir()) / f"phenocascade-yolo-config-{os.getuid()}"),
    )
    import ultralytics
    from ultralytics import settings

    off = {key: False for key in _INTEGRATIONS if key in settings}
    settings.update({**off, "sync": False, "vscode_msg": False, "openvino_msg": False})
    return ultralytics


@contextlib.contextmanager
def _ultralytics_log_level(level: int) -> Iterator[None]:
    """Temporarily set the level of Ultralytics' logger (it prints every epoch and build)."""
    from ultralytics.utils import LOGGER

    previous = LOGGER.level
    LOGGER.setLevel(level)
    try:
        yield
    finally:
        LOGGER.setLevel(previous)


@register_backend("yolo")
class YOLODetector(CalibratedDetector):
    """Ultralytics YOLO (v8/11 family) trained from scratch; kind ``DETECTOR``.

    Boxes are returned in original-image pixels, ``[x_min, y_min, x_max, y_max]`` with the
    maxima exclusive. A class's score is its best box's calibrated score (``1e-6`` if none).

    Parameters
    ----------
    model_yaml : str, default "yolov8n.yaml"
        An Ultralytics model YAML name (``"yolov8n.yaml"``, ``"yolo11n.yaml"``...) or path.
    imgsz : int, default 320
        Network input side (letterboxed), a multiple of 32.
    batch_size : int, default 8
        Training and inference batch size.
    lr : float, default 2e-3
        Initial learning rate (AdamW).
    score_floor : float, default 0.01
        Raw scores below this are never returned.
    iou_nms : float, default 0.6
        IoU threshold of non-maximum suppression.
    detections_per_image : int, default 100
        Upper bound on boxes per image.
    mosaic : float, default 0.0
        Probability of Ultralytics' mosaic augmentation (off: it mixes image scales).
    """

    kind = StageKind.DETECTOR
    model_name = "yolo"
    gate_label = "clear"
    # The network takes [0, 1] pixels as they are.
    normalization = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

    def __init__(
        self,
        *,
        model_yaml: str = "yolov8n.yaml",
        imgsz: int = 320,
        batch_size: int = 8,
        lr: float = 2e-3,
        score_floor: float = 0.01,
        iou_nms: float = 0.6,
        detections_per_image: int = 100,
        mosaic: float = 0.0,
    ) -> None:
        self.model_yaml = model_yaml
        self.imgsz = imgsz
        self.batch_size = batch_size
        self.lr = lr
        self.score_floor = score_floor
        self.iou_nms = iou_nms
        self.detections_per_image = detections_per_image
        self.mosaic = mosaic

    def get_config(self) -> dict[str, Any]:
        """Return the constructor arguments (stored in the artifact)."""
        return {
            "model_yaml": self.model_yaml,
            "imgsz": self.imgsz,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "score_floor": self.score_floor,
            "iou_nms": self.iou_nms,
            "detections_per_image": self.detections_per_image,
            "mosaic": self.mosaic,
        }

    def _build(self, n_classes: int) -> torch.nn.Module:
        _quiet_ultralytics()
        from ultralytics.nn.tasks import DetectionModel

        with _ultralytics_log_level(logging.WARNING):
            return DetectionModel(cfg=self.model_yaml, nc=n_classes, verbose=False)

    def _export(self, samples: Sequence[Sample], load: Loader, root: Path, split: str) -> None:
        """Write samples as 8-bit RGB PNGs plus YOLO label files (class cx cy w h, relative)."""
        index = {c: i for i, c in enumerate(self.classes_)}
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for n, sample in enumerate(samples):
            rgb = (to_unit_rgb(load(sample)) * 255.0 + 0.5).astype(np.uint8)
            h, w = rgb.shape[:2]
            stem = f"{n:06d}"
            Image.fromarray(rgb).save(root / "images" / split / f"{stem}.png")
            lines = []
            for box in sample.boxes:
                if box.label not in index:
                    raise ConfigError(
                        f"sample {sample.image_id} has box label {box.label!r}, "
                        f"not in {self.classes_}"
                    )
                cx, cy = (box.x_min + box.x_max) / 2 / w, (box.y_min + box.y_max) / 2 / h
                bw, bh = (box.x_max - box.x_min) / w, (box.y_max - box.y_min) / h
                lines.append(f"{index[box.label]} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}")
            (root / "labels" / split / f"{stem}.txt").write_text("\n".join(lines))

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
        """Train with Ultralytics' trainer (early stopping on validation fitness).

        Parameters
        ----------
        train, val : sequence of Sample
            ``Sample.boxes`` in pixels; samples without boxes are negatives.
        classes : sequence of str
            Object classes in order.
        load : callable
            ``Sample -> (H, W, C) uint8/uint16 pixels``; called once per sample.
        progress : bool, callable or None, default None
            ``True`` lets Ultralytics print its progress; a callable receives
            ``{"epoch", "train_loss"}`` after each epoch.
        seed : int, default 0
            Ultralytics' seed (deterministic mode).
        device : str, default "cpu"
            ``"cpu"`` or ``"cuda"``.
        max_epochs : int, default 10
            Upper bound on epochs.
        patience : int, default 3
            Epochs without validation improvement before stopping.

        Returns
        -------
        Self
            With ``model_``, ``classes_``, ``history_`` (training loss per step),
            ``calibrators_`` (temperature 1.0) and ``thresholds_`` (fallback).

        Notes
        -----
        After each validation, ``1 - AP50`` on ``val`` (Ultralytics' mAP50) goes to the
        hook of an enclosing :func:`phenocascade.models.training.epoch_hook`.
        """
        if not train or not val:
            raise ConfigError("fit needs at least one training and one validation sample")
        seed_everything(seed)
        ultralytics = _quiet_ultralytics()
        self.classes_ = list(classes)
        history: list[float] = []

        def on_batch_end(trainer: Any) -> None:
            history.append(float(sum(float(v) for v in trainer.loss_items.values())))

        def on_epoch_end(trainer: Any) -> None:
            if callable(progress):
                progress(
                    {
                        "epoch": float(trainer.epoch),
                        "train_loss": history[-1] if history else float("nan"),
                    }
                )

        def on_fit_epoch_end(trainer: Any) -> None:
            # 1 - AP50, the figure torchvision_detector's early_stopping="ap50" reports, so
            # a sweep's pruner compares the two detectors' curves on one scale.
            ap50 = (trainer.metrics or {}).get("metrics/mAP50(B)")
            if ap50 is not None:
                report_epoch(int(trainer.epoch), 1.0 - float(ap50))

        with tempfile.TemporaryDirectory(prefix="phenocascade-yolo-") as tmp:
            root = Path(tmp)
            self._export(train, load, root / "data", "train")
            self._export(val, load, root / "data", "val")
            data = {
                "path": str(root / "data"),
                "train": "images/train",
                "val": "images/val",
                "names": dict(enumerate(self.classes_)),
            }
            (root / "data.yaml").write_text(yaml.safe_dump(data))
            level = logging.INFO if progress is True else logging.WARNING
            with _ultralytics_log_level(level):
                model = ultralytics.YOLO(self.model_yaml, task="detect")
                model.add_callback("on_train_batch_end", on_batch_end)
                model.add_callback("on_train_epoch_end", on_epoch_end)
                model.add_callback("on_fit_epoch_end", on_fit_epoch_end)
                self._train(model, root, max_epochs, patience, device, seed, progress is True)
            # After train() the wrapper holds the best checkpoint's model (unfused).
            net = self._build(len(self.classes_))
            net.load_state_dict(model.model.float().state_dict())
        self.model_ = net.to(device).eval()
        self.device_ = device
        self.history_ = history
        self._neutral_calibration()
        return self

    def _train(
        self,
        model: Any,
        root: Path,
        max_epochs: int,
        patience: int,
        device: str,
        seed: int,
        verbose: bool,
    ) -> None:
        """Run Ultralytics' trainer with plots, AMP checks and downloads switched off."""
        model.train(
            data=str(root / "data.yaml"),
            epochs=max_epochs,
            patience=patience,
            imgsz=self.imgsz,
            batch=self.batch_size,
            device=device,
            workers=0,
            seed=seed,
            deterministic=True,
            optimizer="AdamW",
            lr0=self.lr,
            warmup_epochs=0,
            mosaic=self.mosaic,
            close_mosaic=0,
            amp=False,
            plots=False,
            pretrained=False,
            project=str(root / "runs"),
            name="train",
            exist_ok=True,
            verbose=verbose,
            cache=False,
        )

    def _letterbox(self, pixels: npt.NDArray[Any]) -> tuple[torch.Tensor, float]:
        """Resize the longer side to ``imgsz`` and pad bottom/right with grey 114."""
        image = to_chw(to_unit_rgb(pixels))
        _, h, w = image.shape
        gain = self.imgsz / max(h, w)
        size = (max(1, round(h * gain)), max(1, round(w * gain)))
        image = F.interpolate(image[None], size=size, mode="bilinear", antialias=True)[0]
        out = torch.full((3, self.imgsz, self.imgsz), 114 / 255.0)
        out[:, : size[0], : size[1]] = image
        return out, gain

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
            One per image; boxes in original pixels, clipped to the image.
        """
        from ultralytics.utils.nms import non_max_suppression

        outputs: list[StageOutput] = []
        self.model_.eval()
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            boxed = [self._letterbox(img.pixels) for img in chunk]
            batch = torch.stack([b for b, _ in boxed]).to(self.device_)
            with torch.inference_mode():
                raw = self.model_(batch)
                detections = non_max_suppression(
                    raw,
                    conf_thres=self.score_floor,
                    iou_thres=self.iou_nms,
                    max_det=self.detections_per_image,
                    nc=len(self.classes_),
                )
            for img, (_, gain), det in zip(chunk, boxed, detections, strict=True):
                outputs.append(self._to_output(img, det.cpu().double().numpy(), gain, calibrated))
        return outputs

    def _to_output(
        self, img: DecodedImage, det: npt.NDArray[np.float64], gain: float, calibrated: bool
    ) -> StageOutput:
        # Rows are letterboxed (x_min, y_min, x_max, y_max, score, class); the gain undoes it.
        return self._boxes_output(
            img,
            (
                (x0 / gain, y0 / gain, x1 / gain, y1 / gain, self.classes_[int(cls)], score)
                for x0, y0, x1, y1, score, cls in det[:, :6]
            ),
            calibrated,
        )

    def _artifact_network(self) -> tuple[torch.nn.Module, int]:
        return self.model_, self.imgsz

    @classmethod
    def load(cls, folder: Path, device: str = "cpu") -> Self:
        """Rebuild the network from its YAML and read ``weights.pt`` with ``weights_only=True``."""
        meta = artifact.read_meta(folder, cls.model_name)
        stage = cls(**meta.config)
        net = stage._build(len(meta.classes))
        net.load_state_dict(artifact.load_weights(folder, device="cpu"))
        stage.model_ = net.to(device).eval()
        stage.device_ = device
        stage._adopt_meta(meta)
        return stage
