"""Active-learning acquisition: each strategy ranks what it claims to, and MC dropout samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from phenocascade.domain import DecodedImage
from phenocascade.errors import ConfigError
from phenocascade.models import acquisition
from phenocascade.models.backends.multilabel_cnn import MultiLabelCNN
from phenocascade.models.nets import build_classifier

SIZE = ("size:small", "size:medium", "size:large")


def test_a_lone_label_is_ranked_alike_by_margin_entropy_and_least_confidence() -> None:
    p = np.array([[0.97], [0.52], [0.2], [0.45], [0.01]])
    columns = acquisition.group_columns(["clear"], [])
    least_confident = 1.0 - 2.0 * np.abs(p[:, 0] - 0.5)
    for score in (
        acquisition.priority("margin", p, columns),
        acquisition.priority("entropy", p, columns),
    ):
        assert list(np.argsort(-score)) == list(np.argsort(-least_confident))
    assert acquisition.priority("entropy", np.array([[0.5]]), columns)[0] == pytest.approx(1.0)


def test_margin_and_entropy_read_a_softmax_group_as_one_distribution() -> None:
    columns = acquisition.group_columns([*SIZE, "mitotic"], [SIZE])
    assert columns == [[0, 1, 2], [3]]
    probs = np.array(
        [
            [0.9, 0.05, 0.05, 0.99],  # sure of both
            [0.5, 0.49, 0.01, 0.99],  # torn between two sizes
            [1 / 3, 1 / 3, 1 / 3, 0.99],  # no idea of the size
        ]
    )
    margin = acquisition.priority("margin", probs, columns)
    assert margin[0] < margin[1] < margin[2]
    assert margin[0] == pytest.approx(0.15)  # the size gap 0.85 is the smaller one
    assert margin[1] == pytest.approx(0.99)
    entropy = acquisition.priority("entropy", probs, columns)
    assert entropy[0] < entropy[1] < entropy[2]
    lone = -(0.99 * np.log2(0.99) + 0.01 * np.log2(0.01))
    assert entropy[2] == pytest.approx(np.log2(3) + lone)


def test_bald_counts_disagreement_between_samples_not_shared_doubt() -> None:
    columns = acquisition.group_columns(["clear"], [])
    agree_sure = np.full((4, 1, 1), 0.99)
    agree_unsure = np.full((4, 1, 1), 0.5)  # every sample says 50/50: doubt, no disagreement
    disagree = np.array([0.99, 0.01, 0.99, 0.01]).reshape(4, 1, 1)
    scores = [acquisition.bald(s, columns)[0] for s in (agree_sure, agree_unsure, disagree)]
    assert scores[0] == pytest.approx(0.0, abs=1e-9)
    assert scores[1] == pytest.approx(0.0, abs=1e-9)
    assert scores[2] == pytest.approx(1.0 - 0.0808, abs=1e-3)
    with pytest.raises(ConfigError, match="T >= 2"):
        acquisition.bald(np.full((1, 1, 1), 0.5), columns)


def test_k_centres_picks_the_farthest_unlabelled_points_in_turn() -> None:
    features = np.array([[0.0], [1.0], [10.0], [10.5], [5.0], [-4.0]])
    picked = acquisition.k_centres(features, labelled=[0], candidates=[1, 2, 3, 4, 5], k=3)
    # 10.5 is farthest from 0; then 5 (5 from 0, 5.5 from 10.5), then -4 (4 from 0).
    assert picked == [3, 4, 5]
    assert acquisition.k_centres(features, labelled=[], candidates=[2, 3, 5], k=2) == [2, 5]
    assert acquisition.k_centres(features, labelled=[0], candidates=[1], k=5) == [1]


def test_a_group_naming_an_unknown_label_is_refused() -> None:
    with pytest.raises(ConfigError, match="not classes"):
        acquisition.group_columns(["a", "b"], [("a", "c")])


def _mobilenet_classifier(backbone: str = "mobilenet_v2") -> MultiLabelCNN:
    stage = MultiLabelCNN(backbone=backbone, input_size=32, view="resize", batch_size=4)
    stage.classes_ = [*SIZE, "mitotic"]
    stage.softmax_groups = (SIZE,)
    torch.manual_seed(0)
    net = build_classifier(backbone, len(stage.classes_))
    # An untrained network's batch norms scale every feature to ~0: give them real statistics.
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        net.train()(torch.rand(8, 3, 32, 32))
    head = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
    torch.nn.init.normal_(head.weight, std=0.1)
    stage.net_ = net.eval()
    stage.device_ = "cpu"
    return stage


def test_mc_dropout_samples_vary_by_pass_repeat_by_seed_and_keep_groups_normalised() -> None:
    stage = _mobilenet_classifier()
    rng = np.random.default_rng(0)
    images = [
        DecodedImage(f"i{j}", rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for j in range(3)
    ]
    samples = stage.sample_probabilities(images, passes=6, seed=1)
    assert samples.shape == (6, 3, 4)
    assert np.abs(samples[0] - samples[1]).max() > 1e-3
    np.testing.assert_allclose(samples[..., :3].sum(-1), 1.0, atol=1e-9)
    np.testing.assert_array_equal(samples, stage.sample_probabilities(images, passes=6, seed=1))
    assert ((samples >= 0.0) & (samples <= 1.0)).all()
    assert acquisition.bald(samples, acquisition.group_columns(stage.classes_, [SIZE])).max() > 0
    assert stage.net_.training is False


def test_mc_dropout_needs_a_dropout_layer_before_the_head() -> None:
    stage = _mobilenet_classifier("small_cnn")
    image = DecodedImage("i", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ConfigError, match="Monte-Carlo dropout needs one dropout layer"):
        stage.sample_probabilities([image], passes=2)
