"""Download the public originals of the shared datasets, verifying SHA-256 checksums.

The pinned URLs and checksums live in the packaged manifest
``phenocascade/resources/fetch_manifest.json``. A file is written under its final name
only after its checksum matched; a mismatch deletes the partial download and raises.
An entry whose checksum is not pinned (``"sha256": null``) is refused unless the caller
explicitly accepts an unverified download (``allow_unverified=True``,
``phenocascade data fetch --allow-unverified``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from phenocascade.errors import ConfigError, DownloadError

_log = logging.getLogger(__name__)
_CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SCHEMES = ("https", "http", "file")


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """One file to download.

    Attributes
    ----------
    url : str
        ``https://``, ``http://`` or ``file://`` URL.
    filename : str
        Name to store it under (no folders).
    sha256 : str or None
        Expected lower-case hex digest; ``None`` if not pinned.
    """

    url: str
    filename: str
    sha256: str | None


@dataclass(frozen=True, slots=True)
class DatasetSource:
    """A dataset's public origin: what it is, its licence and its files."""

    name: str
    description: str
    license: str
    files: tuple[RemoteFile, ...]


def _parse_file(entry: Any, where: str) -> RemoteFile:
    """Validate one manifest file entry."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected an object, got {entry!r}")
    url, filename, digest = entry.get("url"), entry.get("filename"), entry.get("sha256")
    if not isinstance(url, str) or urllib.parse.urlparse(url).scheme not in _SCHEMES:
        raise ConfigError(f"{where}: url {url!r} is not an {'/'.join(_SCHEMES)} URL")
    if not isinstance(filename, str) or not filename or Path(filename).name != filename:
        raise ConfigError(f"{where}: filename {filename!r} must be a plain file name")
    if digest is not None and (not isinstance(digest, str) or not _SHA256.match(digest)):
        raise ConfigError(f"{where}: sha256 {digest!r} is not 64 lower-case hex digits or null")
    return RemoteFile(url, filename, digest)


def load_manifest(path: Path | None = None) -> dict[str, DatasetSource]:
    """Read and validate a fetch manifest.

    Parameters
    ----------
    path : pathlib.Path or None, default None
        A manifest JSON file; ``None`` reads the packaged one.

    Returns
    -------
    dict of str to DatasetSource
        By dataset name.

    Raises
    ------
    ConfigError
        If the file is missing, not JSON, or an entry is malformed.
    """
    if path is None:
        where = "packaged fetch_manifest.json"
        text = resources.files("phenocascade.resources").joinpath("fetch_manifest.json").read_text()
    else:
        where = str(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read manifest {path}: {exc.strerror}") from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}:{exc.lineno}: bad JSON: {exc.msg}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected an object of datasets")
    out = {}
    for name, entry in doc.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("files"), list):
            raise ConfigError(f"{where}: dataset {name!r} needs a 'files' list")
        files = tuple(
            _parse_file(f, f"{where}: {name}.files[{i}]") for i, f in enumerate(entry["files"])
        )
        out[name] = DatasetSource(
            name, str(entry.get("description", "")), str(entry.get("license", "")), files
        )
    return out


def sha256_file(path: Path) -> str:
    """Return the lower-case hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download(
    remote: RemoteFile, dest_dir: Path, *, allow_unverified: bool = False, timeout: float = 60.0
) -> Path:
    """Download one file into ``dest_dir`` and verify its checksum.

    A file already present with the pinned checksum is kept without downloading.

    Parameters
    ----------
    remote : RemoteFile
        What to download.
    dest_dir : pathlib.Path
        Target folder; created if missing.
    allow_unverified : bool, default False
        Accept a file whose checksum is not pinned (its digest is logged).
    timeout : float, default 60.0
        Socket timeout in seconds.

    Returns
    -------
    pathlib.Path
        ``dest_dir / remote.filename``.

    Raises
    ------
    DownloadError
        If the checksum is not pinned and ``allow_unverified`` is false (nothing is
        downloaded), the download fails, or the checksum does not match (the partial
        file is deleted).
    """
    if remote.sha256 is None and not allow_unverified:
        raise DownloadError(
            f"{remote.url} has no pinned SHA-256, so its content cannot be verified; pass "
            "--allow-unverified (allow_unverified=True) to accept it anyway"
        )
    if urllib.parse.urlparse(remote.url).scheme not in _SCHEMES:
        raise DownloadError(f"{remote.url}: only {'/'.join(_SCHEMES)} URLs are fetched")
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / remote.filename
    if remote.sha256 is not None and target.is_file() and sha256_file(target) == remote.sha256:
        _log.info("%s already present and verified", target)
        return target
    partial = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    try:
        with (
            urllib.request.urlopen(remote.url, timeout=timeout) as response,
            partial.open("wb") as handle,
        ):
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                handle.write(chunk)
    except (urllib.error.URLError, OSError) as exc:
        partial.unlink(missing_ok=True)
        raise DownloadError(f"{remote.url}: download failed ({exc})") from exc
    actual = digest.hexdigest()
    if remote.sha256 is not None and actual != remote.sha256:
        partial.unlink(missing_ok=True)
        raise DownloadError(
            f"{remote.url}: SHA-256 {actual} does not match the pinned {remote.sha256}; the "
            "download was deleted. The file changed upstream or was corrupted in transit"
        )
    if remote.sha256 is None:
        _log.warning("%s accepted UNVERIFIED, sha256=%s", remote.url, actual)
    partial.replace(target)
    return target


def fetch(
    name: str,
    dest: Path,
    *,
    allow_unverified: bool = False,
    manifest: dict[str, DatasetSource] | None = None,
) -> list[Path]:
    """Download every file of one dataset of the manifest into ``dest``.

    Parameters
    ----------
    name : str
        Dataset name in the manifest (``dsb2018``, ``bccd``, ``bbbc006``).
    dest : pathlib.Path
        Target folder.
    allow_unverified : bool, default False
        See :func:`download`.
    manifest : dict or None, default None
        A loaded manifest; ``None`` loads the packaged one.

    Returns
    -------
    list of pathlib.Path
        The downloaded (or already present) files; archives are not extracted.

    Raises
    ------
    ConfigError
        If ``name`` is not in the manifest.
    DownloadError
        As :func:`download`.
    """
    sources = load_manifest() if manifest is None else manifest
    if name not in sources:
        raise ConfigError(f"unknown dataset {name!r}; the manifest has {sorted(sources)}")
    return [download(f, dest, allow_unverified=allow_unverified) for f in sources[name].files]
