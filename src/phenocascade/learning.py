"""Training recipes of the active-learning loop: challengers and the fixed holdout.

:class:`RecipeTrainer` is the :class:`~phenocascade.consumers.retrainer.ChallengerTrainer`
the command line gives the retraining consumer. Like :mod:`phenocascade.recipes` it sits
outside the library (the consumers never import it).

The holdout and the val split
-----------------------------
A tier's fixed holdout is its val split (optionally a seeded subset of it, the same on
every call). It plays the role the val split plays in :func:`~phenocascade.recipes.train_tier`
for every model of the tier, champion and challengers alike: early stopping, temperature
calibration and certified thresholds are fitted on it, and the promotion metric is
computed on it. Annotations of holdout images are never trained on (the retrainer drops
them by image content), so the holdout is the same labelled set for every comparison. The
promotion metrics are rankings (AUROC, average precision, AP50), which a per-label
temperature does not change, so re-fitting the calibration on the holdout does not tilt
the comparison.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from phenocascade.config import Settings
from phenocascade.consumers.retrainer import Challenger, image_key
from phenocascade.domain import Sample
from phenocascade.errors import ConfigError
from phenocascade.models.base import ArtifactMeta, load_stage
from phenocascade.models.evaluate import evaluate_stage, summary_metrics
from phenocascade.recipes import TIERS, Size, Tier, decode, subset, tier_data, train_tier

# The metric that decides a promotion, per tier; all are rankings (higher is better).
TIER_METRICS: dict[str, str] = {"quality": "auroc", "majority": "mean_ap", "minority": "ap50"}


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
    """

    size: Size = "bootstrap"
    seed: int = 0
    max_train: int | None = None
    max_epochs: int | None = None
    max_val_fit: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    max_holdout: int | None = None
    target_precision: float | None = None


class RecipeTrainer:
    """Train challengers with :func:`~phenocascade.recipes.train_tier` and score them.

    Parameters
    ----------
    settings : Settings
        Datasets and artifacts folders (the artifacts folder the workers serve from).
    budget : Budget, default Budget()
        Training budget and holdout size.
    device : str, default "cpu"
        Torch device.
    base : Mapping of str to sequence of Sample, or None, default None
        Per tier, base training data replacing the tier's train split (a benchmark passes
        empty tuples to train on annotations alone); ``None`` uses the split.
    holdout : Mapping of str to sequence of Sample, or None, default None
        Per tier, a holdout replacing the val split; ``None`` uses the split.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        budget: Budget | None = None,
        device: str = "cpu",
        base: Mapping[str, Sequence[Sample]] | None = None,
        holdout: Mapping[str, Sequence[Sample]] | None = None,
    ) -> None:
        self.settings = settings
        self.budget = budget or Budget()
        self.device = device
        self.base = dict(base or {})
        self._holdout: dict[str, tuple[Sample, ...]] = {
            t: tuple(s) for t, s in (holdout or {}).items()
        }
        self._keys: dict[str, frozenset[str]] = {}
        self._scores: dict[tuple[str, str], dict[str, float]] = {}

    @staticmethod
    def _tier(tier: str) -> Tier:
        if tier not in TIERS:
            raise ConfigError(f"no training recipe for tier {tier!r}; recipes exist for {TIERS}")
        return cast(Tier, tier)

    def metric(self, tier: str) -> str:
        """Return the name of the holdout metric that decides promotions of ``tier``."""
        return TIER_METRICS[self._tier(tier)]

    def holdout(self, tier: str) -> tuple[Sample, ...]:
        """Return the tier's fixed holdout (the same samples on every call)."""
        if tier not in self._holdout:
            val = tier_data(self._tier(tier), self.settings.datasets, "val", seed=self.budget.seed)
            self._holdout[tier] = subset(val.samples, self.budget.max_holdout, self.budget.seed)
        return self._holdout[tier]

    def holdout_keys(self, tier: str) -> frozenset[str]:
        """Return the content keys of the holdout's image files (degraded copies share one)."""
        if tier not in self._keys:
            paths = {s.path for s in self.holdout(tier) if s.path is not None}
            self._keys[tier] = frozenset(image_key(p.read_bytes()) for p in paths)
        return self._keys[tier]

    def train(
        self, tier: str, *, extra_samples: Sequence[Sample], parent_version: str
    ) -> Challenger:
        """Train a challenger on the base data plus ``extra_samples``; never make it champion.

        The challenger is of the parent's backend, with that backend's recipe. Its
        calibration and thresholds are fitted on the holdout, and its ``val_report``
        (hence the returned metrics) is computed on the holdout.
        """
        b = self.budget
        parent = ArtifactMeta.read(self.settings.artifacts / tier / parent_version)
        folder = train_tier(
            self._tier(tier),
            settings=self.settings,
            backend=parent.backend,
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
        metrics = summary_metrics(ArtifactMeta.read(folder).metrics)
        self._scores[(tier, folder.name)] = metrics
        return Challenger(version=folder.name, metrics=metrics)

    def evaluate(self, tier: str, version: str) -> dict[str, float]:
        """Score a saved version on the holdout (cached: the holdout never changes).

        The report and plots go to ``<home>/retraining/<tier>/<version>/holdout``.
        """
        if (tier, version) not in self._scores:
            stage = load_stage(self.settings.artifacts, tier, version, device=self.device)
            samples = self.holdout(tier)
            out = self.settings.home / "retraining" / tier / version / "holdout"
            report = evaluate_stage(stage, decode(samples), list(samples), out)
            self._scores[(tier, version)] = summary_metrics(report)
        return self._scores[(tier, version)]
