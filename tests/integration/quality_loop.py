"""What the retraining tests share: a deliberately weak quality champion, simulated expert
answers about image quality, and the small training budget that lets a challenger beat the
champion within a test.

A fair fight: the bootstrap quality champion scores AUROC 1.0 on the holdout, which no
tiny challenger can strictly beat. Tests that need a promotion therefore start from the
fine-tuned ``quality_cnn`` recipe with a from-scratch ``small_cnn`` trained for one step on
four images; the challenger, of its parent's backend (pretrained MobileNetV2, 96 px, 2
epochs, 24 base images + the annotations), must beat it on the same fixed holdout.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import tifffile

from phenocascade.config import Settings
from phenocascade.data.labelled import load_pixels
from phenocascade.learning import Budget, RecipeTrainer
from phenocascade.recipes import train_tier
from phenocascade.recipes.bundled_data import quality_set
from phenocascade.streams import events

HOLDOUT = 48
BUDGET = Budget(
    max_train=24, max_epochs=2, config={"input_size": 96, "batch_size": 8}, max_holdout=HOLDOUT
)
BUDGET_ARGS = [
    "--max-train",
    "24",
    "--max-epochs",
    "2",
    "--config",
    json.dumps(BUDGET.config),
    "--holdout",
    str(HOLDOUT),
]


def weak_champion(settings: Settings, trainer: RecipeTrainer) -> str:
    """Train the deliberately weak quality champion: small_cnn from scratch, one step."""
    train = quality_set(settings, "train", max_sources=2).samples[:4]
    folder = train_tier(
        "quality",
        settings=settings,
        train_samples=train,
        val_samples=trainer.holdout("quality"),
        max_epochs=1,
        backend="quality_cnn",
        config_overrides={"backbone": "small_cnn", "pretrained": None, "input_size": 64},
        progress=False,
    )
    return folder.name


def degraded_copies(settings: Settings, sources: list[str], folder: Path) -> list[Path]:
    """Write severely degraded copies of DSB train images as files (ground truth: unclear)."""
    wanted = {f"dsb2018:{s}" for s in sources}
    paths = []
    for sample in quality_set(settings, "train").samples:
        if sample.group in wanted and sample.degradation:
            wanted.discard(sample.group)
            pixels = load_pixels(sample)
            path = folder / f"degraded-{sample.group.split(':')[1]}.tif"
            tifffile.imwrite(path, pixels[..., 0] if pixels.shape[2] == 1 else pixels)
            paths.append(path)
    return paths


def quality_annotation(image_id: str, path: Path, clear: bool, version: str) -> dict[str, Any]:
    """Return an expert's ``Annotation`` of an image's quality (``clear`` or not)."""
    return {
        "annotation_id": uuid.uuid4().hex,
        "image_id": image_id,
        "tier": "quality",
        "annotator": "simulated-expert",
        "labels": ["clear"] if clear else [],
        "boxes": [],
        "uri": str(path),
        "model_version": version,
        "created_at": events.now_ms(),
    }
