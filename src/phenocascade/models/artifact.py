"""Helpers for writing and reading the artifact folder described in :mod:`.base`."""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import io
import logging
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from phenocascade.errors import ArtifactError
from phenocascade.models.base import ArtifactMeta

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.pt"


def new_version() -> str:
    """Return a sortable unique version such as ``"20261128T101500-3fa2"`` (UTC).

    It matches :data:`~phenocascade.models.base.VERSION_PATTERN`, which every version must.
    """
    return f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(2)}"


def code_version() -> str:
    """Return the installed phenocascade version."""
    try:
        return importlib.metadata.version("phenocascade")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def utc_now() -> str:
    """Return the current UTC time in ISO-8601."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def save_weights(folder: Path, state: Mapping[str, Any]) -> dict[str, str]:
    """Write a state dict (tensors only) to ``folder/weights.pt``.

    Returns
    -------
    dict of str to str
        ``{"weights.pt": hex SHA-256 of the file}``, for ``ArtifactMeta.weights_sha256``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    data = buffer.getvalue()
    (folder / WEIGHTS_FILE).write_bytes(data)
    return {WEIGHTS_FILE: hashlib.sha256(data).hexdigest()}


def load_weights(folder: Path, device: str = "cpu") -> dict[str, Any]:
    """Read ``folder/weights.pt`` with ``weights_only=True`` (no pickled code runs).

    The bytes are checked against the SHA-256 recorded in ``metadata.json`` before they
    are unpickled. An artifact written before digests were recorded loads with a warning.

    Raises
    ------
    ArtifactError
        If the file is missing, its SHA-256 is not the recorded one, or it holds anything
        but tensors and plain containers.
    """
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; the artifact is incomplete, retrain the tier")
    data = path.read_bytes()
    expected = ArtifactMeta.read(folder).weights_sha256.get(WEIGHTS_FILE)
    actual = hashlib.sha256(data).hexdigest()
    if expected is None:
        log.warning("%s has no recorded SHA-256 (an older artifact); loading it unchecked", path)
    elif actual != expected:
        raise ArtifactError(
            f"{path} has SHA-256 {actual}, but its metadata records {expected}: the weights "
            "were changed or damaged after training; retrain the tier or restore the artifact"
        )
    try:
        state: dict[str, Any] = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError or EOFError here
        raise ArtifactError(f"{path} is not a loadable state dict: {exc}") from exc
    return state


def read_meta(folder: Path, backend: str) -> ArtifactMeta:
    """Read the metadata and check that it was written by ``backend``."""
    meta = ArtifactMeta.read(folder)
    if meta.backend != backend:
        raise ArtifactError(f"{folder} holds a {meta.backend!r} model, not {backend!r}")
    return meta
