"""docker-compose.yml stays in step with the topology and the CLI.

No Docker engine runs in CI, so this checks the file's structure, not a running stack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from phenocascade.cli import build_parser
from phenocascade.cli.cascade import learning_commands
from phenocascade.config import Settings, load_topology

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"
PROJECT_IMAGE = "phenocascade:latest"


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    compose = yaml.safe_load(COMPOSE.read_text())
    return dict(compose["services"])


@pytest.fixture(scope="module")
def cascade_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services.items() if s.get("image") == PROJECT_IMAGE}


def test_every_tier_of_the_packaged_topology_has_a_worker(
    cascade_services: dict[str, dict[str, Any]],
) -> None:
    commands = [s["command"] for s in cascade_services.values()]
    for tier in load_topology().tiers:
        assert ["worker", tier.name] in commands, f"no worker service for tier {tier.name!r}"
    assert ["joiner"] in commands
    # The annotation loop of `run --learning`, the rescorer included.
    for name, args in learning_commands(50, rescore=True).items():
        assert any(c[0] == args[0] for c in commands), f"no {name} service"


def test_the_loop_shares_one_image_store_and_serves_the_app_on_loopback(
    services: dict[str, dict[str, Any]], cascade_services: dict[str, dict[str, Any]]
) -> None:
    stores = {s["environment"].get("PHENOCASCADE_IMAGE_STORE") for s in cascade_services.values()}
    assert len(stores) == 1 and None not in stores
    (store,) = stores
    for name, service in cascade_services.items():
        mounted = {m.split(":")[1]: m.split(":")[0] for m in service["volumes"]}
        assert mounted.get(store) == "images", f"{name} does not see the image store"
    assert services["rescorer"]["environment"]["PHENOCASCADE_RESCORE_ON_PROMOTION"] == "true"
    assert services["ui"]["ports"] == ["127.0.0.1:8000:8000"]


def test_every_cascade_command_is_a_real_cli_command(
    cascade_services: dict[str, dict[str, Any]],
) -> None:
    parser = build_parser()
    for name, service in cascade_services.items():
        args = parser.parse_args(service["command"])
        assert callable(args.func), name


def test_cascade_settings_point_at_the_compose_services(
    cascade_services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, service in cascade_services.items():
        env = {k: str(v) for k, v in service["environment"].items()}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = Settings()
        assert settings.kafka.bootstrap_servers.split(":")[0] == "kafka", name
        assert settings.cassandra.hosts == ["cassandra"], name
        mounts = {m.split(":")[1]: m.split(":")[0] for m in service["volumes"]}
        assert mounts.get(str(settings.artifacts)) == "artifacts", (
            f"{name} does not read model artifacts from the shared volume"
        )
        # The one-shot topic creation needs Kafka only; the cascade processes need both.
        needed = {"kafka"} if service.get("restart") == "no" else {"kafka", "cassandra"}
        assert needed <= set(service["depends_on"]), name


def test_brokers_have_healthchecks_and_publish_on_loopback_only(
    services: dict[str, dict[str, Any]],
) -> None:
    assert services["kafka"]["image"].startswith("apache/kafka:4.")
    assert services["cassandra"]["image"].startswith("cassandra:5.")
    for name in ("kafka", "cassandra"):
        assert services[name]["healthcheck"]["test"], name
        for port in services[name].get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    env = services["kafka"]["environment"]
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"
    assert "INTERNAL://kafka:29092" in env["KAFKA_ADVERTISED_LISTENERS"]
