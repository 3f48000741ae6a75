r"""Avro single-object encoding of phenocascade events (fastavro).

Frame: ``b"\\xc3\\x01"`` + the 8-byte little-endian CRC-64-AVRO fingerprint of the writer
schema's Parsing Canonical Form + the Avro binary body (Avro 1.11 spec, "Single-object
encoding"). A reader looks the writer schema up by fingerprint among every schema it
knows (current ``schemas/*.avsc`` plus ``schemas/history/*.avsc``) and resolves it to its
own reader schema, so old readers read new writers and new readers read old writers as
long as the schema files are deployed before the producers that use them.

No schema registry is used: none can run in the tests here, so the Confluent wire format
is deliberately left out rather than shipped untested.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from phenocascade.errors import SchemaError

MAGIC = b"\xc3\x01"
HEADER_SIZE = 10

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The timestamp-millis values a reader can turn into a datetime: years 1 to 9999 (UTC).
TIMESTAMP_MS_RANGE = (
    (datetime.min.replace(tzinfo=UTC) - _EPOCH) // timedelta(milliseconds=1),
    (datetime.max.replace(tzinfo=UTC) - _EPOCH) // timedelta(milliseconds=1),
)

EVENT_NAMES = (
    "ImageSubmitted",
    "TierResult",
    "ImageOutput",
    "AnnotationRequest",
    "DeadLetter",
    "Annotation",
    "ModelPromoted",
)


def schema_fingerprint(schema: Mapping[str, Any]) -> bytes:
    """Return the 8-byte CRC-64-AVRO fingerprint of ``schema`` as it goes on the wire."""
    pcf = to_parsing_canonical_form(dict(schema))
    # fastavro renders the fingerprint as the hex of its little-endian bytes.
    return bytes.fromhex(fingerprint(pcf, "CRC-64-AVRO"))


def _parse(raw: Mapping[str, Any]) -> dict[str, Any]:
    # Each file is self-contained; parse with its own name table so that the same named
    # type (e.g. Box) may be defined in several files.
    parsed = fastavro.parse_schema(dict(raw), named_schemas={})
    assert isinstance(parsed, dict)
    return parsed


def _is_timestamp(schema: Any) -> bool:
    """Whether ``schema`` is ``timestamp-millis``, or a union with a ``timestamp-millis`` branch."""
    if isinstance(schema, list):
        return any(_is_timestamp(branch) for branch in schema)
    return isinstance(schema, dict) and schema.get("logicalType") == "timestamp-millis"


def default_schema_dir() -> Path:
    """Return the packaged ``schemas/`` folder."""
    return Path(str(resources.files("phenocascade.resources").joinpath("schemas")))


class EventCodec:
    """Encode and decode events with the Avro single-object encoding.

    Parameters
    ----------
    schema_dir : pathlib.Path or None, default None
        Folder holding ``<Event>.avsc`` (the reader schemas) and ``history/*.avsc`` (older
        writer versions still accepted). ``None`` uses the packaged ``schemas/``.
    extra_writer_schemas : Iterable of dict, default ()
        More writer schemas to accept (used by evolution tests).
    """

    def __init__(
        self,
        schema_dir: Path | None = None,
        extra_writer_schemas: Iterable[Mapping[str, Any]] = (),
    ) -> None:
        folder = schema_dir or default_schema_dir()
        self._readers: dict[str, dict[str, Any]] = {}
        self._fingerprints: dict[str, bytes] = {}
        # Per event, its timestamp fields (a top-level field, in every schema so far).
        self._timestamps: dict[str, tuple[str, ...]] = {}
        self._writers: dict[bytes, tuple[str, dict[str, Any]]] = {}
        for path in sorted(folder.glob("*.avsc")):
            raw = json.loads(path.read_text())
            schema = _parse(raw)
            name = str(raw["name"])
            fp = schema_fingerprint(schema)
            self._readers[name] = schema
            self._fingerprints[name] = fp
            self._timestamps[name] = tuple(
                f["name"] for f in schema["fields"] if _is_timestamp(f["type"])
            )
            self._writers[fp] = (name, schema)
        history = [json.loads(p.read_text()) for p in sorted((folder / "history").glob("*.avsc"))]
        for raw in [*history, *extra_writer_schemas]:
            schema = _parse(raw)
            self._writers.setdefault(schema_fingerprint(schema), (str(raw["name"]), schema))

    def schema(self, name: str) -> dict[str, Any]:
        """Return the parsed reader schema of event ``name``."""
        try:
            return self._readers[name]
        except KeyError:
            raise SchemaError(
                f"unknown event type {name!r}; known: {sorted(self._readers)}"
            ) from None

    def encode(self, name: str, record: Mapping[str, Any]) -> bytes:
        """Encode ``record`` as event ``name``.

        Raises
        ------
        SchemaError
            If the record does not match the schema (field name and value in the message),
            or an integer timestamp lies outside :data:`TIMESTAMP_MS_RANGE` (years 1 to
            9999), which no reader could decode.
        """
        schema = self.schema(name)
        low, high = TIMESTAMP_MS_RANGE
        for field in self._timestamps[name]:
            value = record.get(field)
            if isinstance(value, int) and not low <= value <= high:
                raise SchemaError(
                    f"record does not match the {name} schema: {field}={value} ms is outside "
                    f"years 1 to 9999 ({low} to {high} ms since 1970), which no reader can decode"
                )
        buf = io.BytesIO()
        buf.write(MAGIC)
        buf.write(self._fingerprints[name])
        try:
            fastavro.schemaless_writer(buf, schema, dict(record), strict_allow_default=True)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise SchemaError(f"record does not match the {name} schema: {exc}") from exc
        return buf.getvalue()

    def decode(self, data: bytes | None, expected: str | None = None) -> tuple[str, dict[str, Any]]:
        """Decode one framed message.

        Parameters
        ----------
        data : bytes or None
            The Kafka message value.
        expected : str or None, default None
            If given, the event type the caller accepts.

        Returns
        -------
        tuple of (str, dict)
            Event name and the record, resolved to this reader's schema.

        Raises
        ------
        SchemaError
            On a missing frame, an unknown fingerprint, a body that does not decode, or an
            unexpected event type.
        """
        if data is None or len(data) < HEADER_SIZE or data[:2] != MAGIC:
            head = b"" if data is None else data[:2]
            raise SchemaError(
                f"not an Avro single-object message (header {head!r}); producers must use "
                "phenocascade's EventCodec or the Avro single-object encoding"
            )
        fp = data[2:HEADER_SIZE]
        known = self._writers.get(fp)
        if known is None:
            raise SchemaError(
                f"unknown schema fingerprint {fp.hex()}; deploy the writer's .avsc under "
                "schemas/history before producing with it"
            )
        name, writer = known
        if expected is not None and name != expected:
            raise SchemaError(f"expected a {expected} event, got {name}")
        reader = self._readers.get(name, writer)
        try:
            record = fastavro.schemaless_reader(io.BytesIO(data[HEADER_SIZE:]), writer, reader)
        except Exception as exc:  # fastavro raises many types on a corrupt body
            raise SchemaError(f"cannot decode {name} body: {exc}") from exc
        if not isinstance(record, dict):
            raise SchemaError(f"{name} body did not decode to a record")
        return name, record
