"""The image store: every submitted image's bytes, content-addressed, for replay.

A folder or any fsspec URL (``/data/phenocascade/images``, ``file:///...``, ``s3://bucket/
images`` with ``s3fs`` installed) holds two kinds of files:

* ``blobs/<aa>/<sha256>``: the bytes of one image content, named by their SHA-256, so the
  same bytes submitted under several ids are kept once. An OME-Zarr slide (a folder) is
  kept as a folder there, its files at their relative paths, named by its content digest
  (:func:`content_digest`), so the workers can read its chunks lazily from the copy;
* ``images/<aa>/<sha256 of the id>.json``: one manifest per image id, the submission as
  it was last published (its metadata, format, original path or ``inline``, submission
  time) and the SHA-256 and size of its bytes.

A manifest is written before its blob, so a blob that :meth:`ImageStore.prune` finds
without a manifest is never one being stored. Images submitted by path are kept for good;
inline ones (whose bytes exist nowhere else) for ``inline_days``, after which
:meth:`ImageStore.prune` drops them.

**The content digest of a folder** is the SHA-256 of its ``sha256sum`` listing: one line
per regular file, its hex SHA-256, two spaces, its path relative to the folder (joined by
``/``) and a newline, the lines sorted by path (code point order, as ``LC_ALL=C sort``).
Every file counts, metadata included; folders count only through the files they hold.

The store is chosen by ``PHENOCASCADE_IMAGE_STORE`` (:func:`configured_store`), and the
inline retention by ``PHENOCASCADE_IMAGE_STORE_INLINE_DAYS``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from phenocascade.errors import ConfigError, InfraError, NotFoundError, ValidationError

STORE_ENV = "PHENOCASCADE_IMAGE_STORE"
INLINE_DAYS_ENV = "PHENOCASCADE_IMAGE_STORE_INLINE_DAYS"
DEFAULT_INLINE_DAYS = 30.0
OFF = "off"
_DAY_MS = 86_400_000
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class StoredImage:
    """The manifest of one stored image.

    Attributes
    ----------
    image_id : str
        The id it was submitted under (the Kafka key).
    sha256 : str
        Hex SHA-256 of its bytes: the name of its blob.
    size : int
        Its size in bytes.
    format : str
        The ``ImageFormat`` symbol it was submitted with.
    uri : str or None
        The path it was submitted by; ``None`` for an inline submission.
    submitted_at : int
        When it was last submitted, in epoch milliseconds.
    metadata : dict of str to str
        The submission's ``ImageMetadata`` record (study, specimen, modality, ...).
    tiling : dict of str to int or None
        For a slide submitted as tiles, how it was tiled (``size``, ``overlap``,
        ``level``), so that replay tiles it again alike; ``None`` for a whole image.
    """

    image_id: str
    sha256: str
    size: int
    format: str
    uri: str | None
    submitted_at: int
    metadata: dict[str, str] = field(default_factory=dict)
    tiling: dict[str, int] | None = None

    @property
    def study(self) -> str:
        """The study it was submitted to."""
        return self.metadata.get("study", "")

    @classmethod
    def from_submission(
        cls,
        record: Mapping[str, Any],
        *,
        sha256: str,
        size: int,
        tiling: Mapping[str, int] | None = None,
    ) -> StoredImage:
        """Return the manifest of an ``ImageSubmitted`` record whose bytes have this digest.

        ``tiling`` is the tiling of a slide (``size``, ``overlap``, ``level``), else ``None``.
        """
        return cls(
            image_id=record["image_id"],
            sha256=sha256,
            size=size,
            format=record["format"],
            uri=record["uri"],
            submitted_at=int(record["submitted_at"]),
            metadata={k: str(v) for k, v in record["metadata"].items()},
            tiling=None if tiling is None else dict(tiling),
        )


@dataclass(frozen=True)
class PruneReport:
    """What :meth:`ImageStore.prune` removed (or would remove, for a dry run)."""

    expired_images: list[str]
    blobs: int
    bytes: int


class ImageStore:
    """Content-addressed image bytes and one manifest per image id, on any fsspec filesystem.

    Parameters
    ----------
    url : str
        A folder or an fsspec URL; a plain path is resolved against the working folder.
    inline_days : float or None, default 30.0
        How long inline images are kept, in days; ``0`` keeps none, ``None`` keeps them
        for good. Images submitted by path are always kept.

    Raises
    ------
    ConfigError
        If fsspec has no backend for the URL's protocol here, or ``inline_days`` is negative.
    """

    def __init__(self, url: str, *, inline_days: float | None = DEFAULT_INLINE_DAYS) -> None:
        if inline_days is not None and not (inline_days >= 0 and math.isfinite(inline_days)):
            raise ConfigError(
                f"{INLINE_DAYS_ENV}: expected a number of days >= 0, got {inline_days!r}"
            )
        if "://" not in url:
            url = str(Path(url).resolve())
        self.url = url
        self.inline_days = inline_days
        try:
            fs, root = url_to_fs(url)
        except (ImportError, ValueError) as exc:
            raise ConfigError(
                f"{STORE_ENV}={url}: fsspec cannot open it ({exc}); use a folder, a file:// "
                "URL, or install the fsspec backend of its protocol (s3fs for s3://)"
            ) from exc
        self._fs: AbstractFileSystem = fs
        self._root = root.rstrip("/")

    def __repr__(self) -> str:
        return f"ImageStore({self.url!r})"

    # -- layout ----------------------------------------------------------------------------
    def _blob(self, sha256: str) -> str:
        return f"{self._root}/blobs/{sha256[:2]}/{sha256}"

    def _manifest(self, image_id: str) -> str:
        name = hashlib.sha256(image_id.encode()).hexdigest()
        return f"{self._root}/images/{name[:2]}/{name}.json"

    def local_path(self, image: StoredImage) -> Path | None:
        """Return the blob of ``image`` as a local path, or ``None`` if not local.

        A file, or the folder of an OME-Zarr slide.
        """
        if not isinstance(self._fs, LocalFileSystem):
            return None
        return Path(self._blob(image.sha256))

    # -- writing ---------------------------------------------------------------------------
    def put(self, record: Mapping[str, Any], data: bytes) -> StoredImage | None:
        """Keep the bytes of one submission and its manifest (replacing the id's old one).

        Parameters
        ----------
        record : Mapping
            The ``ImageSubmitted`` record as published (its ``inline`` is not read).
        data : bytes
            The image's encoded bytes (the file's, or the inline ones).

        Returns
        -------
        StoredImage or None
            Its manifest; ``None`` for an inline image when ``inline_days`` is 0.

        Raises
        ------
        InfraError
            If the store cannot be written.
        """
        image = StoredImage.from_submission(
            record, sha256=hashlib.sha256(data).hexdigest(), size=len(data)
        )
        return self._keep(image, lambda tmp: self._fs.pipe_file(tmp, data))

    def put_file(
        self,
        record: Mapping[str, Any],
        path: Path,
        *,
        sha256: str,
        tiling: Mapping[str, int] | None = None,
    ) -> StoredImage | None:
        """Keep a submission whose bytes are the file (or folder) at ``path``, in chunks.

        As :meth:`put`, with memory bounded by the chunk size however large the file (a
        slide). A folder (an OME-Zarr slide) is copied file by file, each in chunks, into a
        folder named by its content digest (:func:`content_digest`).

        Parameters
        ----------
        record : Mapping
            The ``ImageSubmitted`` record as published (its ``inline`` is not read).
        path : pathlib.Path
            The file holding the image's encoded bytes, or the slide's folder.
        sha256 : str
            Hex SHA-256 the file's bytes (or the folder's content digest) were found to
            have when it was taken.
        tiling : Mapping or None, default None
            For a slide (``record`` is the slide's own submission, not a tile's), how it
            was tiled: ``size``, ``overlap`` and ``level``, kept in the manifest.

        Raises
        ------
        ValidationError
            If the file or folder no longer holds that content (it was written to since);
            nothing is kept.
        FileNotFoundError
            If the file or folder is gone.
        InfraError
            If the file or the store cannot be read or written.
        """
        folder = path.is_dir()
        files = folder_files(path) if folder else [("", path)]
        size = sum(source.stat().st_size for _, source in files)
        image = StoredImage.from_submission(record, sha256=sha256, size=size, tiling=tiling)

        def copy(tmp: str) -> None:
            digests = [
                self._copy_file(source, f"{tmp}/{rel}" if folder else tmp) for rel, source in files
            ]
            found = (
                _listing_digest(zip([r for r, _ in files], digests, strict=True))
                if folder
                else digests[0]
            )
            if found != sha256:
                raise ValidationError(
                    f"{path} changed while it was copied to the image store {self.url}; it is "
                    "taken again once it is complete"
                )

        return self._keep(image, copy)

    def _copy_file(self, source: Path, dest: str) -> str:
        """Copy ``source`` to ``dest`` in chunks; return the hex SHA-256 of what was copied."""
        self._fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
        digest = hashlib.sha256()
        with source.open("rb") as src, self._fs.open(dest, "wb") as dst:
            while chunk := src.read(_CHUNK_BYTES):
                digest.update(chunk)
                dst.write(chunk)
        return digest.hexdigest()

    def _keep(self, image: StoredImage, write: Callable[[str], None]) -> StoredImage | None:
        """Write the blob of ``image`` (unless kept already) and its manifest.

        ``write`` writes the bytes at a temporary name beside the blob; the manifest is
        written before that file becomes the blob (see the module's notes).
        """
        if image.uri is None and self.inline_days == 0:
            return None
        blob = self._blob(image.sha256)
        tmp = None
        try:
            if not self._fs.exists(blob):
                tmp = self._temporary(blob)
                write(tmp)
            self._write(self._manifest(image.image_id), json.dumps(asdict(image)).encode())
            if tmp is not None:
                self._fs.mv(tmp, blob, recursive=True)
        except OSError as exc:
            raise InfraError(f"cannot write to the image store {self.url}: {exc}") from exc
        finally:
            if tmp is not None and self._fs.exists(tmp):
                self._fs.rm(tmp, recursive=True)
        return image

    def _temporary(self, path: str) -> str:
        """Return a fresh temporary name beside ``path`` (its folder made if missing)."""
        parent = path.rsplit("/", 1)[0]
        self._fs.makedirs(parent, exist_ok=True)
        return f"{parent}/.tmp-{uuid.uuid4().hex}"

    def _write(self, path: str, data: bytes) -> None:
        """Write ``data`` at ``path`` whole or not at all (a temporary name, then a move)."""
        tmp = self._temporary(path)
        self._fs.pipe_file(tmp, data)
        self._fs.mv(tmp, path)

    # -- reading ---------------------------------------------------------------------------
    def get(self, image_id: str) -> StoredImage | None:
        """Return the manifest of ``image_id``, or ``None`` if it is not stored."""
        try:
            raw = self._fs.cat_file(self._manifest(image_id))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise InfraError(f"cannot read the image store {self.url}: {exc}") from exc
        return _manifest_from(raw)

    def images(self) -> Iterator[StoredImage]:
        """Yield the manifest of every stored image, in no set order.

        Reads every manifest: a study or a time span is selected by filtering these.
        """
        try:
            paths = [p for p in self._fs.find(f"{self._root}/images") if p.endswith(".json")]
            for start in range(0, len(paths), 500):
                for raw in self._fs.cat(paths[start : start + 500], on_error="omit").values():
                    yield _manifest_from(raw)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise InfraError(f"cannot read the image store {self.url}: {exc}") from exc

    def read(self, image: StoredImage) -> bytes:
        """Return the bytes of ``image``, checked against its SHA-256.

        Raises
        ------
        NotFoundError
            If its blob is missing or no longer holds those bytes.
        InfraError
            If the store cannot be read.
        """
        try:
            data = bytes(self._fs.cat_file(self._blob(image.sha256)))
        except FileNotFoundError:
            raise NotFoundError(
                f"image {image.image_id}: its bytes ({image.sha256[:12]}...) are missing from "
                f"the image store {self.url}"
            ) from None
        except OSError as exc:
            raise InfraError(f"cannot read the image store {self.url}: {exc}") from exc
        if hashlib.sha256(data).hexdigest() != image.sha256:
            raise NotFoundError(
                f"image {image.image_id}: its blob in {self.url} no longer holds the bytes "
                "submitted (SHA-256 differs); the store is damaged"
            )
        return data

    # -- retention -------------------------------------------------------------------------
    def prune(self, now_ms: int, *, dry_run: bool = False) -> PruneReport:
        """Drop inline images older than ``inline_days``, and every blob no manifest names.

        A blob of an expired inline image that a kept image shares stays. An image
        resubmitted while this runs may lose a blob it shares with an expiring one; its
        next submission stores it again.

        Parameters
        ----------
        now_ms : int
            The present, in epoch milliseconds.
        dry_run : bool, default False
            Report what would go, remove nothing.

        Raises
        ------
        InfraError
            If the store cannot be read or written.
        """
        cutoff = None if self.inline_days is None else now_ms - self.inline_days * _DAY_MS
        expired: list[StoredImage] = []
        kept: set[str] = set()
        for image in self.images():
            if image.uri is None and cutoff is not None and image.submitted_at < cutoff:
                expired.append(image)
            else:
                kept.add(image.sha256)
        try:
            # A name starting with a dot is a blob being written (:meth:`_write`). A folder's
            # files are sized and removed together, as the one blob they are.
            # ``blobs/ab/abcd...`` is a file blob, ``blobs/ab/abcd.../0/c/0/0`` a file of a
            # folder blob: both are of blob ``abcd...``.
            prefix = f"{self._root}/blobs/"
            blobs: dict[str, int] = {}
            for path, info in self._fs.find(prefix, detail=True).items():
                shard, name = path.removeprefix(prefix).split("/")[:2]
                if name not in kept and not name.startswith("."):
                    blob = f"{prefix}{shard}/{name}"
                    blobs[blob] = blobs.get(blob, 0) + int(info.get("size") or 0)
            if not dry_run:
                for image in expired:
                    self._fs.rm_file(self._manifest(image.image_id))
                for blob in blobs:
                    self._fs.rm(blob, recursive=True)
        except FileNotFoundError:
            blobs = {}
        except OSError as exc:
            raise InfraError(f"cannot prune the image store {self.url}: {exc}") from exc
        return PruneReport(
            expired_images=sorted(i.image_id for i in expired),
            blobs=len(blobs),
            bytes=sum(blobs.values()),
        )


def folder_files(folder: Path) -> list[tuple[str, Path]]:
    """Return ``(relative path, file)`` of every regular file under ``folder``, sorted by path.

    Relative paths are joined by ``/``; symbolic links are not followed.

    Raises
    ------
    ValidationError
        If the folder holds a symbolic link (its target is no part of the folder).
    FileNotFoundError
        If the folder is gone.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    files = []
    for root, dirs, names in os.walk(folder):
        for name in [*dirs, *names]:
            if (Path(root) / name).is_symlink():
                raise ValidationError(
                    f"{folder} holds a symbolic link, {Path(root) / name}; copy what it points "
                    "at into the folder"
                )
        for name in names:
            path = Path(root) / name
            files.append((path.relative_to(folder).as_posix(), path))
    return sorted(files)


def _listing_digest(files: Iterable[tuple[str, str]]) -> str:
    """Return the hex SHA-256 of the ``sha256sum`` listing of ``(relative path, digest)``."""
    listing = hashlib.sha256()
    for rel, digest in sorted(files):
        listing.update(f"{digest}  {rel}\n".encode())
    return listing.hexdigest()


def content_digest(path: Path) -> str:
    """Return the hex SHA-256 of a file's bytes, or a folder's content digest.

    A folder's digest is that of its ``sha256sum`` listing (see the module's notes). Files
    are read in chunks: memory does not grow with their size.

    Raises
    ------
    FileNotFoundError
        If ``path`` is gone.
    ValidationError
        If a folder holds a symbolic link.
    """
    if not path.is_dir():
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    digests = []
    for rel, file in folder_files(path):
        with file.open("rb") as f:
            digests.append((rel, hashlib.file_digest(f, "sha256").hexdigest()))
    return _listing_digest(digests)


def _manifest_from(raw: bytes) -> StoredImage:
    record = json.loads(raw)
    return StoredImage(**{**record, "metadata": dict(record.get("metadata") or {})})


def configured_store(home: Path, environ: Mapping[str, str] | None = None) -> ImageStore | None:
    """Return the image store the environment names, or ``None`` when it is ``off``.

    Parameters
    ----------
    home : pathlib.Path
        ``PHENOCASCADE_HOME``; the store defaults to its ``images`` folder.
    environ : Mapping or None, default None
        The environment (default ``os.environ``): ``PHENOCASCADE_IMAGE_STORE`` (a folder,
        an fsspec URL or ``off``) and ``PHENOCASCADE_IMAGE_STORE_INLINE_DAYS`` (days to keep
        inline images, ``forever`` for good; unset: 30).

    Raises
    ------
    ConfigError
        If either variable is invalid.
    """
    env = os.environ if environ is None else environ
    url = env.get(STORE_ENV, "").strip() or str(home / "images")
    if url.lower() == OFF:
        return None
    raw_days = env.get(INLINE_DAYS_ENV, "").strip()
    days: float | None
    if raw_days.lower() == "forever":
        days = None
    elif not raw_days:
        days = DEFAULT_INLINE_DAYS
    else:
        try:
            days = float(raw_days)
        except ValueError:
            raise ConfigError(
                f"{INLINE_DAYS_ENV}: expected a number of days >= 0 or 'forever', got {raw_days!r}"
            ) from None
    return ImageStore(url, inline_days=days)
