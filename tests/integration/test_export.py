"""``phenocascade export`` from the real Cassandra, and the results-topic consumer example
on the real Kafka: COCO read back by the COCO importer, CSV and Parquet read back whole."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml
from cassandra.cluster import Session
from harness import TEST_KEYSPACE, settings_env
from PIL import Image

import phenocascade.cli.export as export_cli
from phenocascade.cli import main
from phenocascade.config import Settings, load_topology
from phenocascade.data.exports import image_rows
from phenocascade.data.importers import import_coco
from phenocascade.store.cassandra import connect, save_output
from phenocascade.streams import events
from phenocascade.streams.kafka import create_topics, plain_producer
from phenocascade.streams.serde import EventCodec

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Study:
    settings: Settings
    session: Session
    name: str
    root: Path
    outputs: list[dict[str, Any]]


def _png(path: Path, width: int, height: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 40, np.uint8)).save(path)
    return path


def _box(x0: float, y0: float, x1: float, y1: float, label: str, score: float) -> dict[str, Any]:
    return {"x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1, "label": label, "score": score}


def _outputs(root: Path, study: str) -> list[dict[str, Any]]:
    """Outputs shaped as the joiner writes them: analyzed, awaiting annotation, unusable."""
    full = {"quality": "v1", "majority": "v4", "minority": "v2"}
    return [
        events.image_output(
            f"{study}-a",
            status=events.OutputStatus.ANALYZED,
            study=study,
            uri=str(_png(root / "plate1" / "a.png", 96, 64)),
            labels={"mitotic": 0.93, "apoptotic": 0.02},
            boxes=[_box(4, 5, 40, 33.5, "large_nucleus", 0.97)],
            routes={"quality": "PASS", "majority": "PASS", "minority": "PASS"},
            model_versions=full,
        ),
        events.image_output(
            f"{study}-b",
            status=events.OutputStatus.AWAITING_ANNOTATION,
            study=study,
            uri=str(_png(root / "plate2" / "b.png", 80, 80)),
            labels={"mitotic": 0.55, "apoptotic": 0.40},
            boxes=[_box(0, 0, 10, 10, "large_nucleus", 0.61), _box(50, 60, 79, 80, "giant", 0.88)],
            routes={"quality": "PASS", "majority": "ANNOTATE", "minority": "PASS"},
            model_versions=full,
        ),
        events.image_output(
            f"{study}-c",
            status=events.OutputStatus.UNUSABLE,
            study=study,
            uri=str(_png(root / "plate2" / "c.png", 32, 32)),
            labels={},
            boxes=[],
            routes={"quality": "SKIP"},
            model_versions={"quality": "v1"},
        ),
    ]


@pytest.fixture
def study(infra: Settings, tmp_path: Path) -> Iterator[Study]:
    root = tmp_path / "scans"
    settings = infra.model_copy(
        update={
            "allowed_roots": [root],
            "cassandra": infra.cassandra.model_copy(update={"keyspace": TEST_KEYSPACE}),
        }
    )
    session = connect(settings.cassandra)
    name = f"export{uuid.uuid4().hex[:8]}"
    outputs = _outputs(root, name)
    for output in outputs:
        save_output(session=session, output=output)
    yield Study(settings, session, name, root, outputs)


def _export(study: Study, monkeypatch: pytest.MonkeyPatch, dest: Path, *args: str) -> None:
    monkeypatch.setattr(export_cli, "get_settings", lambda: study.settings)
    assert main(["export", "--study", study.name, "-o", str(dest), *args]) == 0


def test_coco_export_round_trips_through_the_coco_importer(
    study: Study, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "out" / "study.json"
    _export(study, monkeypatch, dest, "--format", "coco")
    doc = json.loads(dest.read_text())
    info = doc["info"]
    assert info["study"] == study.name and info["left_out"] == []
    assert info["model_versions"] == {"majority=v4;minority=v2;quality=v1": 2, "quality=v1": 1}
    assert info["routes"]["majority"] == {"PASS": 1, "ANNOTATE": 1}
    attributes = {i["attributes"]["image_id"]: i["attributes"] for i in doc["images"]}
    assert attributes[f"{study.name}-b"]["labels"] == {"mitotic": 0.55, "apoptotic": 0.40}
    assert attributes[f"{study.name}-c"]["routes"] == {"quality": "SKIP"}

    back = import_coco(dest, Path(info["images_root"]))
    assert back.classes == ("giant", "large_nucleus")
    got = {s.image_id: sorted((b.label, *b.as_list()) for b in s.boxes) for s in back.samples}
    want = {
        str(Path(o["uri"]).relative_to(study.root).with_suffix("")): sorted(
            (b["label"], b["x_min"], b["y_min"], b["x_max"], b["y_max"]) for b in o["boxes"]
        )
        for o in study.outputs
    }
    assert got == want
    scores = sorted(a["score"] for a in doc["annotations"])
    assert scores == pytest.approx([0.61, 0.88, 0.97])


def test_parquet_and_csv_exports_read_back_row_for_row(
    study: Study, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _export(study, monkeypatch, tmp_path / "images.parquet", "--format", "parquet")
    table = pq.read_table(tmp_path / "images.parquet")
    rows = sorted(table.to_pylist(), key=lambda r: r["image_id"])
    assert [(r["image_id"], r["status"], r["n_boxes"]) for r in rows] == [
        (f"{study.name}-a", "analyzed", 1),
        (f"{study.name}-b", "awaiting_annotation", 2),
        (f"{study.name}-c", "unusable", 0),
    ]
    assert rows[1]["label_mitotic"] == 0.55 and rows[2]["label_mitotic"] is None
    assert rows[1]["route_majority"] == "ANNOTATE" and rows[2]["route_majority"] is None
    assert rows[0]["version_majority"] == "v4" and rows[2]["versions_key"] == "quality=v1"
    facts = json.loads(table.schema.metadata[b"phenocascade"])
    assert facts["study"] == study.name and facts["images"] == 3 and facts["boxes"] == 3

    _export(study, monkeypatch, tmp_path / "boxes.csv", "--format", "csv", "--per", "box")
    with (tmp_path / "boxes.csv").open() as f:
        read = sorted(csv.DictReader(f), key=lambda r: (r["image_id"], r["box"]))
    want = sorted(
        (o["image_id"], str(i), b["label"], b["score"], b["x_min"], b["y_max"])
        for o in study.outputs
        for i, b in enumerate(o["boxes"])
    )
    got = [
        (
            r["image_id"],
            r["box"],
            r["label"],
            float(r["score"]),
            float(r["x_min"]),
            float(r["y_max"]),
        )
        for r in read
    ]
    assert got == want
    assert {r["version_minority"] for r in read} == {"v2"}


def test_the_example_consumer_writes_the_results_topic_to_parquet(
    study: Study, tmp_path: Path
) -> None:
    topology = load_topology().namespaced(f"ex{uuid.uuid4().hex[:8]}-")
    topo_file = tmp_path / "topology.yaml"
    topo_file.write_text(yaml.safe_dump(topology.model_dump()))
    settings = study.settings.model_copy(update={"topology": topo_file})
    create_topics(settings.kafka, topology)
    codec = EventCodec()
    producer = plain_producer(settings.kafka)
    for output in study.outputs:
        producer.produce(
            topology.joiner.results_topic,
            key=output["image_id"].encode(),
            value=codec.encode("ImageOutput", output),
        )
    assert producer.flush(30) == 0

    out = tmp_path / "parquet"
    example = str(ROOT / "examples" / "results_to_parquet.py")
    group = f"ex-{uuid.uuid4().hex[:8]}"
    run = subprocess.run(
        [sys.executable, example, "--out", str(out), "--group", group, "--idle-exit-s", "5"],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = sorted(ds.dataset(out).to_table().to_pylist(), key=lambda r: r["image_id"])
    want = image_rows(study.outputs)
    assert [r["image_id"] for r in rows] == [w["image_id"] for w in want]
    for got, expected in zip(rows, want, strict=True):
        assert {k: got.get(k) for k in expected} == expected
