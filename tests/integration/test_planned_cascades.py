"""Planned cascades of 2 and of 5 tiers, streamed end to end on the real Kafka and Cassandra.

``plan`` turns a stored dataset into a topology; the number of tiers follows its labels.
Each planned topology runs as real processes (tier workers + joiner): every image gets
exactly one output, every tier it reached answered in its own class names, and a tier
without a model yet (cold start) asked experts exactly its labels.
"""

from __future__ import annotations

import csv
import dataclasses
import shutil
import subprocess
import sys
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import Cascade, settings_env
from synthetic import write_em_like

from phenocascade.config import Settings, Topology, load_topology
from phenocascade.data.labelled import LabelledSet
from phenocascade.data.registry import save_dataset
from phenocascade.domain import NO_MODEL_VERSION
from phenocascade.recipes import ensure_bootstrap
from phenocascade.recipes.bundled_data import (
    majority_set,
    nuclei_set,
    rare_set,
    split_ids,
    split_samples,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "phenocascade", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, f"phenocascade {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _stream(settings: Settings, workdir: Path, topology: Topology, images: list[Path]) -> Any:
    """Run the cascade on copies of ``images`` in its input folder; return it and the ids."""
    cascade = Cascade(settings, workdir, topology=topology)
    copies = []
    for image in images:
        copies.append(cascade.roots / image.name)
        shutil.copyfile(image, copies[-1])
    cascade.start()
    try:
        ids = cascade.submit(copies, prefix="p-")
        counts = cascade.wait_until_done(ids, timeout_s=600)
        assert counts == Counter({i: 1 for i in ids}), cascade.log_tail()
    finally:
        cascade.stop()
    return cascade, ids


def _check_tiers(cascade: Cascade, ids: list[str]) -> dict[str, set[str]]:
    """Each tier's results use its own labels; cold tiers asked experts exactly those.

    Returns, per tier, the images it scored.
    """
    wanted = set(ids)
    scored: dict[str, set[str]] = defaultdict(set)
    for tier in cascade.topology.tiers:
        for result in cascade.read(tier.result_topic, "TierResult"):
            if result["image_id"] not in wanted:
                continue
            scored[tier.name].add(result["image_id"])
            assert set(result["scores"]) <= set(tier.labels or ["clear"]), result
            assert {b["label"] for b in result["boxes"]} <= set(tier.labels or []), result
            if result["model_version"] == NO_MODEL_VERSION:
                assert result["route"] == "ANNOTATE", result
    requests = cascade.read(cascade.topology.annotate_topic, "AnnotationRequest")
    for request in requests:
        if request["image_id"] in wanted and request["model_version"] == NO_MODEL_VERSION:
            assert request["classes"] == cascade.topology.tier(request["tier"]).labels, request
    return scored


def test_em_slices_plan_to_two_tiers_and_stream(infra: Settings, tmp_path: Path) -> None:
    data = tmp_path / "em"
    counts = write_em_like(data, n=15, size=384)
    assert counts["dense_core_granule"] / sum(counts.values()) < 0.15
    settings = infra.model_copy(
        update={"home": tmp_path / "home", "artifacts": tmp_path / "home" / "artifacts"}
    )
    env = settings_env(settings.model_copy(update={"allowed_roots": [data]}))
    name = f"em-{uuid.uuid4().hex[:6]}"
    _cli(env, "data", "import", "class-masks", str(data / "masks"), str(data / "images"),
         "--name", name, "--min-size", "10")  # fmt: skip
    planned = tmp_path / "topology.yaml"
    _cli(env, "plan", name, "--out", str(planned))
    topology = load_topology(planned)
    assert [t.name for t in topology.tiers] == ["quality", "rare"]
    assert topology.tier("rare").labels == ["dense_core_granule"]

    # The gate learns from the lab's own slices (and degraded copies of them); the detector
    # has no model yet. A hand-set gate threshold of 0 passes every slice on to it: this test
    # is about the planned flow, not about a gate trained on 9 slices.
    _cli(env, "train", "quality", "--topology", str(planned), "--max-epochs", "1")
    raw = yaml.safe_load(planned.read_text())
    raw["tiers"][0]["thresholds"] = {"positive": 0.0, "negative": 0.0}
    topology = Topology.model_validate(raw)
    images = sorted((data / "images").glob("*.tif"))
    cascade, ids = _stream(settings, tmp_path / "c2", topology, images)
    scored = _check_tiers(cascade, ids)
    assert scored["quality"] == scored["rare"] == set(ids)


def _dsb_with_groups(settings: Settings, ids: list[str]) -> LabelledSet:
    """DSB images with three label groups, every nucleus, and the rare large nuclei."""
    kinds = {}
    with (settings.datasets / "dsb2018" / "images.csv").open() as f:
        for row in csv.DictReader(f):
            kinds[row["image_id"]] = row["kind"]
    majority = {s.image_id: s for s in majority_set(settings, "train").samples}
    nuclei = {s.image_id: s for s in nuclei_set(settings, "train").samples}
    rare = {s.image_id: s for s in rare_set(settings, "train").samples}
    samples = tuple(
        dataclasses.replace(
            majority[i],
            labels=majority[i].labels | {f"modality:{kinds[i]}"},
            boxes=nuclei[i].boxes + rare[i].boxes,
        )
        for i in ids
    )
    classes = [*sorted({label for s in samples for label in s.labels}), "large_nucleus", "nucleus"]
    return LabelledSet("dsb-groups", tuple(classes), samples)


def test_a_dataset_with_groups_and_rare_objects_plans_to_five_tiers_and_streams(
    infra: Settings, tmp_path: Path
) -> None:
    ensure_bootstrap(infra)  # the bundled generic gate
    train = split_ids(infra, "dsb2018", "train")
    labelled = _dsb_with_groups(infra, train[:90])
    groups: dict[str, list[str]] = defaultdict(list)
    for label in labelled.classes:
        if ":" in label:
            groups[label.split(":")[0]].append(label)
    name = f"dsb-{uuid.uuid4().hex[:6]}"
    save_dataset(
        tmp_path / "home" / "datasets",
        name,
        labelled,
        kinds={c: "object" if ":" not in c else "image" for c in labelled.classes},
        groups=groups,
    )
    settings = infra.model_copy(update={"home": tmp_path / "home"})
    env = settings_env(settings)
    planned = tmp_path / "topology.yaml"
    _cli(env, "plan", name, "--out", str(planned), "--quality", "generic")
    topology = load_topology(planned)
    assert [t.name for t in topology.tiers] == [
        "quality",
        "density",
        "modality",
        "nucleus_size",
        "rare",
    ]
    assert topology.tier("rare").labels == ["large_nucleus"]

    images = [s.path for s in split_samples(infra, "dsb2018", "train")[90:102] if s.path]
    cascade, ids = _stream(settings, tmp_path / "c5", topology, images)
    scored = _check_tiers(cascade, ids)
    passed = {
        r["image_id"]
        for r in cascade.read(cascade.topology.tiers[0].result_topic, "TierResult")
        if r["image_id"] in set(ids) and r["route"] == "PASS"
    }
    assert passed, "the bundled gate passed none of the DSB images"
    for tier in topology.tiers[1:]:
        assert scored[tier.name] == passed, tier.name
