"""The torchvision detector can pick its best epoch by validation AP50 instead of the loss."""

from __future__ import annotations

import numpy as np
import pytest

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
