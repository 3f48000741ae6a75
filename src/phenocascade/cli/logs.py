"""Where the command line's log records go: the console gets what a user needs.

The console (stderr; for the processes of ``phenocascade run``, their log file) gets
phenocascade's own records at INFO, and the drivers' (cassandra-driver, faust, aiokafka...)
only at WARNING. librdkafka logs through the ``librdkafka`` logger
(:meth:`phenocascade.config.KafkaSettings.config`); its warnings are mostly retries while a
broker starts or moves a leader, so they reach the console only at ERROR. Every driver
record at INFO or above also goes to ``<home>/logs/drivers.log``, so what the console
leaves out is kept. ``-v`` adds phenocascade's DEBUG records and every driver's INFO ones
to the console.

On a terminal, phenocascade's INFO records show their message alone (a warning or an error
keeps its level and logger), so a person reads what happened, not where it was logged;
anywhere else (a log file, a pipe, ``-v``) every record has its time, level and logger.
"""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path

from phenocascade.config import LIBRDKAFKA_LOGGER, get_settings
from phenocascade.errors import ConfigError

OURS = "phenocascade"
DRIVERS_LOG = "drivers.log"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TERMINAL_WARNING_FORMAT = "%(levelname)s %(name)s: %(message)s"

_installed: list[logging.Handler] = []


def is_ours(name: str) -> bool:
    """Whether a logger name is phenocascade's own (not a driver's)."""
    return name == OURS or name.startswith(OURS + ".")


class ConsoleFilter(logging.Filter):
    """Let through phenocascade's records and the drivers' from their console level on.

    Parameters
    ----------
    verbose : bool
        Drivers from INFO (else WARNING, and librdkafka from ERROR).
    """

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.driver_level = logging.INFO if verbose else logging.WARNING
        self.librdkafka_level = logging.INFO if verbose else logging.ERROR

    def filter(self, record: logging.LogRecord) -> bool:
        """Return whether ``record`` goes to the console."""
        if is_ours(record.name):
            return True
        if record.name == LIBRDKAFKA_LOGGER:
            return record.levelno >= self.librdkafka_level
        return record.levelno >= self.driver_level


class TerminalFormatter(logging.Formatter):
    """Format phenocascade's INFO (and lower) records as their message alone."""

    def __init__(self) -> None:
        super().__init__(TERMINAL_WARNING_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        """Return the message of our INFO records; the level and logger of the rest."""
        if is_ours(record.name) and record.levelno <= logging.INFO:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + self.formatException(record.exc_info)
            return message
        return super().format(record)


class _DriverFileHandler(logging.FileHandler):
    """Append the drivers' records to a file made (with its folder) at the first record."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, delay=True)
        self.setLevel(logging.INFO)
        self.addFilter(lambda record: not is_ours(record.name))

    def _open(self) -> io.TextIOWrapper:
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def default_log_dir() -> Path | None:
    """Return ``<home>/logs``, or ``None`` if the settings are invalid (reported later)."""
    try:
        return get_settings().home / "logs"
    except ConfigError:
        return None


def configure_logging(verbose: bool, log_dir: Path | None) -> None:
    """Send log records to the console and to ``log_dir/drivers.log`` (see the module).

    Calling it again replaces what the previous call installed. Logging that someone else
    set up (an application or a test runner calling :func:`phenocascade.cli.main`) is left
    as it is, as :func:`logging.basicConfig` would.
    """
    root = logging.getLogger()
    if any(handler not in _installed for handler in root.handlers):
        return
    for handler in _installed:
        root.removeHandler(handler)
        handler.close()
    _installed.clear()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    console = logging.StreamHandler()
    console.addFilter(ConsoleFilter(verbose))
    _installed.append(console)
    if log_dir is not None:
        _installed.append(_DriverFileHandler(log_dir / DRIVERS_LOG))
    for handler in _installed:
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    if not verbose and sys.stderr.isatty():
        console.setFormatter(TerminalFormatter())
