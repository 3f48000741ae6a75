"""One conformance suite that every registered Stage backend must pass.

Each backend is trained for a few steps on tiny synthetic images (a bright square on a
noisy background is the object), then checked against the Stage contract and the
estimator rules: configuration-only constructors, ``fit`` returning ``self``, a falling
loss, well-formed predictions, and save/load round trips through ``weights_only=True``.
"""

from __future__ import annotations

import builtins
import json
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from phenocascade.domain import Box, DecodedImage, Route, Sample, StageKind, route
from phenocascade.models.base import Embedder, Stage, backend_names, get_backend, load_stage
from phenocascade.models.calibration import Temperature
from phenocascade.models.certify import calibrate_stage
from phenocascade.models.novelty import NoveltyGuard

SIZE = 48

# Per backend: constructor arguments and epochs small enough for a unit test.
FAST: dict[str, tuple[dict[str, Any], int]] = {
    "quality_cnn": ({"input_size": 32, "view": "resize", "batch_size": 4}, 6),
    "quality_probe": ({"input_size": 32, "n_axes": 4, "batch_size": 4}, 1),
    "multilabel_cnn": ({"backbone": "small_cnn", "input_size": 32, "batch_size": 4}, 6),
    "torchvision_detector": ({"backbone": "resnet18", "min_size": SIZE, "max_size": SIZE}, 5),
    "yolo": ({"imgsz": 64, "batch_size": 4}, 6),
    "nucleus_mask_outlier_detector": (
        {"segmenter": {"crop_size": 32, "batch_size": 4, "steps_per_epoch": 4, "min_area": 4}},
        5,
    ),
    "morphometric_classifier": (
        {"segmenter": {"crop_size": 32, "batch_size": 4, "steps_per_epoch": 4, "min_area": 4}},
        5,
    ),
    "nucleus_outlier_detector": (
        {"detector": {"backbone": "resnet18", "min_size": SIZE, "max_size": SIZE}},
        5,
    ),
}


def _classes(cls: type[Any]) -> tuple[str, ...]:
    return (cls.gate_label,) if cls.kind is StageKind.GATE else ("square",)


def _synthetic(n: int, seed: int, label: str) -> tuple[list[Sample], dict[str, np.ndarray]]:
    """Half of the images hold one bright square (the object / the positive label)."""
    rng = np.random.default_rng(seed)
    samples, pixels = [], {}
    for i in range(n):
        img = (rng.random((SIZE, SIZE, 1)) * 40).astype(np.uint8)
        labels: frozenset[str] = frozenset()
        boxes: tuple[Box, ...] = ()
        if i % 2 == 0:
            side = int(rng.integers(12, 20))
            x, y = (int(v) for v in rng.integers(0, SIZE - side, 2))
            img[y : y + side, x : x + side] = 220
            labels = frozenset({label})
            boxes = (Box(float(x), float(y), float(x + side), float(y + side), label),)
        sid = f"syn{seed}-{i}"
        pixels[sid] = img
        samples.append(Sample(sid, None, labels=labels, boxes=boxes))
    return samples, pixels


def _test_images() -> list[DecodedImage]:
    """Grey uint8, RGB uint8 and grey uint16 images of different sizes."""
    rng = np.random.default_rng(7)
    grey = (rng.random((SIZE, SIZE, 1)) * 40).astype(np.uint8)
    grey[10:26, 12:28] = 230
    rgb = (rng.random((40, 56, 3)) * 60).astype(np.uint8)
    rgb[5:20, 30:45] = 200
    deep = (rng.random((64, 48, 1)) * 4000).astype(np.uint16)
    deep[30:50, 10:30] = 60000
    return [DecodedImage("grey", grey), DecodedImage("rgb", rgb), DecodedImage("deep", deep)]


@pytest.fixture(scope="module", params=backend_names())
def fitted(
    request: pytest.FixtureRequest,
) -> Iterator[tuple[str, Any, list[Sample], dict[str, np.ndarray]]]:
    name = request.param
    cls = get_backend(name)
    config, epochs = FAST.get(name, ({}, 3))
    label = _classes(cls)[0]
    train, train_px = _synthetic(8, 0, label)
    val, val_px = _synthetic(4, 1, label)
    pixels = {**train_px, **val_px}
    stage = cls(**config)
    returned = stage.fit(
        train,
        val,
        classes=_classes(cls),
        load=lambda s: pixels[s.image_id],
        seed=0,
        max_epochs=epochs,
        patience=epochs,
    )
    assert returned is stage
    yield name, stage, val, pixels


@pytest.mark.parametrize("name", backend_names())
def test_constructor_only_stores_configuration(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"constructor did I/O: {args[:1]}")

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    cls = get_backend(name)
    stage = cls(**FAST.get(name, ({}, 3))[0])
    learned = [k for k in vars(stage) if k.endswith("_") and not k.startswith("__")]
    assert learned == []
    monkeypatch.undo()
    assert cls(**stage.get_config()).get_config() == stage.get_config()


def test_loss_goes_down(fitted: tuple[str, Any, list[Sample], dict[str, np.ndarray]]) -> None:
    _, stage, _, _ = fitted
    history = np.asarray(stage.history_, dtype=float)
    assert len(history) >= 4 and np.isfinite(history).all()
    quarter = max(1, len(history) // 4)
    assert history[-quarter:].mean() < history[:quarter].mean()


def test_predictions_follow_the_stage_contract(
    fitted: tuple[str, Any, list[Sample], dict[str, np.ndarray]],
) -> None:
    _, stage, _, _ = fitted
    assert isinstance(stage, Stage)
    images = _test_images()
    outputs = stage.predict(images)
    assert len(outputs) == len(images)
    for img, out in zip(images, outputs, strict=True):
        assert set(out.scores) == set(stage.classes)
        assert all(0.0 <= p <= 1.0 for p in out.scores.values())
        if stage.kind is not StageKind.DETECTOR:
            assert out.boxes == ()
        for box in out.boxes:
            assert box.label in stage.classes
            assert 0.0 <= box.score <= 1.0
            assert 0 <= box.x_min <= box.x_max <= img.width
            assert 0 <= box.y_min <= box.y_max <= img.height
    assert stage.predict([]) == []


def test_save_load_round_trip(
    fitted: tuple[str, Any, list[Sample], dict[str, np.ndarray]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name, stage, val, pixels = fitted
    images = [DecodedImage(s.image_id, pixels[s.image_id]) for s in val]
    calibrate_stage(stage, images, val, target_precision=0.9, delta=0.2)
    before = stage.predict([*images, *_test_images()])
    meta = stage.save(tmp_path / "v1", tier="test")
    assert (tmp_path / "v1" / "weights.pt").is_file()
    assert meta.version == "v1" and meta.backend == name and meta.classes == list(stage.classes)

    calls: list[dict[str, Any]] = []
    real_load = torch.load

    def recording_load(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    loaded = get_backend(name).load(tmp_path / "v1")
    assert calls and all(c.get("weights_only") is True for c in calls)
    assert loaded.version == "v1"
    assert loaded.thresholds == stage.thresholds
    assert loaded.predict([*images, *_test_images()]) == before


def test_an_artifact_with_temperatures_only_still_loads(
    fitted: tuple[str, Any, list[Sample], dict[str, np.ndarray]], tmp_path: Path
) -> None:
    # Artifacts written before calibrators were chosen per label store a temperature per
    # label, ``calibration["temperature"]``; they must load and score as before.
    name, stage, val, pixels = fitted
    images = [DecodedImage(s.image_id, pixels[s.image_id]) for s in val]
    calibrate_stage(stage, images, val, target_precision=0.9, delta=0.2)
    stage.set_calibration(dict.fromkeys(stage.classes, Temperature(1.7)), stage.thresholds_)
    before = stage.predict([*images, *_test_images()])
    stage.save(tmp_path / "v1", tier="test")
    path = tmp_path / "v1" / "metadata.json"
    meta = json.loads(path.read_text())
    record = {"method": "temperature", "temperature": 1.7}
    assert meta["calibration"]["calibrators"] == {label: record for label in stage.classes}
    meta["calibration"] = {"temperature": dict.fromkeys(stage.classes, 1.7)}
    path.write_text(json.dumps(meta))
    loaded = get_backend(name).load(tmp_path / "v1")
    assert loaded.calibrators_ == stage.calibrators_
    assert loaded.predict([*images, *_test_images()]) == before


def test_saved_stage_keeps_its_novelty_state_and_flags_a_foreign_image(
    fitted: tuple[str, Any, list[Sample], dict[str, np.ndarray]], tmp_path: Path
) -> None:
    _, stage, val, pixels = fitted
    # Calibrated on its 12 training and validation images (alpha = 0.1 per kind of features:
    # at least 9 needed).
    train, _ = _synthetic(8, 0, _classes(type(stage))[0])
    samples = [*train, *val]
    images = [DecodedImage(s.image_id, pixels[s.image_id]) for s in samples]
    kinds = "descriptor+backbone" if isinstance(stage, Embedder) else "descriptor"
    alpha = 0.1 * len(kinds.split("+"))
    result = calibrate_stage(
        stage, images, samples, target_precision=0.9, delta=0.2, novelty_alpha=alpha
    )
    version = "20261130T120000-0a1b"
    meta = stage.save(tmp_path / "test" / version, tier="test")
    assert meta.calibration["novelty"] == result.novelty
    assert result.novelty is not None and result.novelty["n"] == 12
    assert result.novelty["features"] == kinds

    loaded = load_stage(tmp_path, "test", version)
    assert isinstance(loaded, NoveltyGuard) and isinstance(loaded, Stage)
    assert loaded.novelty is not None
    for (kind, saved), (loaded_kind, read) in zip(
        stage.novelty_.parts, loaded.novelty.parts, strict=True
    ):
        assert kind == loaded_kind
        saved_state, loaded_state = saved.to_state(), read.to_state()
        assert saved_state.keys() == loaded_state.keys()
        for key, value in saved_state.items():
            np.testing.assert_array_equal(loaded_state[key], value)

    # An RGB field of saturated colour noise: nothing like the dark grey training images.
    foreign = DecodedImage(
        "foreign", np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    )
    outputs = loaded.predict([foreign, *images[:2]])
    assert [o.novel for o in outputs] == [True, False, False]
    assert route(loaded.kind, outputs[0], loaded.thresholds, loaded.gate_label) is Route.ANNOTATE
    # the guard changes nothing but the flag
    assert [o.scores for o in outputs] == [o.scores for o in stage.predict([foreign, *images[:2]])]


def test_embedded_features_have_one_width(
    fitted: tuple[str, Any, list[Sample], dict[str, np.ndarray]],
) -> None:
    _, stage, _, _ = fitted
    if not isinstance(stage, Embedder):
        pytest.skip("this backend offers no embed(); novelty reads the image descriptor")
    images = _test_images()
    features = stage.embed(images)
    assert features.dtype == np.float64 and features.ndim == 2 and len(features) == 3
    assert np.isfinite(features).all()
    np.testing.assert_allclose(stage.embed(images[1:2]), features[1:2], rtol=1e-5, atol=1e-6)
    assert stage.embed([]).shape == (0, features.shape[1])
