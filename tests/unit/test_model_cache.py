"""The bootstrap model cache: a fresh checkout copies the models its code and data made."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from phenocascade.config import Settings, get_settings
from phenocascade.models.base import champion_version, set_champion
from phenocascade.recipes import bundled, cache
from phenocascade.recipes.bundled import BOOTSTRAP_ORDER, TIERS, ensure_bootstrap
from phenocascade.recipes.cache import MODEL_CACHE_ENV, bootstrap_key


@pytest.fixture
def trained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A home, a datasets folder and a model cache in ``tmp_path``; training recorded.

    Training itself is tested elsewhere (it takes minutes): here each "trained" model is
    an artifact folder with metadata and weights whose bytes name the run.
    """
    datasets = tmp_path / "datasets" / "dsb2018"
    datasets.mkdir(parents=True)
    (datasets / "a.png").write_bytes(b"x" * 10)
    monkeypatch.setenv("PHENOCASCADE_DATASETS", str(tmp_path / "datasets"))
    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path / "cache"))
    runs: list[str] = []

    def train_tier(tier: bundled.Tier, *, settings: Settings, **_: Any) -> Path:
        version = f"20261130T00000{len(runs)}-{TIERS.index(tier):04x}"
        folder = settings.artifacts / tier / version
        (folder / "val_report").mkdir(parents=True)
        (folder / "metadata.json").write_text(json.dumps({"tier": tier, "version": version}))
        (folder / "weights.pt").write_bytes(f"weights of run {len(runs)}".encode())
        set_champion(settings.artifacts, tier, version)
        runs.append(tier)
        return folder

    monkeypatch.setattr(bundled, "train_tier", train_tier)
    yield runs
    get_settings.cache_clear()


def _checkout(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings of a fresh checkout: a home and artifacts folder of its own."""
    monkeypatch.setenv("PHENOCASCADE_HOME", str(tmp_path / name))
    monkeypatch.setenv("PHENOCASCADE_ARTIFACTS", str(tmp_path / name / "artifacts"))
    get_settings.cache_clear()
    return get_settings()


def test_a_second_checkout_copies_the_models_of_the_first(
    trained: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _checkout(tmp_path, "first", monkeypatch)
    versions = ensure_bootstrap(first)
    assert trained == list(BOOTSTRAP_ORDER)

    second = _checkout(tmp_path, "second", monkeypatch)
    assert ensure_bootstrap(second) == versions
    assert trained == list(BOOTSTRAP_ORDER)  # nothing trained again
    for tier, version in versions.items():
        assert champion_version(second.artifacts, tier) == version
        copied, original = second.artifacts / tier / version, first.artifacts / tier / version
        assert (copied / "weights.pt").read_bytes() == (original / "weights.pt").read_bytes()
        assert (copied / "val_report").is_dir()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]


def test_other_data_or_another_device_trains_anew(
    trained: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _checkout(tmp_path, "first", monkeypatch)
    key = bootstrap_key("quality", settings, device="cpu")
    assert bootstrap_key("quality", settings, device="cpu") == key
    assert bootstrap_key("quality", settings, device="cuda") != key
    assert bootstrap_key("majority", settings, device="cpu") != key
    ensure_bootstrap(settings)

    # A dataset file added: the cached models were made from other data.
    (tmp_path / "datasets" / "dsb2018" / "b.png").write_bytes(b"y")
    assert bootstrap_key("quality", settings, device="cpu") != key
    ensure_bootstrap(_checkout(tmp_path, "second", monkeypatch))
    assert trained == list(BOOTSTRAP_ORDER) * 2


def test_the_cache_can_be_switched_off(
    trained: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MODEL_CACHE_ENV, "off")
    ensure_bootstrap(_checkout(tmp_path, "first", monkeypatch))
    ensure_bootstrap(_checkout(tmp_path, "second", monkeypatch))
    assert trained == list(BOOTSTRAP_ORDER) * 2
    assert not (tmp_path / "cache").exists()


def test_a_checkout_with_champions_keeps_them(
    trained: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _checkout(tmp_path, "first", monkeypatch)
    versions = ensure_bootstrap(settings)
    assert ensure_bootstrap(settings) == versions
    assert trained == list(BOOTSTRAP_ORDER)


def test_each_tier_is_announced_as_soon_as_its_model_is_ready(
    trained: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The demo starts a tier's workers from this call, while the later tiers still train.
    settings = _checkout(tmp_path, "first", monkeypatch)
    announced: list[tuple[str, str, int]] = []

    def ready(tier: str, version: str) -> None:
        announced.append((tier, version, len(trained)))

    versions = ensure_bootstrap(settings, ready=ready)
    assert announced == [(t, versions[t], i + 1) for i, t in enumerate(BOOTSTRAP_ORDER)]

    # Models already there (copied or kept) are announced too, each once.
    announced.clear()
    ensure_bootstrap(_checkout(tmp_path, "second", monkeypatch), ready=ready)
    assert announced == [(t, versions[t], 3) for t in BOOTSTRAP_ORDER]


def test_the_key_covers_the_code_that_trains_and_not_the_services() -> None:
    package = Path(cache.__file__).resolve().parents[1]
    files = {p.relative_to(package).parts[0] for p in cache._files(package, cache.SERVICE_CODE)}
    assert {"models", "recipes", "data", "resources", "domain.py", "config.py"} <= files
    assert not files & set(cache.SERVICE_CODE)
    for name in cache.SERVICE_CODE:
        assert (package / name).exists(), name  # a renamed service would silently count
