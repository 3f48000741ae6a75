"""Recipes that calibrate on part of the train split: which images train, which certify.

The DSB nucleus recipe keeps half of the train split's images out of training and certifies
on them beside val (``Recipe.calibration_share``). A model must never see an image that
certifies it, and early stopping still reads val only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from phenocascade.config import Settings
from phenocascade.models.base import ArtifactMeta, set_champion
from phenocascade.recipes import bundled
from phenocascade.recipes.bundled_data import split_ids
from phenocascade.recipes.core import TrainingRun

VERSION = "20261130T220000-0a1b"


@pytest.fixture
def root() -> Path:
    path = Settings().datasets
    if not (path / "dsb2018").is_dir():
        pytest.skip(f"shared datasets not found at {path} (set PHENOCASCADE_DATASETS)")
    return path


def _run_of(
    tier: bundled.Tier,
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    settings: Settings | None = None,
    **kwargs: Any,
) -> TrainingRun:
    """The TrainingRun ``train_tier`` hands to ``fit_and_save`` (nothing is trained)."""
    runs: list[TrainingRun] = []

    def capture(run: TrainingRun, **_kwargs: Any) -> Path:
        runs.append(run)
        return Path("unused")

    monkeypatch.setattr(bundled, "fit_and_save", capture)
    bundled.train_tier(tier, settings=settings or Settings(datasets=root), progress=False, **kwargs)
    return runs[0]


@pytest.mark.parametrize("tier", ["minority", "majority"])
def test_images_that_certify_are_never_trained_on(
    tier: bundled.Tier, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert bundled.recipe(tier, "bootstrap").calibration_share == 0.5
    run = _run_of(tier, root, monkeypatch)
    settings = Settings(datasets=root)
    train_ids = set(split_ids(settings, "dsb2018", "train"))
    val_ids = set(split_ids(settings, "dsb2018", "val"))
    trained = {s.image_id for s in run.train}
    certifying = {s.image_id for s in run.val.samples}
    assert not trained & certifying
    # Half of the 399 train images moved; every val image still certifies.
    assert len(trained) == 199 and trained <= train_ids
    assert certifying == val_ids | (train_ids - trained)
    # Early stopping reads val only, and the moved images keep the tier's own labels.
    assert {s.image_id for s in run.fit_val} <= val_ids
    own = {s.image_id: s for s in bundled.tier_data(tier, settings, "train").samples}
    for sample in run.val.samples:
        if sample.image_id in train_ids:
            assert sample.labels == own[sample.image_id].labels
            assert sample.boxes == own[sample.image_id].boxes
    # Seeded: the same images move every time.
    assert {s.image_id for s in _run_of(tier, root, monkeypatch).train} == trained


def test_the_majority_head_adopts_a_segmenter_only_one_trained_on_its_own_images(
    root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    minority = _run_of("minority", root, monkeypatch)
    settings = Settings(datasets=root, artifacts=tmp_path / "artifacts")

    def champion(fingerprint: str, backend: str = "nucleus_mask_outlier_detector") -> Path:
        folder = settings.artifacts / "minority" / VERSION
        ArtifactMeta(
            backend=backend,
            tier="minority",
            version=VERSION,
            kind="detector",
            classes=["large_nucleus"],
            input_size=256,
            normalization={},
            data_fingerprint=fingerprint,
        ).write(folder)
        set_champion(settings.artifacts, "minority", VERSION)
        return folder

    folder = champion(minority.fingerprint_set.fingerprint())
    run = _run_of("majority", root, monkeypatch, settings)
    assert run.backend == "morphometric_classifier"
    assert run.config["segmenter_from"] == str(folder)
    assert run.record["segmenter_from"] == f"minority/{VERSION}"
    # The head learns from the images the segmenter learnt from; the rest certify both.
    assert {s.image_id for s in run.train} == {s.image_id for s in minority.train}
    assert {s.image_id for s in run.val.samples} == {s.image_id for s in minority.val.samples}
    assert all(len(s.labels) == 2 for s in run.val.samples)  # the majority's own labels
    # A sweep trial that samples its own segmenter settings trains that segmenter.
    sampled = {"segmenter": {"crop_size": 192, "lr": 1e-3, "steps_per_epoch": 25}}
    trial = _run_of("majority", root, monkeypatch, settings, config_overrides=sampled)
    assert "segmenter_from" not in trial.config

    # A segmenter that saw other images, or a champion without one: the head's recipe
    # trains a segmenter of its own instead.
    champion("0" * 64)
    assert "segmenter_from" not in _run_of("majority", root, monkeypatch, settings).config
    champion(minority.fingerprint_set.fingerprint(), backend="nucleus_outlier_detector")
    assert "segmenter_from" not in _run_of("majority", root, monkeypatch, settings).config
