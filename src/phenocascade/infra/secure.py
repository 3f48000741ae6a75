"""``phenocascade infra up --secure``: the local services with TLS and passwords, set up once.

The first secured start makes, under ``<home>/infra/secure`` (a folder only its owner may
read):

* a certificate authority and a server certificate for ``127.0.0.1`` it signs, in a
  PKCS12 keystore (:func:`make_certificates`, with ``openssl``);
* random passwords: the keystore's, Kafka's SCRAM-SHA-512 user ``phenocascade``, and a
  Cassandra superuser role ``phenocascade`` (``secrets.json``, mode 0600);
* ``client.env`` (mode 0600): the ``PHENOCASCADE_*`` settings that give every client
  (workers, the joiner, the CLI, the UI) those credentials and the CA.

Cassandra's PasswordAuthenticator starts with the well-known superuser
``cassandra``/``cassandra``; once the service answers, :func:`provision_cassandra` creates
the ``phenocascade`` role, gives ``cassandra`` a random password nobody keeps and takes
its login away. Later starts reuse every file, so clients keep working.

The services' own configuration files must hold the keystore password in plain text (a
JVM reads them); ``phenocascade.infra.local`` writes them readable by their owner only.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cassandra import DriverException

from phenocascade.config import Settings
from phenocascade.errors import InfraError
from phenocascade.infra.local import Security, local_cassandra, write_private

log = logging.getLogger(__name__)

USER = "phenocascade"
# Cassandra's PasswordAuthenticator creates this superuser on first start.
DEFAULT_SUPERUSER = ("cassandra", "cassandra")
_PROVISIONED = "cassandra.provisioned"
_PASSWORD_VARIABLE = "PHENOCASCADE_KEYSTORE_PASSWORD"


def _openssl(*args: str, cwd: Path, env: dict[str, str] | None = None) -> None:
    try:
        subprocess.run(
            ["openssl", *args],
            cwd=cwd,
            env=None if env is None else {**os.environ, **env},
            check=True,
            capture_output=True,
            timeout=60,
        )
    except FileNotFoundError as exc:
        needed = "openssl is needed to make the local CA (apt-get install openssl)"
        raise InfraError(needed) from exc
    except subprocess.CalledProcessError as exc:
        detail = exc.stderr.decode(errors="replace").strip()
        raise InfraError(f"openssl {args[0]} failed: {detail}") from exc


def make_certificates(
    folder: Path, keystore_password: str, *, days: int = 825
) -> tuple[Path, Path]:
    """Make a CA and a server certificate for ``127.0.0.1`` (and ``localhost``) it signs.

    Parameters
    ----------
    folder : pathlib.Path
        Where the files go (created).
    keystore_password : str
        Password of the PKCS12 keystore.
    days : int, default 825
        Validity of both certificates.

    Returns
    -------
    tuple of pathlib.Path
        The CA's PEM certificate (``ca.pem``, for clients) and the keystore
        (``server.p12``: the server's key and certificate chain, for the services).

    Raises
    ------
    InfraError
        If ``openssl`` is missing or fails.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    valid = ["-days", str(days)]
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", *valid,
        "-subj", "/CN=phenocascade local CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip
    _openssl(
        "req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1",
        cwd=folder,
    )  # fmt: skip
    (folder / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "basicConstraints=CA:FALSE\n"
    )
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", *valid, "-extfile", "server.ext",
        cwd=folder,
    )  # fmt: skip
    _openssl(
        "pkcs12", "-export", "-in", "server.pem", "-inkey", "server.key",
        "-certfile", "ca.pem", "-name", "server", "-out", "server.p12",
        # From the environment: a password on the command line shows in the process list.
        "-passout", f"env:{_PASSWORD_VARIABLE}",
        cwd=folder,
        env={_PASSWORD_VARIABLE: keystore_password},
    )  # fmt: skip
    for private in ("ca.key", "server.key", "server.p12"):
        (folder / private).chmod(0o600)
    return folder / "ca.pem", folder / "server.p12"


@dataclass(frozen=True)
class LocalSecrets:
    """The CA, keystore and passwords of one home's secured services.

    Attributes
    ----------
    folder : pathlib.Path
        ``<home>/infra/secure``.
    keystore_password, kafka_password, cassandra_password : str
        Random, made once.
    """

    folder: Path
    keystore_password: str
    kafka_password: str
    cassandra_password: str

    @property
    def ca_file(self) -> Path:
        """The CA's PEM certificate, which clients trust."""
        return self.folder / "ca.pem"

    @property
    def provisioned(self) -> bool:
        """Whether Cassandra's ``phenocascade`` role exists (:func:`provision_cassandra`)."""
        return (self.folder / _PROVISIONED).is_file()

    def security(self) -> Security:
        """Return what :func:`phenocascade.infra.local.up` starts the services with."""
        return Security(
            keystore=self.folder / "server.p12",
            keystore_password=self.keystore_password,
            ca_file=self.ca_file,
            kafka_users={USER: self.kafka_password},
        )

    def client_settings(self, settings: Settings) -> Settings:
        """Return ``settings`` with these credentials and CA for Kafka and Cassandra.

        Before the ``phenocascade`` role exists, Cassandra's login is its default superuser.
        """
        kafka = settings.kafka.model_copy(
            update={
                "client": {
                    **settings.kafka.client,
                    "security.protocol": "SASL_SSL",
                    "sasl.mechanism": "SCRAM-SHA-512",
                    "sasl.username": USER,
                    "sasl.password": self.kafka_password,
                    "ssl.ca.location": str(self.ca_file),
                }
            }
        )
        user, password = (USER, self.cassandra_password) if self.provisioned else DEFAULT_SUPERUSER
        cassandra = settings.cassandra.model_copy(
            update={"username": user, "password": password, "ssl_ca_file": self.ca_file}
        )
        return settings.model_copy(update={"kafka": kafka, "cassandra": cassandra})

    def write_env(self, settings: Settings) -> Path:
        """Write ``client.env`` (mode 0600): ``export`` lines of the client settings."""
        client = self.client_settings(settings)
        values = {
            "PHENOCASCADE_KAFKA__BOOTSTRAP_SERVERS": client.kafka.bootstrap_servers,
            "PHENOCASCADE_KAFKA__CLIENT": json.dumps(client.kafka.client),
            "PHENOCASCADE_CASSANDRA__PORT": str(client.cassandra.port),
            "PHENOCASCADE_CASSANDRA__USERNAME": client.cassandra.username or "",
            "PHENOCASCADE_CASSANDRA__PASSWORD": client.cassandra.password or "",
            "PHENOCASCADE_CASSANDRA__SSL_CA_FILE": str(self.ca_file),
        }
        target = self.folder / "client.env"
        write_private(target, "".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items()))
        return target


def ensure_secrets(home: Path) -> LocalSecrets:
    """Return the home's secrets, making the CA, keystore and passwords the first time.

    Raises
    ------
    InfraError
        If ``openssl`` is missing or fails, or ``secrets.json`` is unreadable.
    """
    folder = home / "infra" / "secure"
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    stored = folder / "secrets.json"
    if stored.is_file():
        try:
            values = json.loads(stored.read_text())
            return LocalSecrets(
                folder,
                values["keystore_password"],
                values["kafka_password"],
                values["cassandra_password"],
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise InfraError(
                f"{stored} is damaged ({exc}); stop the services and delete {folder} and "
                f"{home / 'infra'} to start the secured services afresh"
            ) from exc
    made = LocalSecrets(
        folder,
        secrets.token_urlsafe(24),
        secrets.token_urlsafe(24),
        secrets.token_urlsafe(24),
    )
    make_certificates(folder, made.keystore_password)
    write_private(
        stored,
        json.dumps(
            {
                "keystore_password": made.keystore_password,
                "kafka_password": made.kafka_password,
                "cassandra_password": made.cassandra_password,
            }
        ),
    )
    log.info("made a local CA, a server keystore and passwords in %s", folder)
    return made


def provision_cassandra(settings: Settings, made: LocalSecrets) -> None:
    """Create the ``phenocascade`` superuser role and retire the default one (once).

    ``settings`` points at the running, secured Cassandra; the default superuser logs in
    to create the role, which then gives ``cassandra`` a random password and no login.
    """
    if made.provisioned:
        return
    port = settings.cassandra.port
    as_default = made.client_settings(settings).cassandra
    as_ours = as_default.model_copy(update={"username": USER, "password": made.cassandra_password})
    steps = [
        (
            as_default,
            f"CREATE ROLE IF NOT EXISTS {USER} WITH PASSWORD = %s AND LOGIN = true "
            "AND SUPERUSER = true",
            made.cassandra_password,
        ),
        (
            as_ours,
            f"ALTER ROLE {DEFAULT_SUPERUSER[0]} WITH PASSWORD = %s AND LOGIN = false",
            secrets.token_urlsafe(24),
        ),
    ]
    for login, statement, secret in steps:
        cluster = local_cassandra(login, port)
        try:
            cluster.connect().execute(statement, (secret,), timeout=30)
        except DriverException as exc:
            raise InfraError(
                f"setting up Cassandra's {USER} role on 127.0.0.1:{port} failed: {exc}"
            ) from exc
        finally:
            cluster.shutdown()
    (made.folder / _PROVISIONED).touch(mode=0o600)
    log.info("Cassandra: role %s made, the default superuser retired", USER)
