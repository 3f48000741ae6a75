"""``phenocascade infra up|down|status``: the local Kafka and Cassandra JVMs."""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from phenocascade.config import get_settings
from phenocascade.errors import ConfigError
from phenocascade.infra import local, nodes, secure


def register(subparsers: Any) -> None:
    """Add ``infra`` and its sub-commands to the top-level parser's subparsers."""
    infra = subparsers.add_parser(
        "infra",
        help="start, stop or inspect the local Kafka and Cassandra",
        description=(
            "Real Kafka (KRaft) and Cassandra as local JVM processes on 127.0.0.1. Files live "
            "under $PHENOCASCADE_HOME/infra; jars are cached under $PHENOCASCADE_INFRA_CACHE "
            "(default ~/.cache/phenocascade/infra) after the first start."
        ),
    )
    sub = infra.add_subparsers(dest="infra_command", required=True)

    up = sub.add_parser("up", help="start the services and wait until they answer")
    _add_only(up)
    up.add_argument(
        "--timeout",
        type=float,
        default=180.0,
        help="seconds to wait for readiness after launch (default: %(default)s)",
    )
    up.add_argument(
        "--secure",
        action="store_true",
        help=(
            "TLS and passwords: Kafka over SASL_SSL (SCRAM-SHA-512) and Cassandra with "
            "passwords and client TLS. The first start makes a local CA and random "
            "credentials under $PHENOCASCADE_HOME/infra/secure and writes client.env there: "
            "source it before any other phenocascade command. Needs a fresh "
            "PHENOCASCADE_HOME (a plaintext Kafka storage cannot be secured later)"
        ),
    )
    up.add_argument(
        "--cassandra-storage-port",
        type=int,
        default=7000,
        help="Cassandra's inter-node port on each node's address (default: %(default)s)",
    )
    up.add_argument(
        "--nodes",
        type=int,
        default=None,
        help=(
            f"nodes per service, 1 to {nodes.MAX_NODES} (default: as many as this "
            "PHENOCASCADE_HOME was started with, else 1). With 3: Kafka nodes on the "
            "bootstrap port +0, +2, +4 and Cassandra nodes on 127.0.0.1-3, everything "
            "replicated 3 times; prints the settings clients need (eval-able on stdout). "
            "The size is kept in the home: another size needs a fresh PHENOCASCADE_HOME"
        ),
    )
    up.set_defaults(func=_up)

    down = sub.add_parser("down", help="stop the services this machine's phenocascade started")
    _add_only(down)
    down.set_defaults(func=_down)

    status = sub.add_parser("status", help="show whether each service runs and answers")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(func=_status)


def _add_only(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--only",
        choices=local.SERVICES,
        action="append",
        help="act on this service only (repeatable; default: all)",
    )


def _services(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(args.only) if args.only else local.SERVICES


def _up(args: argparse.Namespace) -> int:
    console = Console(stderr=True, log_path=False)
    started = time.monotonic()
    settings = get_settings()
    if args.secure and args.nodes is not None and args.nodes > 1:
        raise ConfigError("--secure starts one node per service; it cannot be used with --nodes")
    made = secure.ensure_secrets(settings.home) if args.secure else None
    # Before the Cassandra role exists, its login is the default superuser.
    client = made.client_settings(settings) if made is not None else settings
    with console.status("starting local infrastructure"):
        statuses = local.up(
            client,
            services=_services(args),
            timeout_s=args.timeout,
            progress=console.log,
            security=made.security() if made is not None else None,
            cassandra_storage_port=args.cassandra_storage_port,
            nodes=args.nodes,
        )
        if made is not None and "cassandra" in _services(args):
            secure.provision_cassandra(client, made)
    console.print(_table(statuses))
    console.print(f"ready in {time.monotonic() - started:.1f} s")
    size = local.cluster_size(settings)
    if size > 1:
        console.print(
            f"a cluster of {size} nodes per service: clients need the settings below "
            '(on stdout: eval "$(phenocascade infra up)" sets them)',
            markup=False,
        )
        for key, value in nodes.client_env(settings, size).items():
            print(f"export {key}={shlex.quote(value)}")
    if made is not None:
        env = made.write_env(settings)
        console.print(
            f"secured: clients need the credentials and CA in {env} (mode 0600); "
            f"run  source {env}  in each shell before other phenocascade commands"
        )
    return 0


def _down(args: argparse.Namespace) -> int:
    console = Console(stderr=True, log_path=False)
    with console.status("stopping local infrastructure"):
        statuses = local.down(get_settings(), services=_services(args), progress=console.log)
    console.print(_table(statuses))
    return 0


def _status(args: argparse.Namespace) -> int:
    """Print the status; exit 0 only if every service is ready (usable in scripts)."""
    statuses = local.status(get_settings())
    if args.json:
        print(json.dumps({name: s.as_dict() for name, s in statuses.items()}, indent=2))
    else:
        Console().print(_table(statuses))
    return 0 if all(s.ready for s in statuses.values()) else 1


def _table(statuses: dict[str, local.ServiceStatus]) -> Table:
    table = Table("service", "pid")
    table.add_column("address", no_wrap=True)
    table.add_column("ready")
    table.add_column("version")
    table.add_column("log", overflow="fold")
    for s in statuses.values():
        table.add_row(
            s.name,
            str(s.pid) if s.pid is not None else "-",
            f"{s.host}:{s.port}",
            _readiness(s),
            s.version or "-",
            _short(s.log),
        )
    return table


def _readiness(s: local.ServiceStatus) -> str:
    if s.ready:
        return "[green]yes[/]"
    return "[yellow]port open, not answering[/]" if s.listening else "[red]no[/]"


def _short(path: Path) -> str:
    """Return ``path`` relative to the working directory when it lies below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
