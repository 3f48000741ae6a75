"""Recipes of the bundled tiers: which bundled dataset, backend and settings each uses.

This module glues the bundled datasets, stored as a lab's are
(:mod:`phenocascade.recipes.bundled_data`), to :mod:`phenocascade.models` (the
backends); the library never imports it. Bootstrap recipes are small enough for a few CPU
minutes in total and still give real models; ``full`` recipes train on every training
image. A lab's own datasets use
:mod:`phenocascade.recipes.own` instead.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from phenocascade.config import Runtime, Settings
from phenocascade.data.labelled import LabelledSet, load_pixels
from phenocascade.domain import Sample
from phenocascade.errors import ConfigError
from phenocascade.models.backends.nucleus_outlier import SizeOutlierComposite
from phenocascade.models.base import ArtifactMeta, champion_version, load_stage
from phenocascade.models.evaluate import evaluate_stage
from phenocascade.models.runtime import with_runtime
from phenocascade.recipes.bundled_data import (
    bbbc006_set,
    bccd_set,
    majority_set,
    nuclei_set,
    quality_set,
    rare_set,
)
from phenocascade.recipes.cache import bootstrap_key, keep, restore
from phenocascade.recipes.core import (
    COPY_PASTE,
    DETECTOR_IMAGES_SEEN,
    Recipe,
    Size,
    TrainingRun,
    backend_config,
    decode,
    fit_and_save,
    offline_mobilenet,
    subset,
)

log = logging.getLogger(__name__)

Tier = Literal["quality", "majority", "minority"]
Dataset = Literal["dsb", "bccd"]
DATASETS: tuple[Dataset, ...] = ("dsb", "bccd")
TIERS: tuple[Tier, ...] = ("quality", "majority", "minority")
# The minority tier first: the majority recipe adopts its segmenter.
BOOTSTRAP_ORDER: tuple[Tier, ...] = ("quality", "minority", "majority")


def _minority_recipe(
    size: Size, mobilenet: str | None, *, backend: str | None, dataset: Dataset
) -> Recipe:
    """Minority recipes per backend and dataset (see :func:`recipe`)."""
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
    name = backend or (
        "nucleus_mask_outlier_detector" if dataset == "dsb" else "torchvision_detector"
    )
    full = size == "full"
    if name in ("nucleus_mask_outlier_detector", "nucleus_outlier_detector") and dataset != "dsb":
        raise ConfigError(
            f"{name} flags DSB 2018 size outliers among all nuclei; it has no BCCD "
            "recipe, use torchvision_detector or yolo"
        )
    if name == "nucleus_mask_outlier_detector":
        # Random 256 px crops of all 399 training images with their instance masks. 16
        # epochs of 25 steps of 8 crops took 6 to 8.5 minutes on 2 CPU cores; early
        # stopping reads one centre crop of each of 40 val images.
        segmenter = {"pretrained": mobilenet, "steps_per_epoch": 100 if full else 25}
        # Half of the train split calibrates: the 133 val images alone cannot certify
        # "no large nucleus here" (the first rare image comes after 44 clean ones in the
        # bootstrap's image scores, and 95 % needs 45), and a segmenter on 200 images
        # loses little, as it learns from random crops of every nucleus.
        return Recipe(
            name,
            {"segmenter": segmenter},
            max_epochs=40 if full else 16,
            patience=6 if full else 4,
            max_val_fit=None if full else 40,
            train_data="dsb2018_nuclei",
            calibration_share=0.5,
            # Two start points: the absence certificate otherwise ends at the first rare
            # image whose large nucleus the segmenter split or missed (the 68th of the
            # bootstrap's calibration images: 67 decided, against 77 with two starts).
            ltt_starts=2,
        )
    # Nuclei are 7-70 px wide (median 20) in images of 256-1388 px: resized to a 320 px
    # short side (512 px long side at most) the smallest shrink to a few pixels, so the
    # smallest anchor is 8 px on the stride-8 level. A frozen ImageNet body makes steps a
    # third cheaper, so more of them fit the bootstrap budget.
    detector: dict[str, Any] = {
        "backbone": "mobilenet_v2",
        "pretrained": mobilenet,
        "min_size": 512 if full else 320,
        "max_size": 800 if full else 512,
        "anchor_sizes": (8, 16, 32, 64) if dataset == "dsb" else (16, 32, 64, 128),
        "freeze_backbone": mobilenet is not None and not full,
        "lr": 1e-3,
    }
    if name == "nucleus_outlier_detector":
        # Every nucleus at its own pixel size (the two 1024 px val images that hold 70 of
        # the 110 val rare boxes lose their ~10 px nuclei at a 512 px long side), trained
        # on 256 px crops to bound the step cost; up to 375 nuclei per image, which rarely
        # overlap, so fragments are suppressed at IoU 0.3.
        nuclei = {
            **detector,
            "min_size": 256,
            "max_size": 1400,
            "scale_mode": "native",
            "crop_size": None if full else 256,
            "detections_per_image": 400,
            "nms_iou": 0.3,
        }
        config: dict[str, Any] = {"detector": nuclei}
        if full:
            return Recipe(name, config, max_epochs=30, patience=5, train_data="dsb2018_nuclei")
        # Kept small so that a fresh machine bootstraps in minutes. Early stopping reads
        # one 256 px crop per val image, so nearly all of the budget goes to training steps.
        return Recipe(
            name,
            config,
            max_epochs=16,
            patience=3,
            max_train=120,
            max_val_fit=40,
            train_data="dsb2018_nuclei",
        )
    if name == "yolo":
        # Built from its YAML with no pretrained weights: validation mAP stays at zero for
        # the first ~6 epochs on BCCD, so fewer epochs or a short patience stop it before
        # it has learned anything (session 2's 6-epoch recipe scored AP50 0.000).
        config = {"model_yaml": "yolov8n.yaml", "imgsz": 640 if full else 416}
        if full:
            return Recipe(name, config, max_epochs=150, patience=30)
        return Recipe(name, config, max_epochs=40, patience=12, max_train=100, max_val_fit=30)
    if name != "torchvision_detector":
        config = {"pretrained": mobilenet} if mobilenet else {}
        if full:
            return Recipe(name, config, max_epochs=40, patience=6)
        return Recipe(name, config, max_epochs=6, patience=3, max_train=100, max_val_fit=30)
    # Few rare boxes per image: pick the epoch by val AP50, not by the detection loss, and
    # paste rare objects into other images (:data:`~phenocascade.recipes.core.COPY_PASTE`).
    config = {**detector, "early_stopping": "ap50", "copy_paste": COPY_PASTE}
    if full:
        return Recipe(name, config, max_epochs=40, patience=6)
    return Recipe(
        name,
        config,
        max_epochs=6,
        patience=3,
        max_train=100,
        max_val_fit=30,
        min_images_seen=DETECTOR_IMAGES_SEEN,
    )


def recipe(
    tier: Tier, size: Size, *, backend: str | None = None, dataset: Dataset = "dsb"
) -> Recipe:
    """Return the default recipe of ``tier`` at ``size``.

    Parameters
    ----------
    tier : {"quality", "majority", "minority"}
        Which tier.
    size : {"bootstrap", "full"}
        Recipe size.
    backend : str or None, default None
        Minority tier: the recipe of this backend (``"nucleus_mask_outlier_detector"``,
        ``"nucleus_outlier_detector"``, ``"torchvision_detector"``, ``"yolo"``); ``None``
        is the dataset's default (the first for DSB, ``"torchvision_detector"`` for BCCD).
        Majority tier: ``None`` and ``"morphometric_classifier"`` get the morphometric
        recipe (on the minority tier's segmenter when it can share it); anything else gets
        the ``multilabel_cnn`` one. Quality tier: ``None`` and ``"quality_probe"`` get the
        probe's recipe at bootstrap size when the offline MobileNetV2 weights are
        installed; otherwise, and for any other backend, the fine-tuned ``quality_cnn``.
    dataset : {"dsb", "bccd"}, default "dsb"
        Minority tier only: DSB 2018 large nuclei, or BCCD white cells and platelets.
    """
    mobilenet = offline_mobilenet()
    if (
        tier == "quality"
        and mobilenet
        and size == "bootstrap"
        and backend in (None, "quality_probe")
    ):
        # A logistic head on frozen ImageNet features and image statistics
        # (:mod:`~phenocascade.models.backends.quality_probe`): it looks at each image once,
        # so it trains in minutes where fine-tuning MobileNetV2 took 20 on a 2-core AMD
        # EPYC (1178 s), and it ranks clear fields above unclear ones more cleanly (val:
        # 0.97 of clear images above every unclear one, against 0.38 for deep features
        # alone). Two start points: one confidently wrong image near the top of the
        # pooled ranking otherwise ends the single sequence early (a cross-fitted
        # certificate at 0.99 passed 297 of 824 clear images with one, 637 with two).
        return Recipe(
            "quality_probe",
            {"pretrained": mobilenet, "input_size": 160},
            max_epochs=1,
            patience=1,
            max_val_fit=150,
            ltt_starts=2,
        )
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
            # Every training source (1812 samples with their degraded copies). With 100
            # sources and 4 epochs (35 s on a fresh 2-core machine in 2026-12) the gate
            # ranked three severe degradations among its top 108 val images, certified PASS
            # at 0.993 and passed 3 of 30 clear DSB test images; with all of them it stopped
            # after 5 epochs (205 s) at val AUROC 0.9998, certified PASS on 213 of 220 clear
            # val images and passed 128 of 132 DSB test images.
            return Recipe("quality_cnn", config, max_epochs=8, patience=3, max_val_fit=150)
        return Recipe("quality_cnn", {**config, "input_size": 256}, max_epochs=40, patience=6)
    if tier == "majority":
        if backend in (None, "morphometric_classifier"):
            # The size and density labels are the median nucleus area and the nucleus
            # count, cut into tertiles: measured on segmented nuclei, they are decided on
            # far more images than a CNN on the resized field decides (on the DSB test
            # split at 0.95: 72 of 132 images, against 5). The segmenter is the minority
            # tier's when that one trained on exactly the images this head trains on (the
            # same half of the train split, whose other half calibrates both tiers), so it
            # costs no second segmenter training; otherwise one is trained as the
            # minority recipe trains its own.
            segmenter = {"pretrained": mobilenet, "steps_per_epoch": 100 if size == "full" else 25}
            return Recipe(
                "morphometric_classifier",
                {"segmenter": segmenter},
                max_epochs=40 if size == "full" else 16,
                patience=6 if size == "full" else 4,
                max_val_fit=None if size == "full" else 40,
                ltt_starts=2,
                calibration_share=0.5,
                segmenter_from="minority",
            )
        if size == "bootstrap":
            config = (
                {"backbone": "mobilenet_v2", "pretrained": mobilenet, "input_size": 160, "lr": 5e-4}
                if mobilenet
                else {"backbone": "small_cnn", "input_size": 160, "lr": 2e-3}
            )
            # Two start points: one confidently wrong label near the top of the pooled
            # ranking (the size and density labels are tertiles of continuous measures, so
            # border cases exist) otherwise ends the single sequence below any coverage.
            return Recipe("multilabel_cnn", config, max_epochs=5, patience=2, ltt_starts=2)
        return Recipe(
            "multilabel_cnn",
            {"backbone": "resnet18", "input_size": 256},
            max_epochs=40,
            patience=6,
            ltt_starts=2,
        )
    if tier == "minority":
        return _minority_recipe(size, mobilenet, backend=backend, dataset=dataset)
    raise ConfigError(f"unknown tier {tier!r}; choose one of {TIERS}")


def tier_data(
    tier: Tier,
    settings: Settings,
    split: str,
    *,
    seed: int = 0,
    dataset: Dataset = "dsb",
) -> LabelledSet:
    """Return the bundled dataset split that trains or evaluates ``tier``.

    The minority tier reads DSB 2018's large-nucleus boxes (``dataset="dsb"``) or BCCD's
    ``WBC`` and ``Platelets`` boxes (``dataset="bccd"``; its two zero-area RBC boxes are
    dropped at import).
    """
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
    if tier == "minority" and dataset == "bccd":
        return bccd_set(settings, split)
    if tier == "quality":
        return quality_set(settings, split, seed=seed)
    if tier == "majority":
        return majority_set(settings, split)
    if tier == "minority":
        return rare_set(settings, split)
    raise ConfigError(f"unknown tier {tier!r}; choose one of {TIERS}")


def _complete_rare_annotations(
    artifacts: Path,
    tier: Tier,
    parent_version: str,
    samples: Sequence[Sample],
    *,
    device: str,
) -> tuple[tuple[Sample, ...], dict[str, int]]:
    """Give rare-box annotations every nucleus, from the parent model's detections.

    Returns the completed samples and ``{"expert": n, "pseudo": m}`` box counts.

    Raises
    ------
    ConfigError
        Without a parent version, or if the parent is not a nucleus composite.
    """
    if not parent_version:
        raise ConfigError(
            "the nucleus composite learns from every nucleus box, but expert annotations hold "
            "only the rare ones: it needs the model they were made against (parent_version) "
            "to label the image's other nuclei"
        )
    # The backend itself: it labels training data, so no novelty guard.
    parent = load_stage(artifacts, tier, parent_version, device=device, novelty=False)
    if not isinstance(parent, SizeOutlierComposite):
        raise ConfigError(
            f"{tier} model {parent_version} is {type(parent).__name__}, not a nucleus "
            "composite: it cannot label the other nuclei of rare-box annotations"
        )
    completed = parent.complete_annotations(samples, load=load_pixels)
    expert = sum(len(s.boxes) for s in samples)
    total = sum(len(s.boxes) for s in completed)
    log.info(
        "%d annotated images: %d expert boxes plus %d nuclei detected by %s",
        len(samples),
        expert,
        total - expert,
        parent_version,
    )
    return tuple(completed), {"expert": expert, "pseudo": total - expert}


def _share_for_calibration(
    train_set: LabelledSet,
    val_set: LabelledSet,
    tier_train: LabelledSet,
    share: float,
    seed: int,
) -> tuple[LabelledSet, LabelledSet]:
    """Move ``share`` of the training images (seeded) from training to calibration.

    ``train_set`` holds the data the recipe trains on (every nucleus), ``tier_train`` the
    same images with the tier's own labels (the rare boxes); the images moved out of
    ``train_set`` join ``val_set`` with those labels. Returns both sets.
    """
    ids = sorted(s.image_id for s in train_set.samples)
    rng = np.random.default_rng(seed)
    moved = set(rng.choice(ids, round(share * len(ids)), replace=False).tolist())
    kept = tuple(s for s in train_set.samples if s.image_id not in moved)
    extra = tuple(s for s in tier_train.samples if s.image_id in moved)
    log.info("%d training images calibrate instead of training", len(extra))
    return (
        dataclasses.replace(train_set, samples=kept),
        dataclasses.replace(
            val_set, name=f"{val_set.name}+{len(extra)} train", samples=val_set.samples + extra
        ),
    )


# Backends whose artifacts hold a nucleus segmenter that a morphometric head can adopt.
SEGMENTER_BACKENDS = ("nucleus_mask_outlier_detector", "morphometric_classifier")


def _segmenter_donor(
    settings: Settings, donor_tier: str, tier: str, parent_version: str, train: Sequence[Sample]
) -> Path | None:
    """Return the artifact whose nucleus segmenter a morphometric ``tier`` model adopts.

    A challenger (``parent_version``) keeps its parent's segmenter: it is calibrated on the
    holdout, drawn from the val split, which no bundled segmenter trains on. A first model
    adopts the ``donor_tier`` champion's only if that segmenter trained on exactly the
    images of ``train`` (its recorded data fingerprint is theirs, as DSB 2018 nuclei):
    then the images that calibrate the head are images the segmenter never saw, as a
    certificate needs. Otherwise ``None``: the model trains a segmenter of its own.
    """
    artifacts = settings.artifacts
    if parent_version:
        folder = artifacts / tier / parent_version
        return folder if ArtifactMeta.read(folder).backend in SEGMENTER_BACKENDS else None
    version = champion_version(artifacts, donor_tier)
    if version is None:
        log.info("no %s champion to share a segmenter; %s trains its own", donor_tier, tier)
        return None
    folder = artifacts / donor_tier / version
    meta = ArtifactMeta.read(folder)
    nuclei = nuclei_set(settings, "train")
    ids = {s.image_id for s in train}
    trained_on = dataclasses.replace(
        nuclei, samples=tuple(s for s in nuclei.samples if s.image_id in ids)
    )
    if meta.backend not in SEGMENTER_BACKENDS or meta.data_fingerprint != trained_on.fingerprint():
        log.info(
            "the %s champion %s (%s) did not train a segmenter on this %s model's training "
            "images; %s trains its own",
            donor_tier,
            version,
            meta.backend,
            tier,
            tier,
        )
        return None
    log.info("%s adopts the segmenter of %s/%s", tier, donor_tier, version)
    return folder


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
    train_samples: Sequence[Sample] | None = None,
    extra_samples: Sequence[Sample] = (),
    val_samples: Sequence[Sample] | None = None,
    max_epochs: int | None = None,
    max_val_fit: int | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    parent_version: str = "",
    champion_if_none: bool = True,
    dataset: Dataset = "dsb",
    cross_fit: int = 0,
) -> Path:
    """Train, calibrate, certify and save one tier; make it champion if it has none.

    Parameters
    ----------
    tier : {"quality", "majority", "minority"}
        Which tier.
    settings : Settings
        Gives the datasets and artifacts folders.
    backend : str or None, default None
        Registered backend; ``None`` uses the recipe's. The minority tier has a recipe per
        backend; for other tiers another backend gets only the recipe's ``pretrained``
        setting, not its other arguments.
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
    train_samples : sequence of Sample or None, default None
        Replaces the tier's train split as base training data (still capped by
        ``max_train``); ``None`` uses the split.
    extra_samples : sequence of Sample, default ()
        Added to the base training data uncapped, e.g. expert annotations. For a recipe
        with ``train_data="dsb2018_nuclei"`` these hold only the rare boxes; the
        ``parent_version`` model adds each image's other nuclei (see
        :meth:`~phenocascade.models.backends.nucleus_outlier.SizeOutlierComposite.complete_annotations`),
        and the metrics record ``annotation_boxes`` (``expert`` and ``pseudo`` counts).
    val_samples : sequence of Sample or None, default None
        Replaces the val split for early stopping, calibration, thresholds and the
        ``val_report``; the active-learning loop passes its fixed holdout here.
    max_epochs : int or None, default None
        Overrides the recipe's epoch cap.
    max_val_fit : int or None, default None
        Overrides the recipe's number of validation samples used for early stopping.
    config_overrides : Mapping or None, default None
        Backend constructor arguments that replace the recipe's (e.g. ``input_size``).
    parent_version : str, default ""
        Version this model was retrained from, stored in its metadata.
    champion_if_none : bool, default True
        Make the new version champion when the tier has none; ``False`` never touches
        ``CHAMPION`` (challengers).
    dataset : {"dsb", "bccd"}, default "dsb"
        Minority tier only: DSB 2018 large nuclei or BCCD ``WBC``/``Platelets`` (see
        :func:`tier_data`). A recipe with ``train_data="dsb2018_nuclei"`` fits on every
        DSB nucleus box (``train_samples`` then replaces those; early stopping uses the
        val split's nucleus boxes) and is calibrated and reported on large-nucleus boxes.
    cross_fit : int, default 0
        ``K >= 2`` certifies on out-of-fold scores of train and val from ``K`` extra
        models (see :func:`phenocascade.recipes.core.fit_and_save`); not for recipes that
        train on other data than they are calibrated on (``train_data``).

    Returns
    -------
    pathlib.Path
        The artifact folder ``<artifacts>/<tier>/<version>``.
    """
    plan = recipe(tier, size, backend=backend, dataset=dataset)
    if cross_fit and plan.train_data is not None:
        raise ConfigError(
            f"the {plan.backend} recipe trains on {plan.train_data} and is calibrated on "
            f"{tier} data, so out-of-fold scores of its training data cannot certify it; "
            "train it without --cross-fit"
        )
    record: dict[str, Any] = {"dataset": dataset} if tier == "minority" else {}
    if plan.train_data == "dsb2018_nuclei" and extra_samples:
        extra_samples, annotated = _complete_rare_annotations(
            settings.artifacts, tier, parent_version, extra_samples, device=device
        )
        record["annotation_boxes"] = annotated
    val_set = tier_data(tier, settings, "val", seed=seed, dataset=dataset)
    if val_samples is not None:
        val_set = dataclasses.replace(val_set, samples=tuple(val_samples))
    if plan.train_data == "dsb2018_nuclei":
        train_set = nuclei_set(settings, "train")
        fit_val_set = nuclei_set(settings, "val")
        if plan.calibration_share and train_samples is None and val_samples is None:
            train_set, val_set = _share_for_calibration(
                train_set,
                val_set,
                tier_data(tier, settings, "train", dataset=dataset),
                plan.calibration_share,
                seed,
            )
    else:
        train_set = tier_data(tier, settings, "train", seed=seed, dataset=dataset)
        fit_val_set = val_set
        if plan.calibration_share and train_samples is None and val_samples is None:
            train_set, val_set = _share_for_calibration(
                train_set, val_set, train_set, plan.calibration_share, seed
            )
    if train_samples is not None:
        train_set = dataclasses.replace(train_set, samples=tuple(train_samples))
    train = subset(train_set.samples, max_train or plan.max_train, seed) + tuple(extra_samples)
    name, config = backend_config(plan, backend, pretrained=pretrained, overrides=config_overrides)
    # Adopted only for the recipe's own segmenter: a sweep trial that samples segmenter
    # settings trains the segmenter it asked for.
    if (
        plan.segmenter_from is not None
        and name == plan.backend
        and "segmenter_from" not in config
        and config.get("segmenter") == plan.config.get("segmenter")
    ):
        donor = _segmenter_donor(settings, plan.segmenter_from, tier, parent_version, train)
        if donor is not None and cross_fit:
            raise ConfigError(
                f"the {tier} recipe adopts the segmenter of {donor.parent.name}/{donor.name}, "
                "which trained on part of the images cross-fitting would certify on; train "
                "it without --cross-fit (it certifies on val and the other half of train)"
            )
        if donor is not None:
            config["segmenter_from"] = str(donor)
            record["segmenter_from"] = f"{donor.parent.name}/{donor.name}"
    # An explicit epoch count is kept as given; the recipe's grows on a small set.
    epochs, patience = plan.epochs_for(len(train), max_epochs)
    run = TrainingRun(
        artifact=tier,
        backend=name,
        config=config,
        train=train,
        fit_val=subset(fit_val_set.samples, max_val_fit or plan.max_val_fit, seed),
        val=val_set,
        fingerprint_set=dataclasses.replace(train_set, samples=train),
        max_epochs=epochs,
        patience=patience,
        ltt_starts=plan.ltt_starts,
        record=record,
    )
    return fit_and_save(
        run,
        settings=settings,
        size=size,
        seed=seed,
        device=device,
        progress=progress,
        target_precision=target_precision,
        delta=delta,
        parent_version=parent_version,
        champion_if_none=champion_if_none,
        cross_fit=cross_fit,
    )


def ensure_bootstrap(
    settings: Settings,
    *,
    progress: bool = False,
    device: str = "cpu",
    ready: Callable[[Tier, str], None] | None = None,
) -> dict[str, str]:
    """Give every tier that has no champion yet a bootstrap model.

    A model of the same code, packages and data found in the model cache
    (:mod:`phenocascade.recipes.cache`) is copied; otherwise the tier trains one and
    stores it there. The minority tier comes before the majority tier, whose recipe
    adopts its segmenter (:data:`BOOTSTRAP_ORDER`).

    Parameters
    ----------
    settings : Settings
        Where the champions and datasets are.
    progress : bool, default False
        Show a progress bar per training.
    device : str, default "cpu"
        Where to train.
    ready : callable or None, default None
        Called with ``(tier, champion version)`` as soon as each tier has its champion,
        before the next one trains (the demo starts each tier's workers then).

    Returns
    -------
    dict
        ``{tier: champion version}`` for all three tiers.
    """
    for tier in BOOTSTRAP_ORDER:
        if champion_version(settings.artifacts, tier) is None:
            key = bootstrap_key(tier, settings, device=device)
            if restore(settings, tier, key) is None:
                folder = train_tier(
                    tier, settings=settings, size="bootstrap", progress=progress, device=device
                )
                keep(folder, key)
        if ready is not None:
            ready(tier, champion_version(settings.artifacts, tier) or "")
    return {tier: champion_version(settings.artifacts, tier) or "" for tier in TIERS}


def evaluate_tier(
    tier: Tier,
    *,
    settings: Settings,
    out_dir: Path,
    version: str | None = None,
    device: str = "cpu",
    dataset: Dataset = "dsb",
    split: str = "test",
    runtime: Runtime = "eager",
) -> dict[str, Any]:
    """Evaluate a trained tier on the test split; write ``metrics.json`` and plots.

    The quality tier is also checked on BBBC006's real defocus (``out_dir/bbbc006``).
    Detectors report ``ap50`` (pycocotools, mean over classes), ``ap50_per_class`` and
    ``recall_at_1fp`` (recall at one false positive per image).

    Parameters
    ----------
    dataset : {"dsb", "bccd"}, default "dsb"
        Minority tier only: the dataset the model was trained for (see :func:`tier_data`).
    split : str, default "test"
        ``"val"`` while tuning; report only ``"test"``.
    runtime : {"eager", "bf16", "onnx"}, default "eager"
        How the model computes (:mod:`phenocascade.models.runtime`).

    Raises
    ------
    ConfigError
        If the model's classes are not the dataset's.
    """
    stage = with_runtime(
        load_stage(settings.artifacts, tier, version, device=device), runtime, device
    )
    test = tier_data(tier, settings, split, dataset=dataset)
    if tuple(stage.classes) != tuple(test.classes):
        raise ConfigError(
            f"{tier} model {stage.version} predicts {list(stage.classes)}, but {dataset} "
            f"holds {list(test.classes)}; pass the dataset it was trained on"
        )
    metrics = evaluate_stage(stage, decode(test.samples), list(test.samples), out_dir)
    if tier == "quality":
        real = bbbc006_set(settings)
        metrics["bbbc006"] = evaluate_stage(
            stage, decode(real.samples), list(real.samples), out_dir / "bbbc006"
        )
    return metrics
