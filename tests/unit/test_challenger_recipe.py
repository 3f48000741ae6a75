"""A challenger is trained as its champion was, whatever the topology's tier says.

``phenocascade sweep TIER`` may promote a trial of another backend, backbone or input
size than the topology's tier; the retrainer's challengers to that champion must keep it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from phenocascade import learning
from phenocascade.config import Settings, TierSpec, Topology, load_topology
from phenocascade.domain import Sample
from phenocascade.learning import RecipeTrainer, challenger_spec
from phenocascade.models.base import ArtifactMeta

CHAMPION = "20261201T090000-5ee9"
# What a sweep's winning trial recorded: not the topology's torchvision_detector.
WINNER = ArtifactMeta(
    backend="yolo",
    tier="rare",
    version=CHAMPION,
    kind="detector",
    classes=["granule"],
    input_size=320,
    normalization={"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
    config={"model_yaml": "yolo11n.yaml", "imgsz": 320, "lr": 0.004, "mosaic": 0.3},
)


def _topology() -> Topology:
    """The packaged topology, its minority tier a lab's ``rare`` detector of granules."""
    packaged = load_topology(None)
    rare = packaged.tier("minority").model_copy(
        update={"name": "rare", "artifact": "rare", "labels": ["granule"], "config": {"lr": 2e-3}}
    )
    tiers = [rare if t.name == "minority" else t for t in packaged.tiers]
    return packaged.model_copy(update={"tiers": tiers})


def _trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[RecipeTrainer, list[Any]]:
    """A trainer whose own-data recipe records the tier entry it is given instead of training."""
    settings = Settings(home=tmp_path, artifacts=tmp_path / "artifacts")
    WINNER.write(settings.artifacts / "rare" / CHAMPION)
    trained: list[Any] = []

    def record(spec: TierSpec, stored: object, **kwargs: Any) -> Path:
        trained.append((spec, kwargs["config_overrides"]))
        folder = settings.artifacts / "rare" / "20261201T100000-0c0c"
        dataclasses.replace(WINNER, backend=spec.backend).write(folder)
        return folder

    monkeypatch.setattr(learning, "train_own_tier", record)
    return RecipeTrainer(settings, topology=_topology()), trained


def test_a_challenger_keeps_its_sweep_winning_champions_backend_and_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer, trained = _trainer(tmp_path, monkeypatch)
    annotated = [Sample(f"img{i}", None, frozenset()) for i in range(8)]
    trainer.train("rare", extra_samples=annotated, parent_version=CHAMPION)
    [(spec, overrides)] = trained
    assert spec.backend == "yolo"
    assert spec.config == WINNER.config
    assert spec.labels == ["granule"] and spec.artifact == "rare"
    assert overrides == {}  # the budget adds nothing here


def test_a_first_model_follows_the_topology(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer, trained = _trainer(tmp_path, monkeypatch)
    annotated = [Sample(f"img{i}", None, frozenset()) for i in range(8)]
    trainer.train("rare", extra_samples=annotated, parent_version="")
    [(spec, _)] = trained
    assert spec.backend == "torchvision_detector" and spec.config == {"lr": 2e-3}


def test_challenger_spec_takes_backend_and_config_from_the_champion_only() -> None:
    tier = _topology().tier("rare")
    assert challenger_spec(tier, None) == tier
    spec = challenger_spec(tier, WINNER)
    assert (spec.backend, spec.config) == ("yolo", WINNER.config)
    assert spec.model_dump(exclude={"backend", "config"}) == tier.model_dump(
        exclude={"backend", "config"}
    )
    spec.config["imgsz"] = 640
    assert WINNER.config["imgsz"] == 320  # the champion's record is not shared
