"""Training and evaluation recipes: which data, backend and settings each tier uses.

A tier is trained from a lab's stored dataset when the topology gives it one (``dataset:``,
written by ``phenocascade plan``) or when ``dataset`` names one
(:mod:`phenocascade.recipes.own`); the bundled tiers ``quality``, ``majority`` and
``minority`` of the packaged topology keep their tuned recipes
(:mod:`phenocascade.recipes.bundled`) on the bundled datasets, which
:mod:`phenocascade.recipes.bundled_data` imports into the store as a lab's own. The
library never imports this package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from phenocascade.config import Runtime, Settings, TierSpec, Topology
from phenocascade.data.registry import StoredDataset, load_dataset
from phenocascade.domain import StageKind
from phenocascade.errors import ConfigError
from phenocascade.models.base import ArtifactMeta, champion_version
from phenocascade.models.evaluate import KIND_METRICS, summary_metrics
from phenocascade.models.runtime import RuntimeCheck, record_check
from phenocascade.recipes.bundled import (
    DATASETS,
    TIERS,
    Dataset,
    Tier,
    ensure_bootstrap,
    recipe,
    tier_data,
)
from phenocascade.recipes.bundled import evaluate_tier as _evaluate_bundled
from phenocascade.recipes.bundled import train_tier as _train_bundled
from phenocascade.recipes.core import (
    BOOTSTRAP_TARGET_PRECISION,
    Recipe,
    Size,
    decode,
    subset,
)
from phenocascade.recipes.own import evaluate_own_tier, tier_set, train_own_tier

__all__ = [
    "BOOTSTRAP_TARGET_PRECISION",
    "DATASETS",
    "TIERS",
    "Dataset",
    "Recipe",
    "Size",
    "Tier",
    "check_runtime",
    "decode",
    "ensure_bootstrap",
    "evaluate_tier",
    "own_tier",
    "recipe",
    "subset",
    "tier_data",
    "tier_set",
    "train_tier",
]


def own_tier(
    tier: str, *, settings: Settings, topology: Topology | None, dataset: str | None
) -> tuple[TierSpec, StoredDataset] | None:
    """Return the tier's spec and stored dataset, or ``None`` for a bundled recipe.

    A tier is trained on a stored dataset when ``dataset`` names one, or else when its
    topology entry has ``dataset:``. ``dataset`` may also be a bundled recipe's dataset
    (``"dsb"``, ``"bccd"``) when no stored dataset has that name, or when the stored one
    is that bundled set (:mod:`.bundled_data` imported it).

    Raises
    ------
    ConfigError
        If the named dataset is not stored, or the tier is not in the topology.
    """
    spec = None
    if topology is not None and any(t.name == tier for t in topology.tiers):
        spec = topology.tier(tier)
    name = dataset or (spec.dataset if spec is not None else None)
    if name is None or (name in DATASETS and not (settings.dataset_store / name).is_dir()):
        return None
    stored = load_dataset(settings.dataset_store, name)
    if name in DATASETS and "bundled" in stored.source:
        return None
    if spec is None:
        tiers = [t.name for t in topology.tiers] if topology is not None else []
        raise ConfigError(
            f"tier {tier!r} is not in the topology (it has {tiers}); plan one for dataset "
            f"{name!r} with `phenocascade plan {name}` and set PHENOCASCADE_TOPOLOGY to it"
        )
    return spec, stored


def _bundled_tier(tier: str) -> Tier:
    if tier not in TIERS:
        raise ConfigError(
            f"tier {tier!r} has no dataset: give it one (`dataset:` in the topology, or "
            f"--dataset NAME of `phenocascade data list`); bundled recipes exist for {TIERS}"
        )
    return cast(Tier, tier)


def train_tier(
    tier: str,
    *,
    settings: Settings,
    topology: Topology | None = None,
    dataset: str | None = None,
    **kwargs: Any,
) -> Path:
    """Train, calibrate, certify and save one tier; make it champion if it has none.

    Parameters
    ----------
    tier : str
        A tier of ``topology`` (any name), or a bundled tier.
    settings : Settings
        Gives the datasets, stored datasets and artifacts folders.
    topology : Topology or None, default None
        The tier's topology; ``None`` for the bundled recipes.
    dataset : str or None, default None
        A stored dataset (else the tier's ``dataset:``), or a bundled minority dataset
        (``"dsb"``, ``"bccd"``).
    **kwargs
        Training options of :func:`phenocascade.recipes.own.train_own_tier` or
        :func:`phenocascade.recipes.bundled.train_tier`.

    Returns
    -------
    pathlib.Path
        The artifact folder.
    """
    own = own_tier(tier, settings=settings, topology=topology, dataset=dataset)
    if own is not None:
        for bundled_only in ("backend", "train_samples", "max_val_fit"):
            if kwargs.pop(bundled_only, None) is not None:
                raise ConfigError(
                    f"{bundled_only} applies to the bundled recipes only; a topology tier "
                    "takes its backend and config from the topology"
                )
        return train_own_tier(*own, settings=settings, **kwargs)
    return _train_bundled(
        _bundled_tier(tier), settings=settings, dataset=cast(Dataset, dataset or "dsb"), **kwargs
    )


def evaluate_tier(
    tier: str,
    *,
    settings: Settings,
    out_dir: Path,
    topology: Topology | None = None,
    dataset: str | None = None,
    version: str | None = None,
    device: str = "cpu",
    split: str = "test",
    runtime: Runtime = "eager",
) -> dict[str, Any]:
    """Evaluate a trained tier on a test split; write ``metrics.json`` and plots.

    The dataset is chosen as in :func:`train_tier`; ``runtime`` is how the model computes
    (:mod:`phenocascade.models.runtime`). Returns the metrics.
    """
    own = own_tier(tier, settings=settings, topology=topology, dataset=dataset)
    if own is not None:
        return evaluate_own_tier(
            *own,
            settings=settings,
            out_dir=out_dir,
            version=version,
            device=device,
            split=split,
            runtime=runtime,
        )
    return _evaluate_bundled(
        _bundled_tier(tier),
        settings=settings,
        out_dir=out_dir,
        version=version,
        device=device,
        dataset=cast(Dataset, dataset or "dsb"),
        split=split,
        runtime=runtime,
    )


def check_runtime(
    tier: str,
    runtime: Runtime,
    *,
    settings: Settings,
    topology: Topology | None = None,
    dataset: str | None = None,
    version: str | None = None,
    device: str = "cpu",
) -> tuple[str, RuntimeCheck]:
    """Check a runtime against eager on the tier's test split and record it in the artifact.

    Both evaluations write their reports under
    ``<home>/runtime-checks/<artifact>/<version>/{eager,<runtime>}``; the check goes to the
    artifact's :data:`~phenocascade.models.runtime.RUNTIME_CHECKS`, where workers read it.

    Returns
    -------
    tuple of (str, RuntimeCheck)
        The version checked (``version``, else the champion) and the check.

    Raises
    ------
    ConfigError
        If ``runtime`` is ``"eager"`` (nothing to check) or the tier has no such model.
    """
    if runtime == "eager":
        raise ConfigError("eager is the reference: check bf16 or onnx (--runtime bf16|onnx)")
    own = own_tier(tier, settings=settings, topology=topology, dataset=dataset)
    artifact = own[0].artifact if own is not None else tier
    version = version or champion_version(settings.artifacts, artifact)
    if version is None:
        raise ConfigError(
            f"tier {tier!r} has no champion to check; run `phenocascade train {tier}`"
        )
    folder = settings.artifacts / artifact / version
    meta = ArtifactMeta.read(folder)
    metric = KIND_METRICS[StageKind(meta.kind)]
    reports = settings.home / "runtime-checks" / artifact / version
    values = {}
    for name in ("eager", runtime):
        report = evaluate_tier(
            tier,
            settings=settings,
            out_dir=reports / name,
            topology=topology,
            dataset=dataset,
            version=version,
            device=device,
            runtime=name,
        )
        values[name] = summary_metrics(report).get(metric)
        images = int(report["n_images"])
    check = RuntimeCheck(runtime, metric, values["eager"], values[runtime], "test", images)
    record_check(folder, check)
    return version, check
