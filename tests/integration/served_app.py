"""The annotation app served on a fresh namespace of the shared test keyspace: two studies
with open tasks, users of every role, and callers holding a session (or none), for the tests
of the HTTP API's access rules and its fuzzing."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from annotating import PASSWORD, AnnotationWorld, ExpertClient, add_test_user, serve

from phenocascade.config import Settings
from phenocascade.store.annotations import add_task
from phenocascade.store.users import delete_user, list_users
from phenocascade.ui.app import create_app
from phenocascade.ui.security import CSRF_HEADER

TIER = "quality"


@dataclass(frozen=True)
class Caller:
    """One visitor: a session cookie and its CSRF token, or neither (no session at all)."""

    cookie: str = ""
    token: str = ""

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.cookie:
            headers["Cookie"] = self.cookie
        if self.token:
            headers[CSRF_HEADER] = self.token
        return headers


@dataclass
class ServedApp:
    """The app on a loopback port, and what it serves.

    Every user it makes is named ``<prefix><role>-<hex>``, and :func:`served_app` deletes
    them all afterwards. The app believes loopback's ``X-Forwarded-For``
    (``ui_trusted_proxies``), so a caller sending :attr:`forwarded_for` counts its failed
    logins under an address of its own, apart from every other test logging in from
    127.0.0.1.
    """

    world: AnnotationWorld
    base_url: str
    client: httpx.Client
    image: Path
    user_prefix: str
    study_a: str
    study_b: str
    forwarded_for: dict[str, str] = field(default_factory=dict)

    def task(self, study: str) -> str:
        """Add an open task of ``study`` in tier ``quality``; return its image id."""
        request, _ = self.world.request(
            uuid.uuid4().hex[:12],
            tier=TIER,
            path=self.image,
            scores={"clear": 0.5},
            classes=["clear"],
            study=study,
        )
        assert add_task(session=self.world.session, request=request)
        return str(request["image_id"])

    def user(self, role: str, studies: Sequence[str] = ()) -> str:
        """Add a user of ``role`` granted ``studies``; return the name (password: PASSWORD)."""
        return add_test_user(self.world.session, role, studies, prefix=self.user_prefix)

    def login(self, username: str) -> Caller:
        """Log in through the login page and route, as the browser does."""
        expert = ExpertClient(self.client, username, PASSWORD)
        return Caller(expert.cookie, expert.token)

    def anonymous(self) -> Caller:
        """The anonymous session and token the login page hands out."""
        page = self.send(Caller(), "GET", "/login")
        assert page.status_code == 200, page.text
        return Caller(page.headers["set-cookie"].split(";", 1)[0], ExpertClient._csrf(page.text))

    def send(
        self,
        caller: Caller,
        method: str,
        url: str,
        body: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send one request as ``caller``, with ``headers`` too; cookies set are not kept."""
        headers = {**self.forwarded_for, **caller.headers(), **(headers or {})}
        response = self.client.request(method, url, json=body, headers=headers, **kwargs)
        self.client.cookies.clear()
        return response


@contextmanager
def served_app(infra: Settings, home: Path) -> Iterator[ServedApp]:
    """Serve the app on its own topics, studies and users; remove its users afterwards."""
    world = AnnotationWorld(infra)
    settings = world.settings.model_copy(update={"home": home, "ui_trusted_proxies": ["127.0.0.1"]})
    image = sorted((infra.datasets / "dsb2018" / "images").glob("*.png"))[0].resolve()
    user_prefix = f"{world.prefix}u-"
    # 198.18.0.0/15 is for benchmarking: no real client has such an address.
    address = f"198.18.{uuid.uuid4().int % 256}.{uuid.uuid4().int % 254 + 1}"
    try:
        with (
            serve(create_app(settings, world.topology, session=world.session)) as base_url,
            httpx.Client(base_url=base_url, timeout=30) as client,
        ):
            yield ServedApp(
                world=world,
                base_url=base_url,
                client=client,
                image=image,
                user_prefix=user_prefix,
                study_a=f"{world.study}-a",
                study_b=f"{world.study}-b",
                forwarded_for={"X-Forwarded-For": address},
            )
    finally:
        for user in list_users(session=world.session):
            if user["username"].startswith(user_prefix):
                delete_user(session=world.session, username=user["username"])
        world.session.cluster.shutdown()
