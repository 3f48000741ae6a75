"""`phenocascade infra` refuses clearly when a tool it needs is missing or unusable."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest

from phenocascade.config import CassandraSettings, KafkaSettings, Settings
from phenocascade.errors import InfraError
from phenocascade.infra.local import source_port_range, status, up


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings on free ports with an empty jar cache, so nothing is reused."""
    monkeypatch.setenv("PHENOCASCADE_INFRA_CACHE", str(tmp_path / "cache"))
    return Settings(
        home=tmp_path / "home",
        kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{_free_port()}"),
        cassandra=CassandraSettings(port=_free_port()),
    )


def _path_with_java(tmp_path: Path, version_line: str) -> Path:
    """A PATH folder holding only a fake ``java`` that prints ``version_line`` like java."""
    folder = tmp_path / "bin"
    folder.mkdir()
    java = folder / "java"
    java.write_text(f"#!/bin/sh\necho '{version_line}' >&2\n")
    java.chmod(java.stat().st_mode | stat.S_IXUSR)
    return folder


def test_missing_java_is_named(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(InfraError, match=r"java not found on PATH.*Java 17"):
        up(settings)


def test_old_java_is_refused(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(_path_with_java(tmp_path, 'openjdk version "11.0.22"')))
    with pytest.raises(InfraError, match=r"is Java 11; .* need Java 17"):
        up(settings)


def test_missing_maven_is_named_on_first_start(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(_path_with_java(tmp_path, 'openjdk version "17.0.15"')))
    with pytest.raises(InfraError, match=r"mvn \(Apache Maven\) not found on PATH"):
        up(settings)
    assert not (settings.home / "infra" / "cassandra" / "cassandra.pid").exists()


def test_unknown_service_is_refused(settings: Settings) -> None:
    with pytest.raises(InfraError, match="unknown service"):
        up(settings, services=("zookeeper",))


def test_remote_kafka_is_not_mistaken_for_local(settings: Settings) -> None:
    remote = settings.model_copy(update={"kafka": KafkaSettings(bootstrap_servers="kafka:9092")})
    with pytest.raises(InfraError, match=r"serves 127\.0\.0\.1 only"):
        status(remote)


def test_a_cluster_on_source_ports_is_warned_of(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    low, high = source_port_range()
    if not low <= 40000 < high:
        pytest.skip("port 40000 is outside this kernel's source-port range")
    monkeypatch.setenv("PATH", str(tmp_path))  # no java: up stops after its checks
    cluster = settings.model_copy(
        update={"kafka": KafkaSettings(bootstrap_servers="127.0.0.1:40000")}
    )
    said: list[str] = []
    with pytest.raises(InfraError, match="java"):
        up(cluster, nodes=3, progress=said.append)
    warned = [line for line in said if "source-port range" in line]
    assert len(warned) == 1
    assert "40000, 40001, 40002, 40003, 40004, 40005" in warned[0]
    assert f"below {low}" in warned[0]
