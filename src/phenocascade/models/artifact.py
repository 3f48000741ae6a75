"""Helpers for writing and reading the artifact folder described in :mod:`.base`."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from phenocascade.errors import ArtifactError
from phenocascade.models.base import ArtifactMeta

WEIGHTS_FILE = "weights.pt"


def new_version() -> str:
    """Return a sortable unique version such as ``"20261128T101500-3fa2"`` (UTC)."""
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


def save_weights(folder: Path, state: Mapping[str, Any]) -> None:
    """Write a state dict (tensors only) to ``folder/weights.pt``."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(dict(state), folder / WEIGHTS_FILE)


def load_weights(folder: Path, device: str = "cpu") -> dict[str, Any]:
    """Read ``folder/weights.pt`` with ``weights_only=True`` (no pickled code runs).

    Raises
    ------
    ArtifactError
        If the file is missing or holds anything but tensors and plain containers.
    """
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; the artifact is incomplete, retrain the tier")
    try:
        state: dict[str, Any] = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError or EOFError here
        raise ArtifactError(f"{path} is not a loadable state dict: {exc}") from exc
    return state


def read_meta(folder: Path, backend: str) -> ArtifactMeta:
    """Read the metadata and check that it was written by ``backend``."""
    meta = ArtifactMeta.read(folder)
    if meta.backend != backend:
        raise ArtifactError(f"{folder} holds a {meta.backend!r} model, not {backend!r}")
    return meta
