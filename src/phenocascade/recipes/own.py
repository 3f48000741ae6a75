"""Recipes of a lab's own tiers: any topology tier, trained on a stored dataset.

A tier of a planned topology (``phenocascade plan``) names its backend, its labels and the
stored dataset it learns from (``phenocascade data import ... --name NAME``). Its training,
validation and test sets are that dataset's splits, restricted to the tier's labels:

* a **gate** learns ``"clear"``: from the dataset's own image label ``"clear"`` when it has
  one, else from its images (clear) and severely degraded copies of them (unclear);
* a **classifier** learns image labels; an object class among its labels is an image
  label that is present when the image has a box of it (the samples keep their objects,
  which ``morphometric_classifier`` segments and measures);
* a **detector** learns the boxes of its labels; images without any are negatives.

The recipe of each backend adapts to the data where that matters: a detector's anchor
sizes follow the sizes of the dataset's objects after the resize it applies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from phenocascade.config import Runtime, Settings, TierSpec
from phenocascade.data.importers import image_size
from phenocascade.data.labelled import QUALITY_LABEL, LabelledSet, quality_examples
from phenocascade.data.registry import StoredDataset
from phenocascade.domain import Sample, StageKind
from phenocascade.errors import ConfigError
from phenocascade.models.base import load_stage, tier_classes
from phenocascade.models.evaluate import evaluate_stage
from phenocascade.models.runtime import with_runtime
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

# Detector input scaling of the own-data recipes (short side, capped long side).
_DETECTOR_SIZES = {"bootstrap": (320, 512), "full": (512, 800)}


def tier_labels(spec: TierSpec, stored: StoredDataset) -> tuple[str, ...]:
    """Return the tier's labels, checked against the dataset.

    Raises
    ------
    ConfigError
        If the tier lists no labels, or labels the dataset does not have.
    """
    kind, labels = tier_classes(spec)
    unknown = sorted(set(labels) - set(stored.classes))
    if kind is not StageKind.GATE and unknown:
        raise ConfigError(
            f"tier {spec.name!r} decides {unknown}, which dataset {stored.name!r} does not "
            f"have; it has {list(stored.classes)}"
        )
    return tuple(labels)


def tier_set(spec: TierSpec, stored: StoredDataset, split: str, *, seed: int = 0) -> LabelledSet:
    """Return the dataset's ``split`` as the tier learns it (see the module docstring).

    Parameters
    ----------
    spec : TierSpec
        The tier; its backend's kind decides the form of the samples.
    stored : StoredDataset
        The dataset.
    split : {"train", "val", "test"}
        Which split.
    seed : int, default 0
        Seeds the degraded copies of a gate without quality labels.

    Returns
    -------
    LabelledSet
        ``classes`` are the tier's labels.
    """
    labels = tier_labels(spec, stored)
    kind, _ = tier_classes(spec)
    samples = [s for s in stored.samples if stored.split.get(s.image_id) == split]
    name = f"{stored.name}/{spec.name}/{split}"
    if kind is StageKind.GATE:
        if stored.kinds.get(QUALITY_LABEL) == "image":
            gate = [_restrict(s, labels, kind) for s in samples]
            return LabelledSet(name, labels, tuple(gate))
        return quality_examples(samples, name=name, seed=seed)
    return LabelledSet(name, labels, tuple(_restrict(s, labels, kind) for s in samples))


def _restrict(sample: Sample, labels: Sequence[str], kind: StageKind) -> Sample:
    """Keep only what ``sample`` says about ``labels``, in the form the kind learns."""
    keep = set(labels)
    if kind is StageKind.DETECTOR:
        boxes = tuple(b for b in sample.boxes if b.label in keep)
        return dataclasses.replace(sample, labels=frozenset(), boxes=boxes, mask=None)
    present = (set(sample.labels) | {b.label for b in sample.boxes}) & keep
    # The objects stay: a morphometric classifier learns to segment them (others ignore them).
    return dataclasses.replace(sample, labels=frozenset(present))


def anchor_sizes(samples: Sequence[Sample], min_size: int, max_size: int) -> tuple[int, ...]:
    """Return four anchor sizes (powers of two) that span the training objects' sizes.

    Each box's side (the square root of its area) is scaled as the detector scales its
    image (short side to ``min_size``, long side at most ``max_size``). The smallest
    anchor is the power of two at or below the 5th percentile of those sides, at least
    8 px; each next one doubles.
    """
    sides = []
    for sample in samples:
        if not sample.boxes or sample.path is None:
            continue
        width, height = image_size(sample.path)
        scale = min(min_size / min(width, height), max_size / max(width, height))
        sides += [np.sqrt((b.x_max - b.x_min) * (b.y_max - b.y_min)) * scale for b in sample.boxes]
    if not sides:
        return (16, 32, 64, 128)
    low = max(8.0, float(np.percentile(sides, 5)))
    base = int(2 ** np.floor(np.log2(low)))
    return tuple(base * 2**k for k in range(4))


def own_recipe(kind: StageKind, backend: str, size: Size) -> Recipe:
    """Return the default recipe of ``backend`` for a tier of ``kind`` at ``size``.

    Detector anchors are set from the data by :func:`train_own_tier`. A third-party
    backend gets no constructor arguments beyond the tier's ``config``.
    """
    mobilenet = offline_mobilenet()
    full = size == "full"
    if backend in ("quality_cnn", "multilabel_cnn"):
        config: dict[str, Any] = (
            {"backbone": "mobilenet_v2", "pretrained": mobilenet, "input_size": 160, "lr": 5e-4}
            if mobilenet
            else {"backbone": "small_cnn", "input_size": 160, "lr": 2e-3}
        )
        if backend == "quality_cnn":
            config["view"] = "resize"
        starts = 2 if kind is StageKind.CLASSIFIER else 1
        if full:
            return Recipe(backend, config, max_epochs=40, patience=6, ltt_starts=starts)
        return Recipe(backend, config, max_epochs=6, patience=2, max_train=400, ltt_starts=starts)
    if backend == "quality_probe":
        # A logistic head on frozen features: one look at each image, no epochs to tune.
        return Recipe(backend, {"pretrained": mobilenet, "input_size": 160}, 1, 1, ltt_starts=2)
    if backend == "torchvision_detector":
        min_size, max_size = _DETECTOR_SIZES[size]
        config = {
            "backbone": "mobilenet_v2",
            "pretrained": mobilenet,
            "min_size": min_size,
            "max_size": max_size,
            "freeze_backbone": mobilenet is not None and not full,
            "lr": 1e-3,
            "early_stopping": "ap50",
            "copy_paste": COPY_PASTE,
        }
        if full:
            return Recipe(backend, config, max_epochs=40, patience=6)
        return Recipe(
            backend,
            config,
            max_epochs=12,
            patience=4,
            max_train=100,
            max_val_fit=30,
            min_images_seen=DETECTOR_IMAGES_SEEN,
        )
    if backend == "morphometric_classifier":
        segmenter = {"pretrained": mobilenet, "steps_per_epoch": 100 if full else 25}
        return Recipe(
            backend,
            {"segmenter": segmenter},
            max_epochs=40 if full else 16,
            patience=6 if full else 4,
            max_val_fit=None if full else 40,
            ltt_starts=2,
        )
    if backend == "yolo":
        config = {"model_yaml": "yolov8n.yaml", "imgsz": 640 if full else 416}
        return Recipe(backend, config, max_epochs=150 if full else 40, patience=30 if full else 12)
    return Recipe(backend, {}, max_epochs=40 if full else 10, patience=6 if full else 3)


def train_own_tier(
    spec: TierSpec,
    stored: StoredDataset | None,
    *,
    settings: Settings,
    size: Size = "bootstrap",
    seed: int = 0,
    device: str = "cpu",
    pretrained: str | None = None,
    max_train: int | None = None,
    progress: bool = True,
    target_precision: float | None = None,
    delta: float = 0.1,
    extra_samples: Sequence[Sample] = (),
    val_samples: Sequence[Sample] | None = None,
    max_epochs: int | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    parent_version: str = "",
    champion_if_none: bool = True,
    cross_fit: int = 0,
) -> Path:
    """Train, calibrate, certify and save a model of ``spec`` on ``stored``.

    The tier's ``backend`` and ``config`` (topology) are honoured; ``config_overrides``
    replace both. The model trains on the train split plus ``extra_samples`` (expert
    annotations), stops early and is calibrated on the val split (or ``val_samples``),
    and is saved under ``<artifacts>/<spec.artifact>/<version>``; it becomes champion if
    the tier has none and ``champion_if_none``. A tier without a dataset (``stored`` is
    ``None``: a lab that began with images and no labels) trains on ``extra_samples``
    alone and needs ``val_samples``. Other parameters are those of
    :func:`phenocascade.recipes.core.fit_and_save`.

    Returns
    -------
    pathlib.Path
        The artifact folder.
    """
    kind, labels = tier_classes(spec)
    plan = own_recipe(kind, spec.backend, size)
    if stored is not None:
        train_set = tier_set(spec, stored, "train", seed=seed)
        val_set = tier_set(spec, stored, "val", seed=seed)
    elif val_samples is None:
        raise ConfigError(
            f"tier {spec.name!r} has no dataset: its first model needs a holdout of expert "
            "annotations to be calibrated and certified on"
        )
    else:
        train_set = val_set = LabelledSet(f"{spec.name}/annotations", tuple(labels), ())
    if val_samples is not None:
        val_set = dataclasses.replace(val_set, samples=tuple(val_samples))
    train = subset(train_set.samples, max_train or plan.max_train, seed) + tuple(extra_samples)
    overrides = {**spec.config, **(config_overrides or {})}
    name, config = backend_config(plan, spec.backend, pretrained=pretrained, overrides=overrides)
    if name == "torchvision_detector" and "anchor_sizes" not in overrides:
        min_size = int(config.get("min_size", 320))
        max_size = int(config.get("max_size", 512))
        config["anchor_sizes"] = anchor_sizes(train, min_size, max_size)
    if name == "multilabel_cnn" and spec.groups and "declared_groups" not in config:
        # The dataset's exclusive groups: a group one of whose labels every image holds
        # becomes one softmax.
        config["declared_groups"] = {g: list(m) for g, m in spec.groups.items()}
    # An explicit epoch count is kept as given; the recipe's grows on a small set.
    epochs, patience = plan.epochs_for(len(train), max_epochs)
    run = TrainingRun(
        artifact=spec.artifact,
        backend=name,
        config=config,
        train=train,
        fit_val=subset(val_set.samples, plan.max_val_fit, seed),
        val=val_set,
        fingerprint_set=dataclasses.replace(train_set, samples=train),
        max_epochs=epochs,
        patience=patience,
        ltt_starts=plan.ltt_starts,
        record=(
            {"dataset": stored.name, "dataset_version": stored.version}
            if stored is not None
            else {"dataset": None}
        ),
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


def evaluate_own_tier(
    spec: TierSpec,
    stored: StoredDataset,
    *,
    settings: Settings,
    out_dir: Path,
    version: str | None = None,
    device: str = "cpu",
    split: str = "test",
    runtime: Runtime = "eager",
) -> dict[str, Any]:
    """Evaluate a trained model of ``spec`` on the dataset's ``split``; write the report.

    ``runtime`` is how the model computes (:mod:`phenocascade.models.runtime`).

    Raises
    ------
    ConfigError
        If the model's classes are not the tier's labels.
    """
    stage = load_stage(settings.artifacts, spec.artifact, version, device=device)
    stage = with_runtime(stage, runtime, device)
    test = tier_set(spec, stored, split)
    if tuple(stage.classes) != tuple(test.classes):
        raise ConfigError(
            f"{spec.artifact} model {stage.version} predicts {list(stage.classes)}, but tier "
            f"{spec.name!r} decides {list(test.classes)}; retrain it "
            f"(phenocascade train {spec.name})"
        )
    return evaluate_stage(stage, decode(test.samples), list(test.samples), out_dir)
