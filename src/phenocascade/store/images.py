"""The image store: every submitted image's bytes, content-addressed, for replay.

A folder or any fsspec URL (``/data/phenocascade/images``, ``file:///...``, ``s3://bucket/
images`` with ``s3fs`` installed) holds two kinds of files:

* ``blobs/<aa>/<sha256>``: the bytes of one image content, named by their SHA-256, so the
  same bytes submitted under several ids are kept once;
* ``images/<aa>/<sha256 of the id>.json``: one manifest per image id, the submission as
  it was last published (its metadata, format, original path or ``inline``, submission
  time) and the SHA-256 and size of its bytes.

A manifest is written before its blob, so a blob that :meth:`ImageStore.prune` finds
without a manifest is never one being stored. Images submitted by path are kept for good;
inline ones (whose bytes exist nowhere else) for ``inline_days``, after which
:meth:`ImageStore.prune` drops them.

The store is chosen by ``PHENOCASCADE_IMAGE_STORE`` (:func:`configured_store`), and the
inline retention by ``PHENOCASCADE_IMAGE_STORE_INLINE_DAYS``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
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
        """Return the blob of ``image`` as a local file path, or ``None`` if not local."""
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
        """Keep a submission whose bytes are the file at ``path``, copied in chunks.

        As :meth:`put`, with memory bounded by the chunk size however large the file (a
        slide).

        Parameters
        ----------
        record : Mapping
            The ``ImageSubmitted`` record as published (its ``inline`` is not read).
        path : pathlib.Path
            The file holding the image's encoded bytes.
        sha256 : str
            Hex SHA-256 the file's bytes were found to have when it was taken.
        tiling : Mapping or None, default None
            For a slide (``record`` is the slide's own submission, not a tile's), how it
            was tiled: ``size``, ``overlap`` and ``level``, kept in the manifest.

        Raises
        ------
        ValidationError
            If the file no longer holds those bytes (it was written to since); nothing is
            kept.
        FileNotFoundError
            If the file is gone.
        InfraError
            If the file or the store cannot be read or written.
        """
        size = path.stat().st_size
        image = StoredImage.from_submission(record, sha256=sha256, size=size, tiling=tiling)

        def copy(tmp: str) -> None:
            digest = hashlib.sha256()
            with path.open("rb") as src, self._fs.open(tmp, "wb") as dst:
                while chunk := src.read(_CHUNK_BYTES):
                    digest.update(chunk)
                    dst.write(chunk)
            if digest.hexdigest() != sha256:
                raise ValidationError(
                    f"{path} changed while it was copied to the image store {self.url}; it is "
                    "taken again once it is complete"
                )

        return self._keep(image, copy)

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
                self._fs.mv(tmp, blob)
        except OSError as exc:
            raise InfraError(f"cannot write to the image store {self.url}: {exc}") from exc
        finally:
            if tmp is not None and self._fs.exists(tmp):
                self._fs.rm_file(tmp)
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
            # A name starting with a dot is a blob being written (:meth:`_write`).
            blobs = [
                (path, int(info.get("size") or 0))
                for path, info in self._fs.find(f"{self._root}/blobs", detail=True).items()
                if (name := path.rsplit("/", 1)[-1]) not in kept and not name.startswith(".")
            ]
            if not dry_run:
                for image in expired:
                    self._fs.rm_file(self._manifest(image.image_id))
                for path, _ in blobs:
                    self._fs.rm_file(path)
        except FileNotFoundError:
            blobs = []
        except OSError as exc:
            raise InfraError(f"cannot prune the image store {self.url}: {exc}") from exc
        return PruneReport(
            expired_images=sorted(i.image_id for i in expired),
            blobs=len(blobs),
            bytes=sum(size for _, size in blobs),
        )


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
