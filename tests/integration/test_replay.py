"""Replay after a promotion on the real Kafka and Cassandra: old and new outputs both kept,
and ``diff`` lists exactly the images the new model changed; with re-scoring on
promotion, exactly the images no expert has answered are re-scored by themselves.

The three tier workers run in this process on stand-in models whose answers depend only
on an image's grey level (and, for the detector, on its version), so which images a
promotion changes is known in advance; the joiner is a real ``phenocascade joiner``
process. Images are submitted with ``submit_paths`` into the image store, the detector is
promoted as the retrainer does (``CHAMPION``, then ``ModelPromoted``), and ``replay`` and
``diff`` run as commands.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import tifffile
import yaml
from cassandra.cluster import Session
from harness import TEST_KEYSPACE, read_events, settings_env
from ome_zarr_images import write_ome_zarr
from PIL import Image

import phenocascade.cli.replay as replay_cli
from phenocascade.cli import main
from phenocascade.cli.cascade import start_process, stop_cascade, submit_paths
from phenocascade.config import Settings, Topology, load_topology
from phenocascade.consumers.annotation_sink import AnnotationSink
from phenocascade.consumers.rescorer import Rescorer
from phenocascade.consumers.worker import TierWorker
from phenocascade.domain import Box, DecodedImage, ImageMeta, LabelThresholds, StageKind
from phenocascade.domain import StageOutput as Output
from phenocascade.errors import ArtifactError, ConflictError
from phenocascade.models.base import Stage
from phenocascade.store.annotations import claim_task, complete_task, get_task
from phenocascade.store.cassandra import all_outputs, connect, versions_key
from phenocascade.store.images import configured_store
from phenocascade.streams import events
from phenocascade.streams.kafka import create_topics, plain_producer
from phenocascade.streams.serde import EventCodec
from phenocascade.streams.tiling import Tiling

pytestmark = [pytest.mark.integration]

V1 = "20261201T000000-0001"
V2 = "20261201T000000-0002"
CONFIDENT = LabelThresholds(positive=0.9, negative=0.3)
# Grey levels of the images: 10 is unusable; the promoted detector loses the box of 80
# and is unsure of the one of 200 (it goes to an expert); the others it sees as before.
LEVELS = (10, 40, 80, 160, 200, 240)
CHANGED = {80: ["boxes"], 200: ["route"]}
# Levels whose giant each detector version is unsure of (it asks an expert).
UNSURE = {V1: {50, 55, 60, 70}, V2: {60, 200}}


class StandIn:
    """A stage whose answer depends on the image's grey level and its own version."""

    model_name = "stand-in"
    gate_label = "clear"

    def __init__(self, kind: StageKind, label: str, version: str) -> None:
        self.kind = kind
        self.classes = (label,)
        self.version = version
        self.thresholds = {label: CONFIDENT}

    def predict(self, images: Sequence[DecodedImage]) -> list[Output]:
        return [self._one(round(float(np.mean(img.pixels)))) for img in images]

    def _one(self, level: int) -> Output:
        label = self.classes[0]
        if self.kind is StageKind.GATE:
            return Output(scores={label: 0.01 if level < 20 else 0.99})
        if self.kind is StageKind.CLASSIFIER:
            return Output(scores={label: 0.95 if level > 128 else 0.05})
        score = 0.5 if level in UNSURE[self.version] else 0.95
        boxes = () if (self.version == V2 and level == 80) else (Box(2, 2, 12, 12, label, score),)
        return Output(scores={label: max([b.score for b in boxes], default=1e-6)}, boxes=boxes)


_KINDS = {
    "quality": (StageKind.GATE, "clear"),
    "majority": (StageKind.CLASSIFIER, "bright"),
    "minority": (StageKind.DETECTOR, "giant"),
}


@dataclass
class Lab:
    settings: Settings
    topology: Topology
    session: Session
    workers: dict[str, TierWorker]
    study: str
    root: Path
    # Versions the next load refuses once, as a broken artifact would be refused.
    refuse_once: set[str] = field(default_factory=set)


def _wait(what: str, timeout_s: float, found: Callable[[], bool], lab: Lab) -> None:
    deadline = time.monotonic() + timeout_s
    while not found():
        if time.monotonic() > deadline:
            logs = "\n".join(
                p.read_text(errors="replace")[-3000:] for p in (lab.root / "logs").glob("*.log")
            )
            raise AssertionError(f"timed out waiting for {what}\n{logs}")
        time.sleep(1.0)


@pytest.fixture
def lab(infra: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    data = load_topology().namespaced(f"rp{uuid.uuid4().hex[:8]}-").model_dump()
    for tier in data["tiers"]:
        tier.update(replicas=1, threads=None)
    topology = Topology.model_validate(data)
    topo_file = tmp_path / "topology.yaml"
    topo_file.write_text(yaml.safe_dump(topology.model_dump()))
    scans = tmp_path / "scans"
    scans.mkdir()
    settings = infra.model_copy(
        update={
            "topology": topo_file,
            "home": tmp_path / "home",
            "artifacts": tmp_path / "artifacts",
            "allowed_roots": [scans],
            "cassandra": infra.cassandra.model_copy(update={"keyspace": TEST_KEYSPACE}),
        }
    )
    monkeypatch.delenv("PHENOCASCADE_IMAGE_STORE", raising=False)
    monkeypatch.setattr(replay_cli, "get_settings", lambda: settings)
    create_topics(settings.kafka, topology)
    session = connect(settings.cassandra)
    for tier, version in (("quality", V1), ("majority", V1), ("minority", V1)):
        (settings.artifacts / tier).mkdir(parents=True)
        (settings.artifacts / tier / "CHAMPION").write_text(version)

    refuse_once: set[str] = set()

    def loader(name: str) -> Callable[[str | None], Stage]:
        kind, label = _KINDS[name]

        def load(version: str | None) -> Stage:
            if version in refuse_once:
                refuse_once.discard(version)
                raise ArtifactError(f"{name} {version} does not load (on purpose)")
            return cast(Stage, StandIn(kind, label, version or V1))

        return load

    stop = threading.Event()
    workers = {
        t.name: TierWorker(
            settings=settings, topology=topology, tier=t, instance="0", stage_loader=loader(t.name)
        )
        for t in topology.tiers
    }
    threads = [threading.Thread(target=w.run, args=(stop,), daemon=True) for w in workers.values()]
    for thread in threads:
        thread.start()
    joiner = start_process(
        "joiner", ["joiner", "--metrics-port", "0"], tmp_path / "logs", settings_env(settings)
    )
    try:
        study = f"replay-{uuid.uuid4().hex[:8]}"
        yield Lab(settings, topology, session, workers, study, tmp_path, refuse_once)
    finally:
        stop.set()
        stop_cascade({"joiner": joiner})
        for thread in threads:
            thread.join(30)


def _image(path: Path, level: int) -> Path:
    Image.fromarray(np.full((24, 32), level, np.uint8)).save(path)
    return path


def _outputs(lab: Lab) -> dict[str, dict[str, dict[str, Any]]]:
    """``{image id: {versions key (with the experts): output}}`` of the study, from Cassandra."""
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for o in all_outputs(session=lab.session, study=lab.study):
        key = versions_key(o["model_versions"], o["annotators"])
        found.setdefault(o["image_id"], {})[key] = o
    return found


def _promote_detector(lab: Lab) -> None:
    """Promote the detector to V2 as the retrainer does: the champion, then the event."""
    (lab.settings.artifacts / "minority" / "CHAMPION").write_text(V2)
    producer = plain_producer(lab.settings.kafka)
    promoted = {"tier": "minority", "version": V2, "parent_version": V1, "metrics": {}}
    producer.produce(
        lab.topology.models_topic,
        key=b"minority",
        value=EventCodec().encode("ModelPromoted", {**promoted, "promoted_at": 0}),
    )
    assert producer.flush(30) == 0


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_replay_after_a_promotion_keeps_both_outputs_and_diff_lists_the_changed(
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    scans = lab.settings.allowed_roots[0]
    store = configured_store(lab.settings.home)
    meta = ImageMeta(study=lab.study)
    paths = [_image(scans / f"level{level:03d}.png", level) for level in LEVELS]
    ids = submit_paths(
        lab.settings, lab.topology, paths[:-1], meta=meta, progress=False, store=store
    )
    ids += submit_paths(
        lab.settings, lab.topology, paths[-1:], meta=meta, inline=True, progress=False, store=store
    )
    level_of = dict(zip(ids, LEVELS, strict=True))
    skipped = ids[0]
    old = {"quality": V1, "majority": V1, "minority": V1}
    new = {**old, "minority": V2}
    _wait("the first outputs", 90, lambda: len(_outputs(lab)) == len(ids), lab)
    first = _outputs(lab)
    assert set(first[skipped]) == {f"quality={V1}"}
    assert all(set(first[i]) == {versions_key(old)} for i in ids[1:])

    _promote_detector(lab)
    minority = lab.workers["minority"]
    _wait("the detector's swap", 60, lambda: minority.stats.swaps == [V2], lab)

    said = " ".join(_cli(capsys, "replay", "--study", lab.study, "--tiers", "minority").split())
    assert "replayed 5 images" in said and "(1 inline, 4 path)" in said, said
    assert "1 already scored by the champions of minority" in said, said

    def replayed() -> bool:
        now = _outputs(lab)
        return all(versions_key(new) in now[i] for i in ids[1:])

    _wait("the replayed outputs", 90, replayed, lab)
    second = _outputs(lab)
    assert set(second[skipped]) == {f"quality={V1}"}
    for image_id in ids[1:]:
        assert set(second[image_id]) == {versions_key(old), versions_key(new)}
        # The old output is kept as it was.
        assert second[image_id][versions_key(old)] == first[image_id][versions_key(old)]
    inline_output = second[ids[-1]][versions_key(new)]
    assert inline_output["uri"] is None and inline_output["labels"] == {"bright": 0.95}

    report = json.loads(
        _cli(
            capsys,
            "diff",
            "--from",
            versions_key(old),
            "--to",
            versions_key(new),
            "--study",
            lab.study,
            "--json",
        )
    )
    changed = {c["image_id"]: c["changed"] for c in report["changed"]}
    assert changed == {i: CHANGED[level_of[i]] for i in ids if level_of[i] in CHANGED}
    assert report["compared"] == len(ids) and report["unchanged"] == len(ids) - 2
    assert report["only_from"] == [] and report["only_to"] == []
    by_id = {c["image_id"]: c for c in report["changed"]}
    unsure = next(i for i in ids if level_of[i] == 200)
    assert by_id[unsure]["routes"] == {"minority": ["PASS", "ANNOTATE"]}
    assert by_id[unsure]["status"] == ["analyzed", "awaiting_annotation"]
    lost = next(i for i in ids if level_of[i] == 80)
    assert [b["label"] for b in by_id[lost]["boxes"]["removed"]] == ["giant"]


def _slide(path: Path, grey: np.ndarray) -> Path:
    """A pyramidal OME-TIFF of ``grey``, its level 1 (half as large) in a SubIFD."""
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(grey, tile=(256, 256), compression="zlib", subifds=1)
        tif.write(grey[::2, ::2], tile=(256, 256), compression="zlib", subfiletype=1)
    return path


def _zarr_slide(path: Path, grey: np.ndarray) -> Path:
    """An OME-Zarr (0.5, Zarr v3) image of ``grey``, its levels 2 and 4 times smaller."""
    return write_ome_zarr(path, grey, "yx", version="0.5")


def _bytes_of(path: Path) -> int:
    """The size of a file, or of a folder's files."""
    files = path.rglob("*") if path.is_dir() else [path]
    return sum(f.stat().st_size for f in files if f.is_file())


def _remove(path: Path) -> None:
    """Delete a slide from the scanner's folder: a file, or an OME-Zarr folder."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


# Each slide test runs on a pyramidal OME-TIFF and on an OME-Zarr folder.
SLIDES = pytest.mark.parametrize(
    ("name", "write"),
    [("slide.ome.tif", _slide), ("slide.ome.zarr", _zarr_slide)],
    ids=["ome-tiff", "ome-zarr"],
)


@SLIDES
def test_a_slide_is_replayed_from_its_stored_copy_into_one_new_output(
    lab: Lab,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    write: Callable[[Path, np.ndarray], Path],
) -> None:
    scans = lab.settings.allowed_roots[0]
    # A local store under the allowed roots: the workers read replayed tiles from it.
    monkeypatch.setenv("PHENOCASCADE_IMAGE_STORE", str(scans / "store"))
    store = configured_store(lab.settings.home)
    assert store is not None
    # 3000 x 3000 of grey 80, whose boxes the new detector loses.
    path = write(scans / name, np.full((3_000, 3_000), 80, np.uint8))
    tiling = Tiling(size=1024, overlap=128, level=1)  # level 1 is 1500 x 1500: 2 x 2 tiles
    [slide_id] = submit_paths(
        lab.settings, lab.topology, [path], meta=ImageMeta(study=lab.study), progress=False,
        store=store, tiling=tiling,
    )  # fmt: skip
    [kept] = store.images()
    assert kept.image_id == slide_id and kept.uri == str(path)
    assert kept.tiling == {"size": 1024, "overlap": 128, "level": 1}
    assert kept.size == _bytes_of(path)
    old = {"quality": V1, "majority": V1, "minority": V1}
    new = {**old, "minority": V2}
    _wait("the slide's output", 90, lambda: slide_id in _outputs(lab), lab)
    first = _outputs(lab)[slide_id]
    assert set(first) == {versions_key(old)} and len(first[versions_key(old)]["boxes"]) == 4

    _remove(path)  # gone from the scanner's folder: replay must read the stored copy
    _promote_detector(lab)
    minority = lab.workers["minority"]
    _wait("the detector's swap", 60, lambda: minority.stats.swaps == [V2], lab)
    said = " ".join(_cli(capsys, "replay", "--study", lab.study, "--tiers", "minority").split())
    assert "replayed 1 images" in said and "(1 store)" in said, said
    _wait("the re-scored slide", 90, lambda: versions_key(new) in _outputs(lab)[slide_id], lab)
    # Replayed again with the same models: the tiles' outputs are as before, no output.
    said = " ".join(_cli(capsys, "replay", "--images", str(_ids_file(lab, slide_id))).split())
    assert "replayed 1 images" in said, said
    time.sleep(8.0)  # room for a stray output, tile by tile, if one were coming

    second = _outputs(lab)[slide_id]
    assert set(second) == {versions_key(old), versions_key(new)}
    assert second[versions_key(old)] == first[versions_key(old)]
    rescored = second[versions_key(new)]
    assert rescored["boxes"] == [] and rescored["status"] == "analyzed"
    stored_copy = Path(rescored["uri"])  # its tiles were read from the store
    assert stored_copy.name == kept.sha256 and stored_copy.is_relative_to(scans / "store")
    published = read_events(lab.settings, lab.topology.joiner.results_topic, "ImageOutput")
    # One output per slide and versions: none for a tile, none half re-scored.
    assert [o["model_versions"]["minority"] for o in published] == [V1, V2]
    assert {o["image_id"] for o in published} == {slide_id}


@SLIDES
def test_a_promotion_rescores_a_slide_whose_tiles_await_an_expert(
    lab: Lab, monkeypatch: pytest.MonkeyPatch, name: str, write: Callable[[Path, np.ndarray], Path]
) -> None:
    """A slide whose top half is grey 55 and bottom half 60, in four tiles: the old detector
    asks about all four; the new one decides the top two (their tasks are withdrawn) and
    asks about the bottom two (their tasks are renewed). The slide is re-scored whole, from
    its stored copy (its own file is gone by then), into one new output."""
    scans = lab.settings.allowed_roots[0]
    monkeypatch.setenv("PHENOCASCADE_IMAGE_STORE", str(scans / "store"))
    grey = np.full((3_000, 3_000), 55, np.uint8)
    grey[1_500:] = 60
    path = write(scans / name, grey)
    with _rescoring(lab) as rescorer:
        [slide_id] = submit_paths(
            lab.settings, lab.topology, [path], meta=ImageMeta(study=lab.study), progress=False,
            store=configured_store(lab.settings.home), tiling=Tiling(size=750, overlap=0, level=1),
        )  # fmt: skip
        tiles = [f"{slide_id}#tile-{i}" for i in range(4)]  # top left, top right, bottom...
        _wait("the slide's output", 90, lambda: slide_id in _outputs(lab), lab)
        _wait("the tiles' tasks", 60, lambda: all(_task(lab, t) for t in tiles), lab)
        _remove(path)
        _promote_detector(lab)
        _wait("the rescorer's work", 120, lambda: len(rescorer.done) == 1, lab)

        def renewed() -> bool:
            return all((_task(lab, t) or {}).get("model_version") == V2 for t in tiles[2:])

        _wait("the renewed tasks", 60, renewed, lab)

    job = rescorer.done[0]
    # Other tests' unanswered tasks are of images not in this store: left out.
    assert set(job.sent) == set(tiles) and job.unfinished == []
    assert sorted(job.superseded) == tiles[:2] and sorted(job.asked) == tiles[2:]
    old = versions_key({"quality": V1, "majority": V1, "minority": V1})
    new = versions_key({"quality": V1, "majority": V1, "minority": V2})
    outputs = _outputs(lab)[slide_id]
    assert set(outputs) == {old, new}
    assert outputs[new]["status"] == "awaiting_annotation"
    assert outputs[new]["routes"]["minority"] == "ANNOTATE"
    assert Path(outputs[new]["uri"]).is_relative_to(scans / "store")  # read from the copy
    published = read_events(lab.settings, lab.topology.joiner.results_topic, "ImageOutput")
    assert [o["model_versions"]["minority"] for o in published] == [V1, V2]
    status = {t: cast(dict[str, Any], _task(lab, t)) for t in tiles}
    assert [status[t]["status"] for t in tiles] == ["superseded", "superseded", "open", "open"]
    assert {status[t]["superseded_by"] for t in tiles[:2]} == {V2}


def _ids_file(lab: Lab, *ids: str) -> Path:
    path = lab.root / "ids.txt"
    path.write_text("".join(f"{i}\n" for i in ids))
    return path


def _answer(lab: Lab, image_id: str, expert: str) -> None:
    """Answer the detector's task of an image as the annotation app does."""
    task = claim_task(session=lab.session, image_id=image_id, tier="minority", user=expert)
    assert task is not None
    annotation = {
        "annotation_id": uuid.uuid4().hex,
        "image_id": image_id,
        "tier": "minority",
        "annotator": expert,
        "labels": ["giant"],
        "boxes": [events.box_record(Box(2, 2, 12, 12, "giant", 1.0))],
        "uri": task["uri"],
        "model_version": task["model_version"],
        "created_at": events.now_ms(),
    }
    producer = plain_producer(lab.settings.kafka)
    producer.produce(
        lab.topology.annotations_topic,
        key=image_id.encode(),
        value=EventCodec().encode("Annotation", annotation),
    )
    assert producer.flush(30) == 0
    complete_task(
        session=lab.session,
        image_id=image_id,
        tier="minority",
        user=expert,
        annotation_id=annotation["annotation_id"],
    )


@contextmanager
def _rescoring(lab: Lab) -> Iterator[Rescorer]:
    """Run the annotation sink and a rescorer (following each promotion for 90 s) meanwhile."""
    stop = threading.Event()
    sink = AnnotationSink(settings=lab.settings, topology=lab.topology, session=lab.session)
    rescorer = Rescorer(
        settings=lab.settings,
        topology=lab.topology,
        store=configured_store(lab.settings.home),
        session=lab.session,
        wait_s=90,
        resend_s=3,
        poll_s=0.5,
    )
    threads = [
        threading.Thread(target=sink.run, args=(stop,), daemon=True),
        threading.Thread(target=rescorer.run, args=(stop,), daemon=True),
    ]
    for thread in threads:
        thread.start()
    try:
        assert rescorer.positioned.wait(60)
        yield rescorer
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)


def _submit_levels(lab: Lab, levels: Sequence[int]) -> dict[int, str]:
    """Submit one image per grey level into the image store; ``{level: image id}``."""
    scans = lab.settings.allowed_roots[0]
    paths = [_image(scans / f"level{level:03d}.png", level) for level in levels]
    ids = submit_paths(
        lab.settings,
        lab.topology,
        paths,
        meta=ImageMeta(study=lab.study),
        progress=False,
        store=configured_store(lab.settings.home),
    )
    return dict(zip(levels, ids, strict=True))


def _task(lab: Lab, image_id: str) -> dict[str, Any] | None:
    return get_task(session=lab.session, image_id=image_id, tier="minority")


def test_a_promotion_rescores_exactly_the_images_no_expert_answered(lab: Lab) -> None:
    """Levels: 40 the old detector decided; 50, 55, 60 and 70 it asked about. An expert
    answered 70 and another holds a claim on 55. The new detector decides 50 and 55 and is
    unsure of 60: 50's task is withdrawn, 55's stays with its expert, 60's stays open with
    the new detector's question."""
    with _rescoring(lab) as rescorer:
        by_level = _submit_levels(lab, (40, 50, 55, 60, 70))
        ids = list(by_level.values())

        def task(level: int) -> dict[str, Any] | None:
            return _task(lab, by_level[level])

        _wait("the first outputs", 90, lambda: len(_outputs(lab)) == len(ids), lab)
        _wait("the detector's tasks", 60, lambda: all(task(lv) for lv in (50, 55, 60, 70)), lab)
        assert task(40) is None
        _answer(lab, by_level[70], "ann")
        claim_task(session=lab.session, image_id=by_level[55], tier="minority", user="bob")
        old = versions_key({"quality": V1, "majority": V1, "minority": V1})
        new = versions_key({"quality": V1, "majority": V1, "minority": V2})
        answered = versions_key(
            {"quality": V1, "majority": V1, "minority": V1}, {"minority": "ann"}
        )
        _wait("the expert's output", 60, lambda: answered in _outputs(lab)[by_level[70]], lab)
        first = _outputs(lab)

        _promote_detector(lab)
        _wait("the rescorer's work", 120, lambda: len(rescorer.done) == 1, lab)
        # The new detector asks about 60 too: its request renews the open task.
        _wait("the renewed task", 60, lambda: (task(60) or {})["model_version"] == V2, lab)

    job = rescorer.done[0]
    assert (job.tier_artifact, job.version) == ("minority", V2)
    assert set(job.sent) == {by_level[level] for level in (50, 55, 60)}
    assert job.superseded == [by_level[50]] and job.asked == [by_level[60]]
    # Unanswered tasks other tests left in the keyspace are of images not in this store.
    assert not set(job.left_out) & set(ids) and job.unfinished == []

    now = _outputs(lab)
    for level, image_id in by_level.items():
        expected = {old, new} if level in (50, 55, 60) else set(first[image_id])
        assert set(now[image_id]) == expected, level
        # Old outputs are kept as they were.
        assert all(now[image_id][key] == first[image_id][key] for key in first[image_id])
    assert set(first[by_level[70]]) == {old, answered}
    assert now[by_level[50]][new]["status"] == "analyzed"
    assert now[by_level[60]][new]["routes"]["minority"] == "ANNOTATE"

    status = {level: cast(dict[str, Any], task(level)) for level in (50, 55, 60, 70)}
    assert status[50]["status"] == "superseded" and status[50]["superseded_by"] == V2
    assert status[55]["status"] == "claimed" and status[55]["claimed_by"] == "bob"
    assert status[60]["status"] == "open" and status[60]["scores"] == {"giant": 0.5}
    assert status[70]["status"] == "done" and status[70]["completed_by"] == "ann"
    with pytest.raises(ConflictError, match=f"withdrawn: model {V2} now decides"):
        claim_task(session=lab.session, image_id=by_level[50], tier="minority", user="ann")


def test_images_a_worker_scored_before_it_swapped_models_are_sent_again(lab: Lab) -> None:
    """The detector's worker refuses the promotion at first and scores the re-sent image
    with the old model (no new output); once the promotion is announced again and applied,
    the rescorer's next sending settles it."""
    with _rescoring(lab) as rescorer:
        image_id = _submit_levels(lab, (50,))[50]
        _wait("the detector's task", 90, lambda: _task(lab, image_id) is not None, lab)
        # The joiner is its own process: on a loaded machine its first output can come
        # well after the detector's task.
        _wait("the first output", 90, lambda: image_id in _outputs(lab), lab)
        minority = lab.workers["minority"]
        lab.refuse_once.add(V2)
        _promote_detector(lab)
        # The first image, then at least two sendings scored by the old model.
        _wait("the old model's re-scoring", 60, lambda: minority.stats.images >= 3, lab)
        assert minority.stats.swaps == [] and len(_outputs(lab)[image_id]) == 1
        assert rescorer.done == []
        _promote_detector(lab)  # as a restarted retrainer announces its champion again
        _wait("both promotions handled", 120, lambda: len(rescorer.done) == 2, lab)
    assert minority.stats.swaps == [V2]
    job, again = rescorer.done
    assert job.sent == {image_id: "minority"} and job.superseded == [image_id]
    assert job.unfinished == [] and again.sent == {}
    new = versions_key({"quality": V1, "majority": V1, "minority": V2})
    assert _outputs(lab)[image_id][new]["status"] == "analyzed"
    assert (_task(lab, image_id) or {})["status"] == "superseded"
