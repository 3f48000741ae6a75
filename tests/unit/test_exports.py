"""Exports of image outputs: COCO that the COCO importer reads back, CSV and Parquet rows."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from phenocascade.data.exports import box_rows, coco_document, image_rows, write_csv, write_parquet
from phenocascade.data.importers import import_coco


def _png(path: Path, width: int, height: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((height, width), np.uint8)).save(path)
    return str(path)


def _output(
    image_id: str, uri: str | None, boxes: list[dict[str, Any]], at: int = 0
) -> dict[str, Any]:
    return {
        "image_id": image_id,
        "status": "analyzed" if boxes else "awaiting_annotation",
        "study": "s1",
        "uri": uri,
        "labels": {"mitotic": 0.9, "apoptotic": 0.05},
        "boxes": boxes,
        "routes": {"quality": "PASS", "majority": "PASS", "minority": "ANNOTATE"},
        "model_versions": {"quality": "v1", "majority": "v3", "minority": "v2"},
        "produced_at": datetime(2026, 11, 30, 12, 0, at),  # naive UTC, as the store gives
    }


def _box(x0: float, y0: float, x1: float, y1: float, label: str, score: float) -> dict[str, Any]:
    return {"x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1, "label": label, "score": score}


def test_coco_round_trips_through_the_importer_with_scores_labels_and_versions(
    tmp_path: Path,
) -> None:
    root = tmp_path / "scans"
    outputs = [
        _output(
            "a", _png(root / "plate1" / "a.png", 64, 48), [_box(1.5, 2, 30, 40.25, "large", 0.8)]
        ),
        _output(
            "b",
            _png(root / "plate2" / "b.tif", 32, 32),
            [_box(0, 0, 32, 32, "small", 0.6), _box(3, 4, 10, 12, "large", 0.99)],
        ),
        _output("c", _png(root / "plate2" / "c.png", 20, 10), []),
    ]
    doc = coco_document(outputs, study="s1", roots=[tmp_path])
    path = tmp_path / "export.json"
    path.write_text(json.dumps(doc))

    info = doc["info"]
    assert info["images_root"] == str(root) and info["left_out"] == []
    assert info["model_versions"] == {"majority=v3;minority=v2;quality=v1": 3}
    assert info["routes"]["minority"] == {"ANNOTATE": 3}
    assert [c["name"] for c in doc["categories"]] == ["large", "small"]
    assert sorted(a["score"] for a in doc["annotations"]) == [0.6, 0.8, 0.99]
    attributes = {i["attributes"]["image_id"]: i["attributes"] for i in doc["images"]}
    assert attributes["a"]["labels"] == {"mitotic": 0.9, "apoptotic": 0.05}
    assert attributes["c"]["status"] == "awaiting_annotation"

    back = import_coco(path, Path(info["images_root"]))
    by_file = {s.image_id: s for s in back.samples}
    assert set(by_file) == {"plate1/a", "plate2/b", "plate2/c"}
    for o in outputs:
        sample = by_file[str(Path(o["uri"]).relative_to(root).with_suffix(""))]
        got = sorted((b.label, *b.as_list()) for b in sample.boxes)
        want = sorted(
            (b["label"], b["x_min"], b["y_min"], b["x_max"], b["y_max"]) for b in o["boxes"]
        )
        assert got == want


def test_coco_leaves_out_images_it_cannot_name_and_says_why(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    rewritten = _png(allowed / "r.png", 8, 8)
    outputs = [
        _output("inline", None, []),
        _output("gone", str(allowed / "gone.png"), []),
        _output("outside", _png(tmp_path / "elsewhere" / "o.png", 8, 8), []),
        _output("old-content", rewritten, [], at=1),
        _output("new-content", rewritten, [], at=2),
        _output("kept", _png(allowed / "k.png", 8, 8), []),
    ]
    doc = coco_document(outputs, study="s1", roots=[allowed])
    reasons = {e["image_id"]: e["reason"] for e in doc["info"]["left_out"]}
    assert set(reasons) == {"inline", "gone", "outside", "old-content"}
    assert "inline" in reasons["inline"]
    assert "does not exist" in reasons["gone"]
    assert "outside the allowed roots" in reasons["outside"]
    assert "new-content" in reasons["old-content"]
    assert sorted(i["attributes"]["image_id"] for i in doc["images"]) == ["kept", "new-content"]
    assert doc["info"]["images"] == 2


def test_tables_per_image_and_per_box_state_versions_and_routes(tmp_path: Path) -> None:
    skipped = _output("s", "/x/s.png", [])
    skipped.update(
        status="unusable", labels={}, routes={"quality": "SKIP"}, model_versions={"quality": "v1"}
    )
    outputs = [
        _output("a", "/x/a.png", [_box(1, 2, 3, 4, "large", 0.5), _box(5, 6, 7, 8, "small", 0.25)]),
        skipped,
    ]
    images = image_rows(outputs)
    assert images[0]["n_boxes"] == 2 and images[0]["label_mitotic"] == 0.9
    assert images[0]["route_minority"] == "ANNOTATE" and images[0]["version_majority"] == "v3"
    assert images[1]["versions_key"] == "quality=v1" and "route_minority" not in images[1]
    assert images[0]["produced_at"] == datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)
    boxes = box_rows(outputs)
    assert [(b["image_id"], b["box"], b["label"], b["x_max"]) for b in boxes] == [
        ("a", 0, "large", 3.0),
        ("a", 1, "small", 7.0),
    ]

    write_parquet(images, tmp_path / "i.parquet", per="image", metadata={"study": "s1"})
    table = pq.read_table(tmp_path / "i.parquet")
    assert table.column_names[:7] == [
        "image_id",
        "study",
        "status",
        "uri",
        "produced_at",
        "versions_key",
        "n_boxes",
    ]
    assert table.to_pylist() == [{k: r.get(k) for k in table.column_names} for r in images]
    assert json.loads(table.schema.metadata[b"phenocascade"]) == {"study": "s1"}

    write_csv(boxes, tmp_path / "b.csv", per="box")
    with (tmp_path / "b.csv").open() as f:
        read = list(csv.DictReader(f))
    assert [(r["image_id"], r["label"], float(r["score"]), r["route_quality"]) for r in read] == [
        ("a", "large", 0.5, "PASS"),
        ("a", "small", 0.25, "PASS"),
    ]
    assert read[0]["produced_at"] == "2026-11-30T12:00:00+00:00"


def test_rows_name_the_expert_of_each_tier_a_person_completed() -> None:
    answered = {**_output("a", None, []), "annotators": {"minority": "alice"}}
    rows = image_rows([answered, _output("b", None, [])])
    assert rows[0]["annotator_minority"] == "alice"
    assert "annotator_minority" not in rows[1]
    assert rows[0]["versions_key"].endswith(";minority@expert=alice")
