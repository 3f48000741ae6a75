"""The login throttle holds across app replicas: two apps sharing the real Cassandra keyspace
share the failures, so guesses through one replica lock the login on the other, and the lock
lifts, its rows expired, after the window."""

from __future__ import annotations

import re
import secrets
import time
import uuid
from collections.abc import Iterator

import bcrypt
import httpx
import pytest
from annotating import serve
from cassandra.cluster import Session

from phenocascade.config import Settings, load_topology
from phenocascade.store.cassandra import connect
from phenocascade.store.logins import recent_login_failures
from phenocascade.store.users import add_user
from phenocascade.ui.app import create_app

pytestmark = [pytest.mark.integration]
PASSWORD = "correct horse battery staple"
MAX_FAILURES = 3
WINDOW_S = 5.0


@pytest.fixture(scope="module")
def settings(infra: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    # Loopback is the trusted proxy, so each test client picks its address in
    # X-Forwarded-For, apart from every other test logging in from 127.0.0.1.
    return infra.model_copy(
        update={
            "home": tmp_path_factory.mktemp("ui-home"),
            "ui_login_max_failures": MAX_FAILURES,
            "ui_login_window_s": WINDOW_S,
            "ui_trusted_proxies": ["127.0.0.1"],
        }
    )


@pytest.fixture(scope="module")
def replicas(settings: Settings) -> Iterator[tuple[str, str]]:
    """Two apps, each with its own Cassandra connection, on the same keyspace."""
    sessions = [connect(settings.cassandra) for _ in range(2)]
    apps = [create_app(settings, load_topology(), session=session) for session in sessions]
    with serve(apps[0]) as replica_a, serve(apps[1]) as replica_b:
        yield replica_a, replica_b
    for session in sessions:
        session.cluster.shutdown()


@pytest.fixture
def session(settings: Settings) -> Iterator[Session]:
    session = connect(settings.cassandra)
    yield session
    session.cluster.shutdown()


def _address() -> str:
    return f"2001:db8::{secrets.token_hex(2)}:{secrets.token_hex(2)}"


def _login(base_url: str, username: str, password: str, client: str) -> httpx.Response:
    """Log in as the login page does, from ``client`` (sent as X-Forwarded-For)."""
    with httpx.Client(base_url=base_url, timeout=30) as browser:
        page = browser.get("/login")
        token = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
        assert token is not None, page.text[:500]
        cookie = page.headers["set-cookie"].split(";", 1)[0]
        return browser.post(
            "/login",
            json={"username": username, "password": password},
            headers={"X-CSRF-Token": token.group(1), "Cookie": cookie, "X-Forwarded-For": client},
        )


def test_failures_on_one_replica_lock_the_login_on_the_other_until_the_window_passed(
    session: Session, replicas: tuple[str, str]
) -> None:
    replica_a, replica_b = replicas
    name = f"throttled-{uuid.uuid4().hex[:8]}"
    # Cost 4 keeps the wrong guesses quick, so the window is not over before they are done.
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    assert add_user(session=session, username=name, password_hash=hashed, role="annotator")
    guesser = _address()

    # Through replica A: wrong passwords for the user from several addresses, and guesses at
    # unknown names from one address.
    for _ in range(MAX_FAILURES):
        assert _login(replica_a, name, "wrong password", _address()).status_code == 401
    for k in range(MAX_FAILURES):
        assert _login(replica_a, f"nobody-{k}", "wrong password", guesser).status_code == 401
    last_failure = time.time()

    # Replica B refuses both, without a password check.
    refused = _login(replica_b, name, PASSWORD, _address())
    assert refused.status_code == 429, refused.text
    assert f"for user {name!r}" in refused.json()["detail"]
    assert 1 <= int(refused.headers["Retry-After"]) <= WINDOW_S
    refused = _login(replica_b, "nobody-else", "wrong password", guesser)
    assert refused.status_code == 429, refused.text
    assert f"from {guesser}" in refused.json()["detail"]

    # Once the window passed, Cassandra has forgotten the failures (their TTL) and replica B
    # lets the user in, from the guessing address too.
    time.sleep(max(0.0, last_failure + WINDOW_S + 0.5 - time.time()))
    for scope, key in (("user", name), ("client", guesser)):
        assert recent_login_failures(session=session, scope=scope, name=key, limit=10) == []
    accepted = _login(replica_b, name, PASSWORD, guesser)
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["username"] == name
