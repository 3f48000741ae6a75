"""Training recipes of the active-learning loop: challengers and the fixed holdout.

:class:`RecipeTrainer` is the :class:`~phenocascade.consumers.retrainer.ChallengerTrainer`
the command line gives the retraining consumer. Like :mod:`phenocascade.recipes` it sits
outside the library (the consumers never import it).

The holdout and the val split
-----------------------------
A tier's fixed holdout is its val split (optionally a seeded subset of it, the same on
every call). It plays the role the val split plays in :func:`~phenocascade.recipes.train_tier`
for every model of the tier, champion and challengers alike: early stopping, calibration
and certified thresholds are fitted on it, and the promotion metric is computed on it.
Annotations of holdout images are never trained on (the retrainer drops them by image
content), so the holdout is the same labelled set for every comparison. The promotion
metrics are rankings (AUROC, average precision, AP50), which a per-label calibrator does
not change (it is increasing; an isotonic one ties only the scores beyond its outermost
breakpoints), so re-fitting the calibration on the holdout does not tilt the comparison.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from phenocascade.config import Settings, TierSpec, Topology
from phenocascade.consumers.retrainer import Challenger, image_key
from phenocascade.data.labelled import stable_seed
from phenocascade.data.registry import StoredDataset, load_dataset
from phenocascade.domain import Sample, StageKind
from phenocascade.errors import ConfigError
from phenocascade.models.base import ArtifactMeta, champion_version, get_backend, load_stage
from phenocascade.models.evaluate import KIND_METRICS, evaluate_stage, summary_metrics
from phenocascade.recipes import (
    TIERS,
    Dataset,
    Size,
    Tier,
    check_runtime,
    decode,
    recipe,
    subset,
    tier_data,
    tier_set,
    train_tier,
)
from phenocascade.recipes.own import train_own_tier

log = logging.getLogger(__name__)

# A tier without a dataset learns from annotations alone: this share of its annotated
# images (chosen by a stable hash of the image id) is its holdout instead.
ANNOTATION_HOLDOUT_SHARE = 4


def annotation_holdout(samples: Sequence[Sample]) -> tuple[list[Sample], list[Sample]]:
    """Split annotated samples into training and holdout by a stable hash of each image id.

    One in :data:`ANNOTATION_HOLDOUT_SHARE` images is held out, the same one on every call
    (an image never moves between the two as annotations accumulate). Both parts get at
    least one sample when there are two or more.
    """
    holdout = [s for s in samples if stable_seed(s.image_id) % ANNOTATION_HOLDOUT_SHARE == 0]
    train = [s for s in samples if stable_seed(s.image_id) % ANNOTATION_HOLDOUT_SHARE != 0]
    if len(samples) >= 2 and not holdout:
        holdout, train = train[:1], train[1:]
    elif len(samples) >= 2 and not train:
        holdout, train = holdout[1:], holdout[:1]
    return train, holdout


def challenger_spec(spec: TierSpec, champion: ArtifactMeta | None) -> TierSpec:
    """Return the tier entry a model of an own-data tier is trained with, given its champion.

    A champion need not be of the topology's backend and ``config``: ``phenocascade
    sweep`` promotes whichever trial won, of any backend, backbone or input size.
    Challengers keep what won: the champion's backend and its constructor arguments
    (``champion.config``, a copy) replace the entry's ``backend`` and ``config``; that
    backend's recipe gives the rest (epochs, patience). A first model (``champion`` is
    ``None``) follows the topology. A topology edit of ``backend:`` or ``config:`` thus
    reaches a tier that has a champion through a trained and promoted model only
    (``phenocascade train``, ``sweep``).

    Parameters
    ----------
    spec : TierSpec
        The tier's topology entry.
    champion : ArtifactMeta or None
        Metadata of the tier's champion, the challenger's parent; ``None`` for none.

    Returns
    -------
    TierSpec
        ``spec``, or a copy with the champion's ``backend`` and ``config``.
    """
    if champion is None:
        return spec
    return spec.model_copy(update={"backend": champion.backend, "config": dict(champion.config)})


@dataclass(frozen=True)
class Budget:
    """How much a challenger may train, and how large the holdout is.

    Attributes
    ----------
    size : {"bootstrap", "full"}
        Recipe size (:func:`phenocascade.recipes.recipe`).
    seed : int
        Seeds the base-data subset, the holdout subset, initialisation and augmentation.
    max_train : int or None
        Cap on base training samples (annotations are always all used); ``None``: the
        recipe's.
    max_epochs : int or None
        Cap on epochs; ``None``: the recipe's.
    max_val_fit : int or None
        Holdout samples used for early stopping (all are used for calibration and the
        metrics); ``None``: the recipe's.
    config : dict
        Backend arguments replacing the recipe's, e.g. ``{"input_size": 96}``.
    max_holdout : int or None
        Seeded subset of the val split used as holdout; ``None``: the whole split.
    target_precision : float or None
        Precision of certified routing decisions; ``None``: the recipe size's default.
    backend : str or None
        Bundled tiers: the backend of a first model (``parent_version=""``); ``None``: the
        recipe's. A challenger keeps its parent's.
    """

    size: Size = "bootstrap"
    seed: int = 0
    max_train: int | None = None
    max_epochs: int | None = None
    max_val_fit: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    max_holdout: int | None = None
    target_precision: float | None = None
    backend: str | None = None


@dataclass(frozen=True)
class TierSource:
    """Where one tier's training data comes from.

    Attributes
    ----------
    kind : StageKind
        What the tier predicts; decides the promotion metric.
    spec : TierSpec or None
        The tier's topology entry (``None`` for a bundled tier without a topology).
    stored : StoredDataset or None
        The tier's stored dataset, ``None`` for a bundled tier or one that learns from
        annotations alone.
    bundled : str or None
        The shared dataset of a bundled tier (its champion's, e.g. ``"bccd"``), else
        ``None``.
    """

    kind: StageKind
    spec: TierSpec | None
    stored: StoredDataset | None
    bundled: str | None


class RecipeTrainer:
    """Train challengers (and first models) with the tier's recipe and score them.

    A tier of the topology with a stored dataset (``dataset:``) trains on that dataset's
    train split plus the annotations and is compared on its val split; a bundled tier
    (``quality``, ``majority``, ``minority`` of the packaged topology) on its shared
    dataset, the one its champion was trained on; a tier with neither learns from the
    annotations alone, with one in :data:`ANNOTATION_HOLDOUT_SHARE` annotated images as
    its holdout.

    Parameters
    ----------
    settings : Settings
        Datasets, stored datasets and artifacts folders (the artifacts folder the workers
        serve from).
    budget : Budget, default Budget()
        Training budget and holdout size.
    device : str, default "cpu"
        Torch device.
    base : Mapping of str to sequence of Sample, or None, default None
        Bundled tiers: per tier, base training data replacing the tier's train split (a
        benchmark passes empty tuples to train on annotations alone); ``None`` uses the
        split.
    holdout : Mapping of str to sequence of Sample, or None, default None
        Per tier, a holdout replacing the val split; ``None`` uses the split.
    topology : Topology or None, default None
        Names each tier's backend, labels and dataset; tiers are looked up by artifact
        name. ``None``: bundled tiers only.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        budget: Budget | None = None,
        device: str = "cpu",
        base: Mapping[str, Sequence[Sample]] | None = None,
        holdout: Mapping[str, Sequence[Sample]] | None = None,
        topology: Topology | None = None,
    ) -> None:
        self.settings = settings
        self.budget = budget or Budget()
        self.device = device
        self.base = dict(base or {})
        self.topology = topology
        self._holdout: dict[str, tuple[Sample, ...]] = {
            t: tuple(s) for t, s in (holdout or {}).items()
        }
        self._keys: dict[str, frozenset[str]] = {}
        self._scores: dict[tuple[str, str], dict[str, float]] = {}
        self._sources: dict[str, TierSource] = {}

    def source(self, tier: str) -> TierSource:
        """Return where the tier (an artifact name) learns from; see the class docstring.

        Raises
        ------
        ConfigError
            If the tier is neither in the topology nor bundled.
        """
        if tier not in self._sources:
            self._sources[tier] = self._resolve(tier)
        return self._sources[tier]

    def _resolve(self, tier: str) -> TierSource:
        tiers = self.topology.tiers if self.topology is not None else []
        spec = next((t for t in tiers if t.artifact == tier), None)
        if spec is not None and spec.dataset:
            stored = load_dataset(self.settings.dataset_store, spec.dataset)
            return TierSource(get_backend(spec.backend).kind, spec, stored, None)
        if tier in TIERS:
            champion = champion_version(self.settings.artifacts, tier)
            meta = (
                ArtifactMeta.read(self.settings.artifacts / tier / champion) if champion else None
            )
            dataset = str(meta.metrics.get("dataset") or "dsb") if meta else "dsb"
            if spec is not None:
                kind = get_backend(spec.backend).kind
            elif meta is not None:
                kind = StageKind(meta.kind)
            else:
                bundled = recipe(cast(Tier, tier), self.budget.size, dataset=cast(Dataset, dataset))
                kind = get_backend(bundled.backend).kind
            return TierSource(kind, spec, None, dataset)
        if spec is None:
            raise ConfigError(
                f"no tier of the topology has the artifact {tier!r}; bundled recipes exist "
                f"for {TIERS}"
            )
        return TierSource(get_backend(spec.backend).kind, spec, None, None)

    def metric(self, tier: str) -> str:
        """Return the name of the holdout metric that decides promotions of ``tier``."""
        return KIND_METRICS[self.source(tier).kind]

    def holdout(self, tier: str) -> tuple[Sample, ...]:
        """Return the tier's fixed holdout (the same samples on every call).

        A tier that learns from annotations alone has the holdout of its last training
        (empty before it).
        """
        if tier not in self._holdout:
            src = self.source(tier)
            b = self.budget
            if src.spec is not None and src.stored is not None:
                val = tier_set(src.spec, src.stored, "val", seed=b.seed)
            elif src.bundled is not None:
                bundled = cast(Tier, tier)
                val = tier_data(
                    bundled,
                    self.settings,
                    "val",
                    seed=b.seed,
                    dataset=cast(Dataset, src.bundled),
                )
            else:
                return ()
            self._holdout[tier] = subset(val.samples, b.max_holdout, b.seed)
        return self._holdout[tier]

    def holdout_keys(self, tier: str) -> frozenset[str]:
        """Return the content keys of the holdout's image files (degraded copies share one).

        Empty for a tier that learns from annotations alone: it splits them itself.
        """
        src = self.source(tier)
        if src.stored is None and src.bundled is None:
            return frozenset()
        if tier not in self._keys:
            paths = {s.path for s in self.holdout(tier) if s.path is not None}
            self._keys[tier] = frozenset(image_key(p.read_bytes()) for p in paths)
        return self._keys[tier]

    def train(
        self, tier: str, *, extra_samples: Sequence[Sample], parent_version: str
    ) -> Challenger:
        """Train a model on the base data plus ``extra_samples``; never make it champion.

        A challenger is of the parent's backend: a bundled tier's with that backend's
        recipe, a topology tier's also with the parent's constructor arguments
        (:func:`challenger_spec`); a first model (``parent_version=""``) follows the
        topology. Its calibration and thresholds are fitted on the holdout, and its
        ``val_report`` (hence the returned metrics) is computed on the holdout.
        """
        src = self.source(tier)
        if src.bundled is not None:
            folder = self._train_bundled(tier, src.bundled, extra_samples, parent_version)
        else:
            assert src.spec is not None
            extra = list(extra_samples)
            if src.stored is None:
                extra, held = annotation_holdout(extra)
                self._holdout[tier] = tuple(held)
            b = self.budget
            folder = train_own_tier(
                challenger_spec(src.spec, self._parent(tier, parent_version)),
                src.stored,
                settings=self.settings,
                size=b.size,
                seed=b.seed,
                device=self.device,
                max_train=b.max_train,
                progress=False,
                target_precision=b.target_precision,
                extra_samples=extra,
                val_samples=self.holdout(tier),
                max_epochs=b.max_epochs,
                config_overrides=b.config,
                parent_version=parent_version,
                champion_if_none=False,
            )
        metrics = summary_metrics(ArtifactMeta.read(folder).metrics)
        self._scores[(tier, folder.name)] = metrics
        self._check_runtime(src, folder.name)
        return Challenger(version=folder.name, metrics=metrics)

    def _check_runtime(self, src: TierSource, version: str) -> None:
        """Check the tier's ``runtime:`` on a challenger, so that it serves so if promoted.

        A tier without a test split (one that learns from annotations alone) is left
        unchecked: its workers serve the challenger eager, and say so.
        """
        spec = src.spec
        if spec is None or spec.runtime == "eager":
            return
        try:
            _, check = check_runtime(
                spec.name,
                spec.runtime,
                settings=self.settings,
                topology=self.topology,
                dataset=src.bundled if src.stored is None else None,
                version=version,
                device=self.device,
            )
        except ConfigError as exc:
            log.warning(
                "tier %s: %s left unchecked for %s: %s", spec.name, spec.runtime, version, exc
            )
            return
        log.info("tier %s: %s %s", spec.name, version, check.describe())

    def _parent(self, tier: str, parent_version: str) -> ArtifactMeta | None:
        """Return the metadata of the version a challenger is trained to beat, if any."""
        if not parent_version:
            return None
        return ArtifactMeta.read(self.settings.artifacts / tier / parent_version)

    def _train_bundled(
        self, tier: str, dataset: str, extra_samples: Sequence[Sample], parent_version: str
    ) -> Path:
        """Train a bundled tier's challenger on its champion's shared dataset."""
        b = self.budget
        parent = self._parent(tier, parent_version)
        backend = parent.backend if parent is not None else b.backend
        return train_tier(
            tier,
            settings=self.settings,
            dataset=dataset,
            backend=backend,
            size=b.size,
            seed=b.seed,
            device=self.device,
            max_train=b.max_train,
            progress=False,
            target_precision=b.target_precision,
            train_samples=self.base.get(tier),
            extra_samples=extra_samples,
            val_samples=self.holdout(tier),
            max_epochs=b.max_epochs,
            max_val_fit=b.max_val_fit,
            config_overrides=b.config,
            parent_version=parent_version,
            champion_if_none=False,
        )

    def evaluate(self, tier: str, version: str) -> dict[str, float]:
        """Score a saved version on the holdout (cached per holdout size).

        The report and plots go to ``<home>/retraining/<tier>/<version>/holdout``.
        """
        samples = self.holdout(tier)
        key = (tier, f"{version}@{len(samples)}")
        if key not in self._scores:
            stage = load_stage(self.settings.artifacts, tier, version, device=self.device)
            out = self.settings.home / "retraining" / tier / version / "holdout"
            report = evaluate_stage(stage, decode(samples), list(samples), out)
            self._scores[key] = summary_metrics(report)
        return self._scores[key]
