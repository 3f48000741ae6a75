"""The morphometric classifier: image labels read off the measured objects of each image.

Synthetic fields hold few or many discs, small or large; the labels are exactly those two
facts, so a backend that measures its objects must learn them from a handful of images,
and keep them through save and load.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from discs import disc_field
from PIL import Image

from phenocascade.domain import Box, DecodedImage, Sample
from phenocascade.errors import ConfigError
from phenocascade.models.backends.morphometric import (
    FEATURES,
    MorphometricClassifier,
    morphometry,
)
from phenocascade.models.segmentation import DESCRIPTION_SIZE, Instance

CLASSES = ("count:few", "count:many", "size:small", "size:large")
SIDE = 96


def _field(rng: np.random.Generator, many: bool, large: bool) -> tuple[np.ndarray, np.ndarray]:
    """A grey field with discs, and its instance label image."""
    return disc_field(rng, SIDE, 14 if many else 3, 9 if large else 3)


def _samples(folder: Path, n: int, seed: int) -> tuple[list[Sample], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    samples, pixels = [], {}
    for i in range(n):
        many, large = bool(i % 2), bool((i // 2) % 2)
        image, labels = _field(rng, many, large)
        image_id = f"f{seed}-{i}"
        mask = folder / f"{image_id}.png"
        Image.fromarray(labels).save(mask)
        pixels[image_id] = image
        tags = {"count:many" if many else "count:few", "size:large" if large else "size:small"}
        samples.append(Sample(image_id, None, labels=frozenset(tags), mask=mask))
    return samples, pixels


def _fit(samples: list[Sample], pixels: dict[str, np.ndarray]) -> MorphometricClassifier:
    stage = MorphometricClassifier(
        segmenter={"crop_size": 64, "batch_size": 4, "steps_per_epoch": 15, "lr": 3e-3}
    )
    return stage.fit(
        samples[:-4],
        samples[-4:],
        classes=CLASSES,
        load=lambda s: pixels[s.image_id],
        max_epochs=4,
        patience=4,
    )


@pytest.mark.slow
def test_labels_that_are_counts_and_sizes_are_learned_from_the_objects(tmp_path: Path) -> None:
    train, pixels = _samples(tmp_path, 24, seed=0)
    stage = _fit(train, pixels)
    assert stage.softmax_groups == (("count:few", "count:many"), ("size:small", "size:large"))
    test, test_pixels = _samples(tmp_path, 12, seed=1)
    images = [DecodedImage(s.image_id, test_pixels[s.image_id]) for s in test]
    outputs = stage.predict(images, calibrated=False)
    right = 0
    for sample, out in zip(test, outputs, strict=True):
        for group in ("count", "size"):
            best = max((c for c in CLASSES if c.startswith(group)), key=lambda c: out.scores[c])
            right += best in sample.labels
    assert right >= 0.9 * 2 * len(test), [o.scores for o in outputs]
    assert stage.embed(images).shape == (len(images), len(FEATURES) + DESCRIPTION_SIZE)

    # A batch scored and then checked for novelty is segmented once.
    calls: list[int] = []
    segment = stage.segmenter_.segment
    stage.segmenter_.segment = lambda px: calls.append(1) or segment(px)  # type: ignore[method-assign]
    batch = [DecodedImage(i.image_id, i.pixels.copy()) for i in images]
    scored = stage.predict(batch)
    np.testing.assert_allclose(stage.embed(batch), stage.embed(images))
    assert len(calls) == 2 * len(batch)  # this batch once, the first batch once more
    assert [o.scores for o in scored] == [o.scores for o in stage.predict(batch)]
    stage.segmenter_.segment = segment  # type: ignore[method-assign]

    stage.save(tmp_path / "artifact" / "v1", tier="majority")
    loaded = MorphometricClassifier.load(tmp_path / "artifact" / "v1")
    assert loaded.softmax_groups == stage.softmax_groups
    np.testing.assert_allclose(loaded.decision_logits(images), stage.decision_logits(images))

    # Another tier adopts that segmenter: it learns its head from image labels alone (no
    # outlines), trains no segmenter, and its artifact keeps the weights, not the path.
    unoutlined = [dataclasses.replace(s, mask=None) for s in train]
    adopter = MorphometricClassifier(segmenter_from=str(tmp_path / "artifact" / "v1")).fit(
        unoutlined[:-4],
        unoutlined[-4:],
        classes=CLASSES,
        load=lambda s: pixels[s.image_id],
    )
    assert adopter.history_ == [] and adopter.segmenter == stage.segmenter
    assert "segmenter_from" not in adopter.get_config()
    found = [o.scores for o in adopter.predict(images, calibrated=False)]
    right = sum(
        max((c for c in CLASSES if c.startswith(g)), key=lambda c: scores[c]) in sample.labels
        for sample, scores in zip(test, found, strict=True)
        for g in ("count", "size")
    )
    assert right >= 0.9 * 2 * len(test), found
    adopter.save(tmp_path / "artifact" / "v2", tier="majority")
    again = MorphometricClassifier.load(tmp_path / "artifact" / "v2")
    np.testing.assert_allclose(again.decision_logits(images), adopter.decision_logits(images))


def test_a_segmenter_from_a_folder_without_one_is_refused(tmp_path: Path) -> None:
    samples = [Sample(f"s{i}", None, labels=frozenset({"count:few"})) for i in range(4)]
    with pytest.raises(ConfigError, match="not a model artifact folder"):
        MorphometricClassifier(segmenter_from=str(tmp_path)).fit(
            samples[:2], samples[2:], classes=CLASSES, load=lambda s: np.zeros((8, 8, 1))
        )


def test_a_tier_without_object_outlines_or_boxes_is_refused() -> None:
    samples = [Sample(f"s{i}", None, labels=frozenset({"count:few"})) for i in range(4)]
    with pytest.raises(ConfigError, match="instance masks or boxes"):
        MorphometricClassifier().fit(
            samples[:2], samples[2:], classes=CLASSES, load=lambda s: np.zeros((8, 8, 1))
        )


def test_morphometry_measures_count_size_and_cover() -> None:
    def disc(area: int) -> Instance:
        return Instance(Box(0, 0, 1, 1, "object", 0.8), area)

    features = dict(
        zip(FEATURES, morphometry([disc(10), disc(20), disc(30)], 100, 100), strict=True)
    )
    assert features["log_count"] == pytest.approx(np.log(4))
    assert features["log_median_area"] == pytest.approx(np.log(20))
    assert features["covered_fraction"] == pytest.approx(60 / 10_000)
    assert features["mean_confidence"] == pytest.approx(0.8)
    empty = dict(zip(FEATURES, morphometry([], 100, 100), strict=True))
    assert empty["log_count"] == 0 and empty["covered_fraction"] == 0
