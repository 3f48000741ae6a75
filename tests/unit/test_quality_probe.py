"""The quality probe: its image statistics, and a gate learned on synthetic fields."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from phenocascade.domain import DecodedImage, Sample
from phenocascade.errors import ConfigError
from phenocascade.models.backends.quality_probe import (
    STATISTICS,
    ProbeNet,
    QualityProbe,
    image_statistics,
)
from phenocascade.models.base import get_backend


def _field(seed: int, size: int = 128) -> np.ndarray:
    """A fluorescence-like field: bright round nuclei on a dark, slightly noisy background."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size))
    yy, xx = np.mgrid[:size, :size]
    for _ in range(int(rng.integers(8, 16))):
        y, x = rng.uniform(8, size - 8, 2)
        r = rng.uniform(4, 9)
        img[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = rng.uniform(0.5, 0.9)
    img = img + rng.normal(0.05, 0.01, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)[:, :, None]


def _blur(pixels: np.ndarray, radius: float) -> np.ndarray:
    blurred = Image.fromarray(pixels[:, :, 0]).filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(blurred)[:, :, None]


def _jpeg(pixels: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(pixels[:, :, 0]).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())))[:, :, None]


def _degrade(pixels: np.ndarray, how: str, seed: int) -> np.ndarray:
    if how == "blur":
        return _blur(pixels, 4.0)
    if how == "jpeg":
        return _jpeg(pixels, 5)
    unit = pixels.astype(np.float64) / 255.0
    rng = np.random.default_rng(seed)
    if how == "noise":
        unit = unit + rng.normal(0, 0.2, unit.shape)
    elif how == "over":
        unit = unit * 4.0 + 0.3
    elif how == "under":
        unit = unit * 0.08
    elif how == "posterise":
        unit = np.round(unit * 3) / 3
    return (np.clip(unit, 0, 1) * 255).astype(np.uint8)


@pytest.mark.parametrize(
    ("how", "statistic", "direction"),
    [
        ("blur", "log_laplacian_var", -1),
        ("blur", "log_sharpness", -1),
        ("blur", "power_log_log_slope", -1),
        ("noise", "log_noise", 1),
        ("over", "saturated", 1),
        ("under", "black", 1),
        ("under", "grey_p99", -1),
        ("posterise", "grey_levels", -1),
        ("jpeg", "block_edges_x", 1),
        ("jpeg", "block_edges_y", 1),
    ],
)
def test_each_statistic_moves_with_its_degradation(
    how: str, statistic: str, direction: int
) -> None:
    j = STATISTICS.index(statistic)
    for seed in range(4):
        clear = image_statistics(_field(seed))
        degraded = image_statistics(_degrade(_field(seed), how, seed))
        assert np.isfinite(clear).all() and np.isfinite(degraded).all()
        assert direction * (degraded[j] - clear[j]) > 0, (seed, clear[j], degraded[j])


def test_statistics_take_grey_rgb_16_bit_and_tiny_images() -> None:
    rng = np.random.default_rng(0)
    for pixels in (
        rng.integers(0, 256, (40, 56, 3), dtype=np.uint8),
        rng.integers(0, 4000, (64, 48), dtype=np.uint16),
        np.zeros((2, 2, 1), dtype=np.uint8),
        rng.integers(0, 256, (1500, 1300, 1), dtype=np.uint8),
    ):
        stats = image_statistics(pixels)
        assert stats.shape == (len(STATISTICS),) and np.isfinite(stats).all()


def _samples(n: int, start: int) -> tuple[list[Sample], dict[str, np.ndarray]]:
    """Half clear fields, half degraded ones (each degradation in turn)."""
    kinds = ("blur", "noise", "over", "under", "posterise", "jpeg")
    samples, pixels = [], {}
    for i in range(start, start + n):
        sid = f"f{i}"
        if i % 2 == 0:
            pixels[sid] = _field(i)
            samples.append(Sample(sid, None, labels=frozenset({"clear"})))
        else:
            pixels[sid] = _degrade(_field(i), kinds[(i // 2) % len(kinds)], i)
            samples.append(Sample(sid, None, labels=frozenset()))
    return samples, pixels


def test_the_probe_learns_clear_from_degraded_fields_and_survives_save_and_load(
    tmp_path: Path,
) -> None:
    train, train_px = _samples(48, 0)
    val, val_px = _samples(12, 100)
    test, test_px = _samples(24, 200)
    pixels = {**train_px, **val_px, **test_px}
    probe = QualityProbe(input_size=64, n_axes=8, batch_size=16).fit(
        train, val, classes=("clear",), load=lambda s: pixels[s.image_id]
    )
    assert probe.penalty_ in probe.penalties and len(probe.val_history_) == 3
    images = [DecodedImage(s.image_id, pixels[s.image_id]) for s in test]
    scores = np.array([o.scores["clear"] for o in probe.predict(images)])
    clear = np.array(["clear" in s.labels for s in test])
    # every clear field above every degraded one
    assert scores[clear].min() > scores[~clear].max()
    assert probe.embed(images).shape == (len(images), 8 + len(STATISTICS))

    probe.save(tmp_path / "v1", tier="quality")
    loaded = get_backend("quality_probe").load(tmp_path / "v1")
    assert loaded.predict(images) == probe.predict(images)


def test_the_probe_describes_an_image_once_however_often_it_is_scored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    train, pixels = _samples(16, 0)
    val, val_px = _samples(6, 100)
    pixels |= val_px
    probe = QualityProbe(input_size=32, n_axes=4, batch_size=4).fit(
        train, val, classes=("clear",), load=lambda s: pixels[s.image_id]
    )
    described: list[int] = []
    real = ProbeNet.deep
    monkeypatch.setattr(ProbeNet, "deep", lambda net, x: described.append(len(x)) or real(net, x))
    # decoded again, as calibration decodes what training read: not described again
    again = [DecodedImage(s.image_id, pixels[s.image_id].copy()) for s in (*train, *val)]
    first = probe.predict(again)
    assert described == [] and np.array_equal(probe.embed(again[:3]), probe.embed(again)[:3])
    fresh = DecodedImage("new", _field(999))
    probe.predict([fresh, *again[:2]])
    probe.embed([fresh])
    assert described == [1]  # the new image only, once
    assert probe.predict(again) == first


def test_negative_penalties_are_refused_in_one_line() -> None:
    train, pixels = _samples(4, 0)
    probe = QualityProbe(input_size=32, penalties=(-1.0,))
    with pytest.raises(ConfigError, match=r"penalties \[-1.0\] must be one or more L2 penalties"):
        probe.fit(train, train, classes=("clear",), load=lambda s: pixels[s.image_id])
