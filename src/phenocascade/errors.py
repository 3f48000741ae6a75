"""One hierarchy of domain errors.

Every error says what was wrong, with which input, and what to do. The web layer maps
these classes to HTTP status codes; workers map :class:`BadInputError` subclasses to a
dead-letter record whose ``error_kind`` is the class's :attr:`kind`.
"""

from __future__ import annotations


class PhenocascadeError(Exception):
    """Base class of every error raised on purpose by phenocascade."""

    kind: str = "error"


class ConfigError(PhenocascadeError):
    """The configuration or topology is invalid."""

    kind = "config"


class InfraError(PhenocascadeError):
    """A local service (Kafka, Cassandra) or a tool it needs (Java, Maven) is missing or failed."""

    kind = "infra"


class NotFoundError(PhenocascadeError):
    """A requested object (image, model version, annotation task) does not exist."""

    kind = "not_found"


class ConflictError(PhenocascadeError):
    """The request is valid but clashes with the current state (e.g. a task claimed by another)."""

    kind = "conflict"


class ValidationError(PhenocascadeError):
    """A user submission (annotation, form, request) is invalid; nothing was stored."""

    kind = "validation"


class AuthError(PhenocascadeError):
    """Missing or invalid credentials."""

    kind = "unauthenticated"


class TooManyAttemptsError(PhenocascadeError):
    """Too many recent failed attempts (e.g. logins); refused without looking at them.

    Attributes
    ----------
    retry_after_s : int
        Whole seconds until an attempt is accepted again (at least 1).
    """

    kind = "too_many_attempts"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PermissionDeniedError(PhenocascadeError):
    """Valid credentials, but the role may not do this."""

    kind = "forbidden"


class BadInputError(PhenocascadeError):
    """An input that must go to the dead-letter topic; the worker continues."""

    kind = "bad_input"


class CorruptImageError(BadInputError):
    """The bytes are empty, truncated, corrupt or not an image at all."""

    kind = "corrupt_image"


class DecompressionBombError(BadInputError):
    """The image declares an absurd size and is refused before it is decoded."""

    kind = "decompression_bomb"


class UnsupportedImageError(BadInputError):
    """The image decoded, but its dtype or channel count is not supported."""

    kind = "unsupported_image"


class PathNotAllowedError(BadInputError):
    """A source URI points outside the configured allowed roots."""

    kind = "path_not_allowed"


class SchemaError(BadInputError):
    """A message could not be decoded: unknown fingerprint, bad framing or bad Avro body."""

    kind = "schema"


class ArtifactError(PhenocascadeError):
    """A model artifact folder is missing, incomplete or incompatible."""

    kind = "artifact"


class NoChampionError(ArtifactError):
    """A tier has no champion model yet (cold start): not a failure of any artifact."""


class AnnotationError(ValidationError):
    """An annotation or dataset file is malformed; nothing from it was imported.

    Attributes
    ----------
    file : str
        The offending file.
    line : int or None
        1-based line of the offending row or element, ``None`` when the format has none
        (the message then names the element, e.g. ``annotations[17]``).
    """

    kind = "annotation"

    def __init__(self, message: str, *, file: str, line: int | None = None) -> None:
        where = f"{file}:{line}" if line is not None else file
        super().__init__(f"{where}: {message}")
        self.file = file
        self.line = line


class DownloadError(PhenocascadeError):
    """A dataset download failed, or its checksum is wrong or unknown; nothing was kept."""

    kind = "download"
