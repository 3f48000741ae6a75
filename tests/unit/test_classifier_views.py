"""Scale-aware classifier views: which labels read native crops and how views pool.

``view="mixed"`` keeps absolute sizes visible (native crops) for the label groups that
depend on them while the other labels still see the whole resized field.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from phenocascade.domain import DecodedImage, Sample
from phenocascade.errors import ConfigError
from phenocascade.models.backends._classifier import pool_views
from phenocascade.models.backends.multilabel_cnn import MultiLabelCNN

CLASSES = ("size:small", "size:large", "density:sparse", "density:dense")


def test_mixed_pooling_takes_crop_groups_from_the_crop_mean_and_the_rest_from_the_field() -> None:
    # Two images: three views (field + 2 crops), then two views (field + 1 crop).
    rows = np.array(
        [
            [10.0, 20.0, 30.0, 40.0],  # image 0 field
            [1.0, 2.0, 3.0, 4.0],
            [3.0, 4.0, 5.0, 6.0],
            [-1.0, -2.0, -3.0, -4.0],  # image 1 field
            [7.0, 8.0, 9.0, 0.0],
        ]
    )
    from_crops = np.array([True, True, False, False])
    pooled = pool_views(rows, [3, 2], "mixed", from_crops)
    np.testing.assert_allclose(pooled, [[2.0, 3.0, 30.0, 40.0], [7.0, 8.0, -3.0, -4.0]])


@pytest.mark.parametrize("view", ["resize", "crops"])
def test_single_kind_views_average_every_view(view: str) -> None:
    rows = np.array([[0.0, 2.0], [2.0, 4.0], [5.0, 5.0]])
    pooled = pool_views(rows, [2, 1], view, np.zeros(2, dtype=bool))  # type: ignore[arg-type]
    np.testing.assert_allclose(pooled, [[1.0, 3.0], [5.0, 5.0]])


def _mixed(**overrides: object) -> MultiLabelCNN:
    config = {
        "backbone": "small_cnn",
        "input_size": 16,
        "view": "mixed",
        "crop_groups": ("size",),
        "crops_per_image": 2,
        "grid_per_side": 2,
        "batch_size": 4,
        **overrides,
    }
    return MultiLabelCNN(**config)  # type: ignore[arg-type]


def test_each_view_is_trained_only_on_its_own_labels() -> None:
    stage = _mixed()
    stage.classes_ = list(CLASSES)
    mask = stage._view_mask(3)
    # The field row learns density only; every crop row learns size only.
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]
    views = stage._eval_views(np.zeros((40, 48, 1), dtype=np.uint8))
    assert views.shape == (1 + 4, 3, 16, 16)


def test_crop_views_are_native_pixels_not_a_resized_field() -> None:
    stage = _mixed(grid_per_side=1)
    pixels = np.zeros((64, 64, 1), dtype=np.uint8)
    pixels[:16, :16] = 255  # a 16 px bright square in the top-left corner
    field, crop = stage._eval_views(pixels)
    # The crop holds the square at its native size; the field shrinks it to a quarter.
    assert torch.allclose(crop, torch.ones_like(crop))
    assert float(field.mean()) == pytest.approx(1 / 16, abs=0.02)


def test_mixed_view_without_any_crop_label_is_refused() -> None:
    samples = [Sample("a", None, labels=frozenset({"density:sparse"}))]
    with pytest.raises(ConfigError, match="crop_groups"):
        _mixed(crop_groups=("nucleus_size",)).fit(
            samples,
            samples,
            classes=CLASSES,
            load=lambda _s: np.zeros((16, 16, 1), dtype=np.uint8),
            max_epochs=1,
        )


def test_mixed_classifier_fits_saves_and_reloads_with_the_same_scores(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = {f"s{i}": (rng.random((24 + 8 * i, 32, 1)) * 255).astype(np.uint8) for i in range(6)}
    samples = [
        Sample(sid, None, labels=frozenset({CLASSES[i % 2], CLASSES[2 + (i // 2) % 2]}))
        for i, sid in enumerate(pixels)
    ]
    stage = _mixed().fit(
        samples[:4],
        samples[4:],
        classes=CLASSES,
        load=lambda s: pixels[s.image_id],
        max_epochs=1,
        patience=1,
    )
    stage.save(tmp_path / "v1", tier="majority")
    loaded = MultiLabelCNN.load(tmp_path / "v1")
    assert loaded.view == "mixed"
    assert loaded.crop_groups == ("size",)
    images = [DecodedImage(sid, px) for sid, px in pixels.items()]
    np.testing.assert_allclose(loaded.decision_logits(images), stage.decision_logits(images))
    assert loaded.embed(images).shape == (len(images), stage.embed(images).shape[1])
