"""The cascade end to end on the real local Kafka and Cassandra: real images, real models,
real processes. No mocks."""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
from harness import Cascade
from PIL import Image

from phenocascade.cli.cascade import build_report
from phenocascade.cli.demo import sample_images
from phenocascade.config import Settings
from phenocascade.models.base import load_stage
from phenocascade.models.thresholds import binomial_cdf
from phenocascade.recipes import ensure_bootstrap
from phenocascade.recipes.bundled_data import majority_set, rare_set
from phenocascade.store.cassandra import connect, get_outputs
from phenocascade.streams import events
from phenocascade.streams.serde import MAGIC

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="session")
def trained(infra: Settings) -> Settings:
    """The infra settings, with bootstrap models trained (once) if missing."""
    ensure_bootstrap(infra)
    return infra


@pytest.fixture(scope="module")
def cascade(trained: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cascade]:
    c = Cascade(trained, tmp_path_factory.mktemp("cascade"))
    c.start()
    yield c
    c.stop()


def test_real_test_split_images_each_give_exactly_one_output(cascade: Cascade) -> None:
    # The whole DSB test split: the bootstrap models of a fresh 2-core machine (2026-12)
    # decide every label of about 1 in 100 DSB test images at 0.95, none of the first 30.
    images = sample_images(cascade.settings, dsb=132, bccd=15, bbbc006_unclear=15, bbbc006_clear=0)
    assert len(images) == 162
    ids = cascade.submit(images, prefix="real-")
    counts = cascade.wait_until_done(ids, timeout_s=600)
    assert sorted(counts) == sorted(ids), cascade.log_tail()
    assert set(counts.values()) == {1}, {k: v for k, v in counts.items() if v != 1}

    outputs = {o["image_id"]: o for o in cascade.outputs() if o["image_id"] in set(ids)}
    defocused = [i for i, p in zip(ids, images, strict=True) if "unclear_z00" in str(p)]
    assert len(defocused) == 15
    for image_id in defocused:
        assert outputs[image_id]["status"] in {"unusable", "awaiting_annotation"}, outputs[image_id]
    for output in outputs.values():
        assert set(output["model_versions"]) >= {"quality"}
        for box in output["boxes"]:
            assert 0 <= box["x_min"] < box["x_max"] and 0 <= box["y_min"] < box["y_max"]

    session = connect(cascade.settings.cassandra)
    for image_id in ids:
        rows = get_outputs(session=session, image_id=image_id)
        assert len(rows) == 1 and rows[0]["status"] == outputs[image_id]["status"]

    # `phenocascade report --prefix`: this run's images, each in exactly one terminal state.
    report = build_report(cascade.settings, cascade.topology, prefix=cascade.prefix + "real-")
    assert report["submitted"] == 162 and report["balanced"], report
    assert report["dead_lettered"] == 0, report
    automatic = report["automatic"]
    assert automatic["images"] == report["analyzed"] + report["unusable"], report
    # The cascade does its job alone on some of them: labels and every class decided.
    analyzed = [o for o in outputs.values() if o["status"] == "analyzed"]
    assert analyzed and report["analyzed"] == len(analyzed), report
    for output in analyzed:
        assert output["labels"] and not output["pending"], output
        assert set(output["model_versions"]) == {"quality", "majority", "minority"}, output
    # The blood smears, a quarter of the study, make it drift at the majority tier.
    drifted = {(d["study"], d["tier"]) for d in report["drift"]["flagged"]}
    assert (cascade.prefix + "it", "majority") in drifted, report["drift"]

    # What the cascade decided alone is final, and right at about its stated precision.
    majority = load_stage(cascade.settings.artifacts, "majority")
    minority = load_stage(cascade.settings.artifacts, "minority")
    truth = {s.image_id: s for s in majority_set(cascade.settings, "test").samples}
    rare = {s.image_id: s for s in rare_set(cascade.settings, "test").samples}
    decided = wrong = 0
    smears_decided: list[str] = []
    for image_id, path in zip(ids, images, strict=True):
        output = outputs[image_id]
        pending = set(output["pending"])
        assert (output["status"] == "awaiting_annotation") == bool(pending), output
        final = [label for label in output["labels"] if label not in pending]
        if path.stem in truth and output["status"] != "unusable":
            for label in final:
                present = output["labels"][label] >= majority.thresholds[label].positive
                decided += 1
                wrong += present != (label in truth[path.stem].labels)
            for label, t in minority.thresholds.items():
                # The detector's class is decided when not pending: present with a
                # confident box, else certified absent from the image.
                if "minority" in output["model_versions"] and label not in pending:
                    said = any(
                        b["label"] == label and b["score"] >= t.positive for b in output["boxes"]
                    )
                    decided += 1
                    wrong += said != any(b.label == label for b in rare[path.stem].boxes)
        if "BloodImage" in path.name and set(final) & set(majority.classes):
            # Blood smears: a modality the majority classifier never saw. (The gate may pass
            # them: they are sharp, and stained fields were among its training images.)
            smears_decided.append(image_id)
    # The shift detector flagged all 60 BCCD test smears (docs/routing.md); one of these 15
    # slipping through would be a false negative of it, two a broken guard.
    assert len(smears_decided) <= 1, [outputs[i] for i in smears_decided]
    target = next(iter(majority.meta_.thresholds.values()))["target_precision"]
    # No more errors than a precision of the certified target explains (at the 1 % level).
    p_value = 1.0 - binomial_cdf(wrong - 1, decided, 1.0 - target)
    assert wrong == 0 or p_value > 0.01, (decided, wrong, target)


def _png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _tiff(arr: np.ndarray, **kw: str) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def test_every_bad_input_is_dead_lettered_with_its_reason_and_the_worker_goes_on(
    cascade: Cascade, tmp_path: Path
) -> None:
    real = sorted((cascade.settings.datasets / "dsb2018" / "images").glob("*.png"))[0].read_bytes()
    good = Image.open(io.BytesIO(real))
    files = {
        "zero": (b"", "corrupt_image"),
        "truncated": (real[: len(real) // 3], "corrupt_image"),
        "not-image": (b"GIF89a this is no microscopy image", "corrupt_image"),
        "bomb": (_png_claiming(200_000, 200_000), "decompression_bomb"),
        "float-dtype": (_tiff(np.zeros((64, 64), np.float32)), "unsupported_image"),
        "five-channels": (
            _tiff(np.zeros((64, 64, 5), np.uint8), photometric="minisblack", planarconfig="contig"),
            "unsupported_image",
        ),
    }
    expected: dict[str, str] = {}
    paths = []
    for name, (data, _kind) in files.items():
        path = cascade.roots / f"{name}.png"
        path.write_bytes(data)
        paths.append(path)
    ids = cascade.submit(paths, prefix="bad-")
    for image_id, name in zip(ids, files, strict=True):
        expected[image_id] = files[name][1]

    outside = tmp_path / "outside.png"
    good.save(outside)
    ids_outside = cascade.submit([outside], prefix="bad-")
    expected[ids_outside[0]] = "path_not_allowed"

    codec = cascade.codec
    cascade.produce_raw(cascade.prefix + "bad-garbage-message", b"\x00\x01 not avro at all")
    unknown = MAGIC + bytes(range(8)) + b"\x02\x04ab"
    cascade.produce_raw(cascade.prefix + "bad-unknown-schema", unknown)
    # a record of the wrong event type on the input topic
    cascade.produce_raw(
        cascade.prefix + "bad-wrong-event",
        codec.encode(
            "ModelPromoted",
            {
                "tier": "x",
                "version": "1",
                "parent_version": "",
                "metrics": {},
                "promoted_at": events.now_ms(),
            },
        ),
    )
    schema_keys = {
        cascade.prefix + k for k in ("bad-garbage-message", "bad-unknown-schema", "bad-wrong-event")
    }

    ok_path = cascade.roots / "fine.png"
    good.save(ok_path)
    ok_ids = cascade.submit([ok_path], prefix="after-bad-")
    counts = cascade.wait_until_done(ok_ids, timeout_s=300)
    assert counts[ok_ids[0]] == 1, cascade.log_tail()

    dead = cascade.wait_for_dead_letters([*expected, *schema_keys], timeout_s=300)
    by_id = {d["image_id"]: d for d in dead if d["image_id"]}
    for image_id, kind in expected.items():
        assert image_id in by_id, (image_id, dead)
        assert by_id[image_id]["error_kind"] == kind, by_id[image_id]
        assert by_id[image_id]["message"], "a dead letter must say why"
        assert by_id[image_id]["origin_topic"] == cascade.topology.submitted_topic
    schema_dead = [d for d in dead if d["image_id"] in schema_keys]
    assert sorted(d["image_id"] for d in schema_dead) == sorted(schema_keys)
    assert {d["error_kind"] for d in schema_dead} == {"schema"}
    # nothing is lost and nothing is counted twice: bad inputs have no output
    bad_ids = set(expected) | schema_keys
    assert not [o for o in cascade.outputs() if o["image_id"] in bad_ids]
    assert all(cascade.alive().values())


@pytest.mark.slow
def test_kill_9_a_worker_halfway_loses_and_duplicates_nothing(
    trained: Settings, tmp_path: Path
) -> None:
    cascade = Cascade(trained, tmp_path / "crash")
    cascade.start()
    try:
        images = sorted((trained.datasets.resolve() / "dsb2018" / "images").glob("*.png"))[:100]
        ids = cascade.submit(images, prefix="crash-a-") + cascade.submit(images, prefix="crash-b-")
        assert len(set(ids)) == 200
        victim = "quality"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            done = len(cascade.read(cascade.topology.tier(victim).result_topic, "TierResult"))
            if done >= 60:
                break
            time.sleep(0.2)
        assert 0 < done < 200, f"could not catch the worker halfway (done={done})"
        cascade.kill9(victim)
        cascade.restart(victim)
        counts = cascade.wait_until_done(ids, timeout_s=900)
        assert sorted(counts) == sorted(ids), cascade.log_tail()
        assert set(counts.values()) == {1}, {k: v for k, v in counts.items() if v != 1}
        for tier in cascade.topology.tiers:
            committed = Counter(
                r["image_id"]
                for r in cascade.read(tier.result_topic, "TierResult")
                if r["image_id"] in set(ids)
            )
            assert all(n == 1 for n in committed.values()), (tier.name, committed.most_common(3))
        assert set(
            Counter(
                r["image_id"]
                for r in cascade.read(cascade.topology.tier("quality").result_topic, "TierResult")
            )
        ) == set(ids)
    finally:
        cascade.stop()
