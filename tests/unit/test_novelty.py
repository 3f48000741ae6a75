"""Shift detection: the Mahalanobis detector, its calibration, the descriptor, the guard."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from phenocascade.domain import (
    DecodedImage,
    LabelThresholds,
    Route,
    StageKind,
    StageOutput,
    route,
)
from phenocascade.errors import ArtifactError
from phenocascade.models.base import Stage
from phenocascade.models.novelty import (
    DESCRIPTOR_SIZE,
    NOVELTY_FILE,
    NoveltyDetector,
    NoveltyGuard,
    StageNovelty,
    conformal_threshold,
    image_descriptor,
    ledoit_wolf_covariance,
    min_calibration_size,
)


def _correlated(rng: np.random.Generator, n: int, d: int = 8) -> np.ndarray:
    mixing = np.linalg.cholesky(0.5 * np.eye(d) + 0.5)  # unit variances, correlation 0.5
    return rng.normal(size=(n, d)) @ mixing.T + 3.0


# -- the detector ------------------------------------------------------------------------
def test_a_shifted_cluster_is_flagged() -> None:
    rng = np.random.default_rng(0)
    detector = NoveltyDetector(alpha=0.05).fit(_correlated(rng, 300))
    # 1.5 standard deviations per feature, within what a per-feature 3-sigma rule
    # accepts, but against the correlation: a Mahalanobis shift of 6.
    shifted = _correlated(rng, 500) + 1.5 * np.array([1, -1] * 4)
    assert detector.is_novel(shifted).mean() > 0.95
    assert detector.score(shifted).shape == (500,)


def test_false_alarm_rate_stays_near_alpha_on_held_out_data() -> None:
    # Conformal calibration bounds the false-alarm rate averaged over calibration draws by
    # alpha (cross-fitting only lowers it). Averaged over 30 draws of n = 199 (rank 180 of
    # 199 at alpha = 0.1) the per-draw rate has standard deviation about
    # sqrt(0.1 * 0.9 / 200) / sqrt(30) = 0.004, so 0.115 is more than 3.5 deviations above
    # alpha; the lower bound checks the threshold is not uselessly conservative.
    alpha = 0.1
    rates = []
    for seed in range(30):
        rng = np.random.default_rng(seed)
        detector = NoveltyDetector(alpha=alpha, seed=seed).fit(_correlated(rng, 199))
        rates.append(detector.is_novel(_correlated(rng, 2000)).mean())
    assert 0.05 < float(np.mean(rates)) < alpha + 0.015


def _out_of_fold(x: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """The cross-fitted scores NoveltyDetector.fit calibrates on, recomputed."""
    order = np.random.default_rng(seed).permutation(len(x))
    scores = np.empty(len(x))
    for held in np.array_split(order, folds):
        rest = np.setdiff1d(np.arange(len(x)), held)
        scores[held] = NoveltyDetector().fit(x[rest]).score(x[held])
    return scores


def test_too_few_calibration_rows_fall_back_to_the_largest_out_of_fold_score(
    tmp_path: Path,
) -> None:
    # alpha = 0.01 needs 99 rows; 10 give the strictest finite conformal threshold, the
    # largest out-of-fold score, at a false-alarm rate of at most 1 / 11.
    rng = np.random.default_rng(1)
    x = _correlated(rng, 10)
    detector = NoveltyDetector(alpha=0.01).fit(x)
    assert detector.threshold_ == _out_of_fold(x).max()
    assert detector.false_alarm_bound == pytest.approx(1 / 11)
    assert detector.is_novel(x[:3] + 100.0).all()
    assert not detector.is_novel(x).any()
    np.savez(tmp_path / "state.npz", **detector.to_state())
    with np.load(tmp_path / "state.npz", allow_pickle=False) as state:
        back = NoveltyDetector.from_state(state)
    assert back.threshold_ == detector.threshold_
    assert back.false_alarm_bound == detector.false_alarm_bound
    # 99 rows reach alpha itself: the 99th smallest of 99, the largest too, bound 0.01.
    enough = NoveltyDetector(alpha=0.01).fit(_correlated(rng, 99))
    assert enough.false_alarm_bound == 0.01
    assert NoveltyDetector(alpha=0.01).fit(_correlated(rng, 98)).false_alarm_bound > 0.01


def test_the_fallback_threshold_keeps_its_false_alarm_bound_on_held_out_data() -> None:
    # A single draw of n = 10 is erratic (rates from 0 to 0.4); averaged over 200 draws
    # the rate (0.066 here, standard error 0.008) stays under the bound 1 / 11 = 0.091.
    # It is not zero, as it was when too few rows made the threshold infinite.
    rates = []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        detector = NoveltyDetector(alpha=0.01, seed=seed).fit(_correlated(rng, 10))
        rates.append(detector.is_novel(_correlated(rng, 500)).mean())
    assert 0.0 < float(np.mean(rates)) < 1 / 11


def test_min_calibration_size_is_where_the_conformal_threshold_turns_finite() -> None:
    assert (min_calibration_size(0.02), min_calibration_size(0.01)) == (49, 99)
    for alpha in [0.01, 0.02, 0.05, 0.1, 0.03 / 3, 0.05 / 2, *np.linspace(0.001, 0.9, 300)]:
        m = min_calibration_size(float(alpha))
        assert math.isinf(conformal_threshold(np.arange(float(max(m - 1, 0))), alpha))
        assert math.isfinite(conformal_threshold(np.arange(float(max(m, 1))), alpha))


def test_conformal_threshold_rank() -> None:
    scores = np.arange(1.0, 100.0)  # 99 scores
    # ceil(100 * 0.99) = 99: the largest, not past the end despite 100 * 0.99 > 99 in floats
    assert conformal_threshold(scores, 0.01) == 99.0
    assert conformal_threshold(scores[:-1], 0.01) == math.inf
    assert conformal_threshold(scores, 0.1) == 90.0  # ceil(100 * 0.9) = 90


def test_shrunk_covariance_is_positive_definite_and_keeps_the_trace() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(10, 40)) * np.linspace(0.5, 2.0, 40)
    x -= x.mean(0)
    sample = x.T @ x / len(x)
    shrunk = ledoit_wolf_covariance(x)
    assert np.linalg.eigvalsh(sample).min() < 1e-9  # 10 samples cannot span 40 dimensions
    assert np.linalg.eigvalsh(shrunk).min() > 1e-3
    assert np.trace(shrunk) == pytest.approx(np.trace(sample) + 40 * 1e-6)


def test_features_it_was_not_fitted_on_are_refused_and_non_finite_rows_are_novel() -> None:
    rng = np.random.default_rng(3)
    detector = NoveltyDetector().fit(_correlated(rng, 100))
    with pytest.raises(ValueError, match="expected 8 features"):
        detector.score(np.zeros((2, 7)))
    row = _correlated(rng, 1)
    row[0, 3] = np.nan
    assert detector.is_novel(row).all()
    with pytest.raises(ValueError, match="at least 3 rows"):
        NoveltyDetector().fit(_correlated(rng, 2))


def test_state_round_trips_through_npz_without_pickle(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    x = np.hstack([_correlated(rng, 60), rng.normal(size=(60, 50))])  # d > n / 2: PCA
    detector = NoveltyDetector(alpha=0.05, folds=4, seed=7).fit(x)
    assert detector.gaussian_.components.shape == (30, 58)
    np.savez(tmp_path / "state.npz", **detector.to_state())
    with np.load(tmp_path / "state.npz", allow_pickle=False) as state:
        back = NoveltyDetector.from_state(state)
    probe = np.vstack([x[:5], x[:5] + 3.0])
    np.testing.assert_array_equal(back.score(probe), detector.score(probe))
    assert back.threshold_ == detector.threshold_
    assert (back.alpha, back.folds, back.max_components, back.seed) == (0.05, 4, None, 7)


# -- the descriptor ----------------------------------------------------------------------
def _blobs(rng: np.random.Generator, shape: tuple[int, int], n: int) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape)
    for _ in range(n):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        radius = rng.uniform(3, 8)
        out += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
    return np.clip(out, 0, 1)


def _fluorescence(rng: np.random.Generator) -> np.ndarray:
    """Grey, dark background, bright nuclei; half of them 16-bit."""
    shape = (int(rng.integers(64, 97)), int(rng.integers(64, 97)))
    image = (
        0.04
        + 0.01 * rng.normal(size=shape)
        + rng.uniform(0.5, 0.95) * _blobs(rng, shape, int(rng.integers(4, 12)))
    )
    image = np.clip(image, 0, 1)[:, :, None]
    if rng.random() < 0.5:
        return (image * 4095).astype(np.uint16)  # a 12-bit camera in a 16-bit file
    return (image * 255).astype(np.uint8)


def _electron_microscopy(rng: np.random.Generator) -> np.ndarray:
    """Grey, mid-grey everywhere, fine texture and dark membranes."""
    coarse = np.kron(rng.normal(size=(12, 12)), np.ones((8, 8)))
    image = 0.55 + 0.08 * coarse + 0.06 * rng.normal(size=(96, 96))
    image[:, int(rng.integers(10, 80)) :: 23] -= 0.3
    return (np.clip(image, 0, 1)[:, :, None] * 255).astype(np.uint8)


def _stained(rng: np.random.Generator) -> np.ndarray:
    """RGB, pink tissue with purple nuclei."""
    nuclei = _blobs(rng, (80, 80), int(rng.integers(5, 15)))[:, :, None]
    pink = np.array([0.93, 0.72, 0.82]) + 0.04 * rng.normal(size=(80, 80, 3))
    purple = np.array([0.45, 0.25, 0.6])
    image = (1 - nuclei) * pink + nuclei * purple
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def test_descriptor_shape_and_dtype() -> None:
    rng = np.random.default_rng(5)
    for pixels in (_fluorescence(rng), _stained(rng), np.zeros((1, 300, 1), np.uint8)):
        d = image_descriptor(pixels)
        assert d.shape == (DESCRIPTOR_SIZE,) and d.dtype == np.float64
        assert np.isfinite(d).all()


def test_descriptor_separates_modalities() -> None:
    rng = np.random.default_rng(6)
    fit = np.stack([image_descriptor(_fluorescence(rng)) for _ in range(80)])
    detector = NoveltyDetector(alpha=0.05).fit(fit)
    fluorescence = np.stack([image_descriptor(_fluorescence(rng)) for _ in range(40)])
    em = np.stack([image_descriptor(_electron_microscopy(rng)) for _ in range(20)])
    stained = np.stack([image_descriptor(_stained(rng)) for _ in range(20)])
    assert detector.is_novel(em).all()
    assert detector.is_novel(stained).all()
    assert detector.is_novel(fluorescence).sum() <= 6  # alpha = 0.05 of 40 is 2


# -- a stage's novelty and the guard -----------------------------------------------------
class ConfidentGate:
    """A gate sure that every image is unusable: what auto-skipped the EM slices."""

    kind = StageKind.GATE
    classes = ("clear",)
    model_name = "confident_gate"
    version = "v1"
    gate_label = "clear"
    thresholds = {"clear": LabelThresholds(positive=0.9, negative=0.4)}

    def predict(
        self, images: Sequence[DecodedImage], *, calibrated: bool = True
    ) -> list[StageOutput]:
        return [StageOutput(scores={"clear": 0.01 if calibrated else 0.2}) for _ in images]


class EmbeddingGate(ConfidentGate):
    """A gate with backbone features: 8 draws seeded by the image id, far off for ``shift``."""

    def __init__(self) -> None:
        self.shift: set[str] = set()

    def embed(self, images: Sequence[DecodedImage]) -> np.ndarray:
        rows = []
        for img in images:
            rng = np.random.default_rng(sum(img.image_id.encode()))
            rows.append(rng.normal(size=8) + (25.0 if img.image_id in self.shift else 0.0))
        return np.stack(rows)


def test_guard_sends_novel_images_to_a_person_and_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    gate = ConfidentGate()
    val = [DecodedImage(f"f{i}", _fluorescence(rng)) for i in range(60)]
    novelty = StageNovelty.fit(gate, [val[:25], val[25:]], alpha=0.05)
    ((_, detector),) = novelty.parts
    assert novelty.summary() == {
        "alpha": 0.05,
        "threshold": {"descriptor": detector.threshold_},
        "features": "descriptor",
        "n": 60,
    }
    novelty.save(tmp_path)
    with np.load(tmp_path / NOVELTY_FILE, allow_pickle=False) as state:
        assert [str(k) for k in state["features"]] == ["descriptor"]
    guard = NoveltyGuard.around(gate, tmp_path)
    assert isinstance(guard, Stage)
    assert (guard.kind, guard.version, guard.thresholds) == (gate.kind, "v1", gate.thresholds)
    em = DecodedImage("em", _electron_microscopy(rng))
    fresh = DecodedImage("fresh", _fluorescence(rng))
    outputs = guard.predict([em, fresh])
    assert [o.novel for o in outputs] == [True, False]
    assert [route(gate.kind, o, gate.thresholds) for o in outputs] == [Route.ANNOTATE, Route.SKIP]
    # raw scores for calibration pass through untouched
    assert guard.predict([em], calibrated=False) == [StageOutput(scores={"clear": 0.2})]


def test_an_artifact_without_novelty_state_flags_nothing(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    guard = NoveltyGuard.around(ConfidentGate(), tmp_path)
    assert guard.novelty is None
    assert not guard.predict([DecodedImage("em", _electron_microscopy(rng))])[0].novel


def test_too_few_images_warn_what_the_rate_needs_and_still_flag_another_modality(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rng = np.random.default_rng(12)
    gate = ConfidentGate()
    val = [DecodedImage(f"f{i}", _fluorescence(rng)) for i in range(12)]
    with caplog.at_level(logging.WARNING, logger="phenocascade.models.novelty"):
        novelty = StageNovelty.fit(gate, [val])
    (message,) = [r.getMessage() for r in caplog.records]
    assert "12 calibration images are too few for a novelty false-alarm rate of 0.05" in message
    assert "(19 are needed)" in message and "at most about 0.0769" in message
    ((_, detector),) = novelty.parts
    assert novelty.summary()["threshold"] == {"descriptor": detector.threshold_}
    em = [DecodedImage(f"em{i}", _electron_microscopy(rng)) for i in range(5)]
    assert novelty.flags(gate, em).all()


def test_a_state_saved_with_an_infinite_threshold_warns_when_loaded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(13)
    val = [DecodedImage(f"f{i}", _fluorescence(rng)) for i in range(5)]
    state = StageNovelty.fit(ConfidentGate(), [val]).parts[0][1].to_state()
    state["threshold"] = math.inf  # what fits on too few images stored before the fallback
    prefixed = {f"descriptor.{k}": v for k, v in state.items()}
    np.savez(tmp_path / NOVELTY_FILE, features=np.array(["descriptor"]), **prefixed)
    with caplog.at_level(logging.WARNING, logger="phenocascade.models.novelty"):
        guard = NoveltyGuard.around(ConfidentGate(), tmp_path)
    assert "flags no image as novel" in caplog.text and "retrain the tier" in caplog.text
    assert not guard.predict([DecodedImage("em", _electron_microscopy(rng))])[0].novel


def test_a_state_naming_unknown_features_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    novelty = StageNovelty.fit(
        ConfidentGate(), [[DecodedImage(f"f{i}", _fluorescence(rng)) for i in range(5)]]
    )
    state = novelty.parts[0][1].to_state()
    np.savez(tmp_path / NOVELTY_FILE, features=np.str_("pixels"), **state)
    with pytest.raises(ArtifactError, match="unknown novelty features 'pixels'"):
        StageNovelty.load(tmp_path)


def test_a_stage_with_a_backbone_is_read_on_both_features_at_half_the_rate_each(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(10)
    stage = EmbeddingGate()
    val = [DecodedImage(f"f{i}", _fluorescence(rng)) for i in range(120)]
    novelty = StageNovelty.fit(stage, [val], alpha=0.04)
    assert [(kind, d.alpha) for kind, d in novelty.parts] == [
        ("descriptor", 0.02),
        ("backbone", 0.02),
    ]
    assert novelty.summary()["features"] == "descriptor+backbone"
    # An image whose pixels look right but whose features do not is flagged all the same.
    odd = DecodedImage("odd", _fluorescence(rng))
    stage.shift = {"odd"}
    assert novelty.flags(stage, [odd, val[0]]).tolist() == [True, False]
    novelty.save(tmp_path)
    loaded = StageNovelty.load(tmp_path)
    assert loaded is not None and loaded.summary() == novelty.summary()
    assert loaded.flags(stage, [odd, val[0]]).tolist() == [True, False]


def test_a_state_from_before_the_backbone_detector_still_loads(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    val = [DecodedImage(f"f{i}", _fluorescence(rng)) for i in range(60)]
    novelty = StageNovelty.fit(ConfidentGate(), [val], alpha=0.05)
    detector = novelty.parts[0][1]
    np.savez(tmp_path / NOVELTY_FILE, features=np.str_("descriptor"), **detector.to_state())
    loaded = StageNovelty.load(tmp_path)
    assert loaded is not None and loaded.summary() == novelty.summary()
