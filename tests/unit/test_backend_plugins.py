"""Third-party backends: a pip-installed distribution's ``phenocascade.backends`` entry points.

Each test installs a tiny plugin distribution into ``tmp_path`` as pip would (a module
plus a ``*.dist-info`` folder with ``METADATA`` and ``entry_points.txt``) and puts it on
``sys.path``; the package itself is never edited.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from phenocascade.cli import main
from phenocascade.config import get_settings, load_topology
from phenocascade.domain import Sample
from phenocascade.errors import ConfigError
from phenocascade.models import base
from phenocascade.models.base import (
    ArtifactMeta,
    backend_names,
    champion_version,
    get_backend,
    load_stage,
    new_stage,
    tier_classes,
)
from phenocascade.models.novelty import NoveltyGuard
from phenocascade.recipes.core import decode

PLUGIN = "tinylab_backends"
# The lab's backend: the built-in multi-label classifier on a small CNN at 32 px.
TINY_CNN = """
from phenocascade.models.backends.multilabel_cnn import MultiLabelCNN


class TinyCNN(MultiLabelCNN):
    model_name = "tiny_cnn"

    def __init__(self, **config):
        super().__init__(**{"backbone": "small_cnn", "input_size": 32, **config})
"""


@pytest.fixture(autouse=True)
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A registry of the built-ins alone, restored (and the plugin unimported) afterwards."""
    builtin = backend_names()
    monkeypatch.setattr(base, "_REGISTRY", {name: get_backend(name) for name in builtin})
    monkeypatch.setattr(base, "_PLUGINS", base._Plugins())
    yield
    for module in [m for m in sys.modules if m.partition(".")[0] == PLUGIN]:
        del sys.modules[module]


def _install(
    site: Path, monkeypatch: pytest.MonkeyPatch, entry_points: dict[str, str], module: str
) -> None:
    """Install distribution ``tinylab-backends`` with module ``tinylab_backends`` in ``site``."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{PLUGIN}.py").write_text(module)
    dist_info = site / f"{PLUGIN}-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: tinylab-backends\nVersion: 0.1\n"
    )
    lines = [f"{name} = {value}" for name, value in entry_points.items()]
    (dist_info / "entry_points.txt").write_text("[phenocascade.backends]\n" + "\n".join(lines))
    monkeypatch.syspath_prepend(str(site))


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh ``PHENOCASCADE_HOME`` under ``tmp_path``; settings are re-read before and after."""
    monkeypatch.setenv("PHENOCASCADE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PHENOCASCADE_ARTIFACTS", str(tmp_path / "home" / "artifacts"))
    monkeypatch.delenv("PHENOCASCADE_TOPOLOGY", raising=False)
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


@pytest.mark.slow
def test_a_topology_tier_trains_and_serves_an_installed_plugin_backend(
    lab: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install(tmp_path / "site", monkeypatch, {"tiny_cnn": f"{PLUGIN}:TinyCNN"}, TINY_CNN)
    # A lab's class folders: 10 bright and 10 dark noisy 24x24 fields.
    rng = np.random.default_rng(1)
    for i in range(20):
        label, level = ("bright", 200) if i % 2 else ("dark", 50)
        (tmp_path / "cells" / label).mkdir(parents=True, exist_ok=True)
        pixels = np.clip(rng.normal(level, 20, (24, 24)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / "cells" / label / f"{i:02d}.png")
    assert main(["data", "import", "folders", str(tmp_path / "cells"), "--name", "cells"]) == 0

    # Plan the cascade, then pick the plugin for its classifier tier, as a lab edits the YAML.
    path = tmp_path / "topology.yaml"
    assert main(["plan", "cells", "--out", str(path)]) == 0
    planned = yaml.safe_load(path.read_text())
    tier = next(t for t in planned["tiers"] if t["role"] == "branch")
    tier["backend"] = "tiny_cnn"
    path.write_text(yaml.safe_dump(planned))
    monkeypatch.setenv("PHENOCASCADE_TOPOLOGY", str(path))
    get_settings.cache_clear()

    spec = load_topology(path).tier(tier["name"])
    tiny = get_backend("tiny_cnn")
    assert tiny.__module__ == PLUGIN and tiny.__name__ == "TinyCNN"
    assert tier_classes(spec)[1] == tier["labels"]
    assert main(["train", spec.name, "--max-epochs", "1"]) == 0

    artifacts = get_settings().artifacts
    version = champion_version(artifacts, spec.artifact)
    assert version is not None
    meta = ArtifactMeta.read(artifacts / spec.artifact / version)
    assert meta.backend == "tiny_cnn" and meta.input_size == 32
    assert meta.config["backbone"] == "small_cnn"
    stage = load_stage(artifacts, spec.artifact)
    assert isinstance(stage, NoveltyGuard) and isinstance(stage.stage, tiny)
    assert stage.model_name == "tiny_cnn"
    fields = sorted((tmp_path / "cells").rglob("*.png"))[:3]
    outputs = stage.predict(decode([Sample(p.stem, p, frozenset()) for p in fields]))
    assert [set(o.scores) for o in outputs] == [set(tier["labels"])] * 3


def test_a_plugin_named_like_a_built_in_is_refused_with_its_distribution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install(tmp_path, monkeypatch, {"multilabel_cnn": f"{PLUGIN}:TinyCNN"}, TINY_CNN)
    with pytest.raises(ConfigError) as caught:
        get_backend("quality_cnn")
    message = str(caught.value)
    assert "\n" not in message
    assert f"multilabel_cnn = {PLUGIN}:TinyCNN of distribution 'tinylab-backends'" in message
    assert "taken by a built-in backend" in message
    assert base._REGISTRY["multilabel_cnn"].__module__ != PLUGIN  # the built-in stays


def test_a_plugin_that_fails_to_import_is_named_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = "import a_module_this_lab_forgot_to_install\n"
    _install(tmp_path, monkeypatch, {"tiny_cnn": f"{PLUGIN}:TinyCNN"}, broken)
    with pytest.raises(ConfigError) as caught:
        backend_names()
    message = str(caught.value)
    assert "\n" not in message
    assert f"tiny_cnn = {PLUGIN}:TinyCNN of distribution 'tinylab-backends'" in message
    assert "failed to import" in message and "a_module_this_lab_forgot_to_install" in message


def test_a_plugin_class_keeping_its_parents_model_name_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its artifacts would record "multilabel_cnn" and load back as the built-in.
    forgetful = TINY_CNN.replace('    model_name = "tiny_cnn"\n', "")
    _install(tmp_path, monkeypatch, {"tiny_cnn": f"{PLUGIN}:TinyCNN"}, forgetful)
    with pytest.raises(ConfigError, match="model_name 'multilabel_cnn'; set it to 'tiny_cnn'"):
        get_backend("tiny_cnn")
    assert "tiny_cnn" not in base._REGISTRY


def test_a_module_entry_point_registers_its_backend_and_unknown_names_list_both_kinds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decorated = TINY_CNN.replace(
        "\n\nclass TinyCNN",
        "\nfrom phenocascade.models.base import register_backend\n\n\n"
        '@register_backend("tiny_cnn")\nclass TinyCNN',
    )
    _install(tmp_path, monkeypatch, {"tiny_cnn": PLUGIN}, decorated)
    assert get_backend("tiny_cnn").__qualname__ == "TinyCNN"
    assert "tiny_cnn" in backend_names() and "multilabel_cnn" in backend_names()
    with pytest.raises(ConfigError) as caught:
        get_backend("tiny_cnnn")
    message = str(caught.value)
    assert "unknown backend 'tiny_cnnn'" in message
    builtin, _, plugins = message.partition("plugins")
    assert "'multilabel_cnn'" in builtin and "'tiny_cnn'" not in builtin
    assert "['tiny_cnn']" in plugins


def test_an_option_a_backend_does_not_take_is_named_with_those_it_takes() -> None:
    # A fine-tuned network's options given to the probe (a challenger's --config, a
    # topology edit) used to end in a TypeError traceback from the constructor.
    with pytest.raises(ConfigError) as caught:
        new_stage("quality_probe", {"backbone": "small_cnn", "input_size": 64, "lr": 1e-3})
    message = str(caught.value)
    assert "\n" not in message
    assert "'quality_probe' takes no option 'backbone', 'lr'" in message
    assert "input_size" in message.partition("it takes")[2]
    assert new_stage("quality_probe", {"input_size": 64}).input_size == 64
