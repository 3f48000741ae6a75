"""`phenocascade plan`: tiers that follow a stored dataset's label frequencies and kinds."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from phenocascade.cli import main
from phenocascade.config import get_settings, load_topology
from phenocascade.data.labelled import LabelledSet
from phenocascade.data.planning import CascadePlan, PlanRow, plan_cascade
from phenocascade.data.registry import LabelKind, StoredDataset, save_dataset
from phenocascade.domain import Box, Sample
from phenocascade.errors import ValidationError


def _boxes(label: str, n: int) -> tuple[Box, ...]:
    return tuple(Box(4.0 * i, 0.0, 4.0 * i + 3.0, 3.0, label) for i in range(n))


def _stored(
    name: str,
    samples: Sequence[Sample],
    kinds: Mapping[str, LabelKind],
    groups: Mapping[str, tuple[str, ...]] | None = None,
) -> StoredDataset:
    return StoredDataset(
        name=name,
        version=1,
        fingerprint="0" * 64,
        classes=tuple(kinds),
        kinds=dict(kinds),
        groups=dict(groups or {}),
        samples=tuple(samples),
        split={s.image_id: "train" for s in samples},
        images={},
    )


def _em(name: str = "em", *, vesicle_images: int = 6) -> StoredDataset:
    """20 EM images, 10 mitochondria each, one large vesicle in a few (6/206 = 2.9 %)."""
    samples = [
        Sample(
            f"em{i}",
            None,
            boxes=_boxes("mitochondrion", 10) + _boxes("large_vesicle", int(i < vesicle_images)),
        )
        for i in range(20)
    ]
    return _stored(name, samples, {"mitochondrion": "object", "large_vesicle": "object"})


def _cells(name: str = "cells", *, micronuclei: int = 3) -> StoredDataset:
    """100 images: two label groups, nuclei in 80 of them, micronuclei in a few.

    density: dense/sparse 50/50; size: large 10, small 90; nuclei 5 per image in images
    0-79 (400 boxes); one micronucleus in each of images 0..micronuclei-1.
    """
    samples = []
    for i in range(100):
        labels = {"density:dense" if i % 2 else "density:sparse"}
        labels.add("size:large" if i < 10 else "size:small")
        boxes = _boxes("nucleus", 5 if i < 80 else 0) + _boxes("micronucleus", int(i < micronuclei))
        samples.append(Sample(f"c{i}", None, frozenset(labels), boxes))
    kinds: dict[str, LabelKind] = {
        "density:dense": "image",
        "density:sparse": "image",
        "size:large": "image",
        "size:small": "image",
        "nucleus": "object",
        "micronucleus": "object",
    }
    groups = {"density": ("density:dense", "density:sparse"), "size": ("size:large", "size:small")}
    return _stored(name, samples, kinds, groups)


def _row(plan: CascadePlan, label: str, dataset: str | None = None) -> PlanRow:
    (row,) = [r for r in plan.rows if r.label == label and dataset in (None, r.dataset)]
    return row


def _tiers(plan: CascadePlan) -> dict[str, list[str] | None]:
    return {t.name: t.labels for t in plan.topology.tiers}


def test_em_organelles_plan_to_the_gate_and_a_rare_detector() -> None:
    plan = plan_cascade([_em()])
    assert _tiers(plan) == {"quality": ["clear"], "rare": ["large_vesicle"]}
    rare = plan.topology.tier("rare")
    assert (rare.role, rare.backend, rare.batch_size) == ("branch", "torchvision_detector", 4)
    assert _row(plan, "large_vesicle").tier == "rare"
    mito = _row(plan, "mitochondrion")
    assert mito.tier is None
    assert "in every image: no image-level decision to make" in mito.why
    gate = plan.rows[0]
    assert (gate.label, gate.tier) == ("clear", "quality")
    assert "synthetic degradations" in gate.why


def test_two_groups_frequent_and_rare_objects_plan_to_five_tiers() -> None:
    plan = plan_cascade([_cells()])
    assert _tiers(plan) == {
        "quality": ["clear"],
        "density": ["density:dense", "density:sparse"],
        "size": ["size:large", "size:small"],
        "objects": ["nucleus"],
        "rare": ["micronucleus"],
    }
    backends = {t.name: (t.role, t.backend, t.batch_size) for t in plan.topology.tiers}
    assert backends == {
        "quality": ("gate", "quality_probe", 8),
        "density": ("branch", "multilabel_cnn", 8),
        "size": ("branch", "multilabel_cnn", 8),
        "objects": ("branch", "multilabel_cnn", 8),
        "rare": ("branch", "torchvision_detector", 4),
    }
    # A group tier decides its exclusive labels together (per-label routing).
    groups = {t.name: t.groups for t in plan.topology.tiers}
    assert groups["size"] == {"size": ["size:large", "size:small"]}
    assert groups["objects"] == {} and groups["rare"] == {}
    # size:large is rare (10 %) but its group has a frequent label: classified with it
    assert "rare, classified with its group 'size'" in _row(plan, "size:large").why
    assert [r.label for r in plan.rows] == ["clear", *_cells().classes]


def test_the_cut_off_moves_an_object_class_between_detector_and_presence_tier() -> None:
    cells = _cells(micronuclei=40)  # 40 / 440 boxes = 9.1 % of objects
    assert _row(plan_cascade([cells]), "micronucleus").tier == "rare"
    plan = plan_cascade([cells], minority_max_fraction=0.05)
    assert _tiers(plan)["objects"] == ["nucleus", "micronucleus"]
    assert "rare" not in _tiers(plan)
    assert "no object class is rare: no detector tier" in _row(plan, "nucleus").why


def test_the_cut_off_moves_a_label_group_into_the_labels_tier() -> None:
    plan = plan_cascade([_cells()], minority_max_fraction=0.6)
    assert "density" not in _tiers(plan) and "size" in _tiers(plan)
    assert _tiers(plan)["labels"] == ["density:dense", "density:sparse"]
    assert "rare image label (as is all of group 'density')" in _row(plan, "density:dense").why


def test_image_labels_count_images_and_object_classes_count_objects() -> None:
    plan = plan_cascade([_cells()])
    large = _row(plan, "size:large")
    assert (large.kind, large.images, large.objects) == ("image", 10, 0)
    assert (large.image_fraction, large.object_fraction) == (0.10, None)
    nucleus = _row(plan, "nucleus")
    assert (nucleus.kind, nucleus.images, nucleus.objects) == ("object", 80, 400)
    assert nucleus.image_fraction == 0.80
    assert nucleus.object_fraction == pytest.approx(400 / 403)
    micro = _row(plan, "micronucleus")
    assert (micro.images, micro.objects, micro.image_fraction) == (3, 3, 0.03)
    assert micro.object_fraction == pytest.approx(3 / 403)
    assert "0.7% of objects <= 15%" in micro.why


def test_ungrouped_image_labels_share_one_classifier_rare_ones_too() -> None:
    samples = [
        Sample(f"s{i}", None, frozenset({"apoptotic"} if i < 2 else {"mitotic"} if i < 9 else {}))
        for i in range(20)
    ]
    plan = plan_cascade([_stored("lab", samples, {"apoptotic": "image", "mitotic": "image"})])
    assert _tiers(plan) == {"quality": ["clear"], "labels": ["apoptotic", "mitotic"]}
    assert "rare image label without boxes: classified, nothing to detect" in (
        _row(plan, "apoptotic").why
    )


def test_the_yaml_round_trips_through_load_topology(tmp_path: Path) -> None:
    plan = plan_cascade([_cells()])
    path = tmp_path / "topology.yaml"
    path.write_text(plan.to_yaml("Written by: phenocascade plan cells\nFrom dataset cells v1"))
    assert load_topology(path) == plan.topology
    assert path.read_text().startswith(
        "# Written by: phenocascade plan cells\n# From dataset cells v1\n"
    )


def test_tiers_name_their_labels_dataset_artifact_and_namespaced_topics() -> None:
    topology = plan_cascade([_cells()]).topology
    gate = topology.tier("quality")
    assert (gate.artifact, gate.dataset, gate.input) == (
        "cells-quality",
        "cells",
        "cells.images.submitted",
    )
    assert gate.routes == {"pass": "cells.images.usable", "skip": "cells.images.skipped"}
    size = topology.tier("size")
    assert (size.artifact, size.dataset, size.input) == (
        "cells-size",
        "cells",
        "cells.images.usable",
    )
    assert (size.group, size.result_topic) == ("cells.phenocascade-size", "cells.tier.size")
    # The annotation loop's groups too: two cascades on one cluster share no group.
    assert (topology.sink_group, topology.retrainer_group) == (
        "cells.phenocascade-annotation-sink",
        "cells.phenocascade-retrainer",
    )
    assert {t.threads for t in topology.tiers} == {max(1, (os.cpu_count() or 1) // 5)}
    topics = {t.name: (t.partitions, t.retention_ms, t.cleanup_policy) for t in topology.topics}
    assert topics["cells.images.submitted"][0] == topics["cells.images.usable"][0] == 4
    assert topics["cells.annotations"][1] == -1
    assert topics["cells.deadletter"][:2] == (1, 30 * 24 * 3600 * 1000)
    assert topics["cells.models"] == (1, 7 * 24 * 3600 * 1000, "compact")
    assert {f"cells.tier.{t.name}" for t in topology.tiers} <= set(topics)
    assert topology.joiner.app_id == "cells.phenocascade-joiner"


def test_an_empty_prefix_leaves_topics_as_they_are() -> None:
    topology = plan_cascade([_em()], prefix="").topology
    assert topology.submitted_topic == "images.submitted"
    assert topology.tier("rare").group == "phenocascade-rare"


def test_the_generic_gate_is_the_bundled_artifact_without_a_dataset() -> None:
    plan = plan_cascade([_em()], quality="generic")
    gate = plan.topology.tier("quality")
    assert (gate.artifact, gate.dataset, gate.labels) == ("quality", None, ["clear"])
    assert "bundled generic gate" in plan.rows[0].why


def test_a_dataset_with_clear_labels_trains_its_own_gate_on_them() -> None:
    em = _em()
    samples = [
        Sample(s.image_id, None, frozenset({"clear"} if i % 4 else set()), s.boxes)
        for i, s in enumerate(em.samples)
    ]
    plan = plan_cascade([_stored("em", samples, {"clear": "image", **em.kinds})])
    assert _tiers(plan) == {"quality": ["clear"], "rare": ["large_vesicle"]}
    gate = plan.rows[0]
    assert (gate.label, gate.images, gate.tier) == ("clear", 15, "quality")
    assert "own 'clear' labels" in gate.why
    assert [r.label for r in plan.rows].count("clear") == 1


def test_a_dataset_with_nothing_to_decide_is_refused() -> None:
    samples = [Sample(f"s{i}", None, boxes=_boxes("cell", 3)) for i in range(10)]
    with pytest.raises(ValidationError, match=r"nothing in dataset 'plain' needs deciding.*cell"):
        plan_cascade([_stored("plain", samples, {"cell": "object"})])


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValidationError, match="at least one"):
        plan_cascade([])
    with pytest.raises(ValidationError, match="once"):
        plan_cascade([_em(), _em()])
    with pytest.raises(ValidationError, match=r"\(0, 1\)"):
        plan_cascade([_em()], minority_max_fraction=1.5)
    cells = _cells()
    clash = _stored("cells", cells.samples, cells.kinds, {"rare": ("size:large", "size:small")})
    with pytest.raises(ValidationError, match="group 'rare' of dataset 'cells' cannot name"):
        plan_cascade([clash])


def test_two_datasets_get_prefixed_tiers_and_share_one_gate() -> None:
    plan = plan_cascade([_cells(), _em()])
    assert list(_tiers(plan)) == [
        "quality",
        "cells-density",
        "cells-size",
        "cells-objects",
        "cells-rare",
        "em-rare",
    ]
    em_rare = plan.topology.tier("em-rare")
    assert (em_rare.artifact, em_rare.dataset, em_rare.labels) == (
        "em-rare",
        "em",
        ["large_vesicle"],
    )
    assert em_rare.result_topic == "cells.tier.em-rare"
    assert plan.topology.tier("quality").dataset == "cells"
    assert "one gate for all 2 datasets, trained on the first ('cells')" in plan.rows[0].why
    assert _row(plan, "large_vesicle", "em").tier == "em-rare"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("PHENOCASCADE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()


def test_the_plan_command_writes_the_topology_and_says_what_next(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    em = _em()
    images = tmp_path / "images"
    images.mkdir()
    samples = []
    for sample in em.samples:
        path = images / f"{sample.image_id}.png"
        Image.fromarray(np.zeros((48, 48), np.uint8)).save(path)
        samples.append(Sample(sample.image_id, path, boxes=sample.boxes))
    stored = save_dataset(
        get_settings().dataset_store, "em", LabelledSet("em", em.classes, tuple(samples))
    )
    assert main(["plan", "em"]) == 0
    out = capsys.readouterr().out
    topology = load_topology(tmp_path / "topology-em.yaml")
    assert [t.name for t in topology.tiers] == ["quality", "rare"]
    text = (tmp_path / "topology-em.yaml").read_text()
    assert f"# From dataset em version 1, fingerprint {stored.fingerprint}\n" in text
    assert "phenocascade train rare --dataset em" in out
    # At 80 columns each label's row keeps its tier on its own line, and its reason follows.
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("│")}
    assert rows["large_vesicle"].split("│")[-2].strip() == "rare"
    assert rows["mitochondrion"].split("│")[-2].strip() == "-"
    assert "  large_vesicle (em): " in out
    assert out.rstrip().endswith("phenocascade run")
    assert main(["plan", "em", "--json", "--out", "t.yaml", "--prefix", ""]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["out"] == "t.yaml" and report["prefix"] == ""
    assert {r["label"]: r["tier"] for r in report["rows"]} == {
        "clear": "quality",
        "mitochondrion": None,
        "large_vesicle": "rare",
    }
    assert load_topology(tmp_path / "t.yaml").submitted_topic == "images.submitted"
