"""The pure parts of ``phenocascade watch``: when a file is complete, its id, what was sent.

Kept free of Kafka and of watchdog so they can be tested on their own;
:mod:`phenocascade.consumers.watcher` wires them to a file-system observer and a
transactional publisher.

* :class:`SettleTracker` decides when a file a scanner writes is complete: its size and
  modification time have not changed for ``settle_s`` seconds, or its marker file exists.
  An OME-Zarr slide is a folder (:func:`zarr_folder`), followed as one image: its
  :func:`signature` is the total size of its files and the latest modification time in it.
* :func:`content_id` names an image by its bytes' SHA-256 (a folder's by its content
  digest), so a restart resubmits nothing already sent and a file rewritten with new
  content is a new image.
* :class:`Ledger` is the watcher's local state, a SQLite file: the ids it is publishing
  (``pending``) and has published, where its last batch landed on each partition, and the
  size and mtime of each file taken (so a restart does not read them all again).
"""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import json
import os
import sqlite3
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from phenocascade.errors import ConfigError, ConflictError
from phenocascade.store.images import content_digest

# (size in bytes, modification time in ns): a file whose signature is unchanged for the
# settle time is taken as written.
Signature = tuple[int, int]

DEFAULT_PATTERNS = ("*.tif", "*.tiff", "*.png", "*.jpg", "*.jpeg", "*.zarr")


def content_id(digest: str, prefix: str = "") -> str:
    """Return the image id of content whose SHA-256 hex digest is ``digest``.

    The id is ``prefix`` plus the first 16 hex digits (64 bits) of the digest: equal bytes
    give equal ids wherever and whenever they are read.
    """
    return f"{prefix}{digest[:16]}"


def read_digest(path: Path, *, keep: bool) -> tuple[bytes | None, str]:
    """Return the bytes of ``path`` (if ``keep``, else ``None``) and their SHA-256 hex digest.

    Without ``keep`` the file is hashed in chunks, so its size does not bound memory; a
    folder (an OME-Zarr slide) is never kept, its digest is its content digest
    (:func:`~phenocascade.store.images.content_digest`).
    """
    if not keep:
        return None, content_digest(path)
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def signature(path: Path) -> Signature | None:
    """Return the ``(size, mtime_ns)`` of ``path``, or ``None`` if it is gone.

    Of a folder: the total size of the regular files under it, and the latest modification
    time of it, its subfolders and its files (a file added, removed or rewritten moves it).
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size, st.st_mtime_ns
    size, latest = 0, st.st_mtime_ns
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            try:
                entry = os.lstat(os.path.join(root, name))
            except FileNotFoundError:  # removed meanwhile: its folder's mtime moved
                continue
            latest = max(latest, entry.st_mtime_ns)
            if stat.S_ISREG(entry.st_mode):
                size += entry.st_size
    return size, latest


def zarr_folder(path: Path, top: Path) -> Path | None:
    """Return the Zarr folder (``*.zarr``) ``path`` lies in under ``top``, or ``None``.

    The outermost one: an OME-Zarr image is published as a whole, never one of its arrays.
    """
    try:
        rel = path.relative_to(top)
    except ValueError:
        return None
    for parent in reversed(rel.parents[:-1]):  # the outermost first, ``.`` left out
        if parent.name.lower().endswith(".zarr"):
            return top / parent
    return None


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether a file name matches one of the glob ``patterns`` (case-insensitive)."""
    lower = name.lower()
    return any(fnmatch.fnmatchcase(lower, p.lower()) for p in patterns)


@dataclass
class _Candidate:
    signature: Signature | None
    since: float


class SettleTracker:
    """Follow files that may still be written and say when each is complete.

    Parameters
    ----------
    settle_s : float, default 2.0
        A file is complete once its size and modification time have not changed for this
        many seconds (as observed by :meth:`ready`, not by the file's own mtime, so a
        scanner that pauses between chunks for less than this is never cut short).
    marker : str or None, default None
        If set, a file is complete when ``<name><marker>`` (``scan01.tif.done``) or
        ``<stem><marker>`` (``scan01.done``) exists beside it, and only then.

    Notes
    -----
    An empty file (or a folder without bytes) is never complete: scanners create the file
    before writing to it. A folder's signature is that of all it holds (:func:`signature`).
    """

    def __init__(self, settle_s: float = 2.0, marker: str | None = None) -> None:
        self.settle_s = settle_s
        self.marker = marker
        self._candidates: dict[Path, _Candidate] = {}

    def __len__(self) -> int:
        return len(self._candidates)

    def touch(self, path: Path, now: float) -> None:
        """Note that ``path`` may have changed (a file-system event or a folder scan)."""
        if path not in self._candidates:
            self._candidates[path] = _Candidate(None, now)

    def has_marker(self, path: Path) -> bool:
        """Whether the marker of ``path`` exists (``False`` without a marker suffix)."""
        if self.marker is None:
            return False
        return (
            path.with_name(path.name + self.marker).exists()
            or path.with_suffix(self.marker).exists()
        )

    def ready(self, now: float) -> list[tuple[Path, Signature]]:
        """Return the complete files with the signature each was complete at.

        A file stays a candidate (and is returned again) until :meth:`done` is called for
        it; one that disappeared is forgotten.
        """
        found: list[tuple[Path, Signature]] = []
        for path, cand in list(self._candidates.items()):
            sig = signature(path)
            if sig is None:
                del self._candidates[path]
                continue
            if sig != cand.signature:
                cand.signature, cand.since = sig, now
            if sig[0] == 0:
                continue
            complete = (
                self.has_marker(path)
                if self.marker is not None
                else now - cand.since >= self.settle_s
            )
            if complete:
                found.append((path, sig))
        return found

    def done(self, path: Path) -> None:
        """Stop following ``path`` (it was taken); a later event makes it a candidate again."""
        self._candidates.pop(path, None)


class Ledger:
    """What one watcher has published, kept in ``<state dir>/ledger.sqlite``.

    Parameters
    ----------
    state_dir : pathlib.Path
        The watcher's folder (``<home>/watch/<name>``); created if missing. An exclusive
        lock on ``state_dir/lock`` is held while the ledger is open, so two watchers never
        share one state.
    topic : str
        The topic this state belongs to; a state kept for another topic is refused.

    Raises
    ------
    ConflictError
        If another process holds the state.
    ConfigError
        If the state belongs to another topic.

    Notes
    -----
    An image is ``pending`` from just before its transaction starts until the transaction
    is known committed; then it is ``published`` and the offsets after its batch are
    kept. Pending images after a crash or a failed commit are resolved by reading the
    topic from those offsets (:meth:`resolve`), never guessed.
    """

    def __init__(self, state_dir: Path, topic: str) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self._lock: IO[str] = (state_dir / "lock").open("w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise ConflictError(
                f"another watcher is running with the state in {state_dir}; stop it or give "
                "this one another --name"
            ) from None
        # One thread at a time, not necessarily the one that opened it.
        self._db = sqlite3.connect(state_dir / "ledger.sqlite", check_same_thread=False)
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS images (image_id TEXT PRIMARY KEY, sha256 TEXT, "
            "path TEXT, state TEXT, at REAL);"
            "CREATE TABLE IF NOT EXISTS offsets (part INTEGER PRIMARY KEY, next INTEGER);"
            "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, "
            "mtime_ns INTEGER, image_id TEXT);"
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);"
        )
        with self._db:
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('topic', ?)", (topic,))
        (kept,) = self._db.execute("SELECT value FROM meta WHERE key = 'topic'").fetchone()
        if kept != topic:
            self.close()
            raise ConfigError(
                f"the watch state in {state_dir} belongs to topic {kept!r}, not {topic!r}; "
                "give this watcher another --name"
            )

    def close(self) -> None:
        """Close the database and release the lock."""
        self._db.close()
        self._lock.close()

    def is_published(self, image_id: str) -> bool:
        """Whether ``image_id`` is known to be on the topic."""
        row = self._db.execute(
            "SELECT 1 FROM images WHERE image_id = ? AND state = 'published'", (image_id,)
        ).fetchone()
        return row is not None

    def knows_file(self, path: Path, sig: Signature) -> bool:
        """Whether ``path`` was taken at ``sig`` and its content is published.

        Lets a restart skip re-reading the files it already sent: a file whose size and
        modification time are unchanged is taken to hold the same bytes.
        """
        row = self._db.execute(
            "SELECT 1 FROM files JOIN images USING (image_id) WHERE files.path = ? "
            "AND size = ? AND mtime_ns = ? AND state = 'published'",
            (str(path), *sig),
        ).fetchone()
        return row is not None

    def remember_files(self, files: Iterable[tuple[Path, Signature, str]]) -> None:
        """Record ``(path, signature, image id)`` of files whose content is published."""
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)",
                [(str(p), size, mtime, i) for p, (size, mtime), i in files],
            )

    def published_count(self) -> int:
        """Return the number of images known to be on the topic."""
        (n,) = self._db.execute("SELECT count(*) FROM images WHERE state = 'published'").fetchone()
        return int(n)

    def pending(self) -> set[str]:
        """Return the ids whose transaction is not known to be committed or aborted."""
        return {
            r[0] for r in self._db.execute("SELECT image_id FROM images WHERE state = 'pending'")
        }

    def offsets(self) -> dict[int, int]:
        """``{partition: offset after this watcher's last committed batch}``."""
        return {int(p): int(n) for p, n in self._db.execute("SELECT part, next FROM offsets")}

    def add_pending(self, entries: Iterable[tuple[str, str, str]], now: float) -> None:
        """Record ``(image id, sha256, path)`` entries as being published."""
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO images VALUES (?, ?, ?, 'pending', ?)",
                [(i, s, p, now) for i, s, p in entries],
            )

    def mark_published(self, ids: Iterable[str], offsets: Mapping[int, int]) -> None:
        """Mark ``ids`` published and advance the kept offsets to ``offsets`` (never back)."""
        with self._db:
            self._db.executemany(
                "UPDATE images SET state = 'published' WHERE image_id = ?", [(i,) for i in ids]
            )
            self._db.executemany(
                "INSERT INTO offsets VALUES (?, ?) ON CONFLICT(part) "
                "DO UPDATE SET next = max(next, excluded.next)",
                list(offsets.items()),
            )

    def resolve(self, on_topic: set[str]) -> tuple[set[str], set[str]]:
        """Settle every pending id: published if in ``on_topic``, else forgotten.

        Returns
        -------
        tuple of (set of str, set of str)
            The ids found published, and the ids forgotten (their transaction was aborted;
            their files are published again when next seen).
        """
        pending = self.pending()
        landed, lost = pending & on_topic, pending - on_topic
        self.mark_published(landed, {})
        with self._db:
            self._db.executemany("DELETE FROM images WHERE image_id = ?", [(i,) for i in lost])
        return landed, lost


def write_status(path: Path, status: Mapping[str, Any]) -> None:
    """Write the watcher's status as JSON, whole (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(status, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_status(path: Path) -> dict[str, Any] | None:
    """Return the status a watcher last wrote, or ``None`` if it never ran."""
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return data
