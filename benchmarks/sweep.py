"""Model selection against the default recipe: per tier, an Optuna sweep's best and the recipe.

A recipe outside the library (it calls :mod:`phenocascade`, never the reverse). For every
tier of a planned topology (``phenocascade plan``) that names a stored dataset, it trains
the tier's default recipe (:func:`phenocascade.recipes.own.train_own_tier`) and runs a
sweep (:func:`phenocascade.recipes.sweep.sweep_tier`) with the same seed, size and
training cap; both pick their settings on the val split only, and both are then evaluated
on the test split (:func:`phenocascade.recipes.evaluate_tier`). Models, reports and the
study go to a temporary folder: nothing is promoted and the artifacts folder is untouched.

Usage::

    .venv/bin/python benchmarks/sweep.py TOPOLOGY [--tiers a,b] [--trials 20]
        [--budget-minutes 20] [--seed 0] [--size bootstrap|full] [--max-train N]
        [--out benchmarks/results/models.json]

Replaces the ``sweep`` key of ``--out`` (its other keys are kept) with one measurement:

- ``sweep.tiers.<tier>.metric``: the tier kind's metric (gate AUROC, classifier mean AP,
  detector AP50);
- ``sweep.tiers.<tier>.default``: ``test`` (that metric on the test split), ``val`` (on
  the val split, from the artifact), ``backend``, ``config``, ``seconds``;
- ``sweep.tiers.<tier>.sweep_best``: ``test``, ``val``, ``params``, ``trial``, the count
  of trials per state, ``seconds`` (the whole sweep);
- ``sweep.command``, ``sweep.commit``, ``sweep.host`` (cores, torch threads, platform),
  ``sweep.settings``, ``sweep.seconds``.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from phenocascade.config import Settings, TierSpec, Topology, get_settings, load_topology
from phenocascade.data.registry import StoredDataset, load_dataset
from phenocascade.models.base import ArtifactMeta, tier_classes
from phenocascade.models.evaluate import KIND_METRICS, summary_metrics
from phenocascade.recipes import evaluate_tier
from phenocascade.recipes.own import train_own_tier
from phenocascade.recipes.sweep import sweep_tier
from provenance import commit

log = logging.getLogger("benchmarks.sweep")
RESULTS = Path(__file__).parent / "results"


def _test_metric(
    spec: TierSpec, topology: Topology, settings: Settings, version: str, out: Path
) -> float | None:
    """Return the tier kind's metric of a saved version on the test split."""
    report = evaluate_tier(
        spec.name, settings=settings, out_dir=out, topology=topology, version=version
    )
    return summary_metrics(report).get(KIND_METRICS[tier_classes(spec)[0]])


def default_row(
    spec: TierSpec,
    stored: StoredDataset,
    topology: Topology,
    settings: Settings,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Train the tier's default recipe; return its val and test metric."""
    started = time.perf_counter()
    folder = train_own_tier(
        spec,
        stored,
        settings=settings,
        size=args.size,
        seed=args.seed,
        max_train=args.max_train,
        progress=False,
        champion_if_none=False,
    )
    seconds = time.perf_counter() - started
    meta = ArtifactMeta.read(folder)
    metric = KIND_METRICS[tier_classes(spec)[0]]
    return {
        "backend": meta.backend,
        "config": meta.config,
        "val": summary_metrics(meta.metrics).get(metric),
        "test": _test_metric(spec, topology, settings, folder.name, folder / "test_report"),
        "seconds": round(seconds, 1),
    }


def sweep_row(
    spec: TierSpec,
    stored: StoredDataset,
    topology: Topology,
    settings: Settings,
    args: argparse.Namespace,
    storage: str,
) -> dict[str, Any]:
    """Sweep the tier; return its best trial's val and test metric and what it searched."""
    started = time.perf_counter()
    result = sweep_tier(
        spec,
        stored,
        settings=settings,
        trials=args.trials,
        budget_minutes=args.budget_minutes,
        storage=storage,
        seed=args.seed,
        size=args.size,
        max_train=args.max_train,
    )
    seconds = time.perf_counter() - started
    row: dict[str, Any] = {
        "trials": dict(collections.Counter(t.state for t in result.trials)),
        "seconds": round(seconds, 1),
    }
    best = result.best
    if best is None or best.version is None or result.folder is None:
        return {**row, "test": None, "val": None, "params": None, "trial": None}
    test = _test_metric(spec, topology, settings, best.version, result.folder / "test_report")
    return {**row, "test": test, "val": best.metric, "params": best.params, "trial": best.number}


def _host() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("topology", type=Path, help="a planned topology (phenocascade plan)")
    parser.add_argument("--tiers", default="", help="comma-separated tiers (default: all)")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--budget-minutes", type=float, default=20.0, help="per tier")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=("bootstrap", "full"), default="bootstrap")
    parser.add_argument("--max-train", type=int, default=None, help="cap on training samples")
    parser.add_argument("--out", type=Path, default=RESULTS / "models.json")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.perf_counter()
    topology = load_topology(args.topology)
    chosen = [t for t in args.tiers.split(",") if t]
    tiers: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="phenocascade-sweep-bench-") as tmp:
        # Stored datasets from the user's home; models, reports and the study in tmp.
        settings = get_settings().model_copy(update={"artifacts": Path(tmp) / "artifacts"})
        storage = f"sqlite:///{Path(tmp) / 'sweeps.db'}"
        for spec in topology.tiers:
            if (chosen and spec.name not in chosen) or spec.dataset is None:
                continue
            stored = load_dataset(settings.dataset_store, spec.dataset)
            log.info("tier %s: default recipe, then a sweep", spec.name)
            tiers[spec.name] = {
                "metric": KIND_METRICS[tier_classes(spec)[0]],
                "default": default_row(spec, stored, topology, settings, args),
                "sweep_best": sweep_row(spec, stored, topology, settings, args, storage),
            }
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result["sweep"] = {
        "tiers": tiers,
        "command": shlex.join([".venv/bin/python", "benchmarks/sweep.py", *sys.argv[1:]]),
        "commit": commit(),
        "host": _host(),
        "settings": {
            "topology": str(args.topology),
            "trials": args.trials,
            "budget_minutes": args.budget_minutes,
            "seed": args.seed,
            "size": args.size,
            "max_train": args.max_train,
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    log.info("wrote the sweep section of %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
