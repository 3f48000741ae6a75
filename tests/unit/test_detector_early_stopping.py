"""The torchvision detector can pick its best epoch by validation AP50 instead of the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from phenocascade.domain import Box, Sample
from phenocascade.errors import ConfigError
from phenocascade.models.backends.torchvision_detector import TorchvisionDetector

SIZE = 48


def _squares(n: int, seed: int) -> tuple[list[Sample], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    samples, pixels = [], {}
    for i in range(n):
        img = (rng.random((SIZE, SIZE, 1)) * 40).astype(np.uint8)
        side = int(rng.integers(12, 20))
        x, y = (int(v) for v in rng.integers(0, SIZE - side, 2))
        img[y : y + side, x : x + side] = 220
        sid = f"sq{seed}-{i}"
        pixels[sid] = img
        box = Box(float(x), float(y), float(x + side), float(y + side), "square")
        samples.append(Sample(sid, None, boxes=(box,)))
    return samples, pixels


def test_ap50_early_stopping_records_one_minus_ap_and_restores_the_best_epoch() -> None:
    train, train_px = _squares(8, 0)
    val, val_px = _squares(4, 1)
    pixels = {**train_px, **val_px}
    stage = TorchvisionDetector(
        backbone="resnet18", min_size=SIZE, max_size=SIZE, early_stopping="ap50"
    ).fit(
        train,
        val,
        classes=("square",),
        load=lambda s: pixels[s.image_id],
        max_epochs=3,
        patience=3,
    )
    history = stage.val_history_
    assert len(history) == 3
    assert all(0.0 <= v <= 1.0 for v in history), history
    assert stage.best_epoch_ == int(np.argmin(history))
    assert stage.get_config()["early_stopping"] == "ap50"


def test_unknown_early_stopping_is_refused() -> None:
    with pytest.raises(ConfigError, match="early_stopping"):
        TorchvisionDetector(early_stopping="f1")


def _prepared(
    stage: TorchvisionDetector, samples: list[Sample], pixels: dict[str, np.ndarray]
) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    stage.classes_ = ["square", "dot"]
    return [stage._prepare(s, lambda s: pixels[s.image_id]) for s in samples]


def test_copy_paste_adds_objects_where_no_box_is_and_draws_classes_evenly() -> None:

    samples, pixels = _squares(6, 2)
    # One rare "dot" among six squares.
    rare = Sample("dot", None, boxes=(Box(10.0, 10.0, 16.0, 16.0, "dot"),))
    pixels["dot"] = np.zeros((SIZE, SIZE, 1), np.uint8)
    pixels["dot"][10:16, 10:16] = 255
    stage = TorchvisionDetector(min_size=SIZE, max_size=SIZE, copy_paste=3)
    data = _prepared(stage, [*samples, rare], pixels)
    bank, weights = stage._paste_bank(data)
    assert len(bank) == 7
    # Each class is drawn with the same total weight, whatever its count.
    dots = sum(float(w) for (_, label), w in zip(bank, weights, strict=True) if label == 2)
    assert dots == pytest.approx(float(weights.sum()) / 2)
    generator = torch.Generator().manual_seed(0)
    image, target = data[0]
    pasted, new = stage._paste(image, target, bank, weights, generator)
    assert len(new["boxes"]) > len(target["boxes"])
    assert len(new["labels"]) == len(new["boxes"])
    added = new["boxes"][len(target["boxes"]) :]
    # No pasted object covers a box of the image or another pasted one.
    assert float(box_iou(added, target["boxes"]).max()) == 0.0
    overlaps = box_iou(added, added) - torch.eye(len(added))
    assert float(overlaps.max()) == 0.0
    # The pixels under each new box are those of a training object (maybe flipped).
    for box, label in zip(added, new["labels"][len(target["boxes"]) :], strict=True):
        x0, y0, x1, y1 = (int(v) for v in box)
        patch = pasted[:, y0:y1, x0:x1]
        candidates = [p for p, lab in bank if lab == int(label) and p.shape == patch.shape]
        flips = [(), (-1,), (-2,), (-1, -2)]
        assert any(torch.equal(patch, c.flip(f) if f else c) for c in candidates for f in flips)
    # The source image is untouched, and copy_paste=0 changes nothing.
    assert torch.equal(image, data[0][0])
    off = TorchvisionDetector(min_size=SIZE, max_size=SIZE)
    same, kept = off._paste(image, target, bank, weights, generator)
    assert same is image and kept is target


def test_negative_copy_paste_is_refused() -> None:
    with pytest.raises(ConfigError, match="copy_paste"):
        TorchvisionDetector(copy_paste=-1)
