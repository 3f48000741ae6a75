"""``infra up --secure``'s secrets: made once, random, owner-only, and the clients' settings."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from phenocascade.config import Settings
from phenocascade.errors import InfraError
from phenocascade.infra.secure import USER, ensure_secrets

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def test_secrets_are_made_once_and_kept_private(tmp_path: Path) -> None:
    made = ensure_secrets(tmp_path)
    assert ensure_secrets(tmp_path) == made  # a second start reuses them
    assert len({made.keystore_password, made.kafka_password, made.cassandra_password}) == 3
    assert stat.S_IMODE(made.folder.stat().st_mode) == 0o700
    for private in ("secrets.json", "server.p12", "ca.key", "server.key"):
        assert stat.S_IMODE((made.folder / private).stat().st_mode) == 0o600, private
    # The server certificate names 127.0.0.1 and is signed by the CA clients trust.
    checked = subprocess.run(
        ["openssl", "verify", "-CAfile", str(made.ca_file), str(made.folder / "server.pem")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    shown = subprocess.run(
        [
            "openssl",
            "x509",
            "-in",
            str(made.folder / "server.pem"),
            "-noout",
            "-ext",
            "subjectAltName",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "IP Address:127.0.0.1" in shown
    # The keystore opens with the stored password (given to openssl by environment).
    opened = subprocess.run(
        [
            "openssl",
            "pkcs12",
            "-in",
            str(made.folder / "server.p12"),
            "-nokeys",
            "-passin",
            "env:P",
        ],
        env={**os.environ, "P": made.keystore_password},
        capture_output=True,
        text=True,
        check=False,
    )
    assert opened.returncode == 0 and "BEGIN CERTIFICATE" in opened.stdout, opened.stderr


def test_clients_get_the_credentials_and_the_default_superuser_only_before_setup(
    tmp_path: Path,
) -> None:
    made = ensure_secrets(tmp_path)
    settings = Settings(home=tmp_path)
    first = made.client_settings(settings)
    assert first.kafka.client["sasl.username"] == USER
    assert first.kafka.client["sasl.password"] == made.kafka_password
    assert first.kafka.client["ssl.ca.location"] == str(made.ca_file)
    assert (first.cassandra.username, first.cassandra.password) == ("cassandra", "cassandra")
    (made.folder / "cassandra.provisioned").touch()
    later = made.client_settings(settings)
    assert (later.cassandra.username, later.cassandra.password) == (USER, made.cassandra_password)
    env = made.write_env(settings)
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    text = env.read_text()
    assert made.cassandra_password in text and "PHENOCASCADE_KAFKA__CLIENT=" in text


def test_a_damaged_secrets_file_is_named(tmp_path: Path) -> None:
    made = ensure_secrets(tmp_path)
    (made.folder / "secrets.json").write_text(json.dumps({"kafka_password": "x"}))
    with pytest.raises(InfraError, match=r"secrets\.json is damaged"):
        ensure_secrets(tmp_path)
