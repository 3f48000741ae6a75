"""Fuzz the Avro codec of every event: a message decodes to its record or raises SchemaError.

Consumers decode whatever arrives on their topics with :meth:`EventCodec.decode` and
dead-letter a :class:`~phenocascade.errors.SchemaError`; any other exception type would
kill them. Records are drawn from the ``.avsc`` files themselves, so a new field or event
is fuzzed without touching this file.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import fastavro
import pytest
from fuzzing import fuzz, outcome
from hypothesis import example, given
from hypothesis import strategies as st

from phenocascade.errors import SchemaError
from phenocascade.streams.events import to_epoch_ms
from phenocascade.streams.serde import (
    EVENT_NAMES,
    HEADER_SIZE,
    MAGIC,
    TIMESTAMP_MS_RANGE,
    EventCodec,
    default_schema_dir,
    schema_fingerprint,
)

CODEC = EventCodec()
SCHEMA_DIR = default_schema_dir()
CURRENT = {p.stem: json.loads(p.read_text()) for p in sorted(SCHEMA_DIR.glob("*.avsc"))}
# Every writer a reader accepts: the current schemas and each historic version.
WRITERS = CURRENT | {
    p.stem: json.loads(p.read_text()) for p in sorted((SCHEMA_DIR / "history").glob("*.avsc"))
}
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
# timestamp-millis values from 1970 to the end of year 9999, the last a reader can decode.
MILLIS = (0, TIMESTAMP_MS_RANGE[1])
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# A valid DeadLetter record: the event whose only timestamp is failed_at.
DEAD_LETTER = {
    "origin_topic": "t",
    "origin_partition": 0,
    "origin_offset": 0,
    "image_id": None,
    "tier": "quality",
    "error_kind": "schema",
    "message": "m",
    "payload": b"",
    "failed_at": 0,
}


def values(schema: Any, named: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Return a strategy of Python values that ``schema`` (raw ``.avsc`` JSON) can encode."""
    if isinstance(schema, list):  # union
        return st.one_of([values(branch, named) for branch in schema])
    if isinstance(schema, str):
        if schema in named:
            return values(named[schema], named)
        schema = {"type": schema}
    kind = schema["type"]
    if isinstance(kind, list | dict):
        return values(kind, named)
    if "name" in schema:
        named[schema["name"]] = schema
    if schema.get("logicalType") == "timestamp-millis":
        return st.integers(*MILLIS)
    simple: dict[str, st.SearchStrategy[Any]] = {
        "null": st.none(),
        "boolean": st.booleans(),
        "int": st.integers(*INT32),
        "long": st.integers(*INT64),
        "float": st.floats(width=32, allow_nan=False),
        "double": st.floats(allow_nan=False),
        "string": st.text(max_size=12),
        "bytes": st.binary(max_size=24),
    }
    if kind in simple:
        return simple[kind]
    if kind == "enum":
        return st.sampled_from(schema["symbols"])
    if kind == "array":
        return st.lists(values(schema["items"], named), max_size=3)
    if kind == "map":
        return st.dictionaries(st.text(max_size=6), values(schema["values"], named), max_size=3)
    assert kind == "record", schema
    return st.fixed_dictionaries({f["name"]: values(f["type"], named) for f in schema["fields"]})


def records(writer: str) -> st.SearchStrategy[dict[str, Any]]:
    """Return a strategy of records of the schema file ``writer`` (e.g. ``TierResult.v1``)."""
    return values(WRITERS[writer], {})


PARSED = {name: fastavro.parse_schema(raw, named_schemas={}) for name, raw in WRITERS.items()}


def frame(writer: str, record: Mapping[str, Any]) -> bytes:
    """Encode ``record`` with the writer schema file ``writer``, framed as on the wire."""
    schema = PARSED[writer]
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, dict(record))
    return MAGIC + schema_fingerprint(schema) + buf.getvalue()


def plain(value: Any) -> Any:
    """Return ``value`` with decoded timestamps back in epoch milliseconds."""
    if isinstance(value, datetime):
        return to_epoch_ms(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def assert_is_a_reader_record(name: str, record: dict[str, Any]) -> None:
    """Check that a decoded record has exactly the fields of the reader's schema."""
    assert name in EVENT_NAMES
    assert set(record) == {f["name"] for f in CURRENT[name]["fields"]}


events = st.sampled_from(sorted(CURRENT)).flatmap(lambda n: st.tuples(st.just(n), records(n)))


@given(event=events)
@fuzz(60)
def test_every_event_round_trips(event: tuple[str, dict[str, Any]]) -> None:
    name, record = event
    decoded_name, decoded = CODEC.decode(CODEC.encode(name, record), expected=name)
    assert decoded_name == name
    assert plain(decoded) == record


versions = st.sampled_from(sorted(WRITERS)).flatmap(lambda w: st.tuples(st.just(w), records(w)))


@given(version=versions)
@fuzz(60)
def test_every_writer_version_decodes_to_the_reader_record(
    version: tuple[str, dict[str, Any]],
) -> None:
    writer, record = version
    name, decoded = CODEC.decode(frame(writer, record))
    assert name == WRITERS[writer]["name"]
    assert_is_a_reader_record(name, decoded)
    for key, value in record.items():
        if key in decoded:
            assert plain(decoded[key]) == value


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    """Draw a valid message of any writer version, then flip, drop, insert or cut bytes."""
    writer, record = draw(versions)
    data = bytearray(frame(writer, record))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "delete", "insert", "truncate"]))
        # Mostly damage the body: a damaged header is only an unknown fingerprint.
        at = draw(st.integers(HEADER_SIZE if len(data) > HEADER_SIZE else 0, len(data)))
        if op == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=12))
        else:
            del data[at:]
    return bytes(data)


fingerprints = sorted(schema_fingerprint(CODEC.schema(name)) for name in CURRENT)
bodies = st.tuples(st.sampled_from(fingerprints), st.binary(max_size=96)).map(
    lambda fp_body: MAGIC + fp_body[0] + fp_body[1]
)


@given(
    data=damaged() | bodies | st.binary(max_size=32),
    expected=st.none() | st.sampled_from(EVENT_NAMES),
)
@example(data=None, expected=None)
@example(data=MAGIC, expected=None)
@fuzz(150)
def test_any_message_decodes_to_a_reader_record_or_raises_schema_error(
    data: bytes | None, expected: str | None
) -> None:
    got = outcome(lambda: CODEC.decode(data, expected=expected), (SchemaError,))
    if isinstance(got, SchemaError):
        return
    name, record = got
    assert_is_a_reader_record(name, record)
    assert expected in (None, name)


# Field values of the wrong type or range for some schema field.
wrong = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=4)
    | st.binary(max_size=4)
    | st.lists(st.integers(), max_size=2)
    | st.dictionaries(st.text(max_size=2), st.integers(), max_size=2)
)


@st.composite
def bad_records(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """Draw a valid record of a current event, then replace or drop some of its fields."""
    name, record = draw(events)
    for key in draw(st.lists(st.sampled_from(sorted(record)), max_size=3, unique=True)):
        if draw(st.booleans()):
            record[key] = draw(wrong)
        else:
            del record[key]
    return name, record


@given(event=bad_records())
@example(event=("DeadLetter", {"origin_offset": 2**64}))
@example(event=("DeadLetter", {**DEAD_LETTER, "failed_at": TIMESTAMP_MS_RANGE[1] + 1}))
@fuzz(60)
def test_encoding_a_record_that_does_not_fit_raises_schema_error(
    event: tuple[str, dict[str, Any]],
) -> None:
    name, record = event
    got = outcome(lambda: CODEC.encode(name, record), (SchemaError,))
    if isinstance(got, bytes):  # it fitted after all (e.g. an int where a float goes)
        back_name, back = CODEC.decode(got)  # what encodes, every reader can decode
        assert back_name == name
        assert_is_a_reader_record(name, back)


@pytest.mark.parametrize(
    ("ms", "fits"),
    [
        (TIMESTAMP_MS_RANGE[0], True),  # 0001-01-01T00:00:00.000Z
        (TIMESTAMP_MS_RANGE[1], True),  # 9999-12-31T23:59:59.999Z
        (TIMESTAMP_MS_RANGE[0] - 1, False),
        (TIMESTAMP_MS_RANGE[1] + 1, False),
        (INT64[1], False),
    ],
)
def test_a_timestamp_no_reader_can_decode_is_refused_at_encoding(ms: int, fits: bool) -> None:
    record = {**DEAD_LETTER, "failed_at": ms}
    if fits:
        assert plain(CODEC.decode(CODEC.encode("DeadLetter", record))[1]) == record
    else:
        with pytest.raises(SchemaError, match=f"failed_at={ms} ms is outside years 1 to 9999"):
            CODEC.encode("DeadLetter", record)


@given(ms=st.integers(*MILLIS))
# Regression: float seconds made 131651387 ms come back as 131651386.
@example(ms=131_651_387)
@fuzz(50)
def test_a_decoded_timestamp_is_the_exact_millisecond(ms: int) -> None:
    assert to_epoch_ms(EPOCH + timedelta(milliseconds=ms)) == ms


def test_the_fuzzed_schemas_are_every_event_and_version() -> None:
    assert set(CURRENT) == set(EVENT_NAMES)
    assert len(WRITERS) == len(list(SCHEMA_DIR.rglob("*.avsc"))) > len(EVENT_NAMES)


def test_every_timestamp_is_a_top_level_field() -> None:
    """EventCodec.encode range-checks the top-level timestamps only: keep them all there."""

    def is_timestamp(schema: Any) -> bool:
        if isinstance(schema, list):
            return any(is_timestamp(branch) for branch in schema)
        return isinstance(schema, dict) and schema.get("logicalType") == "timestamp-millis"

    for name, raw in CURRENT.items():
        top_level = [f for f in raw["fields"] if is_timestamp(f["type"])]
        assert json.dumps(raw).count('"timestamp-millis"') == len(top_level), name
