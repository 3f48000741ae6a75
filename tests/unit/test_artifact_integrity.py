"""Model artifacts from outside: checked names and versions, and weights checked by SHA-256.

A ``ModelPromoted`` event names the version a worker loads; nothing it says may lead the
worker out of the artifact store or onto weights other than those the trainer wrote.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from phenocascade.config import Settings, load_topology
from phenocascade.consumers import worker as worker_module
from phenocascade.consumers.worker import TierWorker
from phenocascade.domain import Sample
from phenocascade.errors import ArtifactError
from phenocascade.models import artifact
from phenocascade.models.base import (
    VERSION_PATTERN,
    ArtifactMeta,
    get_backend,
    load_stage,
    set_champion,
)
from phenocascade.streams.serde import EventCodec

TIER = "quality"  # the artifact name of the packaged topology's gate
BAD_VERSIONS = [
    "../../outside",
    "20261128T101500-3fa2/../../../outside/20261128T101500-3fa2",
    "/etc",
    "..",
    "20261128T101500-3fa2\n",
    "20261128T101500-3FA2",
    "latest",
]
BAD_NAMES = ["../quality", "quality/x", ".quality", "", "q" * 65, "quality\n"]


def _train(folder: Path) -> None:
    """Fit a tiny quality gate for one epoch and save it to ``folder``."""
    cls = get_backend("quality_cnn")
    rng = np.random.default_rng(0)
    pixels = {f"s{i}": (rng.random((32, 32, 1)) * 255).astype(np.uint8) for i in range(8)}
    samples = [
        Sample(sid, None, labels=frozenset({cls.gate_label} if i % 2 else set()))
        for i, sid in enumerate(pixels)
    ]
    stage = cls(input_size=32, view="resize", batch_size=4)
    stage.fit(
        samples[:6],
        samples[6:],
        classes=(cls.gate_label,),
        load=lambda s: pixels[s.image_id],
        seed=0,
        max_epochs=1,
        patience=1,
    )
    stage.save(folder, tier=TIER)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved artifact folder, copied into each test's own store."""
    folder = tmp_path_factory.mktemp("trained") / artifact.new_version()
    _train(folder)
    return folder


@pytest.fixture
def store(tmp_path: Path, trained: Path) -> Iterator[Path]:
    """An artifact store whose champion is ``trained``, and a copy of it outside the store."""
    artifacts = tmp_path / "artifacts"
    shutil.copytree(trained, artifacts / TIER / trained.name)
    shutil.copytree(trained, tmp_path / "outside" / trained.name)
    set_champion(artifacts, TIER, trained.name)
    yield artifacts


def _add_version(artifacts: Path, edit: dict[str, Any] | None = None) -> str:
    """Copy the champion to a new version; ``edit`` replaces metadata fields."""
    version = artifact.new_version()
    while (artifacts / TIER / version).exists():
        version = artifact.new_version()
    champion = (artifacts / TIER / "CHAMPION").read_text()
    shutil.copytree(artifacts / TIER / champion, artifacts / TIER / version)
    meta = json.loads((artifacts / TIER / version / "metadata.json").read_text())
    meta.update(version=version, **(edit or {}))
    (artifacts / TIER / version / "metadata.json").write_text(json.dumps(meta))
    return version


def _tamper(folder: Path) -> None:
    """Replace the weights by another valid state dict, as an attacker with write access would."""
    state = torch.load(folder / artifact.WEIGHTS_FILE, weights_only=True)
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, folder / artifact.WEIGHTS_FILE)


# The artifact store on its own.


def test_new_versions_match_the_version_pattern() -> None:
    assert all(VERSION_PATTERN.fullmatch(artifact.new_version()) for _ in range(20))


def test_a_saved_artifact_records_the_sha256_of_its_weights(trained: Path) -> None:
    digest = hashlib.sha256((trained / "weights.pt").read_bytes()).hexdigest()
    assert ArtifactMeta.read(trained).weights_sha256 == {"weights.pt": digest}


@pytest.mark.parametrize("version", BAD_VERSIONS)
def test_a_version_that_is_not_a_plain_version_is_refused(store: Path, version: str) -> None:
    with pytest.raises(ArtifactError, match=r"model version .* is invalid"):
        load_stage(store, TIER, version)
    with pytest.raises(ArtifactError, match=r"model version .* is invalid"):
        set_champion(store, TIER, version)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_tier_name_that_is_not_a_plain_name_is_refused(store: Path, name: str) -> None:
    champion = (store / TIER / "CHAMPION").read_text()
    with pytest.raises(ArtifactError, match=r"artifact name .* is invalid"):
        load_stage(store, name, champion)
    with pytest.raises(ArtifactError, match=r"artifact name .* is invalid"):
        set_champion(store, name, champion)


def _escape(trained: Path) -> str:
    """A version leading from the store to the copy of ``trained`` outside it."""
    return f"../../outside/{trained.name}"


def test_a_version_leading_out_of_the_store_is_refused(store: Path, trained: Path) -> None:
    assert (store / TIER / _escape(trained) / "weights.pt").is_file()  # it would load
    with pytest.raises(ArtifactError, match=r"model version .* is invalid"):
        load_stage(store, TIER, _escape(trained))


def test_a_champion_marker_edited_to_leave_the_store_is_refused(store: Path, trained: Path) -> None:
    (store / TIER / "CHAMPION").write_text(_escape(trained))
    with pytest.raises(ArtifactError, match=r"model version .* is invalid"):
        load_stage(store, TIER)


def test_weights_changed_after_training_are_refused(store: Path) -> None:
    version = _add_version(store)
    _tamper(store / TIER / version)
    with pytest.raises(ArtifactError, match=r"SHA-256 .* metadata records"):
        load_stage(store, TIER, version)


def test_an_older_artifact_without_digests_loads_with_a_warning(
    store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    version = _add_version(store, {"weights_sha256": {}})
    with caplog.at_level(logging.WARNING, logger="phenocascade.models.artifact"):
        assert load_stage(store, TIER, version).version == version
    assert "no recorded SHA-256" in caplog.text


# A worker offered such artifacts on the models topic.


@dataclass
class FakeMessage:
    """What the worker reads of a Kafka message."""

    payload: bytes
    offset_: int

    def error(self) -> None:
        return None

    def value(self) -> bytes:
        return self.payload

    def key(self) -> bytes:
        return TIER.encode()

    def topic(self) -> str:
        return "models"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self.offset_


@dataclass
class FakeModels:
    """A models consumer holding a fixed list of messages."""

    msgs: list[FakeMessage]

    def poll(self, timeout: float) -> FakeMessage | None:
        return self.msgs.pop(0) if self.msgs else None


@dataclass
class FakeProducer:
    """A plain producer that keeps what it was given."""

    sent: list[tuple[str, bytes]] = field(default_factory=list)
    flushed: int = 0

    def produce(self, topic: str, key: bytes | None = None, value: bytes = b"") -> None:
        self.sent.append((topic, value))

    def flush(self, timeout: float) -> int:
        self.flushed = len(self.sent)
        return 0


def _promotions(versions: list[str]) -> FakeModels:
    codec = EventCodec()
    return FakeModels(
        [
            FakeMessage(
                codec.encode(
                    "ModelPromoted",
                    {
                        "tier": TIER,
                        "version": v,
                        "parent_version": "",
                        "metrics": {},
                        "promoted_at": 0,
                    },
                ),
                offset,
            )
            for offset, v in enumerate(versions)
        ]
    )


def test_a_worker_dead_letters_a_bad_promotion_and_keeps_its_model(
    store: Path, trained: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    topology = load_topology()
    tier = next(t for t in topology.tiers if t.artifact == TIER)
    tampered, good = _add_version(store), _add_version(store)
    _tamper(store / TIER / tampered)
    producer = FakeProducer()
    monkeypatch.setattr(worker_module, "plain_producer", lambda kafka: producer)
    worker = TierWorker(
        settings=Settings(artifacts=store), topology=topology, tier=tier, instance="test"
    )
    worker.stage = champion = load_stage(store, TIER)

    worker._poll_promotions(_promotions([_escape(trained), tampered]))  # type: ignore[arg-type]

    assert worker.stage is champion and worker.stats.swaps == []
    letters = [EventCodec().decode(value, expected="DeadLetter")[1] for _, value in producer.sent]
    assert [topic for topic, _ in producer.sent] == [topology.dead_letter_topic] * 2
    assert producer.flushed == 2
    assert [(d["origin_offset"], d["error_kind"], d["tier"]) for d in letters] == [
        (0, "artifact", tier.name),
        (1, "artifact", tier.name),
    ]
    assert "model version '../../outside/" in letters[0]["message"]
    assert "SHA-256" in letters[1]["message"]

    worker._poll_promotions(_promotions([good]))  # type: ignore[arg-type]
    assert worker.stage is not None and worker.stage.version == good
    assert worker.stats.swaps == [good]
    assert len(producer.sent) == 2
