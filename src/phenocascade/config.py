"""Typed settings (environment) and the topology (one YAML file).

Settings come from ``PHENOCASCADE_*`` environment variables (nested with ``__``), e.g.
``PHENOCASCADE_KAFKA__BOOTSTRAP_SERVERS`` or ``PHENOCASCADE_KAFKA__CLIENT={"security.protocol":
"SSL"}``. Client settings (TLS, SASL) pass through unchanged to confluent-kafka and to the
Cassandra driver. A path list (``PHENOCASCADE_ALLOWED_ROOTS``) is ``:``-separated, as ``PATH``
is, or JSON. :func:`get_settings` turns a bad variable into a one-line :class:`ConfigError`.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
import re
import ssl
import typing
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from phenocascade.errors import ConfigError

# The Python logger every confluent-kafka client logs through (not straight to stderr).
LIBRDKAFKA_LOGGER = "librdkafka"


class KafkaSettings(BaseModel):
    """How to reach Kafka.

    ``client`` is merged into every producer, consumer and admin config, so any
    librdkafka property (``security.protocol``, ``ssl.ca.location``, ``sasl.mechanism``,
    ``sasl.username``...) passes through.
    """

    bootstrap_servers: str = "127.0.0.1:9092"
    client: dict[str, str] = Field(default_factory=dict)

    def config(self, **extra: Any) -> dict[str, Any]:
        """Return a confluent-kafka config with the pass-through settings applied.

        The client logs through the ``librdkafka`` Python logger, so the command line
        decides where its retries and warnings go (``phenocascade.cli.logs``).
        """
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "logger": logging.getLogger(LIBRDKAFKA_LOGGER),
            **self.client,
            **extra,
        }


class CassandraSettings(BaseModel):
    """How to reach Cassandra; TLS and auth pass through to cassandra-driver."""

    hosts: list[str] = Field(default_factory=lambda: ["127.0.0.1"])
    port: int = 9042
    keyspace: str = "phenocascade"
    local_dc: str | None = None
    replication_factor: int = 1
    username: str | None = None
    password: str | None = None
    ssl_ca_file: Path | None = None
    ssl_cert_file: Path | None = None
    ssl_key_file: Path | None = None

    def ssl_context(self) -> ssl.SSLContext | None:
        """Return the TLS context of the driver, or ``None`` (no TLS) without ``ssl_ca_file``.

        The server's certificate must be signed by ``ssl_ca_file`` and name the host
        connected to. ``ssl_cert_file`` and ``ssl_key_file`` add a client certificate
        (mutual TLS).

        Raises
        ------
        ConfigError
            If a client certificate is given without a CA file, or a file is missing or
            not a PEM certificate or key.
        """
        if self.ssl_ca_file is None:
            if self.ssl_cert_file is not None:
                raise ConfigError(
                    "PHENOCASCADE_CASSANDRA__SSL_CERT_FILE is set but SSL_CA_FILE is not; "
                    "TLS to Cassandra needs the CA that signed its certificate"
                )
            return None
        try:
            context = ssl.create_default_context(cafile=str(self.ssl_ca_file))
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"PHENOCASCADE_CASSANDRA__SSL_CA_FILE: cannot load {self.ssl_ca_file} as PEM "
                f"CA certificates ({exc})"
            ) from exc
        if self.ssl_cert_file is not None:
            try:
                context.load_cert_chain(self.ssl_cert_file, self.ssl_key_file)
            except OSError as exc:
                raise ConfigError(
                    f"PHENOCASCADE_CASSANDRA__SSL_CERT_FILE/SSL_KEY_FILE: cannot load "
                    f"{self.ssl_cert_file} and {self.ssl_key_file} as a PEM certificate and "
                    f"key ({exc})"
                ) from exc
        return context


class Settings(BaseSettings):
    """Process-wide settings, read from the environment."""

    model_config = SettingsConfigDict(
        env_prefix="PHENOCASCADE_", env_nested_delimiter="__", extra="ignore"
    )

    home: Path = Path("var")
    datasets: Path = Path("../shared/datasets")
    # Default: ``<home>/artifacts`` (see ``_artifacts_in_home``).
    artifacts: Path = Path("var/artifacts")
    topology: Path | None = None
    # NoDecode: the validator below reads the variable, which need not be JSON.
    allowed_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    max_inline_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 64_000_000
    # Largest image file read from a URI (a worker, the annotation app, `render`); larger
    # files are dead-lettered unopened. Multi-page TIFFs are read page by page, so this may
    # be far above what one page decodes to.
    max_file_bytes: int = Field(default=4 * 1024**3, ge=1)
    # Signs the annotation app's session cookies (PHENOCASCADE_UI_SECRET); when unset, the
    # app generates one and keeps it in ``home/ui_secret`` so sessions survive restarts.
    ui_secret: SecretStr | None = None
    # Brute-force protection of the app's login: once this many logins for one user name, or
    # from one client address, failed within the last ``ui_login_window_s`` seconds, further
    # attempts get 429 (without a password check) until the oldest failure leaves the window.
    ui_login_max_failures: int = Field(default=5, ge=1)
    ui_login_window_s: float = Field(default=300.0, gt=0)
    # Addresses of the reverse proxies in front of the annotation app (comma-separated or a
    # JSON list). Only a request from one of them has its X-Forwarded-For read, for the
    # login throttle's client address; from anyone else the header is ignored.
    ui_trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Prometheus metrics: a process serves /metrics on this port unless its --metrics-port
    # says otherwise; `phenocascade run` serves on it and gives each of its processes its
    # own port above it (docs/architecture.md, "Metrics and status"). 0: no metrics.
    metrics_port: int = Field(default=9400, ge=0, le=65535)
    # Where the metrics listen: 127.0.0.1 serves this machine only; 0.0.0.0 lets another
    # machine's Prometheus scrape them.
    metrics_host: str = "127.0.0.1"
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    cassandra: CassandraSettings = Field(default_factory=CassandraSettings)

    @model_validator(mode="before")
    @classmethod
    def _artifacts_in_home(cls, data: Any) -> Any:
        """Put the models under the home (``<home>/artifacts``) unless they are named."""
        if isinstance(data, dict) and data.get("artifacts") is None and data.get("home"):
            return {**data, "artifacts": Path(data["home"]) / "artifacts"}
        return data

    @property
    def dataset_store(self) -> Path:
        """Folder of the stored datasets (``phenocascade data import ... --name``)."""
        return self.home / "datasets"

    def roots(self) -> list[Path]:
        """Return the resolved allowed roots; the datasets folder is always allowed."""
        return [p.resolve() for p in [*self.allowed_roots, self.datasets]]

    @field_validator("ui_trusted_proxies", mode="before")
    @classmethod
    def _address_list(cls, value: Any) -> Any:
        """Read a comma-separated or JSON list of IP addresses; refuse anything else."""
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    raise ValueError(_ADDRESS_LIST) from None
            else:
                value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise ValueError(_ADDRESS_LIST)
        for item in value:
            try:
                ipaddress.ip_address(str(item))
            except ValueError:
                raise ValueError(f"{_ADDRESS_LIST} ({item!r} is not one)") from None
        return [str(item) for item in value]

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _path_list(cls, value: Any) -> Any:
        """Read a ``:``-separated path list (as ``PATH``; empty entries skipped) or JSON."""
        if not isinstance(value, str):
            return value
        if value.lstrip().startswith("["):
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                raise ValueError(_PATH_LIST) from None
        return [part for part in value.split(os.pathsep) if part]


_PATH_LIST = "paths separated by ':' (as PATH) or a JSON list of paths"
_ADDRESS_LIST = "IP addresses separated by ',' or a JSON list of them"


class TopicSpec(BaseModel):
    """One Kafka topic and how it is created."""

    model_config = ConfigDict(extra="forbid")

    name: str
    partitions: int = 4
    retention_ms: int = 7 * 24 * 3600 * 1000
    cleanup_policy: Literal["delete", "compact"] = "delete"


class ThresholdOverride(BaseModel):
    """Hand-set thresholds that replace an artifact's calibrated ones for every label."""

    model_config = ConfigDict(extra="forbid")

    positive: float
    negative: float


Runtime = Literal["eager", "bf16", "onnx"]
Acquisition = Literal["uncertainty", "margin", "entropy", "bald", "random"]


class TierSpec(BaseModel):
    """One tier of the cascade.

    A ``gate`` tier forwards each image to the topic of its route (``pass``/``skip``);
    a ``branch`` tier is a leaf whose results the joiner waits for.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    role: Literal["gate", "branch"]
    backend: str
    artifact: str
    input: str
    group: str
    result_topic: str
    routes: dict[Literal["pass", "skip"], str] = Field(default_factory=dict)
    # A batch is what the consumer holds, up to batch_size; it never waits to fill. When
    # nothing is there, the worker waits up to max_wait_ms for a first message.
    batch_size: int = Field(default=8, ge=1)
    max_wait_ms: int = Field(default=200, ge=1)
    device: Literal["cpu", "cuda"] = "cpu"
    # Intra-op threads of this tier's model (None: torch's default, every core). When tiers
    # share one machine, give each its share so they do not oversubscribe the cores.
    threads: int | None = Field(default=None, ge=1)
    # Worker processes `phenocascade run` starts for this tier, all in its consumer group
    # (each takes a share of the input partitions, so at most that many do work).
    replicas: int = Field(default=1, ge=1)
    thresholds: ThresholdOverride | None = None
    # The labels this tier decides, in the order its models index them. A tier without a
    # model yet (cold start) asks experts exactly these; `phenocascade plan` fills them in.
    labels: list[str] | None = None
    # Named groups of this tier's labels that exclude each other (`phenocascade plan` copies
    # the dataset's). A classifier decides a group only when it is sure of each of its
    # labels, and asks an expert the rest (docs/routing.md, "Per-label routing"). Labels
    # named "G:V" are grouped by "G" unless declared here.
    groups: dict[str, list[str]] = Field(default_factory=dict)
    # The stored dataset (`phenocascade data import ... --name NAME`) this tier's models are
    # trained, certified and evaluated on; None for the bundled recipes.
    dataset: str | None = None
    # Backend constructor arguments that replace the recipe's (e.g. {"input_size": 224}).
    config: dict[str, Any] = Field(default_factory=dict)
    # How the model computes: "bf16" (autocast) or "onnx" (the nucleus segmenter in ONNX
    # Runtime) is served only for a model version whose test-split metric it changed by
    # at most 0.005 (`phenocascade check-runtime TIER --runtime R`); any other version
    # runs eager, and the worker says why (docs/architecture.md).
    runtime: Runtime = "eager"
    # The annotation queue's priority for this tier's requests (docs/active_learning.md):
    # the least sure label ("uncertainty"), the smallest top-two gap of a group
    # ("margin"), the summed entropy of the groups ("entropy"), the disagreement of
    # Monte-Carlo dropout samples ("bald", MobileNetV2 classifiers), or none ("random":
    # arrival order, an unbiased sample of what the tier asks). A novel image is first.
    acquisition: Acquisition = "uncertainty"


class JoinerSpec(BaseModel):
    """The faust app that merges tier results into one output per image."""

    model_config = ConfigDict(extra="forbid")

    app_id: str = "phenocascade-joiner"
    results_topic: str = "results"


class Topology(BaseModel):
    """The whole flow: topics, tiers and the joiner."""

    model_config = ConfigDict(extra="forbid")

    submitted_topic: str
    annotate_topic: str
    dead_letter_topic: str
    annotations_topic: str
    models_topic: str
    topics: list[TopicSpec]
    tiers: list[TierSpec]
    joiner: JoinerSpec = Field(default_factory=JoinerSpec)
    # The consumer groups of the annotation loop: the sink's and the retrainer's.
    sink_group: str = "phenocascade-annotation-sink"
    retrainer_group: str = "phenocascade-retrainer"

    @model_validator(mode="after")
    def _check(self) -> Topology:
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        if not self.tiers or self.tiers[0].role != "gate":
            raise ValueError("the first tier must be a gate (the quality gate)")
        known = {t.name for t in self.topics}
        used = {
            self.submitted_topic,
            self.annotate_topic,
            self.dead_letter_topic,
            self.annotations_topic,
            self.models_topic,
            self.joiner.results_topic,
        }
        for tier in self.tiers:
            used |= {tier.input, tier.result_topic, *tier.routes.values()}
            if tier.role == "gate" and set(tier.routes) != {"pass", "skip"}:
                raise ValueError(f"gate tier {tier.name!r} needs routes for pass and skip")
        missing = sorted(used - known)
        if missing:
            raise ValueError(f"topics used but not declared under 'topics': {missing}")
        partitions = {t.name: t.partitions for t in self.topics}
        joined = [*(t.result_topic for t in self.tiers), self.annotations_topic]
        if len({partitions[name] for name in joined}) > 1:
            counts = {name: partitions[name] for name in joined}
            raise ValueError(
                f"the joiner reads {counts}, co-partitioned by image id: give them all the "
                "same number of partitions"
            )
        for tier in self.tiers:
            if tier.replicas > partitions[tier.input]:
                raise ValueError(
                    f"tier {tier.name!r} has {tier.replicas} replicas but its input "
                    f"{tier.input!r} has {partitions[tier.input]} partitions: the extra "
                    "replicas would sit idle"
                )
        return self

    def namespaced(self, prefix: str) -> Topology:
        """Return a copy whose topics, consumer groups and joiner id all start with ``prefix``.

        Lets several isolated cascades (environments, test sessions) share one cluster.
        """

        def rename(name: str) -> str:
            return f"{prefix}{name}"

        data = self.model_dump()
        for key in (
            "submitted_topic",
            "annotate_topic",
            "dead_letter_topic",
            "annotations_topic",
            "models_topic",
        ):
            data[key] = rename(data[key])
        for topic in data["topics"]:
            topic["name"] = rename(topic["name"])
        for tier in data["tiers"]:
            for key in ("input", "group", "result_topic"):
                tier[key] = rename(tier[key])
            tier["routes"] = {k: rename(v) for k, v in tier["routes"].items()}
        data["joiner"]["app_id"] = rename(data["joiner"]["app_id"])
        data["joiner"]["results_topic"] = rename(data["joiner"]["results_topic"])
        data["sink_group"] = rename(data["sink_group"])
        data["retrainer_group"] = rename(data["retrainer_group"])
        return Topology.model_validate(data)

    def tier(self, name: str) -> TierSpec:
        """Return the tier called ``name``.

        Raises
        ------
        ConfigError
            If no tier has that name.
        """
        for t in self.tiers:
            if t.name == name:
                return t
        raise ConfigError(
            f"no tier named {name!r}; the topology has {[t.name for t in self.tiers]}"
        )

    @property
    def branch_tiers(self) -> list[TierSpec]:
        """Tiers whose results the joiner waits for."""
        return [t for t in self.tiers if t.role == "branch"]

    @property
    def gate_tiers(self) -> list[TierSpec]:
        """Tiers that decide whether an image goes on."""
        return [t for t in self.tiers if t.role == "gate"]


def load_topology(path: Path | None = None) -> Topology:
    """Read and validate a topology file.

    Parameters
    ----------
    path : pathlib.Path or None, default None
        A YAML file; ``None`` reads the packaged default ``resources/topology.yaml``.

    Raises
    ------
    ConfigError
        If the file is missing or invalid, with pydantic's explanation.
    """
    if path is None:
        text = resources.files("phenocascade.resources").joinpath("topology.yaml").read_text()
        where = "packaged topology.yaml"
    else:
        if not path.is_file():
            raise ConfigError(f"topology file {path} does not exist")
        text = path.read_text()
        where = str(path)
    try:
        return Topology.model_validate(yaml.safe_load(text))
    except (ValidationError, yaml.YAMLError) as exc:
        raise ConfigError(f"invalid topology in {where}: {exc}") from exc


@functools.cache
def get_settings() -> Settings:
    """Return the process settings (read once from the environment).

    Raises
    ------
    ConfigError
        If a ``PHENOCASCADE_*`` variable is invalid: one line per variable, naming it, the
        form expected and the value given (hidden for secrets and client settings).
    """
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError("; ".join(_invalid_setting(e) for e in exc.errors())) from exc
    except SettingsError as exc:
        raise ConfigError(_undecodable_setting(str(exc))) from exc


_ENV_PREFIX = "PHENOCASCADE_"
# Forms for pydantic errors whose message does not say what is expected.
_FORM_BY_ERROR = {"path_type": "a path"}
# Variables whose values are not echoed: they hold passwords, or may (client settings).
_HIDDEN = re.compile(r"SECRET|PASSWORD|CLIENT|^PHENOCASCADE_(KAFKA|CASSANDRA)$")


def _shown(variable: str, value: Any) -> str:
    """Return how an error message shows the value of ``variable``."""
    if _HIDDEN.search(variable):
        return "a value not shown here"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _invalid_setting(error: Any) -> str:
    """Describe one pydantic validation error of :class:`Settings` as ``VARIABLE: ...``."""
    names = [part for part in error["loc"] if isinstance(part, str)]  # no list indices
    variable = _ENV_PREFIX + "__".join(names).upper()
    message = error["msg"].removeprefix("Input should be ").removeprefix("Value error, ")
    form = _FORM_BY_ERROR.get(error["type"], message)
    return f"{variable}: expected {form}, got {_shown(variable, error['input'])}"


def _undecodable_setting(message: str) -> str:
    """Describe pydantic-settings' "error parsing value for field ..." as ``VARIABLE: ...``.

    It names only the top-level field; the variable is the one under it that should hold
    JSON (a list, a dict or a nested model) and does not.
    """
    match = re.search(r'field "(\w+)"', message)
    field = match.group(1) if match else ""
    prefix = (_ENV_PREFIX + field).upper()
    for variable, value in sorted(os.environ.items()):
        variable = variable.upper()
        if variable != prefix and not variable.startswith(prefix + "__"):
            continue
        path = variable.removeprefix(_ENV_PREFIX).lower().split("__")
        form = _json_form(path)
        if form is not None and not _is_json(value):
            return f"{variable}: expected {form}, got {_shown(variable, value)}"
    return f"{prefix}: expected JSON ({message})"


def _json_form(path: list[str]) -> str | None:
    """Return the JSON form the setting at ``path`` needs, or ``None`` if it is plain text."""
    annotation: Any = Settings
    for name in path:
        fields = getattr(annotation, "model_fields", {})
        if name not in fields:
            return None
        annotation = fields[name].annotation
    origin = typing.get_origin(annotation)
    if origin is list:
        return 'a JSON list such as ["a", "b"]'
    if origin is dict or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return 'a JSON object such as {"key": "value"}'
    return None


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True
