"""Per-study drift: notice a new scanner or stain on its first images.

Each tier's shift detector flags an image ``novel`` at a false-alarm rate ``alpha`` on
images like its calibration data (:mod:`phenocascade.models.novelty`). Over a study's
images the number flagged is then at most ``Binomial(n, alpha)``; a study with far more
has moved away from what the tier was calibrated on, as a whole, even where single images
stay under the threshold. :func:`study_drift` tests that per study and tier with the exact
binomial tail, and ``phenocascade report`` lists the studies it flags
(``docs/routing.md``, "Drift per study").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from phenocascade.models.thresholds import binomial_cdf

# A study is flagged when its novel count has a tail probability below this under the
# tier's false-alarm rate: with alpha = 0.05, 5 novel images of 10 (p = 0.00006).
DRIFT_LEVEL = 0.001


@dataclass(frozen=True)
class StudyDrift:
    """What one tier saw of one study, and how unlikely its novel count is."""

    study: str
    tier: str
    images: int
    novel: int
    alpha: float
    p_value: float
    routes: dict[str, int]

    @property
    def flagged(self) -> bool:
        """Whether the study drifted (``p_value`` below :data:`DRIFT_LEVEL`)."""
        return self.p_value < DRIFT_LEVEL

    def as_dict(self) -> dict[str, Any]:
        """Return the record for the report."""
        return {
            "study": self.study,
            "tier": self.tier,
            "images": self.images,
            "novel": self.novel,
            "expected_novel": round(self.alpha * self.images, 2),
            "p_value": self.p_value,
            "routes": dict(self.routes),
        }


def study_drift(
    results: Iterable[Mapping[str, Any]], alphas: Mapping[str, float]
) -> list[StudyDrift]:
    """Test each (study, tier) pair's novel count against the tier's false-alarm rate.

    Parameters
    ----------
    results : iterable of Mapping
        Decoded ``TierResult`` records; a repeated ``(image_id, tier)`` counts once.
    alphas : Mapping[str, float]
        Each tier's novelty false-alarm rate (its champion's ``calibration.novelty.alpha``).
        A tier without one (no model, or no shift detector) is not tested.

    Returns
    -------
    list of StudyDrift
        One per (study, tier) pair with an ``alpha``, sorted by p-value, the most unlikely
        first. ``p_value`` is ``P(X >= novel)`` for ``X ~ Binomial(images, alpha)``.
    """
    seen: set[tuple[str, str]] = set()
    counts: dict[tuple[str, str], dict[str, Any]] = {}
    for result in results:
        tier = result["tier"]
        if tier not in alphas or (result["image_id"], tier) in seen:
            continue
        seen.add((result["image_id"], tier))
        entry = counts.setdefault((result["study"], tier), {"n": 0, "novel": 0, "routes": {}})
        entry["n"] += 1
        entry["novel"] += result.get("reason") == "novel"
        entry["routes"][result["route"]] = entry["routes"].get(result["route"], 0) + 1
    drifts = [
        StudyDrift(
            study=study,
            tier=tier,
            images=entry["n"],
            novel=entry["novel"],
            alpha=alphas[tier],
            p_value=1.0 - binomial_cdf(entry["novel"] - 1, entry["n"], alphas[tier]),
            routes=entry["routes"],
        )
        for (study, tier), entry in counts.items()
    ]
    return sorted(drifts, key=lambda d: (d.p_value, d.study, d.tier))
