"""The ``Stage`` contract, the backend registry and the artifact format.

A stage takes a batch of decoded images and returns, per image, calibrated scores and
(for detectors) boxes, plus the model version that produced them. The quality gate, the
majority classifier and the minority detectors are implementations of this one contract;
tier workers know nothing else about models.

Artifact layout (one folder per trained version)::

    <artifacts>/<tier>/<version>/weights.pt      # state dict, loaded with weights_only=True
    <artifacts>/<tier>/<version>/metadata.json   # ArtifactMeta, with the weights' SHA-256
    <artifacts>/<tier>/<version>/novelty.npz     # shift detector (models.novelty), no pickle
    <artifacts>/<tier>/CHAMPION                  # text: the version workers should serve

Tier (artifact) names match :data:`NAME_PATTERN` and versions :data:`VERSION_PATTERN`; both
are checked before they form a path, since versions arrive from the models topic.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import numpy.typing as npt

from phenocascade.config import TierSpec
from phenocascade.domain import DecodedImage, LabelThresholds, StageKind, StageOutput
from phenocascade.errors import ArtifactError, ConfigError, NoChampionError

# A tier's artifact folder name: letters, digits, "_", "." and "-", not starting with ".".
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# A version as models.artifact.new_version makes it: UTC time and 4 hex digits.
VERSION_PATTERN = re.compile(r"[0-9]{8}T[0-9]{6}-[0-9a-f]{4}")


def check_artifact_name(name: str) -> str:
    """Return ``name`` if it is a tier's artifact folder name (:data:`NAME_PATTERN`).

    Raises
    ------
    ArtifactError
        Otherwise: it could name a folder outside the artifact store.
    """
    if not NAME_PATTERN.fullmatch(name):
        raise ArtifactError(
            f"artifact name {name!r} is invalid: use 1 to 64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_version(version: str) -> str:
    """Return ``version`` if it has the form of :func:`~.artifact.new_version`'s versions.

    Raises
    ------
    ArtifactError
        Otherwise: it could name a folder outside the artifact store.
    """
    if not VERSION_PATTERN.fullmatch(version):
        raise ArtifactError(
            f"model version {version!r} is invalid: expected UTC time and 4 hex digits, "
            "such as '20261128T101500-3fa2'"
        )
    return version


@runtime_checkable
class Stage(Protocol):
    """What every tier's model offers to a worker.

    Attributes
    ----------
    kind : StageKind
        Gate, classifier or detector; decides how :func:`phenocascade.domain.route` reads
        the scores.
    classes : Sequence[str]
        Label names, in the order of the model's outputs.
    model_name : str
        Registered backend name.
    version : str
        Artifact version that produced the predictions.
    thresholds : Mapping[str, LabelThresholds]
        Calibrated routing thresholds per label.
    gate_label : str
        For gates, the label meaning "usable".
    """

    kind: StageKind
    classes: Sequence[str]
    model_name: str
    version: str
    thresholds: Mapping[str, LabelThresholds]
    gate_label: str

    def predict(self, images: Sequence[DecodedImage]) -> list[StageOutput]:
        """Score a batch; return one :class:`StageOutput` per image, in order."""
        ...


@runtime_checkable
class Embedder(Protocol):
    """Optional capability of a :class:`Stage`: the features its model sees in each image.

    Novelty scoring (:mod:`phenocascade.models.novelty`) reads them; stages without it are
    scored on a backend-agnostic image descriptor instead.
    """

    def embed(self, images: Sequence[DecodedImage]) -> npt.NDArray[np.float64]:
        """Return features of shape ``(len(images), d)``, ``float64``, ``d`` fixed per model."""
        ...


@dataclass
class ArtifactMeta:
    """Metadata stored beside the weights; the artifact describes itself.

    Attributes
    ----------
    backend : str
        Registered backend name, used to rebuild the model.
    tier : str
        Tier the model was trained for.
    version : str
        Unique version, e.g. ``"20261128T101500-3fa2"``.
    kind : str
        :class:`StageKind` value.
    classes : list of str
        Output labels in order.
    input_size : int
        Side of the square network input in pixels.
    normalization : dict
        ``{"mean": [...], "std": [...]}`` applied after scaling to ``[0, 1]``.
    calibration : dict
        Calibrator per label, ``{"calibrators": {label: record}}`` (see
        :func:`~phenocascade.models.calibration.calibrator_from_dict`; older artifacts:
        ``{"temperature": {label: T}}``), and, when a shift detector was fitted
        (``novelty.npz``), ``"novelty": {"alpha", "threshold", "features", "n"}``.
    thresholds : dict
        Per label ``{"positive", "negative", "target_precision", "achieved_precision_pos",
        "achieved_precision_neg", "coverage"}``.
    metrics : dict
        Validation metrics the model earned.
    data_fingerprint : str
        SHA-256 over the training sample ids and labels.
    code_version : str
        phenocascade version (and git revision when known).
    created_at : str
        ISO-8601 UTC time.
    parent_version : str
        Version this one was retrained from, ``""`` for a bootstrap model.
    config : dict
        Backend constructor arguments.
    weights_sha256 : dict
        Hex SHA-256 of each weight file, by file name (``{"weights.pt": ...}``), checked
        when the weights load; empty in artifacts written before it was recorded.
    """

    backend: str
    tier: str
    version: str
    kind: str
    classes: list[str]
    input_size: int
    normalization: dict[str, list[float]]
    calibration: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, dict[str, float]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: str = ""
    code_version: str = ""
    created_at: str = ""
    parent_version: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    weights_sha256: dict[str, str] = field(default_factory=dict)

    def label_thresholds(self) -> dict[str, LabelThresholds]:
        """Return the routing thresholds as :class:`LabelThresholds`."""
        return {label: LabelThresholds.from_record(t) for label, t in self.thresholds.items()}

    def write(self, folder: Path) -> None:
        """Write ``metadata.json`` into ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metadata.json").write_text(json.dumps(asdict(self), indent=2, sort_keys=True))

    @classmethod
    def read(cls, folder: Path) -> ArtifactMeta:
        """Read ``metadata.json`` from ``folder``.

        Raises
        ------
        ArtifactError
            If the file is missing or does not match this schema.
        """
        path = folder / "metadata.json"
        if not path.is_file():
            raise ArtifactError(f"{path} is missing; train the tier first (phenocascade train)")
        try:
            return cls(**json.loads(path.read_text()))
        except (TypeError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{path} is not valid artifact metadata: {exc}") from exc


class Backend(Protocol):
    """A registered backend class: a :class:`Stage` that can also be loaded and saved."""

    @classmethod
    def load(cls, folder: Path, device: str = "cpu") -> Stage:
        """Rebuild a trained stage from an artifact folder."""
        ...


B = TypeVar("B")
_REGISTRY: dict[str, type[Any]] = {}

# Third-party backends: each entry point of this group names a module or a backend class
# (``pkg.module`` or ``pkg.module:Class``), registered under the entry point's name.
ENTRY_POINT_GROUP = "phenocascade.backends"
# What a backend class offers beyond its constructor (see docs/own-data.md).
_BACKEND_METHODS = ("fit", "predict", "set_calibration", "save", "load")


@dataclass
class _Plugins:
    """Backends registered from entry points, and which entry points were loaded."""

    # Backend name -> the distribution whose entry point registered it.
    names: dict[str, str] = field(default_factory=dict)
    # (distribution, name, value) of every entry point loaded: each is loaded once.
    loaded: set[tuple[str, str, str]] = field(default_factory=set)
    # Whether every installed entry point has been loaded once (done at the first lookup).
    scanned: bool = False


_PLUGINS = _Plugins()


def register_backend(name: str) -> Callable[[type[B]], type[B]]:
    """Register a backend class under ``name``; duplicate names are refused.

    Raises
    ------
    ConfigError
        If ``name`` is already registered.
    """

    def decorator(cls: type[B]) -> type[B]:
        if name in _REGISTRY:
            raise ConfigError(f"backend {name!r} is already registered by {_REGISTRY[name]!r}")
        _REGISTRY[name] = cls
        return cls

    return decorator


def backend_names() -> list[str]:
    """Return every registered backend name, built-in and plugin, sorted.

    Raises
    ------
    ConfigError
        If an installed backend plugin cannot be registered (see :func:`load_backend_plugins`).
    """
    load_backend_plugins()
    return sorted(_REGISTRY)


def get_backend(name: str) -> type[Any]:
    """Return the backend class registered as ``name``, built-in or plugin.

    The installed plugins are loaded at the first lookup and again when ``name`` is not
    registered, so one installed while the process runs is found too.

    Raises
    ------
    ConfigError
        If no backend has that name, or an installed backend plugin cannot be registered
        (see :func:`load_backend_plugins`).
    """
    _import_builtin_backends()
    if name not in _REGISTRY or not _PLUGINS.scanned:
        load_backend_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        builtin = sorted(set(_REGISTRY) - set(_PLUGINS.names))
        plugins = sorted(_PLUGINS.names) or "none installed"
        raise ConfigError(
            f"unknown backend {name!r}; built-in: {builtin}; plugins ({ENTRY_POINT_GROUP!r} "
            f"entry points): {plugins}"
        ) from None


def new_stage(name: str, config: Mapping[str, Any]) -> Any:
    """Return a fresh stage of backend ``name`` built from ``config``.

    Raises
    ------
    ConfigError
        If no backend has that name (:func:`get_backend`), or ``config`` names an option
        its constructor does not take: one line naming the options and those it takes.
    """
    backend = get_backend(name)
    params = inspect.signature(backend).parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        takes = [p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL]
        unknown = sorted(set(config) - set(takes))
        if unknown:
            raise ConfigError(
                f"backend {name!r} takes no option {', '.join(map(repr, unknown))}; it takes "
                f"{', '.join(sorted(takes))}: remove or rename it in the tier's config "
                "(or --config)"
            )
    return backend(**config)


def _import_builtin_backends() -> None:
    # Importing the modules runs their @register_backend decorators.
    from phenocascade.models import backends  # noqa: F401


def load_backend_plugins() -> None:
    """Register the backend of every installed :data:`ENTRY_POINT_GROUP` entry point.

    An entry point's value is a backend class (``pkg.module:Class``), registered under the
    entry point's name, or a module (``pkg.module``) whose import registers a backend of
    that name (``@register_backend(name)``). Entry points already loaded are skipped.

    Raises
    ------
    ConfigError
        Naming the distribution and the entry point, if its name is already registered
        (a built-in or another plugin), it fails to import, it names neither a module nor
        a class, or its class is not a backend: it lacks ``fit``, ``predict``,
        ``set_calibration``, ``save`` or ``load``, or a :class:`StageKind` ``kind``, or its
        ``model_name`` is not the entry point's name.
    """
    _import_builtin_backends()
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        dist = entry.dist.name if entry.dist is not None else "(unknown distribution)"
        key = (dist, entry.name, entry.value)
        if key not in _PLUGINS.loaded:
            _register_entry_point(entry, dist)
            _PLUGINS.loaded.add(key)
    _PLUGINS.scanned = True


def _register_entry_point(entry: EntryPoint, dist: str) -> None:
    """Load one entry point and register its backend (see :func:`load_backend_plugins`)."""
    name = entry.name
    where = f"backend plugin {name} = {entry.value} of distribution {dist!r}"
    if name in _REGISTRY:
        owner = _PLUGINS.names.get(name)
        taken = f"distribution {owner!r}" if owner else "a built-in backend"
        raise ConfigError(
            f"{where}: the name {name!r} is taken by {taken}; rename the entry point in the "
            f'[project.entry-points."{ENTRY_POINT_GROUP}"] table of {dist!r}'
        )
    try:
        target = entry.load()
    except Exception as exc:  # a plugin's import may raise anything; it is reported here
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise ConfigError(
            f"{where} failed to import ({reason}); fix or uninstall {dist!r}"
        ) from exc
    if isinstance(target, ModuleType):
        if name not in _REGISTRY:
            raise ConfigError(
                f"{where}: importing the module registered no backend {name!r}; decorate its "
                f"class with @register_backend({name!r}) or name the class (module:Class)"
            )
        cls = _REGISTRY[name]
    elif isinstance(target, type):
        cls = target
    else:
        raise ConfigError(f"{where} is a {type(target).__name__}, not a module or a class")
    problem = _not_a_backend(cls, name)
    if problem:
        _REGISTRY.pop(name, None)
        raise ConfigError(f"{where}: class {cls.__qualname__} {problem}")
    _REGISTRY[name] = cls
    _PLUGINS.names[name] = dist


def _not_a_backend(cls: type[Any], name: str) -> str:
    """Return what ``cls`` lacks to be the backend ``name``, or ``""``."""
    missing = [m for m in _BACKEND_METHODS if not callable(getattr(cls, m, None))]
    if missing:
        return f"has no {', '.join(missing)}; subclass a built-in backend or implement them"
    if not isinstance(getattr(cls, "kind", None), StageKind):
        return "has no `kind` (a StageKind: GATE, CLASSIFIER or DETECTOR)"
    if getattr(cls, "model_name", None) != name:
        # Artifacts record model_name, and load_stage rebuilds them by it.
        return f"has model_name {getattr(cls, 'model_name', None)!r}; set it to {name!r}"
    return ""


def tier_classes(spec: TierSpec) -> tuple[StageKind, list[str]]:
    """Return what a tier predicts and its labels, from its topology entry alone.

    A tier without a model yet (cold start) routes every image to annotation and asks
    experts these labels; its first model learns them. A gate's label is its backend's
    ``gate_label``.

    Raises
    ------
    ConfigError
        If the backend is unknown, or a classifier or detector tier lists no ``labels``.
    """
    backend = get_backend(spec.backend)
    kind: StageKind = backend.kind
    if kind is StageKind.GATE:
        return kind, [str(backend.gate_label)]
    if not spec.labels:
        raise ConfigError(
            f"tier {spec.name!r} has no model yet and its topology entry lists no `labels`: "
            f"train it (phenocascade train {spec.name}) or list the labels experts should "
            "be asked"
        )
    return kind, list(spec.labels)


def champion_version(artifacts: Path, tier: str) -> str | None:
    """Return the champion version of ``tier``, or ``None`` if it has none.

    Raises
    ------
    ArtifactError
        If ``tier`` is not a valid artifact name.
    """
    marker = artifacts / check_artifact_name(tier) / "CHAMPION"
    return marker.read_text().strip() if marker.is_file() else None


def set_champion(artifacts: Path, tier: str, version: str) -> None:
    """Atomically make ``version`` the champion of ``tier``.

    Raises
    ------
    ArtifactError
        If ``tier`` or ``version`` is invalid, or there is no such artifact.
    """
    check_artifact_name(tier)
    check_version(version)
    if not (artifacts / tier / version / "metadata.json").is_file():
        raise ArtifactError(
            f"cannot promote {tier}/{version}: no artifact at {artifacts / tier / version}"
        )
    tmp = artifacts / tier / "CHAMPION.tmp"
    tmp.write_text(version)
    os.replace(tmp, artifacts / tier / "CHAMPION")


def set_compute_threads(threads: int) -> None:
    """Set the intra-op threads every model of this process computes with.

    torch is imported here, not at module level, so that processes without models (the
    joiner, the CLI's Kafka commands) never load it.
    """
    import torch

    torch.set_num_threads(threads)


def load_stage(
    artifacts: Path,
    tier: str,
    version: str | None = None,
    device: str = "cpu",
    *,
    novelty: bool = True,
) -> Stage:
    """Load a trained stage.

    Parameters
    ----------
    artifacts : pathlib.Path
        Root of the artifact store.
    tier : str
        Tier name (a folder under ``artifacts``).
    version : str or None, default None
        Version to load; ``None`` loads the champion.
    device : str, default "cpu"
        ``"cpu"`` or ``"cuda"``.
    novelty : bool, default True
        Wrap the stage in a :class:`~phenocascade.models.novelty.NoveltyGuard`, which marks
        images unlike its calibration data ``novel`` (so they go to a person); ``False``
        returns the backend itself.

    Raises
    ------
    NoChampionError
        If ``version`` is ``None`` and the tier has no champion yet.
    ArtifactError
        If the tier name or the version (given or in ``CHAMPION``) is invalid, the
        weights' SHA-256 is not the recorded one, or there is no such artifact.
    """
    version = version or champion_version(artifacts, tier)
    if version is None:
        raise NoChampionError(
            f"tier {tier!r} has no champion model under {artifacts}; "
            f"run `phenocascade train {tier}`"
        )
    folder = artifacts / check_artifact_name(tier) / check_version(version)
    meta = ArtifactMeta.read(folder)
    stage: Stage = get_backend(meta.backend).load(folder, device=device)
    if not novelty:
        return stage
    # Imported here: novelty needs torch (through preprocess), this module must not.
    from phenocascade.models.novelty import NoveltyGuard

    return NoveltyGuard.around(stage, folder)
