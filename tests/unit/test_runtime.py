"""Runtimes (bf16 and onnx served only once checked against eager) and the queue's priority."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from phenocascade.config import Settings, load_topology
from phenocascade.consumers.worker import TierWorker, _Scored
from phenocascade.domain import DecodedImage, Route, StageKind, StageOutput
from phenocascade.errors import ArtifactError, ConfigError
from phenocascade.models import acquisition
from phenocascade.models.nets import MobileNetUNet
from phenocascade.models.runtime import (
    MAX_METRIC_CHANGE,
    RUNTIME_CHECKS,
    AutocastStage,
    OnnxNetwork,
    RuntimeCheck,
    read_check,
    record_check,
    serving,
    with_runtime,
)
from phenocascade.models.segmentation import NucleusSegmenter

SIZE = ["size:small", "size:medium", "size:large"]


class _Probe:
    """A stage that records whether autocast was on when it predicted."""

    kind = StageKind.CLASSIFIER
    classes = SIZE
    model_name = "probe"
    version = "v1"
    thresholds: dict[str, object] = {}
    gate_label = "clear"
    softmax_groups = (tuple(SIZE),)

    def __init__(self) -> None:
        self.autocast: list[bool] = []

    def predict(
        self, images: Sequence[DecodedImage], *, calibrated: bool = True
    ) -> list[StageOutput]:
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        return [
            StageOutput(scores=dict.fromkeys(SIZE, 1 / 3 if calibrated else 0.2)) for _ in images
        ]

    def raw_boxes(self) -> bool:
        return torch.is_autocast_enabled("cpu")


def _check(eager: float | None, value: float | None) -> RuntimeCheck:
    return RuntimeCheck("bf16", "macro_f1", eager, value, "test", 132)


def test_a_runtime_is_accepted_only_within_the_bound_either_way() -> None:
    assert _check(0.9166, 0.9166 + MAX_METRIC_CHANGE).accepted
    assert _check(0.9166, 0.9166 - MAX_METRIC_CHANGE).accepted
    assert not _check(0.9166, 0.9166 - 0.0051).accepted
    assert not _check(0.9166, None).accepted  # not computable is not accepted
    assert "refused" in _check(0.9, 0.8).describe()


def test_checks_round_trip_through_the_artifact_and_a_bad_file_is_named(tmp_path: Path) -> None:
    assert read_check(tmp_path, "bf16") is None
    record_check(tmp_path, _check(0.9, 0.9025))
    assert read_check(tmp_path, "bf16") == _check(0.9, 0.9025)
    (tmp_path / RUNTIME_CHECKS).write_text("[1, 2]")
    with pytest.raises(ArtifactError, match=RUNTIME_CHECKS):
        read_check(tmp_path, "bf16")


def test_bf16_is_served_only_for_a_version_whose_check_passed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stage = _Probe()
    served, runtime = serving(stage, tmp_path, "eager", device="cpu", tier="majority")
    assert (served, runtime) == (stage, "eager")
    with caplog.at_level(logging.WARNING):
        served, runtime = serving(stage, tmp_path, "bf16", device="cpu", tier="majority")
    assert (served, runtime) == (stage, "eager")
    assert "phenocascade check-runtime majority" in caplog.text

    record_check(tmp_path, _check(0.9, 0.88))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        served, runtime = serving(stage, tmp_path, "bf16", device="cpu", tier="majority")
    assert (served, runtime) == (stage, "eager")
    assert "refused" in caplog.text

    record_check(tmp_path, _check(0.9, 0.9))
    served, runtime = serving(stage, tmp_path, "bf16", device="cpu", tier="majority")
    assert runtime == "bf16" and isinstance(served, AutocastStage)
    image = DecodedImage("a", np.zeros((4, 4, 3), np.uint8))
    served.predict([image])
    raw = served.predict([image], calibrated=False)  # evaluations ask for raw scores too
    assert stage.autocast == [True, True] and raw[0].scores["size:small"] == 0.2
    assert served.raw_boxes() is True  # any other method computes under autocast as well
    assert stage.raw_boxes() is False
    assert served.version == "v1" and served.classes == SIZE  # read from the wrapped stage


class _Segmenting(_Probe):
    """A stage with a nucleus segmenter (random weights), as the segmenting backends have."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.segmenter_ = NucleusSegmenter()
        self.segmenter_.network_ = MobileNetUNet(3, None).eval()
        self.segmenter_.device_ = "cpu"


def test_onnx_runs_the_segmenter_as_eager_does_and_only_once_checked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    eager, stage = _Segmenting(), _Segmenting()
    # Sides that are no multiple of 32, and two image sizes through one exported graph.
    pixels = [
        np.random.default_rng(i).integers(0, 255, (h, w, 3), np.uint8)
        for i, (h, w) in enumerate([(70, 101), (33, 64)])
    ]
    with caplog.at_level(logging.WARNING):
        served, runtime = serving(stage, tmp_path, "onnx", device="cpu", tier="minority")
    assert (served, runtime) == (stage, "eager") and "check-runtime minority" in caplog.text
    assert not isinstance(stage.segmenter_.network_, OnnxNetwork)

    record_check(tmp_path, RuntimeCheck("onnx", "ap50", 0.5, 0.5, "test", 132))
    served, runtime = serving(stage, tmp_path, "onnx", device="cpu", tier="minority")
    assert runtime == "onnx" and served is stage
    network = stage.segmenter_.network_
    assert isinstance(network, OnnxNetwork)
    for p in pixels:
        ours, theirs = stage.segmenter_.probabilities(p), eager.segmenter_.probabilities(p)
        assert ours.shape == theirs.shape == (3, *p.shape[:2])
        assert np.abs(ours - theirs).max() < 1e-4
        # Shift detection reads the encoder in torch, through the same network.
        assert np.allclose(stage.segmenter_.describe(p), eager.segmenter_.describe(p))
    assert with_runtime(stage, "onnx", "cpu").segmenter_.network_ is network  # exported once


def test_onnx_is_refused_in_one_line_where_it_does_not_apply() -> None:
    with pytest.raises(ConfigError, match="not probe; serve it eager or bf16"):
        with_runtime(_Probe(), "onnx", "cpu")
    with pytest.raises(ConfigError, match="on cuda use bf16"):
        with_runtime(_Segmenting(), "onnx", "cuda")


def _worker(tmp_path: Path, strategy: str) -> TierWorker:
    topology = load_topology()
    tier = next(t for t in topology.tiers if t.name == "majority")
    tier = tier.model_copy(update={"acquisition": strategy})
    worker = TierWorker(
        settings=Settings(home=tmp_path),
        topology=topology,
        tier=tier,
        instance="test",
        stage_loader=lambda _version: _Probe(),  # type: ignore[arg-type,return-value]
    )
    worker.stage = _Probe()  # type: ignore[assignment]
    return worker


def _scored(outputs: list[StageOutput], routes: list[Route]) -> _Scored:
    return _Scored(
        outputs=list(outputs),
        routes=routes,
        pending=[()] * len(outputs),
        kind=StageKind.CLASSIFIER,
        model_name="probe",
        version="v1",
        classes=SIZE,
    )


@pytest.mark.parametrize("strategy", ["margin", "entropy"])
def test_the_queue_priority_follows_the_tiers_acquisition_strategy(
    tmp_path: Path, strategy: str
) -> None:
    torn = StageOutput(scores={"size:small": 0.5, "size:medium": 0.48, "size:large": 0.02})
    sure = StageOutput(scores={"size:small": 0.9, "size:medium": 0.05, "size:large": 0.05})
    novel = StageOutput(scores=sure.scores, novel=True)
    images = [DecodedImage(str(j), np.zeros((4, 4, 3), np.uint8)) for j in range(4)]
    routes = [Route.ANNOTATE, Route.ANNOTATE, Route.PASS, Route.ANNOTATE]
    got = _worker(tmp_path, strategy)._priorities(
        images, _scored([torn, sure, sure, novel], routes)
    )
    columns = acquisition.group_columns(SIZE, [SIZE])
    probs = np.array([[o.scores[c] for c in SIZE] for o in (torn, sure)])
    want = acquisition.priority(strategy, probs, columns)  # type: ignore[arg-type]
    if strategy == "entropy":
        want = want / np.log2(3)
    assert got[0] == pytest.approx(want[0]) and got[1] == pytest.approx(want[1])
    assert got[0] > got[1]
    # Passed images are not queued; a novel one keeps the default (1.0, first in the queue).
    assert got[2] is None and got[3] is None
    assert all(0.0 <= p <= 1.0 for p in got[:2] if p is not None)


def test_random_serves_the_queue_in_arrival_order_novel_images_first(tmp_path: Path) -> None:
    sure = StageOutput(scores={"size:small": 0.9, "size:medium": 0.05, "size:large": 0.05})
    torn = StageOutput(scores={"size:small": 0.5, "size:medium": 0.48, "size:large": 0.02})
    novel = StageOutput(scores=sure.scores, novel=True)
    images = [DecodedImage(str(j), np.zeros((4, 4, 3), np.uint8)) for j in range(3)]
    scored = _scored([sure, torn, novel], [Route.ANNOTATE] * 3)
    got = _worker(tmp_path, "random")._priorities(images, scored)
    assert got == [0.5, 0.5, None]  # one priority: ties go by arrival; novel keeps 1.0


def test_uncertainty_leaves_the_requests_default_priority(tmp_path: Path) -> None:
    output = StageOutput(scores=dict.fromkeys(SIZE, 0.4))
    image = DecodedImage("a", np.zeros((4, 4, 3), np.uint8))
    worker = _worker(tmp_path, "uncertainty")
    assert worker._priorities([image], _scored([output], [Route.ANNOTATE])) == [None]
