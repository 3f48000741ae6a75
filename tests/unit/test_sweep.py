"""``phenocascade sweep``: Optuna model selection of a tier, its pruning and its promotion."""

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from discs import disc_field
from PIL import Image

from phenocascade.cli import main
from phenocascade.cli.sweep import promote_best
from phenocascade.config import TierSpec, get_settings, load_topology
from phenocascade.consumers.retrainer import decide
from phenocascade.data.labelled import LabelledSet
from phenocascade.data.registry import StoredDataset, load_dataset, save_dataset
from phenocascade.domain import Sample, StageKind
from phenocascade.models.base import champion_version
from phenocascade.recipes import sweep
from phenocascade.recipes.own import own_recipe
from phenocascade.recipes.sweep import (
    BackendSpace,
    SweepResult,
    default_space,
    sweep_tier,
    trial_config,
)

TIER = "majority"
ARTIFACT = "cells-majority"
# One backbone, tiny inputs, one or two epochs: a trial takes about a second.
TINY = {"multilabel_cnn": BackendSpace(("small_cnn",), (32, 48), (1e-3, 1e-2), (1, 2))}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A home with a stored dataset ``cells`` and a topology whose majority tier learns it."""
    monkeypatch.setenv("PHENOCASCADE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PHENOCASCADE_ARTIFACTS", str(tmp_path / "home" / "artifacts"))
    get_settings.cache_clear()
    _dataset(tmp_path / "images", get_settings().dataset_store)
    topology = load_topology(None)
    tiers = [
        t.model_copy(
            update={"labels": ["bright", "dark"], "dataset": "cells", "artifact": ARTIFACT}
        )
        if t.name == TIER
        else t
        for t in topology.tiers
    ]
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(topology.model_copy(update={"tiers": tiers}).model_dump()))
    monkeypatch.setenv("PHENOCASCADE_TOPOLOGY", str(path))
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()


def _dataset(folder: Path, store: Path) -> StoredDataset:
    """16 grey 24x24 PNGs: 8 bright and 8 dark fields, with noise."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    samples = []
    for i in range(16):
        label = "bright" if i % 2 else "dark"
        level = 190 if label == "bright" else 60
        pixels = np.clip(rng.normal(level, 25, (24, 24)), 0, 255).astype(np.uint8)
        path = folder / f"{i:02d}.png"
        Image.fromarray(pixels).save(path)
        samples.append(Sample(f"{i:02d}", path, frozenset({label}), group=f"{i:02d}"))
    labelled = LabelledSet("cells", ("bright", "dark"), tuple(samples))
    return save_dataset(store, "cells", labelled, kinds={"bright": "image", "dark": "image"})


def _spec() -> TierSpec:
    return load_topology(get_settings().topology).tier(TIER)


def _stored() -> StoredDataset:
    return load_dataset(get_settings().dataset_store, "cells")


def _versions(artifacts: Path) -> set[str]:
    return {p.name for p in (artifacts / ARTIFACT).iterdir() if p.is_dir()}


@pytest.mark.slow
def test_a_sweep_stores_its_trials_keeps_the_best_and_makes_it_first_champion(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sweep, "default_space", lambda *_, **__: TINY)
    settings = get_settings()
    assert champion_version(settings.artifacts, ARTIFACT) is None

    args = ["sweep", TIER, "--trials", "3", "--budget-minutes", "5", "--no-publish"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert [line.split()[:2] for line in out.splitlines()[:3]] == [
        ["trial", "0"],
        ["trial", "1"],
        ["trial", "2"],
    ]
    assert "is champion" in out and "workers load it when they (re)start" in out
    assert (home / "sweeps.db").is_file()

    assert main(["sweep", "show", TIER, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["study"] == ARTIFACT and shown["metric"] == "mean_ap"
    trials = shown["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2]
    for t in trials:
        assert t["state"] == "complete"
        assert t["params"]["backend"] == "multilabel_cnn"
        assert t["params"]["multilabel_cnn.backbone"] == "small_cnn"
        assert t["params"]["multilabel_cnn.input_size"] in (32, 48)
        assert 1e-3 <= t["params"]["multilabel_cnn.lr"] <= 1e-2
        assert 0.0 <= t["metric"] <= 1.0 and t["seconds"] > 0 and t["version"]
    best = [t for t in trials if t["best"]]
    assert len(best) == 1 and best[0]["metric"] == max(t["metric"] for t in trials)
    assert [t["champion"] for t in trials] == [t["best"] for t in trials]

    # The best trial is champion (the tier had none); the other trials' folders are gone.
    assert champion_version(settings.artifacts, ARTIFACT) == best[0]["version"]
    assert _versions(settings.artifacts) == {best[0]["version"]}

    monkeypatch.setenv("COLUMNS", "200")  # one table row per trial
    assert main(["sweep", "show", TIER]) == 0
    table = capsys.readouterr().out
    assert "mean_ap" in table and "best, champion" in table and "small_cnn" in table


@pytest.mark.slow
def test_a_challenger_no_better_than_the_champion_is_not_promoted(home: Path) -> None:
    settings = get_settings()
    spec = _spec()
    stored = _stored()
    result = sweep_tier(spec, stored, settings=settings, trials=1, budget_minutes=5, space=TINY)
    assert result.best is not None and result.folder is not None and result.folder.is_dir()
    assert champion_version(settings.artifacts, ARTIFACT) is None  # a sweep alone promotes none
    first = promote_best(result, spec, stored, settings=settings, device="cpu", announcer=None)
    assert first.decision == "promoted" and first.parent_version == ""

    # The same model again: equal on the val split is not strictly better.
    again = promote_best(result, spec, stored, settings=settings, device="cpu", announcer=None)
    assert again.decision == "rejected" and again.parent_version == first.version
    assert again.metrics["mean_ap"] == again.parent_metrics["mean_ap"]
    assert champion_version(settings.artifacts, ARTIFACT) == first.version


def test_a_trial_whose_validation_curve_falls_behind_is_pruned_and_saves_nothing(
    home: Path, tmp_path: Path
) -> None:
    storage = f"sqlite:///{tmp_path / 'prune.db'}"
    # An earlier trial of the study whose validation loss was near zero at every epoch.
    study = optuna.create_study(storage=storage, study_name=ARTIFACT, direction="maximize")
    study.add_trial(
        optuna.trial.create_trial(value=1.0, intermediate_values={0: -1e-4, 1: -1e-4, 2: -1e-4})
    )
    fixed = {"multilabel_cnn": BackendSpace(("small_cnn",), (32,), (1e-3, 1e-3), (3, 3))}
    result: SweepResult = sweep_tier(
        _spec(),
        _stored(),
        settings=get_settings(),
        trials=1,
        budget_minutes=5,
        storage=storage,
        space=fixed,
        startup_trials=1,
    )
    (trial,) = result.trials
    # Epoch 0 is never judged (warm-up); at epoch 1 its loss is far above the median's.
    assert trial.state == "pruned" and trial.epochs == 2
    assert trial.version is None and result.best is None and result.folder is None
    assert not list((get_settings().artifacts / ARTIFACT).glob("*/metadata.json"))
    assert [t.state for t in optuna.load_study(study_name=ARTIFACT, storage=storage).trials] == [
        optuna.trial.TrialState.COMPLETE,
        optuna.trial.TrialState.PRUNED,
    ]


def test_a_trial_still_training_when_the_budget_is_spent_is_pruned_at_its_next_epoch() -> None:
    study = optuna.create_study(direction="maximize")
    within = sweep.pruning_hook(study.ask(), deadline=time.monotonic() + 3600)
    within(0, 0.5)  # inside the budget, and no pruner verdict at the first epoch: it trains on
    late = study.ask()
    spent = sweep.pruning_hook(late, deadline=time.monotonic() - 1)
    with pytest.raises(optuna.TrialPruned, match="budget was spent at epoch 3"):
        spent(3, 0.5)
    assert study.trials[late.number].intermediate_values == {3: -0.5}


def test_a_trial_that_has_trained_its_last_epoch_is_not_pruned_for_the_budget() -> None:
    study = optuna.create_study(direction="maximize")
    spent = sweep.pruning_hook(study.ask(), deadline=time.monotonic() - 1, last_epoch=1)
    with pytest.raises(optuna.TrialPruned, match="budget was spent at epoch 0"):
        spent(0, 0.5)
    spent(1, 0.4)  # its last epoch: the model is trained, only calibration is left


def test_a_trial_that_cannot_train_fails_with_its_reason_and_the_sweep_goes_on(
    home: Path, tmp_path: Path
) -> None:
    broken = {"multilabel_cnn": BackendSpace(("no_such_net",), (32,), (1e-3, 1e-2), (1, 1))}
    result = sweep_tier(
        _spec(),
        _stored(),
        settings=get_settings(),
        trials=2,
        budget_minutes=5,
        storage=f"sqlite:///{tmp_path / 'fail.db'}",
        space=broken,
    )
    assert [t.state for t in result.trials] == ["failed", "failed"]
    assert all(t.error and "unknown backbone 'no_such_net'" in t.error for t in result.trials)
    assert result.best is None and result.folder is None


@pytest.mark.parametrize(
    ("parent", "new", "old", "decision"),
    [
        ("", 0.1, None, "promoted"),  # no champion: the best trial becomes champion
        ("v1", 0.81, 0.8, "promoted"),
        ("v1", 0.8, 0.8, "rejected"),  # equal is not better
        ("v1", 0.7, 0.8, "rejected"),
        ("v1", None, 0.8, "rejected"),  # a metric that could not be computed never wins
    ],
)
def test_the_sweep_promotes_by_the_retrainers_rule(
    parent: str, new: float | None, old: float | None, decision: str
) -> None:
    decided, reason = decide(
        metric="mean_ap",
        metrics={} if new is None else {"mean_ap": new},
        parent_metrics={} if old is None else {"mean_ap": old},
        parent_version=parent,
    )
    assert decided == decision and "mean_ap" in reason


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sweep", TIER], "needs --trials N and --budget-minutes M"),
        (["sweep", "show", TIER, "--trials", "3"], "--trials: options of `sweep TIER`"),
        (["sweep", "a", "b"], "give one tier"),
        (["sweep", "nope", "--trials", "1", "--budget-minutes", "1"], "no tier named 'nope'"),
        (["sweep", "show", TIER], "no sweeps under"),
        (
            ["sweep", TIER, "--trials", "0", "--budget-minutes", "1", "--no-publish"],
            "at least one trial",
        ),
    ],
)
def test_bad_arguments_are_one_line_errors(
    home: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("phenocascade: error: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_the_morphometric_classifier_is_searched_where_the_dataset_outlines_objects() -> None:
    assert "morphometric_classifier" not in default_space(StageKind.CLASSIFIER)
    space = default_space(StageKind.CLASSIFIER, objects=True)
    assert {"multilabel_cnn", "morphometric_classifier"} <= set(space)
    recipe = own_recipe(StageKind.CLASSIFIER, "morphometric_classifier", "bootstrap").config
    trial = optuna.trial.FixedTrial(
        {
            "morphometric_classifier.input_size": 192,
            "morphometric_classifier.lr": 1e-3,
            "morphometric_classifier.epochs": 9,
        }
    )
    config, epochs = trial_config(
        trial, "morphometric_classifier", space["morphometric_classifier"], recipe
    )
    # The sampled settings go into the segmenter; the recipe's others (weights, steps) stay.
    assert epochs == 9
    assert config == {"segmenter": {**recipe["segmenter"], "crop_size": 192, "lr": 1e-3}}


def test_the_gate_sweep_searches_the_probe_on_its_input_size_alone() -> None:
    space = default_space(StageKind.GATE)
    assert {"quality_cnn", "quality_probe"} <= set(space)
    recipe = own_recipe(StageKind.GATE, "quality_probe", "bootstrap").config
    trial = optuna.trial.FixedTrial({"quality_probe.input_size": 224, "quality_probe.epochs": 1})
    config, epochs = trial_config(trial, "quality_probe", space["quality_probe"], recipe)
    # no learning rate: its head is fitted to convergence; the recipe's weights stay
    assert (config, epochs) == ({"input_size": 224}, 1)
    assert recipe["input_size"] == 160 and "lr" not in recipe


@pytest.mark.slow
def test_a_sweep_trains_and_scores_the_morphometric_classifier_on_outlined_objects(
    home: Path, tmp_path: Path
) -> None:
    """Fields of few or many, small or large discs with their instance masks."""
    discs = _discs(tmp_path / "discs", get_settings().dataset_store)
    spec = _spec().model_copy(
        update={"labels": list(discs.classes), "dataset": "discs", "artifact": "discs-majority"}
    )
    tiny = {
        "morphometric_classifier": BackendSpace(
            (), (48,), (3e-3, 3e-3), (3, 3), size_arg="crop_size", nested="segmenter"
        )
    }
    result = sweep_tier(
        spec, discs, settings=get_settings(), trials=1, budget_minutes=5, space=tiny
    )
    (trial,) = result.trials
    assert trial.state == "complete", trial.error
    assert trial.params == {
        "backend": "morphometric_classifier",
        "morphometric_classifier.input_size": 48,
        "morphometric_classifier.lr": 3e-3,
        "morphometric_classifier.epochs": 3,
    }
    meta = json.loads((result.folder / "metadata.json").read_text()) if result.folder else {}
    assert meta["backend"] == "morphometric_classifier"
    assert meta["config"]["segmenter"]["crop_size"] == 48
    # The labels are the objects' count and size: measuring them ranks the val split well.
    assert trial.metric is not None and trial.metric >= 0.8, trial.metric


def _discs(folder: Path, store: Path) -> StoredDataset:
    """20 grey 64x64 fields of 2 or 9 discs of radius 3 or 7, with instance masks."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    samples = []
    for i in range(20):
        many, large = bool(i % 2), bool((i // 2) % 2)
        image, labels = disc_field(rng, 64, 9 if many else 2, 7 if large else 3)
        path, mask = folder / f"{i:02d}.png", folder / f"{i:02d}_mask.png"
        Image.fromarray(image[:, :, 0]).save(path)
        Image.fromarray(labels).save(mask)
        tags = {"count:many" if many else "count:few", "size:large" if large else "size:small"}
        samples.append(Sample(f"{i:02d}", path, frozenset(tags), group=f"{i:02d}", mask=mask))
    classes = ("count:few", "count:many", "size:small", "size:large")
    labelled = LabelledSet("discs", classes, tuple(samples))
    return save_dataset(
        store,
        "discs",
        labelled,
        kinds=dict.fromkeys(classes, "image"),
        groups={"count": ("count:few", "count:many"), "size": ("size:small", "size:large")},
    )
