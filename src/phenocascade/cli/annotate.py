"""Sub-commands of the active-learning loop: sink, ui, users."""

from __future__ import annotations

import argparse
import getpass
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import uvicorn
from rich.console import Console
from rich.table import Table

from phenocascade.cli.metrics import add_metrics_port, start_metrics
from phenocascade.config import Topology, get_settings, load_topology
from phenocascade.consumers.annotation_sink import AnnotationSink
from phenocascade.errors import ConflictError, NotFoundError, ValidationError
from phenocascade.store.cassandra import connect
from phenocascade.store.users import add_user, change_user_studies, delete_user, list_users
from phenocascade.streams.kafka import create_topics
from phenocascade.ui.app import create_app
from phenocascade.ui.security import check_role, check_username, hash_password
from phenocascade.ui.validation import check_studies

log = logging.getLogger(__name__)
console = Console()


def _topology(args: argparse.Namespace) -> Topology:
    path = getattr(args, "topology", None) or get_settings().topology
    return load_topology(Path(path) if path else None)


def cmd_sink(args: argparse.Namespace) -> int:
    """Materialise the annotate topic into the task table until SIGTERM/SIGINT.

    The topology's topics are created first if missing, as ``phenocascade run`` does.
    """
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    settings = get_settings()
    topology = _topology(args)
    create_topics(settings.kafka, topology)
    sink = AnnotationSink(settings=settings, topology=topology, group=args.group)
    start_metrics(args, settings, {sink.group: [topology.annotate_topic]})
    stats = sink.run(stop, until_caught_up=args.until_caught_up)
    log.info("annotation sink stopped: %s", stats)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """Serve the annotation app."""
    settings = get_settings()
    start_metrics(args, settings)
    app = create_app(settings, _topology(args))
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.ssl_certfile:
        log.warning(
            "serving on %s without TLS: browsers drop the Secure session cookie over plain "
            "HTTP except on localhost; pass --ssl-certfile/--ssl-keyfile or use a TLS proxy",
            args.host,
        )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        log_level="info",
        # The app reads X-Forwarded-For itself, from PHENOCASCADE_UI_TRUSTED_PROXIES only;
        # uvicorn's own rewrite would trust any local peer.
        proxy_headers=False,
    )
    return 0


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        raise ValidationError(
            f"no terminal to ask {args.name}'s password on: give it on stdin with "
            "--password-stdin (one line)"
        )
    first = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("again: ") != first:
        raise ValidationError("the two passwords differ; nothing was changed")
    return first


def _access(role: str, studies: list[str], all_studies: bool) -> str:
    """Describe the studies a user may access, as ``users list`` shows them."""
    if role == "admin" or all_studies:
        return "all studies"
    return ", ".join(studies) or "none (no grant)"


def cmd_users_add(args: argparse.Namespace) -> int:
    """Create a user with a bcrypt-hashed password and the studies they may access."""
    username = check_username(args.name)
    role = check_role(args.role)
    studies = check_studies(args.studies)
    password_hash = hash_password(_read_password(args))
    session = connect(get_settings().cassandra)
    if not add_user(
        session=session,
        username=username,
        password_hash=password_hash,
        role=role,
        studies=studies,
        all_studies=args.all_studies,
    ):
        raise ConflictError(f"user {username!r} already exists; remove it first to replace it")
    console.print(f"added {username} ({role.value}; {_access(role, studies, args.all_studies)})")
    return 0


def cmd_users_studies(args: argparse.Namespace) -> int:
    """Grant (``users grant``) or revoke (``users revoke``) studies of a user."""
    username = check_username(args.name)
    studies = check_studies(args.studies)
    if not studies and not args.all_studies:
        raise ValidationError(f"name the studies to {args.users_command}, or --all-studies")
    granting = args.users_command == "grant"
    if not change_user_studies(
        session=connect(get_settings().cassandra),
        username=username,
        grant=studies if granting else (),
        revoke=() if granting else studies,
        all_studies=granting if args.all_studies else None,
    ):
        raise NotFoundError(f"no user {username!r}; add it with `phenocascade users add`")
    what = ", ".join(studies + (["every study"] if args.all_studies else []))
    console.print(
        f"{'granted' if granting else 'revoked'} {what} {'to' if granting else 'from'} {username}"
    )
    return 0


def cmd_users_list(args: argparse.Namespace) -> int:
    """List users, roles and the studies each may access."""
    table = Table(title="users")
    for col in ("user", "role", "studies", "created"):
        table.add_column(col)
    for user in list_users(session=connect(get_settings().cassandra)):
        table.add_row(
            user["username"],
            user["role"],
            _access(user["role"], user["studies"], user["all_studies"]),
            f"{user['created_at']:%Y-%m-%d %H:%M}",
        )
    console.print(table)
    return 0


def cmd_users_remove(args: argparse.Namespace) -> int:
    """Delete a user."""
    if not delete_user(
        session=connect(get_settings().cassandra), username=check_username(args.name)
    ):
        raise NotFoundError(f"no user {args.name!r}")
    console.print(f"removed {args.name}")
    return 0


def register(sub: Any) -> None:
    """Register the sink, ui and users sub-commands."""
    p = sub.add_parser("sink", help="materialise the annotate topic into the annotation queue")
    p.add_argument("--topology", help="topology YAML (default: PHENOCASCADE_TOPOLOGY or packaged)")
    p.add_argument("--group", help="consumer group (default: the topology's sink_group)")
    p.add_argument(
        "--until-caught-up",
        action="store_true",
        help="stop once every partition is read to its end",
    )
    add_metrics_port(p, "sink")
    p.set_defaults(func=cmd_sink)

    p = sub.add_parser("ui", help="serve the browser annotation app")
    p.add_argument("--topology", help="topology YAML (default: PHENOCASCADE_TOPOLOGY or packaged)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate")
    p.add_argument("--ssl-keyfile", default=None, help="private key of --ssl-certfile")
    add_metrics_port(p, "ui")
    p.set_defaults(func=cmd_ui)

    users = sub.add_parser("users", help="manage annotation app users")
    usub = users.add_subparsers(dest="users_command", required=True)
    p = usub.add_parser("add", help="add a user (password from a prompt or stdin)")
    p.add_argument("name")
    p.add_argument("--role", default="annotator", help="annotator, reviewer or admin")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.add_argument(
        "--studies",
        nargs="+",
        action="extend",
        default=[],
        metavar="STUDY",
        help="studies the user may access (default none: an annotator or reviewer sees "
        "nothing until granted one; admins see every study)",
    )
    p.add_argument("--all-studies", action="store_true", help="the user may access every study")
    p.set_defaults(func=cmd_users_add)
    for verb, help_text, all_help in (
        (
            "grant",
            "let a user access studies (applies at their next request)",
            "also access to every study, present and future",
        ),
        (
            "revoke",
            "take studies from a user (applies at their next request)",
            "also take back access to every study (the studies granted by name stay)",
        ),
    ):
        p = usub.add_parser(verb, help=help_text)
        p.add_argument("name")
        p.add_argument("studies", nargs="*", metavar="STUDY")
        p.add_argument("--all-studies", action="store_true", help=all_help)
        p.set_defaults(func=cmd_users_studies)
    p = usub.add_parser("list", help="list users")
    p.set_defaults(func=cmd_users_list)
    p = usub.add_parser("remove", help="remove a user")
    p.add_argument("name")
    p.set_defaults(func=cmd_users_remove)
