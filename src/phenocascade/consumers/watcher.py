"""``phenocascade watch``: publish every image a scanner finishes writing in a folder.

A watchdog observer (inotify, or a polling one for network shares) reports file events;
:class:`~phenocascade.consumers.watching.SettleTracker` says when a file is complete; its
bytes name it (:func:`~phenocascade.consumers.watching.content_id`); a bounded local queue
holds what Kafka has not taken yet; batches go out in Kafka transactions
(:class:`~phenocascade.streams.ingest.TransactionalPublisher`); the
:class:`~phenocascade.consumers.watching.Ledger` remembers what is on the topic. Each
image's bytes are kept in the image store (:mod:`phenocascade.store.images`) before it is
queued, as ``phenocascade submit`` keeps them, so ``phenocascade replay`` can score it
again. A slide (:func:`~phenocascade.store.slides.is_slide`) is published as its tiles, as
``submit`` publishes it (:mod:`phenocascade.streams.tiling`): one image, all its tiles in
one transaction, keyed by its content id. An OME-Zarr folder is such a slide: a file written
in it makes the folder (not the file) a candidate, complete once all it holds has settled
or its marker appears, its id that of its content digest.

Guarantee: each distinct content seen complete in the folder is committed to the
submitted topic exactly once, as a ``read_committed`` reader (every tier worker) sees it,
across watcher crashes, restarts and broker outages, as long as the watcher keeps its
state folder and the topic keeps its messages (retention). Before a batch's transaction
starts its ids are written ``pending``; once the commit is acknowledged they are
``published``. A crash (or a commit whose answer is lost) leaves ids pending; the next
connection first fences the old transaction (aborting it if still open), then reads the
topic from the offsets after the last known batch and marks published exactly the
pending ids it finds there; the others are sent again.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
    FileSystemMovedEvent,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from phenocascade.consumers.watching import (
    DEFAULT_PATTERNS,
    Ledger,
    SettleTracker,
    Signature,
    content_id,
    matches,
    read_digest,
    signature,
    write_status,
    zarr_folder,
)
from phenocascade.domain import ImageMeta
from phenocascade.errors import BadInputError, InfraError, ValidationError
from phenocascade.store.images import ImageStore
from phenocascade.store.slides import is_slide, is_zarr, pyramid
from phenocascade.streams import events
from phenocascade.streams.ingest import TransactionalPublisher
from phenocascade.streams.tiling import Tiling, tile_submissions

log = logging.getLogger(__name__)

_TICK_S = 0.2
# One transaction carries at most this many images or bytes of inline images.
_BATCH_IMAGES = 50
_BATCH_BYTES = 32 * 1024 * 1024
_MIN_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class WatchConfig:
    """What ``phenocascade watch`` was asked to do.

    Attributes
    ----------
    folder : pathlib.Path
        The watched folder (resolved; watched recursively).
    meta : ImageMeta
        Metadata of every submission (study, scanner, ...).
    patterns : tuple of str
        File name globs of the images (case-insensitive).
    settle_s : float
        Seconds a file's size and mtime must stay unchanged (see ``SettleTracker``).
    marker : str or None
        Marker suffix that says a file is complete instead of the settle time.
    poll : bool
        Poll the folder (network shares) instead of kernel notifications.
    queue_max : int
        Most images held locally while Kafka does not take them.
    inline : bool
        Send the bytes (up to ``max_inline_bytes``) instead of the path.
    max_inline_bytes : int
        Larger files are sent by path even with ``inline``.
    prefix : str
        Prefix of every image id.
    report_s : float
        Seconds between two backlog log lines.
    tiling : Tiling
        How slides are cut into tiles.
    max_image_pixels : int
        A TIFF over this many pixels is a slide even without a pyramid; no tile may be
        larger (``PHENOCASCADE_MAX_IMAGE_PIXELS``).
    """

    folder: Path
    meta: ImageMeta
    patterns: tuple[str, ...] = DEFAULT_PATTERNS
    settle_s: float = 2.0
    marker: str | None = None
    poll: bool = False
    queue_max: int = 1000
    inline: bool = False
    max_inline_bytes: int = 8 * 1024 * 1024
    prefix: str = ""
    report_s: float = 30.0
    tiling: Tiling = field(default_factory=Tiling)
    max_image_pixels: int = 64_000_000


@dataclass
class _Queued:
    image_id: str
    sha256: str
    path: Path
    records: list[dict[str, Any]]  # the image's submission, or its tiles' for a slide
    size: int  # bytes carried inline, 0 for a path
    signature: Signature


@dataclass
class _Kafka:
    """Whether Kafka takes our batches, and when to try again."""

    up: bool = False
    error: str = ""
    retry_at: float = 0.0
    backoff_s: float = _MIN_BACKOFF_S

    def failed(self, now: float, error: str) -> None:
        if self.up or error != self.error:
            log.warning("Kafka unavailable, retrying in %.1f s: %s", self.backoff_s, error)
        self.up, self.error = False, error
        self.retry_at = now + self.backoff_s
        self.backoff_s = min(2 * self.backoff_s, _MAX_BACKOFF_S)

    def succeeded(self) -> None:
        if not self.up and self.error:
            log.info("Kafka takes submissions again")
        self.up, self.error, self.backoff_s = True, "", _MIN_BACKOFF_S


@dataclass
class _Counts:
    published: int = 0
    duplicates: int = 0
    started_at: float = field(default_factory=time.time)


class _Events(FileSystemEventHandler):
    """Hand the paths of written, created and moved-in files to the watcher's thread.

    watchdog reports the files of a folder moved in as events of their own.
    """

    def __init__(self, paths: queue.SimpleQueue[Path]) -> None:
        self.paths = paths

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        if isinstance(event, FileSystemMovedEvent):
            self.paths.put(Path(os.fsdecode(event.dest_path)))
        elif isinstance(event, FileCreatedEvent | FileModifiedEvent | FileClosedEvent):
            self.paths.put(Path(os.fsdecode(event.src_path)))


class FolderWatcher:
    """Publish the complete images of a folder, once each, surviving crashes and outages.

    Parameters
    ----------
    config : WatchConfig
        The folder and the policy.
    publisher : TransactionalPublisher
        Sends batches to the submitted topic.
    ledger : Ledger
        The watcher's state (open, hence locked, for the watcher's lifetime).
    status_path : pathlib.Path
        Where the status JSON is written about once a second (``watch --status``).
    store : ImageStore or None, default None
        Where each image is kept before it is queued; ``None`` keeps none. A file the
        store cannot take waits on disk and is taken again after the settle time.
    """

    def __init__(
        self,
        config: WatchConfig,
        publisher: TransactionalPublisher,
        ledger: Ledger,
        status_path: Path,
        store: ImageStore | None = None,
    ) -> None:
        self.config = config
        self.publisher = publisher
        self.ledger = ledger
        self.status_path = status_path
        self.store = store
        self.tracker = SettleTracker(config.settle_s, config.marker)
        self.kafka = _Kafka()
        self.counts = _Counts()
        self._queue: OrderedDict[str, _Queued] = OrderedDict()
        self._paths: queue.SimpleQueue[Path] = queue.SimpleQueue()
        self._full = False
        self._reported_at = 0.0
        self._status_at = 0.0

    # -- the loop ---------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Watch until ``stop`` is set; files already in the folder are taken too."""
        observer: BaseObserver = PollingObserver(timeout=1.0) if self.config.poll else Observer()
        observer.schedule(_Events(self._paths), str(self.config.folder), recursive=True)
        observer.start()
        log.info(
            "watching %s (%s), %d images published before",
            self.config.folder,
            "polling" if self.config.poll else "notifications",
            self.ledger.published_count(),
        )
        try:
            self._scan_folder(self.config.folder)
            while not stop.is_set():
                self.step(time.monotonic())
                stop.wait(_TICK_S)
        finally:
            observer.stop()
            observer.join()
            self.publisher.close()
            self._write_status(time.monotonic(), running=False)

    def step(self, now: float) -> None:
        """Take events, accept complete files, publish what is queued, report."""
        while not self._paths.empty():
            self._note(self._paths.get_nowait(), now)
        self._accept(now)
        if now >= self.kafka.retry_at and (self._queue or not self.publisher.connected):
            self._publish(now)
        self._report(now)

    def _scan_folder(self, folder: Path) -> None:
        now = time.monotonic()
        for root, _, files in os.walk(folder):
            for name in files:
                self._note(Path(root) / name, now)

    def _note(self, path: Path, now: float) -> None:
        marker = self.config.marker
        zarr = zarr_folder(path, self.config.folder)
        if zarr is not None:
            # A file of an OME-Zarr slide: the folder is the image.
            if matches(zarr.name, self.config.patterns):
                self.tracker.touch(zarr, now)
        elif marker is not None and path.name.endswith(marker):
            # The marker of an image (``x.tif.done`` or ``x.done``): look at its images.
            image = path.with_name(path.name[: -len(marker)])
            for candidate in [image, *path.parent.glob(f"{image.name}.*")]:
                if candidate.exists() and matches(candidate.name, self.config.patterns):
                    self.tracker.touch(candidate, now)
        elif matches(path.name, self.config.patterns):
            self.tracker.touch(path, now)

    # -- accepting files --------------------------------------------------------------------
    def _accept(self, now: float) -> None:
        for path, sig in self.tracker.ready(now):
            if len(self._queue) >= self.config.queue_max:
                self._set_full(True)
                return
            self._take(path, sig, now)
        self._set_full(False)

    def _take(self, path: Path, sig: Signature, now: float) -> None:
        """Read a complete file; queue it unless its content is already sent or queued."""
        if self.ledger.knows_file(path, sig):
            self.tracker.done(path)
            return
        if path.is_dir() and not is_zarr(path):
            # Its Zarr metadata is not written yet: taken again once a file in it is.
            self.tracker.done(path)
            log.warning("%s is not published: a folder without Zarr metadata", path)
            return
        slide = is_slide(path, max_pixels=self.config.max_image_pixels)
        inline = self.config.inline and not slide and sig[0] <= self.config.max_inline_bytes
        try:
            data, digest = read_digest(path, keep=inline)
        except FileNotFoundError:
            return
        except ValidationError as exc:  # a folder holding a symbolic link
            self.tracker.done(path)
            log.warning("%s is not published: %s", path, exc)
            return
        if signature(path) != sig:
            self.tracker.touch(path, now)  # written while we read it: not complete after all
            return
        self.tracker.done(path)
        image_id = content_id(digest, self.config.prefix)
        if image_id in self._queue or self.ledger.is_published(image_id):
            self.counts.duplicates += 1
            log.info("%s holds content %s, already published or queued", path, image_id)
            if image_id not in self._queue:
                self.ledger.remember_files([(path, sig, image_id)])
            return
        fmt = events.format_of(path.name)
        if data is not None:
            record = events.image_submitted(image_id, inline=data, fmt=fmt, meta=self.config.meta)
        else:
            record = events.image_submitted(image_id, uri=str(path), fmt=fmt, meta=self.config.meta)
        records, tiling = [record], None
        if slide:
            tiling = asdict(self.config.tiling)
            try:
                records = tile_submissions(
                    record,
                    levels=pyramid(path),
                    tiling=self.config.tiling,
                    max_pixels=self.config.max_image_pixels,
                )
            except (BadInputError, ValidationError) as exc:
                # Nothing is published; the file is taken again once it is written anew.
                log.warning("%s is not published: it cannot be tiled as a slide: %s", path, exc)
                return
        if self._kept(record, path, digest, now, tiling):
            self._queue[image_id] = _Queued(image_id, digest, path, records, len(data or b""), sig)

    def _kept(
        self,
        record: dict[str, Any],
        path: Path,
        digest: str,
        now: float,
        tiling: dict[str, int] | None,
    ) -> bool:
        """Keep a taken file in the image store (a slide with its ``tiling``); whether to queue it.

        A file written to meanwhile, or that the store refuses, is followed again from
        ``now`` (so it is retried after the settle time); one deleted is dropped.
        """
        if self.store is None:
            return True
        try:
            self.store.put_file(record, path, sha256=digest, tiling=tiling)
        except FileNotFoundError:
            return False
        except ValidationError:
            self.tracker.touch(path, now)
            return False
        except InfraError as exc:
            log.warning("%s waits on disk: %s", path, exc)
            self.tracker.touch(path, now)
            return False
        return True

    def _set_full(self, full: bool) -> None:
        if full and not self._full:
            log.warning(
                "backlog full: %d images wait for Kafka (--queue-max %d); new files stay on "
                "disk and are taken once it drains",
                len(self._queue),
                self.config.queue_max,
            )
        elif self._full and not full:
            log.info("backlog below --queue-max again; taking new files")
        self._full = full

    # -- publishing -------------------------------------------------------------------------
    def _publish(self, now: float) -> None:
        """Connect (resolving pending ids) if needed, then send batches until the queue is empty."""
        try:
            if not self.publisher.connected:
                self.publisher.connect()
                self._resolve_pending()
            while self._queue:
                self._send_batch()
        except InfraError as exc:
            self.kafka.failed(now, str(exc))
            return
        self.kafka.succeeded()

    def _resolve_pending(self) -> None:
        """Learn from the topic which pending ids a crash or a lost commit left behind."""
        pending = self.ledger.pending()
        if not pending:
            return
        landed, lost = self.ledger.resolve(self.publisher.landed(self.ledger.offsets()))
        for image_id in landed:
            self._queue.pop(image_id, None)
        log.info(
            "%d images of an unfinished batch were on the topic already, %d are sent again",
            len(landed),
            len(lost),
        )

    def _send_batch(self) -> None:
        batch: list[_Queued] = []
        size = 0
        for item in self._queue.values():
            if batch and (len(batch) >= _BATCH_IMAGES or size + item.size > _BATCH_BYTES):
                break
            batch.append(item)
            size += item.size
        self.ledger.add_pending([(q.image_id, q.sha256, str(q.path)) for q in batch], time.time())
        offsets = self.publisher.send([r for q in batch for r in q.records])
        self.ledger.mark_published([q.image_id for q in batch], offsets)
        self.ledger.remember_files([(q.path, q.signature, q.image_id) for q in batch])
        for q in batch:
            del self._queue[q.image_id]
        self.counts.published += len(batch)
        log.info("published %d image(s), the first %s", len(batch), batch[0].path)

    # -- reporting --------------------------------------------------------------------------
    def status(self, running: bool = True) -> dict[str, Any]:
        """Return the watcher's state: backlog, Kafka, counts (``watch --status`` prints it)."""
        return {
            "folder": str(self.config.folder),
            "topic": self.publisher.topic,
            "pid": os.getpid(),
            "running": running,
            "updated_at": time.time(),
            "started_at": self.counts.started_at,
            "settling": len(self.tracker),
            "queued": len(self._queue),
            "queue_max": self.config.queue_max,
            "accepting": not self._full,
            "kafka": "up" if self.kafka.up else f"down: {self.kafka.error or 'connecting'}",
            "published_this_run": self.counts.published,
            "duplicates_this_run": self.counts.duplicates,
            "published_total": self.ledger.published_count(),
        }

    def _report(self, now: float) -> None:
        if now - self._status_at >= 1.0:
            self._write_status(now)
        if now - self._reported_at >= self.config.report_s:
            self._reported_at = now
            s = self.status()
            log.info(
                "backlog: %d settling, %d queued of %d%s; kafka %s; published %d this run, "
                "%d in all",
                s["settling"],
                s["queued"],
                s["queue_max"],
                "" if s["accepting"] else " (full, not accepting)",
                s["kafka"],
                s["published_this_run"],
                s["published_total"],
            )

    def _write_status(self, now: float, running: bool = True) -> None:
        self._status_at = now
        write_status(self.status_path, self.status(running))
