"""Cross-fitting in fit-certify-save: no certified score comes from a model that saw its image."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from phenocascade.data.labelled import LabelledSet
from phenocascade.domain import DecodedImage, Sample, StageKind, StageOutput
from phenocascade.errors import ConfigError
from phenocascade.models.calibration import Calibrator
from phenocascade.recipes import core
from phenocascade.recipes.core import TrainingRun


class RecordingGate:
    """A gate stand-in that records what each instance trained and early-stopped on."""

    kind = StageKind.GATE
    classes = ("clear",)
    fits: list[tuple[set[str], set[str]]] = []

    def __init__(self, **config: Any) -> None:
        self.config = config

    def fit(self, train: Sequence[Sample], fit_val: Sequence[Sample], **kwargs: Any) -> Any:
        RecordingGate.fits.append(({s.image_id for s in train}, {s.image_id for s in fit_val}))
        return self

    def predict(
        self, images: Sequence[DecodedImage], *, calibrated: bool = True
    ) -> list[StageOutput]:
        # Clear images score high: the last character of the id is the truth.
        return [
            StageOutput(scores={"clear": 0.9 if img.image_id.endswith("1") else 0.1})
            for img in images
        ]

    def set_calibration(
        self, calibrators: Mapping[str, Calibrator], thresholds: Mapping[str, Mapping[str, float]]
    ) -> None:
        self.thresholds = {label: dict(t) for label, t in thresholds.items()}


def _sample(source: int, copy: int, clear: int) -> Sample:
    return Sample(
        f"s{source}~{copy}-{clear}",
        Path(f"s{source}.png"),
        labels=frozenset({"clear"}) if clear else frozenset(),
        group=f"s{source}",
    )


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch) -> TrainingRun:
    RecordingGate.fits = []
    monkeypatch.setattr(core, "new_stage", lambda name, config: RecordingGate(**config))
    monkeypatch.setattr(
        core,
        "decode",
        lambda samples: [DecodedImage(s.image_id, np.zeros((4, 4, 1))) for s in samples],
    )
    # 20 training and 10 validation sources, each a clear image and a degraded copy.
    train = tuple(_sample(i, c, 1 - c) for i in range(20) for c in (0, 1))
    val = tuple(_sample(i, c, 1 - c) for i in range(20, 30) for c in (0, 1))
    val_set = LabelledSet("quality/val", ("clear",), val)
    return TrainingRun(
        artifact="quality",
        backend="recording",
        config={},
        train=train,
        fit_val=val[:8],
        val=val_set,
        fingerprint_set=LabelledSet("quality/train", ("clear",), train),
        max_epochs=2,
        patience=1,
    )


def _cross_fit(run: TrainingRun, folds: int) -> Any:
    return core._fit_cross_fitted(
        run, folds, target=0.9, delta=0.2, seed=0, device="cpu", progress=False
    )


def test_fold_models_never_see_the_images_they_score(run: TrainingRun) -> None:
    fitted = _cross_fit(run, 3)
    pool = {s.image_id: s for s in (*run.train, *run.val.samples)}
    early = {s.image_id for s in run.fit_val}
    *folds, deployed = RecordingGate.fits
    assert len(folds) == 3
    held_out: list[set[str]] = []
    for train, fit_val in folds:
        seen = train | fit_val
        held_out.append(set(pool) - seen)
        assert fit_val <= early and not train & early
        # a source and its degraded copy are on one side
        assert {pool[i].group for i in seen}.isdisjoint({pool[i].group for i in held_out[-1]})
    # every train and val image is scored once, by the model that did not see it
    assert set().union(*held_out) == set(pool)
    assert sum(len(h) for h in held_out) == len(pool)
    # the deployed model trains on all but the early-stopping samples and stops on them
    assert deployed == (set(pool) - early, early)
    assert fitted.train_samples == len(pool) - len(early)
    assert fitted.calibration.certification == {
        "method": "ltt-binomial",
        "n": 60,
        "cross_fit": 3,
        "calibration_folds": 3,
    }
    assert fitted.stage.thresholds["clear"]["n"] == 60


def test_cross_fitting_needs_two_folds_and_validation_early_stopping(run: TrainingRun) -> None:
    with pytest.raises(ConfigError, match="at least 2 folds"):
        _cross_fit(run, 1)
    other = Sample("nucleus-crop", Path("n.png"), labels=frozenset({"clear"}))
    with pytest.raises(ConfigError, match="early-stopping samples to be validation samples"):
        _cross_fit(dataclasses.replace(run, fit_val=(other,)), 3)
