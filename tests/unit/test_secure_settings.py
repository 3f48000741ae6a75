"""Bad TLS and authentication settings are refused in one line that names them, before any
service or broker is contacted; good ones reach every client, the faust joiner's too."""

from __future__ import annotations

import dataclasses
import socket
import ssl
from pathlib import Path

import faust
import pytest
from faust.types.auth import AuthProtocol, SASLMechanism

from phenocascade.config import CassandraSettings, KafkaSettings, Settings
from phenocascade.consumers.joiner import _credentials
from phenocascade.errors import ConfigError
from phenocascade.infra.local import Security, up
from phenocascade.store.cassandra import connect
from phenocascade.streams.kafka import plain_producer

# Any PEM certificate will do as a CA file here: the one Python itself trusts, if present.
SYSTEM_CA = Path(ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    """A keystore and a CA file (contents do not matter: checks stop before they are read)."""
    keystore, ca_file = tmp_path / "server.p12", tmp_path / "ca.pem"
    keystore.write_bytes(b"not read")
    ca_file.write_text("not read")
    return keystore, ca_file


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"keystore": Path("/nonexistent/server.p12")}, r"^Security\.keystore: .* is not a file$"),
        ({"kafka_users": {}}, r"^Security\.kafka_users is empty"),
        ({"kafka_users": {"a b": "pw"}}, r"^Security\.kafka_users: user name 'a b' must be"),
        ({"kafka_users": {"app": 'quote"d'}}, r"^the password of Kafka user 'app' must be"),
        ({"keystore_password": "new\nline"}, r"^Security\.keystore_password must be"),
    ],
)
def test_bad_security_is_refused_before_anything_starts(
    files: tuple[Path, Path], tmp_path: Path, change: dict[str, object], message: str
) -> None:
    keystore, ca_file = files
    good = Security(
        keystore=keystore,
        keystore_password="secret",
        ca_file=ca_file,
        kafka_users={"app": "app-secret"},
    )
    security = dataclasses.replace(good, **change)
    settings = Settings(
        home=tmp_path / "home",
        kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{_free_port()}"),
        cassandra=CassandraSettings(port=_free_port()),
    )
    with pytest.raises(ConfigError, match=message) as refused:
        up(settings, security=security)
    assert "\n" not in str(refused.value)
    assert 'quote"d' not in str(refused.value)
    assert not (tmp_path / "home").exists()


def test_a_missing_cassandra_ca_file_is_named() -> None:
    settings = CassandraSettings(port=_free_port(), ssl_ca_file=Path("/nonexistent/ca.pem"))
    with pytest.raises(ConfigError, match=r"^PHENOCASCADE_CASSANDRA__SSL_CA_FILE: cannot load"):
        connect(settings)


def test_a_cassandra_client_certificate_needs_a_ca_file() -> None:
    settings = CassandraSettings(ssl_cert_file=Path("client.pem"))
    with pytest.raises(ConfigError, match=r"SSL_CERT_FILE is set but SSL_CA_FILE is not"):
        settings.ssl_context()


def test_the_cassandra_tls_context_checks_the_server() -> None:
    context = CassandraSettings(ssl_ca_file=SYSTEM_CA).ssl_context()
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_librdkafka_refusing_its_settings_is_one_line() -> None:
    kafka = KafkaSettings(client={"security.protocol": "SASL_SSL", "ssl.ca.location": "/x.pem"})
    with pytest.raises(ConfigError, match=r"^PHENOCASCADE_KAFKA__CLIENT: the Kafka client") as e:
        plain_producer(kafka)
    assert "\n" not in str(e.value)


def test_the_joiner_gets_the_scram_credentials_over_tls() -> None:
    kafka = KafkaSettings(
        client={
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": "cascade",
            "sasl.password": "secret",
            "ssl.ca.location": str(SYSTEM_CA),
        }
    )
    credentials = _credentials(kafka)
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.protocol is AuthProtocol.SASL_SSL
    assert credentials.mechanism is SASLMechanism.SCRAM_SHA_512
    assert (credentials.username, credentials.password) == ("cascade", "secret")
    assert credentials.ssl_context is not None and credentials.ssl_context.check_hostname


def test_the_joiner_maps_tls_without_sasl_and_plaintext() -> None:
    tls = KafkaSettings(
        client={
            "security.protocol": "ssl",
            "ssl.ca.location": str(SYSTEM_CA),
            "ssl.endpoint.identification.algorithm": "none",
        }
    )
    credentials = _credentials(tls)
    assert isinstance(credentials, faust.SSLCredentials)
    assert credentials.protocol is AuthProtocol.SSL
    assert not credentials.context.check_hostname
    assert _credentials(KafkaSettings()) is None


@pytest.mark.parametrize(
    ("client", "message"),
    [
        ({"security.protocol": "SASL_SSL"}, r"supports sasl\.mechanism .*not 'GSSAPI'"),
        ({"security.protocol": "TLS"}, r"security\.protocol 'TLS' is not one of"),
        (
            {"security.protocol": "SSL", "ssl.ca.location": "/nonexistent/ca.pem"},
            r"cannot load the TLS files",
        ),
    ],
)
def test_the_joiner_refuses_what_it_cannot_use(client: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=rf"^PHENOCASCADE_KAFKA__CLIENT: .*{message}"):
        _credentials(KafkaSettings(client=client))
