"""``phenocascade watch`` on the real Kafka: a scanner writing slowly, a watcher killed with
SIGKILL and restarted, a file rewritten, a broker away. Every distinct content must land on
the submitted topic exactly once, and no partial file ever; each is kept in the image
store, where replay reads it."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import yaml
from harness import read_events, settings_env
from ome_zarr_images import write_ome_zarr
from PIL import Image

from phenocascade.cli.watch import state_dir
from phenocascade.config import Settings, Topology, load_topology
from phenocascade.consumers.watcher import FolderWatcher, WatchConfig
from phenocascade.consumers.watching import Ledger, content_id
from phenocascade.domain import ImageMeta
from phenocascade.store.images import configured_store, content_digest
from phenocascade.streams import events
from phenocascade.streams.ingest import TransactionalPublisher
from phenocascade.streams.kafka import create_topics, transactional_producer
from phenocascade.streams.scan import scan_topic
from phenocascade.streams.serde import EventCodec

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SETTLE_S = 1.5
# The scanner pauses between chunks for less than the settle time, as a real one must.
CHUNK_PAUSE_S = 0.4


@dataclass
class Lab:
    settings: Settings
    topology: Topology
    inputs: Path
    logs: Path
    env: dict[str, str]
    study: str

    @property
    def topic(self) -> str:
        return self.topology.submitted_topic

    def start_watcher(
        self, *extra: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        self.logs.mkdir(exist_ok=True)
        args = ["watch", str(self.inputs), "--study", self.study, "--settle-s", str(SETTLE_S)]
        # The child keeps its own copy of the descriptor; ours is closed at once.
        with (self.logs / "watch.log").open("ab") as log:
            return subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "phenocascade",
                    *args,
                    "--inline",
                    "--report-s",
                    "2",
                    *extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env or self.env,
            )

    def status(self) -> dict[str, object] | None:
        path = state_dir(self.settings, self.inputs.resolve(), self.topic, None) / "status.json"
        try:
            return dict(json.loads(path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def published(self) -> list[dict[str, object]]:
        return read_events(self.settings, self.topic, "ImageSubmitted")

    def keyed(self) -> list[tuple[str, dict[str, Any]]]:
        """``(Kafka key, ImageSubmitted)`` of every committed submission."""
        codec = EventCodec()
        return [
            (key.decode(), codec.decode(value, expected="ImageSubmitted")[1])
            for key, value in scan_topic(self.settings.kafka, self.topic)
            if key is not None
        ]

    def log(self) -> str:
        return (self.logs / "watch.log").read_text(errors="replace")[-6000:]


@pytest.fixture
def lab(kafka_settings: Settings, tmp_path: Path) -> Lab:
    prefix = f"w{uuid.uuid4().hex[:8]}-"
    topology = load_topology().namespaced(prefix)
    topo_file = tmp_path / "topology.yaml"
    topo_file.write_text(yaml.safe_dump(topology.model_dump()))
    inputs = tmp_path / "scanner"
    inputs.mkdir()
    settings = kafka_settings.model_copy(
        update={"home": tmp_path / "home", "allowed_roots": [inputs], "topology": topo_file}
    )
    create_topics(settings.kafka, topology)
    return Lab(settings, topology, inputs, tmp_path / "logs", settings_env(settings), prefix)


def image_bytes(seed: int, side: int = 160) -> bytes:
    """A PNG of noise (about 75 KB): every seed a distinct content."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def write_slowly(path: Path, data: bytes, chunks: int = 4) -> None:
    """Write ``data`` as a scanner does: in chunks, with pauses, the file open throughout."""
    step = -(-len(data) // chunks)
    with path.open("wb") as f:
        for i in range(0, len(data), step):
            f.write(data[i : i + step])
            f.flush()
            time.sleep(CHUNK_PAUSE_S)


def wait_for(
    condition: Callable[[], bool], timeout_s: float, what: str, log: Callable[[], str]
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{log()}")
        time.sleep(0.5)


def digest_id(data: bytes) -> str:
    return content_id(hashlib.sha256(data).hexdigest())


def assert_exactly_once(lab: Lab, written: list[bytes], *, stored: bool = True) -> None:
    """Every distinct written content is on the topic once, whole, and nothing else is.

    With ``stored``, each is also in the watcher's image store, whole, with its study.
    """
    expected = {digest_id(d): d for d in written}
    records = lab.published()
    counts = Counter(r["image_id"] for r in records)
    assert {k: v for k, v in counts.items() if v != 1} == {}, "published more than once"
    assert set(counts) == set(expected), (set(counts) ^ set(expected), lab.log())
    for r in records:
        data = r["inline"]
        assert isinstance(data, bytes)
        # The bytes are a whole file the scanner finished, named by their own hash.
        assert data == expected[str(r["image_id"])], f"{r['image_id']} is not a complete file"
        assert r["metadata"]["study"] == lab.study  # type: ignore[index]
        Image.open(io.BytesIO(data)).load()
    if not stored:
        return
    store = configured_store(lab.settings.home, lab.env)
    assert store is not None
    kept = {i.image_id: i for i in store.images()}
    assert set(kept) == set(expected)
    for image_id, image in kept.items():
        assert store.read(image) == expected[image_id] and image.study == lab.study


def test_a_scanner_writing_slowly_with_the_watcher_killed_and_restarted(lab: Lab) -> None:
    written: list[bytes] = []
    scanner_done = threading.Event()

    def scanner() -> None:
        for i in range(7):
            data = image_bytes(i)
            write_slowly(lab.inputs / f"plate1_{i:02d}.png", data)
            written.append(data)
        scanner_done.set()

    watcher = lab.start_watcher()
    thread = threading.Thread(target=scanner)
    try:
        thread.start()
        # Kill it once it has published a few, while the scanner is mid-file.
        wait_for(
            lambda: (s := lab.status()) is not None and int(str(s["published_total"])) >= 2,
            120,
            "the first publications",
            lab.log,
        )
        watcher.send_signal(signal.SIGKILL)
        watcher.wait()
        time.sleep(1.0)  # the scanner goes on while no watcher runs
        watcher = lab.start_watcher()
        thread.join()
        assert scanner_done.is_set()
        # After the restart: more files, one rewritten in place with new content, and one
        # copy of an already published content under a new name.
        sub = lab.inputs / "plate2"
        sub.mkdir()
        for i in (7, 8):
            data = image_bytes(i)
            write_slowly(sub / f"plate2_{i:02d}.png", data)
            written.append(data)
        rewritten = image_bytes(100)
        write_slowly(lab.inputs / "plate1_00.png", rewritten)
        written.append(rewritten)
        (sub / "copy_of_01.png").write_bytes(written[1])
        # A scanner that writes a plate elsewhere and moves the whole folder in.
        staging = lab.inputs.parent / "staging" / "plate3"
        staging.mkdir(parents=True)
        moved = image_bytes(9)
        (staging / "plate3_09.png").write_bytes(moved)
        staging.rename(lab.inputs / "plate3")
        written.append(moved)
        wait_for(
            lambda: {r["image_id"] for r in lab.published()} >= {digest_id(d) for d in written},
            120,
            "every content on the topic",
            lab.log,
        )
        time.sleep(2 * SETTLE_S + 1)  # room for a duplicate to appear, if one were coming
    finally:
        thread.join()
        watcher.send_signal(signal.SIGTERM)
        watcher.wait(30)
    assert len(written) == 11
    assert_exactly_once(lab, written)
    assert lab.status() is not None and lab.status()["running"] is False  # type: ignore[index]


def test_a_batch_committed_before_the_crash_is_not_sent_again_and_an_open_one_is(
    lab: Lab,
) -> None:
    """The crash windows, made on purpose: a batch whose commit Kafka acknowledged but whose
    ledger update never happened, and a batch whose transaction was left open."""
    contents = [image_bytes(200 + i) for i in range(4)]
    paths = []
    for i, data in enumerate(contents):
        path = lab.inputs / f"f{i}.png"
        path.write_bytes(data)
        paths.append(path)
    state = state_dir(lab.settings, lab.inputs.resolve(), lab.topic, None)
    tid = f"phenocascade-watch-{state.name}"
    meta = ImageMeta(study=lab.study)

    def entry(i: int) -> tuple[str, str, str]:
        digest = hashlib.sha256(contents[i]).hexdigest()
        return content_id(digest), digest, str(paths[i])

    def record(i: int) -> dict[str, object]:
        return events.image_submitted(entry(i)[0], inline=contents[i], fmt="PNG", meta=meta)

    ledger = Ledger(state, lab.topic)
    publisher = TransactionalPublisher(lab.settings.kafka, lab.topic, tid)
    publisher.connect()
    ledger.add_pending([entry(0), entry(1)], time.time())
    publisher.send([record(0), record(1)])  # committed; the crash comes before mark_published
    publisher.close()
    ledger.add_pending([entry(2)], time.time())
    ledger.close()
    # The crashed process's last transaction, written but never committed.
    orphan = transactional_producer(lab.settings.kafka, tid)
    orphan.begin_transaction()
    orphan.produce(
        lab.topic, key=entry(2)[0].encode(), value=EventCodec().encode("ImageSubmitted", record(2))
    )
    assert orphan.flush(10) == 0

    ledger = Ledger(state, lab.topic)
    config = WatchConfig(folder=lab.inputs.resolve(), meta=meta, settle_s=0.5, inline=True)
    publisher = TransactionalPublisher(lab.settings.kafka, lab.topic, tid)
    watcher = FolderWatcher(config, publisher, ledger, state / "status.json")
    stop = threading.Event()
    runner = threading.Thread(target=watcher.run, args=(stop,))
    runner.start()
    try:
        wait_for(lambda: len(lab.published()) >= 4, 60, "4 contents on the topic", str)
        time.sleep(2.0)  # room for a duplicate to appear, if one were coming
    finally:
        stop.set()
        runner.join(30)
        ledger.close()
        del orphan
    assert watcher.counts.published == 2, "only f2 (aborted) and f3 (new) are sent again"
    # The crashed process is this test, which kept nothing; the watcher ran without a store.
    assert_exactly_once(lab, contents, stored=False)


def test_a_broker_outage_fills_the_bounded_queue_then_everything_goes_once(lab: Lab) -> None:
    written = [image_bytes(300 + i) for i in range(5)]
    for i, data in enumerate(written):
        (lab.inputs / f"o{i}.png").write_bytes(data)
    away = {**lab.env, "PHENOCASCADE_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    watcher = lab.start_watcher("--queue-max", "2", "--kafka-timeout-s", "2", env=away)
    try:
        wait_for(
            lambda: (s := lab.status()) is not None and s["accepting"] is False,
            120,
            "a full backlog",
            lab.log,
        )
        status = lab.status()
        assert status is not None
        assert status["queued"] == 2 and str(status["kafka"]).startswith("down")
        shown = subprocess.run(
            [sys.executable, "-m", "phenocascade", "watch", str(lab.inputs), "--status"],
            env=lab.env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["queued"] == 2
        assert "backlog full" in lab.log()
    finally:
        watcher.send_signal(signal.SIGTERM)
        watcher.wait(30)
    assert lab.published() == []
    # Kafka is back: the files left on disk go out, each once.
    watcher = lab.start_watcher("--queue-max", "2")
    try:
        wait_for(lambda: len(lab.published()) >= 5, 120, "5 published", lab.log)
        time.sleep(2 * SETTLE_S)
    finally:
        watcher.send_signal(signal.SIGTERM)
        watcher.wait(30)
    assert_exactly_once(lab, written)


def slide_bytes(path: Path, seed: int, channels: int = 0) -> bytes:
    """A 3000 x 3000 pyramidal OME-TIFF (level 1 in a SubIFD), distinct per seed.

    With ``channels``, a multichannel one, which cannot be tiled.
    """
    grey = np.full((3_000, 3_000), 40, np.uint8)
    grey[:64, :64] = np.random.default_rng(seed).integers(0, 256, (64, 64), dtype=np.uint8)
    plane = np.stack([grey] * channels) if channels else grey
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(plane, tile=(256, 256), compression="zlib", subifds=1)
        tif.write(plane[..., ::2, ::2], tile=(256, 256), compression="zlib", subfiletype=1)
    data = path.read_bytes()
    path.unlink()
    return data


def restarted_midway(
    lab: Lab,
    tiling: tuple[str, ...],
    first: Callable[[], None],
    writer: threading.Thread,
    second_id: str,
) -> None:
    """Run a watcher through ``first`` (the scanner's first slide, waited for), kill it with
    SIGKILL, let ``writer`` write a second slide while no watcher runs, start it again and
    return once ``second_id`` is on the topic and a duplicate had time to follow."""
    watcher = lab.start_watcher(*tiling)
    try:
        first()
        writer.start()
        watcher.send_signal(signal.SIGKILL)
        watcher.wait()
        writer.join()
        watcher = lab.start_watcher(*tiling)
        wait_for(lambda: second_id in {k for k, _ in lab.keyed()}, 120, "the second slide", lab.log)
        time.sleep(2 * SETTLE_S + 1)  # room for a duplicate to appear, if one were coming
    finally:
        if writer.ident is not None:
            writer.join()
        watcher.send_signal(signal.SIGTERM)
        watcher.wait(30)


def test_slides_are_published_as_tiles_once_across_a_restart(lab: Lab) -> None:
    # Level 1 of the slides is 1500 x 1500: tiles of 512 with 64 of overlap, 4 x 4.
    tiling = ("--tile-size", "512", "--tile-overlap", "64", "--level", "1")
    staging = lab.inputs.parent / "staging"
    staging.mkdir()
    slides = [slide_bytes(staging / f"s{i}.ome.tif", seed=i) for i in range(2)]
    unusable = slide_bytes(staging / "multichannel.ome.tif", seed=9, channels=2)
    png = image_bytes(400)

    def first() -> None:
        write_slowly(lab.inputs / "s0.ome.tif", slides[0])
        (lab.inputs / "plate.png").write_bytes(png)
        (lab.inputs / "multichannel.ome.tif").write_bytes(unusable)
        wait_for(
            lambda: (s := lab.status()) is not None and int(str(s["published_total"])) >= 2,
            120,
            "the first slide and the image",
            lab.log,
        )

    writer = threading.Thread(target=write_slowly, args=(lab.inputs / "s1.ome.tif", slides[1]))
    restarted_midway(lab, tiling, first, writer, digest_id(slides[1]))

    keyed = lab.keyed()
    tiles = Counter((key, r["tile"]["index"]) for key, r in keyed if r["tile"])
    assert {k: n for k, n in tiles.items() if n != 1} == {}, "a tile published twice"
    for data, name in zip(slides, ("s0", "s1"), strict=True):
        slide_id = digest_id(data)
        mine = [r for key, r in keyed if key == slide_id]
        # Keyed by the slide's content id, by path (not inline), 16 tiles of level 1.
        assert sorted(r["tile"]["index"] for r in mine) == list(range(16))
        assert {r["image_id"] for r in mine} == {f"{slide_id}#tile-{i}" for i in range(16)}
        assert {(r["uri"], r["inline"]) for r in mine} == {
            (str(lab.inputs / f"{name}.ome.tif"), None)
        }
        assert {(r["tile"]["level"], r["tile"]["width"]) for r in mine} == {(1, 512)}
    whole = [r for key, r in keyed if not r["tile"]]
    assert [r["image_id"] for r in whole] == [digest_id(png)] and whole[0]["inline"] == png
    assert digest_id(unusable) not in {key for key, _ in keyed}
    assert "cannot be tiled as a slide" in lab.log() and "save each channel" in lab.log()
    store = configured_store(lab.settings.home, lab.env)
    assert store is not None
    kept = {i.image_id: i for i in store.images()}
    for data in slides:
        assert kept[digest_id(data)].tiling == {"size": 512, "overlap": 64, "level": 1}
        assert store.read(kept[digest_id(data)]) == data


def zarr_slide(path: Path, seed: int) -> str:
    """A 2048 x 2048 OME-Zarr slide (Zarr v3, levels 2 and 4 times smaller), distinct per
    seed, at ``path``; return its content id."""
    grey = np.full((2_048, 2_048), 40, np.uint8)
    grey[:64, :64] = np.random.default_rng(seed).integers(0, 256, (64, 64), dtype=np.uint8)
    write_ome_zarr(path, grey, "yx", version="0.5")
    return content_id(content_digest(path))


def copy_slowly(source: Path, dest: Path, batches: int = 4) -> None:
    """Copy a folder as a scanner writes one: its files in batches, with pauses between."""
    files = sorted(p for p in source.rglob("*") if p.is_file())
    step = -(-len(files) // batches)
    for start in range(0, len(files), step):
        for f in files[start : start + step]:
            (dest / f.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest / f.relative_to(source))
        time.sleep(CHUNK_PAUSE_S)


def test_zarr_folders_are_published_as_tiles_once_across_a_restart(lab: Lab) -> None:
    # Level 1 of the slides is 1024 x 1024: tiles of 512 with 64 of overlap.
    tiling = ("--tile-size", "512", "--tile-overlap", "64", "--level", "1")
    staging = lab.inputs.parent / "staging"
    ids = [zarr_slide(staging / f"z{i}.ome.zarr", seed=i) for i in range(2)]

    def first() -> None:
        copy_slowly(staging / "z0.ome.zarr", lab.inputs / "z0.ome.zarr")
        wait_for(lambda: ids[0] in {k for k, _ in lab.keyed()}, 120, "the first slide", lab.log)

    writer = threading.Thread(
        target=copy_slowly, args=(staging / "z1.ome.zarr", lab.inputs / "run2" / "z1.ome.zarr")
    )
    restarted_midway(lab, tiling, first, writer, ids[1])

    keyed = lab.keyed()
    assert {key for key, _ in keyed} == set(ids), lab.log()
    tiles = Counter((key, r["tile"]["index"]) for key, r in keyed)
    assert {k: n for k, n in tiles.items() if n != 1} == {}, "a tile published twice"
    store = configured_store(lab.settings.home, lab.env)
    assert store is not None
    kept = {i.image_id: i for i in store.images()}
    for slide_id, folder in zip(
        ids, (lab.inputs / "z0.ome.zarr", lab.inputs / "run2" / "z1.ome.zarr"), strict=True
    ):
        mine = [r for key, r in keyed if key == slide_id]
        count = mine[0]["tile"]["count"]
        assert count == 9 and sorted(r["tile"]["index"] for r in mine) == list(range(count))
        assert {(r["uri"], r["inline"], r["format"]) for r in mine} == {
            (str(folder), None, "UNKNOWN")
        }
        # Kept in the image store with its tiling, a copy of the whole folder.
        assert kept[slide_id].tiling == {"size": 512, "overlap": 64, "level": 1}
        copy = store.local_path(kept[slide_id])
        assert copy is not None and content_id(content_digest(copy)) == slide_id
    assert "not published" not in lab.log()
