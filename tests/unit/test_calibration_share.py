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
from phenocascade.data import datasets
from phenocascade.recipes import bundled
from phenocascade.recipes.core import TrainingRun


@pytest.fixture
def root() -> Path:
    path = Settings().datasets
    if not (path / "dsb2018").is_dir():
        pytest.skip(f"shared datasets not found at {path} (set PHENOCASCADE_DATASETS)")
    return path


def _run_of(tier: bundled.Tier, root: Path, monkeypatch: pytest.MonkeyPatch) -> TrainingRun:
    """The TrainingRun ``train_tier`` hands to ``fit_and_save`` (nothing is trained)."""
    runs: list[TrainingRun] = []

    def capture(run: TrainingRun, **_kwargs: Any) -> Path:
        runs.append(run)
        return Path("unused")

    monkeypatch.setattr(bundled, "fit_and_save", capture)
    bundled.train_tier(tier, settings=Settings(datasets=root), progress=False)
    return runs[0]


@pytest.mark.parametrize("tier", ["minority"])
def test_images_that_certify_are_never_trained_on(
    tier: bundled.Tier, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert bundled.recipe(tier, "bootstrap").calibration_share == 0.5
    run = _run_of(tier, root, monkeypatch)
    train_ids = set(datasets.split_ids(root, "dsb2018", "train"))
    val_ids = set(datasets.split_ids(root, "dsb2018", "val"))
    trained = {s.image_id for s in run.train}
    certifying = {s.image_id for s in run.val.samples}
    assert not trained & certifying
    # Half of the 399 train images moved; every val image still certifies.
    assert len(trained) == 199 and trained <= train_ids
    assert certifying == val_ids | (train_ids - trained)
    # Early stopping reads val only, and the moved images keep the tier's own labels.
    assert {s.image_id for s in run.fit_val} <= val_ids
    own = {s.image_id: s for s in bundled.tier_data(tier, root, "train").samples}
    for sample in run.val.samples:
        if sample.image_id in train_ids:
            assert sample.labels == own[sample.image_id].labels
            assert sample.boxes == own[sample.image_id].boxes
    # Seeded: the same images move every time.
    assert {s.image_id for s in _run_of(tier, root, monkeypatch).train} == trained
