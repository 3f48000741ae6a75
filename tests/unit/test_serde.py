import json
from pathlib import Path

import pytest

from phenocascade.domain import Route, StageKind, StageOutput
from phenocascade.errors import SchemaError
from phenocascade.streams import events
from phenocascade.streams.serde import (
    EVENT_NAMES,
    MAGIC,
    EventCodec,
    default_schema_dir,
    schema_fingerprint,
)
from phenocascade.streams.tiling import Tiling, tile_submissions


def _crc64_avro(data: bytes) -> int:
    """CRC-64-AVRO (Rabin) written from the Avro specification, independent of fastavro."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for b in data:
        fp = (fp >> 8) ^ table[(fp ^ b) & 0xFF]
    return fp


def test_every_event_has_a_schema() -> None:
    names = {json.loads(p.read_text())["name"] for p in default_schema_dir().glob("*.avsc")}
    assert names == set(EVENT_NAMES)


def test_frame_is_the_single_object_encoding() -> None:
    codec = EventCodec()
    record = events.image_submitted("img-1", uri="/data/a.png", fmt="PNG")
    data = codec.encode("ImageSubmitted", record)
    assert data[:2] == MAGIC
    from fastavro.schema import to_parsing_canonical_form

    pcf = to_parsing_canonical_form(codec.schema("ImageSubmitted"))
    assert data[2:10] == _crc64_avro(pcf.encode()).to_bytes(8, "little")
    name, back = codec.decode(data)
    assert name == "ImageSubmitted"
    assert back["image_id"] == "img-1" and back["uri"] == "/data/a.png" and back["inline"] is None


@pytest.mark.parametrize(
    "payload, match",
    [
        (None, "not an Avro single-object"),
        (b"", "not an Avro single-object"),
        (b"hello world, not avro", "not an Avro single-object"),
        (MAGIC + b"\x00" * 8 + b"\x02", "unknown schema fingerprint"),
    ],
)
def test_undecodable_messages_raise_schema_error(payload: bytes | None, match: str) -> None:
    with pytest.raises(SchemaError, match=match):
        EventCodec().decode(payload)


def test_truncated_body_raises_schema_error() -> None:
    codec = EventCodec()
    data = codec.encode("ImageSubmitted", events.image_submitted("x", uri="/a.png"))
    with pytest.raises(SchemaError, match="cannot decode ImageSubmitted"):
        codec.decode(data[:14])


def test_unexpected_event_type_is_refused() -> None:
    codec = EventCodec()
    data = codec.encode("ImageSubmitted", events.image_submitted("x", uri="/a.png"))
    with pytest.raises(SchemaError, match="expected a TierResult"):
        codec.decode(data, expected="TierResult")


def test_record_not_matching_schema_is_refused() -> None:
    with pytest.raises(SchemaError, match="does not match the ImageSubmitted schema"):
        EventCodec().encode("ImageSubmitted", {"image_id": 3})


# -- evolution: both directions --------------------------------------------------------
def _current(name: str) -> dict:
    return json.loads((default_schema_dir() / f"{name}.avsc").read_text())


def _with_new_field(schema: dict) -> dict:
    newer = json.loads(json.dumps(schema))
    newer["fields"].append({"name": "priority_hint", "type": "int", "default": 0})
    return newer


def _write_dir(tmp: Path, schema: dict, history: list[dict]) -> Path:
    (tmp / "history").mkdir(parents=True)
    (tmp / f"{schema['name']}.avsc").write_text(json.dumps(schema))
    for i, h in enumerate(history):
        (tmp / "history" / f"{h['name']}.v{i}.avsc").write_text(json.dumps(h))
    return tmp


def test_old_reader_reads_new_writer(tmp_path: Path) -> None:
    old = _current("ImageSubmitted")
    new = _with_new_field(old)
    writer = EventCodec(_write_dir(tmp_path / "new", new, []))
    reader = EventCodec(_write_dir(tmp_path / "old", old, [new]))  # new schema deployed first
    record = {**events.image_submitted("e-1", uri="/a.png"), "priority_hint": 7}
    _, back = reader.decode(writer.encode("ImageSubmitted", record))
    assert back["image_id"] == "e-1"
    assert "priority_hint" not in back


def test_new_reader_reads_old_writer_with_defaults(tmp_path: Path) -> None:
    old = _current("ImageSubmitted")
    new = _with_new_field(old)
    writer = EventCodec(_write_dir(tmp_path / "old", old, []))
    reader = EventCodec(_write_dir(tmp_path / "new", new, [old]))
    _, back = reader.decode(
        writer.encode("ImageSubmitted", events.image_submitted("e-2", uri="/b.png"))
    )
    assert back["image_id"] == "e-2"
    assert back["priority_hint"] == 0


def test_writer_schema_unknown_to_reader_is_refused(tmp_path: Path) -> None:
    old = _current("ImageSubmitted")
    new = _with_new_field(old)
    writer = EventCodec(_write_dir(tmp_path / "new", new, []))
    reader = EventCodec(_write_dir(tmp_path / "old", old, []))
    record = {**events.image_submitted("e-3", uri="/a.png"), "priority_hint": 1}
    with pytest.raises(SchemaError, match="unknown schema fingerprint"):
        reader.decode(writer.encode("ImageSubmitted", record))


def test_fingerprint_differs_between_versions() -> None:
    from fastavro import parse_schema

    old = _current("ImageSubmitted")
    assert schema_fingerprint(parse_schema(old, named_schemas={})) != schema_fingerprint(
        parse_schema(_with_new_field(old), named_schemas={})
    )


# -- the reason field (added for novelty) against the packaged history ------------------
def _novel_events() -> dict[str, dict]:
    submitted = events.image_submitted("n-1", uri="/em/slice.tif", fmt="TIFF")
    output = StageOutput(scores={"clear": 0.001}, novel=True)
    common = {"tier": "quality", "output": output, "model_name": "m", "model_version": "v1"}
    return {
        "TierResult": events.tier_result(
            submitted, kind=StageKind.GATE, route=Route.ANNOTATE, **common
        ),
        "AnnotationRequest": events.annotation_request(
            submitted, b"submitted", classes=["clear"], **common
        ),
    }


def test_a_novel_image_is_asked_first_with_its_reason() -> None:
    request = _novel_events()["AnnotationRequest"]
    assert request["reason"] == "novel"
    # confident scores, yet served before any merely uncertain image
    assert request["priority"] == 1.0
    plain = events.annotation_request(
        events.image_submitted("p-1", uri="/a.png"),
        b"submitted",
        tier="quality",
        output=StageOutput(scores={"clear": 0.5}),
        classes=["clear"],
        model_name="m",
        model_version="v1",
    )
    assert plain["reason"] is None


@pytest.mark.parametrize("name", ["TierResult", "AnnotationRequest"])
def test_reason_evolves_compatibly_both_ways(name: str, tmp_path: Path) -> None:
    record = _novel_events()[name]
    old = json.loads((default_schema_dir() / "history" / f"{name}.v1.avsc").read_text())
    assert "reason" not in {f["name"] for f in old["fields"]}
    # new reader, old writer: the reason reads as null
    old_writer = EventCodec(_write_dir(tmp_path / "old", old, []))
    without = {k: v for k, v in record.items() if k in {f["name"] for f in old["fields"]}}
    _, back = EventCodec().decode(old_writer.encode(name, without))
    assert back["reason"] is None and back["image_id"] == "n-1"
    # old reader, new writer (the new schema deployed to the reader first)
    old_reader = EventCodec(_write_dir(tmp_path / "old-reader", old, [_current(name)]))
    _, back = old_reader.decode(EventCodec().encode(name, record))
    assert "reason" not in back and back["image_id"] == "n-1"
    # new to new keeps it
    _, back = EventCodec().decode(EventCodec().encode(name, record))
    assert back["reason"] == "novel"


# -- the tile field (added for slides) against the packaged history -----------------------
def _tile_events() -> dict[str, dict]:
    slide = events.image_submitted("slide-1", uri="/scans/slide.ome.tif", fmt="TIFF")
    [tile, *_] = tile_submissions(slide, levels=[(4096, 4096, 1.0)], tiling=Tiling())
    passed = StageOutput(scores={"clear": 0.99})
    common = {"tier": "quality", "model_name": "m", "model_version": "v1"}
    result = events.tier_result(
        tile, kind=StageKind.GATE, route=Route.PASS, output=passed, **common
    )
    return {"ImageSubmitted": tile, "TierResult": result}


@pytest.mark.parametrize(("name", "old_version"), [("ImageSubmitted", 1), ("TierResult", 4)])
def test_tile_evolves_compatibly_both_ways(name: str, old_version: int, tmp_path: Path) -> None:
    record = _tile_events()[name]
    old = json.loads((default_schema_dir() / "history" / f"{name}.v{old_version}.avsc").read_text())
    old_fields = {f["name"] for f in old["fields"]}
    assert "tile" not in old_fields
    # new reader, old writer: a whole image (no tile)
    old_writer = EventCodec(_write_dir(tmp_path / "old", old, []))
    without = {k: v for k, v in record.items() if k in old_fields}
    _, back = EventCodec().decode(old_writer.encode(name, without))
    assert back["tile"] is None and back["image_id"] == record["image_id"]
    # old reader, new writer (the new schema deployed to the reader first): the tile is
    # dropped, and an old worker would read the whole slide: upgrade the workers and the
    # joiner before the submitters that tile (docs/lab.md)
    old_reader = EventCodec(_write_dir(tmp_path / "old-reader", old, [_current(name)]))
    _, back = old_reader.decode(EventCodec().encode(name, record))
    assert "tile" not in back and back["image_id"] == record["image_id"]
    # new to new keeps it
    _, back = EventCodec().decode(EventCodec().encode(name, record))
    assert back["tile"] == record["tile"] and back["tile"]["parent_id"] == "slide-1"
