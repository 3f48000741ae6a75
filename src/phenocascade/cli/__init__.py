"""The ``phenocascade`` command line.

Each sub-module registers its sub-commands with ``register(subparsers)``; this module
only wires them together and turns :class:`~phenocascade.errors.PhenocascadeError` into a
one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import importlib
import io
import os
import sys
from collections.abc import Sequence

from phenocascade.cli.logs import configure_logging, default_log_dir
from phenocascade.errors import PhenocascadeError

# Sub-command modules, each exposing ``register(subparsers) -> None``.
_COMMAND_MODULES = (
    "phenocascade.cli.infra",
    "phenocascade.cli.data",
    "phenocascade.cli.plan",
    "phenocascade.cli.train",
    "phenocascade.cli.sweep",
    "phenocascade.cli.cascade",
    "phenocascade.cli.watch",
    "phenocascade.cli.export",
    "phenocascade.cli.replay",
    "phenocascade.cli.annotate",
    "phenocascade.cli.demo",
    "phenocascade.cli.learning",
    "phenocascade.cli.status",
)


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every sub-command registered."""
    parser = argparse.ArgumentParser(prog="phenocascade", description=__doc__.splitlines()[0])
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="more on the console: phenocascade's DEBUG records and the drivers' INFO ones",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    # Set before any sub-command module loads torch (libgomp reads it once, at load). A
    # cascade runs one process per tier beside the brokers; OpenMP's default busy-wait
    # between parallel regions burns the cores the others need. Measured on 2 cores, 60
    # DSB images through the whole pipeline: 17.2 s busy-waiting, 7.3 s passive.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # A process that dies of a signal from native code (a segfault in a library) writes
    # every thread's Python stack to its log before it goes, for whoever reads that log.
    # (An embedding caller's stderr may be no file, as under pytest's capture: no stacks.)
    with contextlib.suppress(io.UnsupportedOperation):
        faulthandler.enable()
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose, default_log_dir())
    try:
        rc: int = args.func(args)
    except PhenocascadeError as exc:
        print(f"phenocascade: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
