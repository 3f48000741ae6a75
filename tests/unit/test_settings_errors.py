"""Settings from the environment: path lists as PATH has them, and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from phenocascade.config import Settings, get_settings
from phenocascade.errors import ConfigError


@pytest.fixture(autouse=True)
def fresh_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Read the environment anew in each test, and leave no cached settings behind."""
    for name in os.environ:
        if name.upper().startswith("PHENOCASCADE_"):
            monkeypatch.delenv(name)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.mark.parametrize(
    ("value", "roots"),
    [
        ("/data/scans", ["/data/scans"]),  # as the README writes it
        ("/data/scans:/srv/lab b::", ["/data/scans", "/srv/lab b"]),
        ('["/data/scans", "/srv/a:b"]', ["/data/scans", "/srv/a:b"]),
        ("", []),
    ],
)
def test_allowed_roots_are_a_path_list_or_json(
    monkeypatch: pytest.MonkeyPatch, value: str, roots: list[str]
) -> None:
    monkeypatch.setenv("PHENOCASCADE_ALLOWED_ROOTS", value)
    assert get_settings().allowed_roots == [Path(r) for r in roots]


def test_allowed_roots_given_in_code_stay_a_list() -> None:
    assert Settings(allowed_roots=[Path("/a")]).allowed_roots == [Path("/a")]


def test_models_live_under_the_home_unless_named(monkeypatch: pytest.MonkeyPatch) -> None:
    # A lab that sets only its home finds its models there, not in the working folder.
    assert Settings().artifacts == Path("var/artifacts")
    monkeypatch.setenv("PHENOCASCADE_HOME", "/lab/phenocascade")
    assert Settings().artifacts == Path("/lab/phenocascade/artifacts")
    assert get_settings().artifacts == Path("/lab/phenocascade/artifacts")
    monkeypatch.setenv("PHENOCASCADE_ARTIFACTS", "/models")
    assert Settings().artifacts == Path("/models")
    assert Settings(home=Path("/h")).artifacts == Path("/models")
    monkeypatch.delenv("PHENOCASCADE_ARTIFACTS")
    assert Settings(home=Path("/h")).artifacts == Path("/h/artifacts")


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "PHENOCASCADE_MAX_IMAGE_PIXELS",
            "lots",
            "PHENOCASCADE_MAX_IMAGE_PIXELS: expected a valid integer, unable to parse string "
            "as an integer, got 'lots'",
        ),
        (
            "PHENOCASCADE_ALLOWED_ROOTS",
            '["/data/scans"',
            "PHENOCASCADE_ALLOWED_ROOTS: expected paths separated by ':' (as PATH) or a JSON "
            """list of paths, got '["/data/scans"'""",
        ),
        (
            "PHENOCASCADE_ALLOWED_ROOTS",
            '["/data/scans", 3]',
            "PHENOCASCADE_ALLOWED_ROOTS: expected a path, got 3",
        ),
        (
            "PHENOCASCADE_UI_TRUSTED_PROXIES",
            "10.0.0.1,proxy.lab",
            "PHENOCASCADE_UI_TRUSTED_PROXIES: expected IP addresses separated by ',' or a JSON "
            "list of them ('proxy.lab' is not one), got '10.0.0.1,proxy.lab'",
        ),
        (
            "PHENOCASCADE_UI_LOGIN_MAX_FAILURES",
            "0",
            "PHENOCASCADE_UI_LOGIN_MAX_FAILURES: expected greater than or equal to 1, got '0'",
        ),
        (
            "PHENOCASCADE_CASSANDRA__HOSTS",
            "db1,db2",
            """PHENOCASCADE_CASSANDRA__HOSTS: expected a JSON list such as ["a", "b"], """
            "got 'db1,db2'",
        ),
        (
            "PHENOCASCADE_CASSANDRA__PORT",
            "x",
            "PHENOCASCADE_CASSANDRA__PORT: expected a valid integer, unable to parse string as "
            "an integer, got 'x'",
        ),
    ],
)
def test_a_bad_variable_is_one_line_naming_it_and_the_form_expected(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as refused:
        get_settings()
    assert str(refused.value) == message


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PHENOCASCADE_KAFKA__CLIENT", '{"sasl.password": "hunter2"'),
        ("PHENOCASCADE_KAFKA__CLIENT", '["sasl.password", "hunter2"]'),
        ("PHENOCASCADE_KAFKA", '{"client": {"sasl.password": "hunter2"}'),
    ],
)
def test_client_settings_are_named_but_not_echoed(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv("PHENOCASCADE_KAFKA__BOOTSTRAP_SERVERS", "kafka:9092")  # plain text
    monkeypatch.setenv(variable, value)
    expected = rf"^{variable}: expected (a JSON object|a valid dictionary)"
    with pytest.raises(ConfigError, match=expected) as refused:
        get_settings()
    assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [("PHENOCASCADE_MAX_IMAGE_PIXELS", "lots"), ("PHENOCASCADE_ALLOWED_ROOTS", "[/data/scans")],
)
def test_the_command_line_prints_a_bad_variable_as_one_line(variable: str, value: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("PHENOCASCADE_")}
    done = subprocess.run(
        [sys.executable, "-m", "phenocascade", "infra", "status"],
        env={**env, variable: value},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"phenocascade: error: {variable}: expected ")
