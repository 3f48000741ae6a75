"""Active learning: which labels to ask for, six strategies against random at five seeds.

Simulated experts label images with the shared datasets' ground truth. For the quality
gate and the majority classifier, and for each seed, every strategy starts from the same
random seed set and then runs rounds of ``k`` labels, picked by one of
:data:`phenocascade.models.acquisition.STRATEGIES`:

* ``uncertainty``: the annotate queue's priority until now, the least sure calibrated
  label (:func:`phenocascade.streams.events.uncertainty`);
* ``margin`` and ``entropy`` over each softmax group (:mod:`phenocascade.models.acquisition`);
* ``bald``: mutual information from 20 Monte-Carlo dropout passes
  (:meth:`~phenocascade.models.backends._classifier.ImageClassifier.sample_probabilities`);
* ``coreset``: greedy k-centres on the model's embeddings;
* ``random``: ``k`` unlabelled pool images drawn uniformly.

Each round uses the real loop pieces: the labels go as ``Annotation`` events to a
namespaced annotations topic on the local Kafka, are read back and turned into samples by
the retraining consumer's :func:`~phenocascade.consumers.retrainer.annotation_samples`
(holdout images are refused there), and a model is trained from scratch on all labels so
far and scored on the fixed holdout by :class:`~phenocascade.learning.RecipeTrainer`,
the retraining consumer's trainer (calibration and thresholds re-fitted on the holdout).
Training is tiny: MobileNetV2 (offline ImageNet weights, whose classifier has the dropout
BALD samples) at ``--input-size`` px, a few epochs, images pre-shrunk to at most 256 px so
two CPU cores finish in minutes. The majority tier learns with the ``multilabel_cnn``
backend: the bootstrap's ``morphometric_classifier`` measures objects with a segmenter
learnt from masks, which image-level annotations cannot train from scratch.

``labels_to_95pct`` is the smallest number of labels at which the mean curve reaches 95 %
of the full-data metric (the same budget trained once per seed on every pool label);
``null`` if no round reaches it. ``vs_random`` compares each strategy's area under the
curve with random's, seed by seed (paired), with a 95 % t-interval over seeds.

Usage::

    .venv/bin/python benchmarks/active_learning.py [--seeds 0 1 2 3 4] [--rounds 6]

Writes ``benchmarks/results/active_learning.json`` (``{tier: {strategy: {labels_to_95pct,
curve: [[labels, mean, std], ...], ci95: [[low, high], ...], seeds, vs_random}}, best,
command, commit, host, ...}``), ``active_learning.png`` (mean and 95 % band per strategy)
and ``active_learning_details.json`` (per-seed curves, full-data metrics, sizes, timings).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from phenocascade.config import Settings, Topology, get_settings, load_topology
from phenocascade.consumers.retrainer import annotation_samples, newest_per_image
from phenocascade.data.labelled import QUALITY_LABEL as QUALITY_CLASS
from phenocascade.data.labelled import load_pixels
from phenocascade.domain import DecodedImage, Sample
from phenocascade.infra.local import up
from phenocascade.learning import Budget, RecipeTrainer
from phenocascade.models import acquisition
from phenocascade.models.backends._classifier import ImageClassifier
from phenocascade.models.base import load_stage
from phenocascade.recipes import TIERS
from phenocascade.recipes.bundled_data import DSB_MAJORITY_CLASSES, majority_set, quality_set
from phenocascade.streams import events
from phenocascade.streams.kafka import create_topics, plain_producer
from phenocascade.streams.scan import scan_topic
from phenocascade.streams.serde import EventCodec
from provenance import provenance

RESULTS = Path(__file__).parent / "results"
# Random first: every other strategy is compared with it.
STRATEGIES: tuple[acquisition.Strategy, ...] = (
    "random",
    "uncertainty",
    "margin",
    "entropy",
    "bald",
    "coreset",
)
MC_PASSES = 20
# Student's t quantile 0.975 by degrees of freedom (seeds - 1), for the 95 % intervals.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
MAX_SIDE = 256
log = logging.getLogger("active_learning")


@dataclass(frozen=True)
class TierPlan:
    """Pool, holdout and round sizes of one tier."""

    tier: str
    pool: tuple[Sample, ...]
    holdout: tuple[Sample, ...]
    initial: int
    k: int
    rounds: int


def shrink(sample: Sample, folder: Path) -> Sample:
    """Write the sample's pixels (degradation applied) at most 256 px wide as a PNG file.

    The networks see 96-128 px anyway; smaller files make the many re-trainings cheap.
    Returns the sample pointing at the file, with no degradation left to apply.
    """
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in sample.image_id)
    path = folder / f"{name}.png"
    if not path.is_file():
        pixels = load_pixels(sample)
        if pixels.dtype != np.uint8:
            raise ValueError(f"{sample.image_id}: expected 8-bit pixels, got {pixels.dtype}")
        image = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BOX)
        image.save(path)
    return replace(sample, path=path, degradation="", seed=0)


def plans(settings: Settings, work: Path, pool_size: int) -> list[TierPlan]:
    """Build the quality and majority pools (train split) and holdouts (val split)."""
    folder = work / "images"
    folder.mkdir(parents=True, exist_ok=True)
    # Quality: every source gives a clear original and two severely degraded copies.
    q_pool = quality_set(settings, "train", max_sources=pool_size // 3).samples
    q_hold = quality_set(settings, "val", max_sources=40).samples
    majority = majority_set(settings, "train").samples
    rng = np.random.default_rng(0)
    m_pool = tuple(majority[i] for i in sorted(rng.choice(len(majority), pool_size, replace=False)))
    m_hold = majority_set(settings, "val").samples
    return [
        TierPlan(
            "quality",
            tuple(shrink(s, folder) for s in q_pool),
            tuple(shrink(s, folder) for s in q_hold),
            initial=16,
            k=16,
            rounds=5,
        ),
        TierPlan(
            "majority",
            tuple(shrink(s, folder) for s in m_pool),
            tuple(shrink(s, folder) for s in m_hold),
            initial=16,
            k=24,
            rounds=6,
        ),
    ]


class Experts:
    """Simulated experts: label pool images with ground truth as ``Annotation`` events."""

    def __init__(self, settings: Settings, topology: Topology) -> None:
        self.settings = settings
        self.topic = topology.annotations_topic
        self.codec = EventCodec()
        self.producer = plain_producer(settings.kafka)

    def label(self, run: str, tier: str, samples: Sequence[Sample]) -> None:
        """Produce one annotation per sample (annotator = the run's name)."""
        for s in samples:
            record = {
                "annotation_id": uuid.uuid4().hex,
                "image_id": s.image_id,
                "tier": tier,
                "annotator": run,
                "labels": sorted(s.labels),
                "boxes": [],
                "uri": str(s.path),
                "model_version": "",
                "created_at": events.now_ms(),
            }
            self.producer.produce(
                self.topic, key=s.image_id.encode(), value=self.codec.encode("Annotation", record)
            )
        if self.producer.flush(30):
            raise RuntimeError("Kafka did not acknowledge the annotations")

    def read(self, run: str) -> list[dict[str, Any]]:
        """Read back every annotation of ``run`` from the topic."""
        found = []
        for _, value in scan_topic(self.settings.kafka, self.topic):
            _, record = self.codec.decode(value, expected="Annotation")
            if record["annotator"] == run:
                found.append(record)
        return found


def train_on_annotations(
    trainer: RecipeTrainer, experts: Experts, run: str, plan: TierPlan, classes: Sequence[str]
) -> tuple[str, float]:
    """Train a model on every annotation of ``run``; return its version and holdout metric."""
    newest, _ = newest_per_image(experts.read(run))
    samples, excluded = annotation_samples(
        newest,
        classes=classes,
        holdout_keys=trainer.holdout_keys(plan.tier),
        roots=[Path(str(plan.pool[0].path)).parent],
        inline_bytes=lambda _: None,
        cache_dir=trainer.settings.home / "inline",
    )
    if excluded:
        raise RuntimeError(f"{run}: annotations left out unexpectedly: {excluded}")
    challenger = trainer.train(plan.tier, extra_samples=samples, parent_version="")
    return challenger.version, challenger.metrics[trainer.metric(plan.tier)]


def pick(
    strategy: acquisition.Strategy,
    version: str,
    plan: TierPlan,
    labelled: set[int],
    pixels: list[DecodedImage],
    settings: Settings,
    rng: np.random.Generator,
) -> list[int]:
    """Choose the next ``k`` pool indices by ``strategy``."""
    unlabelled = [i for i in range(len(plan.pool)) if i not in labelled]
    k = min(plan.k, len(unlabelled))
    images = [pixels[i] for i in unlabelled]
    if strategy == "random":
        return [int(i) for i in rng.choice(unlabelled, k, replace=False)]
    if strategy == "uncertainty":
        # The queue's priority: the served stage, its novelty guard included.
        guarded = load_stage(settings.artifacts, plan.tier, version)
        priority = np.array([events.uncertainty(o) for o in guarded.predict(images)])
        return [unlabelled[int(j)] for j in np.argsort(-priority, kind="stable")[:k]]
    stage = load_stage(settings.artifacts, plan.tier, version, novelty=False)
    if not isinstance(stage, ImageClassifier):
        raise TypeError(f"{plan.tier}/{version} is a {stage.model_name}, not an image CNN")
    if strategy == "coreset":
        features = stage.embed(pixels)
        return acquisition.k_centres(features, sorted(labelled), unlabelled, k)
    columns = acquisition.group_columns(stage.classes_, stage.softmax_groups or ())
    if strategy == "bald":
        samples = stage.sample_probabilities(
            images, passes=MC_PASSES, seed=int(rng.integers(1 << 31))
        )
        priority = acquisition.bald(samples, columns)
    else:
        outputs = stage.predict(images)
        probs = np.array([[o.scores[c] for c in stage.classes_] for o in outputs])
        priority = acquisition.priority(strategy, probs, columns)
    # Highest priority first, as the annotate queue serves them; ties by pool order.
    order = np.argsort(-priority, kind="stable")
    return [unlabelled[int(j)] for j in order[:k]]


def run_tier(
    plan: TierPlan,
    *,
    settings: Settings,
    experts: Experts,
    seeds: Sequence[int],
    rounds: int,
    budget: Budget,
    tag: str,
    strategies: Sequence[acquisition.Strategy],
) -> dict[str, Any]:
    """Run every strategy and the full-data reference for every seed of one tier."""
    pixels = [DecodedImage(s.image_id, load_pixels(s)) for s in plan.pool]
    classes = [QUALITY_CLASS] if plan.tier == "quality" else list(DSB_MAJORITY_CLASSES)
    if plan.tier == "majority":
        budget = replace(budget, backend="multilabel_cnn")
    curves: dict[str, dict[int, list[tuple[int, float]]]] = {s: {} for s in strategies}
    full: dict[int, float] = {}
    for seed in seeds:
        trainer = RecipeTrainer(
            settings,
            budget=replace(budget, seed=seed),
            base={plan.tier: ()},
            holdout={plan.tier: plan.holdout},
        )
        rng = np.random.default_rng(seed)
        initial = [int(i) for i in rng.choice(len(plan.pool), plan.initial, replace=False)]
        # Round 0 is the same for both strategies: train it once.
        start_run = f"{tag}-{plan.tier}-s{seed}-start"
        experts.label(start_run, plan.tier, [plan.pool[i] for i in initial])
        v0, m0 = train_on_annotations(trainer, experts, start_run, plan, classes)
        log.info("%s seed %d: %d labels -> %.4f", plan.tier, seed, len(initial), m0)
        for strategy in strategies:
            run = f"{tag}-{plan.tier}-s{seed}-{strategy}"
            experts.label(run, plan.tier, [plan.pool[i] for i in initial])
            labelled, version, metric = set(initial), v0, m0
            curve = [(len(labelled), m0)]
            pick_rng = np.random.default_rng(seed + 1000)
            for _ in range(rounds):
                chosen = pick(strategy, version, plan, labelled, pixels, settings, pick_rng)
                if version != v0:
                    shutil.rmtree(settings.artifacts / plan.tier / version)
                experts.label(run, plan.tier, [plan.pool[i] for i in chosen])
                labelled |= set(chosen)
                version, metric = train_on_annotations(trainer, experts, run, plan, classes)
                curve.append((len(labelled), metric))
                log.info(
                    "%s seed %d %s: %d labels -> %.4f",
                    plan.tier,
                    seed,
                    strategy,
                    len(labelled),
                    metric,
                )
            shutil.rmtree(settings.artifacts / plan.tier / version)
            curves[strategy][seed] = curve
        shutil.rmtree(settings.artifacts / plan.tier / v0)
        full_run = f"{tag}-{plan.tier}-s{seed}-full"
        experts.label(full_run, plan.tier, plan.pool)
        vf, full[seed] = train_on_annotations(trainer, experts, full_run, plan, classes)
        shutil.rmtree(settings.artifacts / plan.tier / vf)
        log.info("%s seed %d: all %d labels -> %.4f", plan.tier, seed, len(plan.pool), full[seed])
    return {"curves": curves, "full": full}


def _interval(values: npt.NDArray[np.float64]) -> tuple[float, float]:
    """Return the 95 % t-interval of the mean of ``values`` (one per seed)."""
    n = len(values)
    if n < 2:
        return float(values.mean()), float(values.mean())
    half = _T975.get(n - 1, 1.96) * float(values.std(ddof=1)) / np.sqrt(n)
    return float(values.mean() - half), float(values.mean() + half)


def summarise(
    raw: dict[str, Any], seeds: Sequence[int], strategies: Sequence[str]
) -> dict[str, Any]:
    """Mean curves with 95 % bands, labels_to_95pct, and the paired comparison with random."""
    target = 0.95 * float(np.mean(list(raw["full"].values())))
    out: dict[str, Any] = {}
    area: dict[str, npt.NDArray[np.float64]] = {}
    for strategy in strategies:
        per_seed = [raw["curves"][strategy][s] for s in seeds]
        labels = [n for n, _ in per_seed[0]]
        values = np.array([[m for _, m in c] for c in per_seed])
        curve = [
            [int(n), float(values[:, j].mean()), float(values[:, j].std())]
            for j, n in enumerate(labels)
        ]
        reached = [n for n, mean, _ in curve if mean >= target]
        # Mean metric over the rounds after the seed set: the area under the curve per label.
        area[strategy] = np.trapezoid(values, labels, axis=1) / (labels[-1] - labels[0])
        out[strategy] = {
            "labels_to_95pct": reached[0] if reached else None,
            "curve": curve,
            "ci95": [list(_interval(values[:, j])) for j in range(len(labels))],
            "seeds": list(seeds),
            "mean_metric": float(area[strategy].mean()),
        }
    for strategy in strategies:
        if strategy == "random" or "random" not in area:
            continue
        low, high = _interval(area[strategy] - area["random"])
        out[strategy]["vs_random"] = {
            "mean_metric_gain": float((area[strategy] - area["random"]).mean()),
            "ci95": [low, high],
            "beats_random": low > 0.0,
            "seeds_better": int((area[strategy] > area["random"]).sum()),
        }
    return out


def best_strategy(summary: dict[str, Any]) -> str:
    """Return the strategy with the fewest labels to 95 %, ties (and misses) by mean metric.

    ``random`` wins unless another strategy's paired interval lies above it.
    """
    challengers = [
        s
        for s, v in summary.items()
        if s != "random" and v.get("vs_random", {}).get("beats_random")
    ]
    if not challengers:
        return "random"

    def key(strategy: str) -> tuple[float, float]:
        needed = summary[strategy]["labels_to_95pct"]
        return (float("inf") if needed is None else needed, -summary[strategy]["mean_metric"])

    return min(challengers, key=key)


def plot(results: dict[str, Any], details: dict[str, Any], path: Path) -> None:
    """One panel per tier: metric vs labels, mean and 95 % band over seeds, the target."""
    tiers = [t for t in results if t in TIERS]
    fig, axes = plt.subplots(1, len(tiers), figsize=(6.5 * len(tiers), 4.5))
    for ax, tier in zip(np.atleast_1d(axes), tiers, strict=True):
        for j, strategy in enumerate(s for s in STRATEGIES if s in results[tier]):
            curve = np.array(results[tier][strategy]["curve"])
            band = np.array(results[tier][strategy]["ci95"])
            colour = f"C{j}"
            ax.plot(curve[:, 0], curve[:, 1], "o-", color=colour, label=strategy, ms=3)
            ax.fill_between(curve[:, 0], band[:, 0], band[:, 1], color=colour, alpha=0.12)
        full = details[tier]["full_data_metric_mean"]
        ax.axhline(full, color="k", lw=1, label=f"all {details[tier]['pool']} labels")
        ax.axhline(0.95 * full, color="k", lw=1, ls="--", label="95 % of that")
        seeds = len(results[tier]["random"]["seeds"])
        ax.set(
            xlabel="expert labels",
            ylabel=f"holdout {details[tier]['metric']}",
            title=f"{tier}: {seeds} seeds, 95 % bands; queue uses {results[tier]['best']}",
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="acquisition rounds after the seed set (default: 5 for quality, 6 for majority)",
    )
    parser.add_argument("--pool", type=int, default=240, help="pool images per tier")
    parser.add_argument("--input-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--tiers", nargs="+", default=["quality", "majority"])
    parser.add_argument(
        "--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES)
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if "random" not in args.strategies:
        parser.error("--strategies must include random: every other strategy is compared with it")
    strategies = [s for s in STRATEGIES if s in args.strategies]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("phenocascade.recipes", "phenocascade.models"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    started = time.time()

    base = get_settings()
    up(base, services=("kafka",))
    tag = f"al{uuid.uuid4().hex[:6]}"
    topology = load_topology().namespaced(f"{tag}-")
    create_topics(base.kafka, topology)
    work = Path(tempfile.mkdtemp(prefix="phenocascade-al-"))
    settings = base.model_copy(
        update={"artifacts": work / "artifacts", "home": work / "home", "allowed_roots": [work]}
    )
    # Early stopping looks at 32 holdout images; calibration and the metric use all of it.
    budget = Budget(
        max_epochs=args.epochs,
        max_val_fit=32,
        config={"input_size": args.input_size, "batch_size": 16},
    )
    experts = Experts(settings, topology)
    results: dict[str, Any] = {}
    details: dict[str, Any] = {}
    try:
        for plan in plans(settings, work, args.pool):
            if plan.tier not in args.tiers:
                continue
            tier_started = time.time()
            raw = run_tier(
                plan,
                settings=settings,
                experts=experts,
                seeds=args.seeds,
                rounds=args.rounds or plan.rounds,
                budget=budget,
                tag=tag,
                strategies=strategies,
            )
            summary = summarise(raw, args.seeds, strategies)
            results[plan.tier] = {**summary, "best": best_strategy(summary)}
            details[plan.tier] = {
                "metric": RecipeTrainer(settings).metric(plan.tier),
                "backend": "multilabel_cnn" if plan.tier == "majority" else "quality_cnn",
                "pool": len(plan.pool),
                "holdout": len(plan.holdout),
                "initial_labels": plan.initial,
                "k": plan.k,
                "full_data_metric": {str(s): m for s, m in raw["full"].items()},
                "full_data_metric_mean": float(np.mean(list(raw["full"].values()))),
                "per_seed": {
                    strategy: {str(s): c for s, c in raw["curves"][strategy].items()}
                    for strategy in strategies
                },
                "seconds": round(time.time() - tier_started, 1),
            }
            # Written after each tier, so a long run keeps what it has finished.
            write(args, dict(results), dict(details), started)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def write(
    args: argparse.Namespace, results: dict[str, Any], details: dict[str, Any], started: float
) -> None:
    """Write the results, the details and the plot of the tiers finished so far."""
    command = " ".join(
        [".venv/bin/python", "benchmarks/active_learning.py", *map(shlex.quote, sys.argv[1:])]
    )
    results |= provenance(command)
    details["command"] = command
    details["budget"] = {
        "epochs": args.epochs,
        "input_size": args.input_size,
        "batch_size": 16,
        "early_stopping_holdout_images": 32,
        "mc_dropout_passes": MC_PASSES,
    }
    details["seconds"] = round(time.time() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "active_learning.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "active_learning_details.json").write_text(json.dumps(details, indent=2) + "\n")
    plot(results, details, args.out / "active_learning.png")
    print(json.dumps({t: {"best": v["best"]} for t, v in results.items() if t in TIERS}))


if __name__ == "__main__":
    sys.exit(main())
