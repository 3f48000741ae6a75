"""Brute-force protection of the annotation app's login: the policy, the throttle over a
failure log kept in memory (Cassandra's is tested in tests/integration/test_login_throttle.py),
and the route using it."""

from __future__ import annotations

import asyncio
import re
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import bcrypt
import httpx
import pytest
from fastapi import Depends, FastAPI
from pydantic import ValidationError as SettingsError

from phenocascade.config import Settings
from phenocascade.errors import TooManyAttemptsError
from phenocascade.ui import security
from phenocascade.ui.deps import AppContext, check_csrf
from phenocascade.ui.errors import install_error_handlers
from phenocascade.ui.routers import session as login_routes
from phenocascade.ui.security import CSRF_HEADER, SessionCodec
from phenocascade.ui.throttle import LoginThrottle, ThrottleKey, retry_after

RIGHT = "right-password"
WRONG = "wrong-password"


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class MemoryFailureLog:
    """A :class:`~phenocascade.ui.throttle.FailureLog` in a dict; each operation is atomic,
    as each Cassandra statement is, and nothing expires (the TTLs asked for are kept)."""

    def __init__(self) -> None:
        self.failures: dict[ThrottleKey, dict[uuid.UUID, float]] = {}
        self.ttls: list[int] = []
        self._lock = threading.Lock()

    def add(self, key: ThrottleKey, at: float, ttl_s: int) -> uuid.UUID:
        failure = uuid.uuid4()
        with self._lock:
            self.failures.setdefault(key, {})[failure] = at
            self.ttls.append(ttl_s)
        return failure

    def newest(self, key: ThrottleKey, limit: int) -> list[tuple[uuid.UUID, float]]:
        with self._lock:
            held = list(self.failures.get(key, {}).items())
        return sorted(held, key=lambda failure: failure[1], reverse=True)[:limit]

    def remove(self, key: ThrottleKey, failure: uuid.UUID) -> None:
        with self._lock:
            self.failures.get(key, {}).pop(failure, None)

    def clear(self, key: ThrottleKey) -> None:
        with self._lock:
            self.failures.pop(key, None)


def throttle_in_memory(
    clock: FakeClock, max_failures: int = 5, window_s: float = 300
) -> LoginThrottle:
    return LoginThrottle(
        MemoryFailureLog(), max_failures=max_failures, window_s=window_s, clock=clock
    )


def fail(
    throttle: LoginThrottle, times: int, *, username: str = "ada", client: str = "10.0.0.1"
) -> None:
    for _ in range(times):
        throttle.admit(username=username, client=client)


# The policy on its own.


def test_a_key_is_locked_from_the_limit_until_its_limit_th_newest_failure_leaves_the_window() -> (
    None
):
    policy = {"max_failures": 3, "window_s": 100.0}
    assert retry_after([], now=0.0, **policy) is None
    assert retry_after([10.0, 20.0], now=30.0, **policy) is None
    assert retry_after([10.0, 20.0, 30.0], now=30.0, **policy) == 80
    # More than the limit (replicas racing): the third newest decides, not the oldest.
    assert retry_after([30.0, 10.0, 25.0, 20.0], now=30.0, **policy) == 90
    assert retry_after([10.0, 20.0, 30.0], now=109.5, **policy) == 1  # rounded up, never 0
    assert retry_after([10.0, 20.0, 30.0], now=110.0, **policy) is None  # 10 left the window


# The throttle on its own.


def test_the_sixth_attempt_within_the_window_is_refused_with_the_wait() -> None:
    clock = FakeClock()
    throttle = throttle_in_memory(clock)
    fail(throttle, 5)
    clock.now += 120
    with pytest.raises(TooManyAttemptsError, match=r"for user 'ada'.*wait 180 s") as refused:
        throttle.admit(username="ada", client="10.0.0.2")
    assert refused.value.retry_after_s == 180


def test_the_window_slides_one_failure_at_a_time() -> None:
    clock = FakeClock()
    throttle = throttle_in_memory(clock, 3, 100)
    for step in (0, 40, 80):
        clock.now = 1000.0 + step
        throttle.admit(username="ada", client="10.0.0.1")
    clock.now = 1099.5
    with pytest.raises(TooManyAttemptsError) as refused:
        throttle.admit(username="ada", client="10.0.0.1")
    assert refused.value.retry_after_s == 1  # rounded up, never 0
    clock.now = 1100.0  # the failure at 1000 leaves the window; those at 1040 and 1080 stay
    throttle.admit(username="ada", client="10.0.0.1")
    with pytest.raises(TooManyAttemptsError) as refused:
        throttle.admit(username="ada", client="10.0.0.1")
    assert refused.value.retry_after_s == 40


def test_failures_from_one_address_block_it_for_every_user_name() -> None:
    throttle = throttle_in_memory(FakeClock())
    for name in ("ada", "bob", "cy", "dee", "eve"):
        throttle.admit(username=name, client="10.0.0.1")
    with pytest.raises(TooManyAttemptsError, match=re.escape("from 10.0.0.1")):
        throttle.admit(username="fred", client="10.0.0.1")
    throttle.admit(username="fred", client="10.0.0.2")


def test_a_success_clears_its_user_name_but_not_its_address() -> None:
    throttle = throttle_in_memory(FakeClock())
    fail(throttle, 4, username="ada", client="10.0.0.1")
    throttle.succeeded(throttle.admit(username="ada", client="10.0.0.2"))
    fail(throttle, 4, username="ada", client="10.0.0.3")  # a fresh count for ada
    throttle.admit(username="bob", client="10.0.0.1")  # 10.0.0.1's fifth failure
    with pytest.raises(TooManyAttemptsError, match=re.escape("from 10.0.0.1")):
        throttle.succeeded(throttle.admit(username="bob", client="10.0.0.1"))


def test_successful_logins_from_one_address_never_block_it() -> None:
    throttle = throttle_in_memory(FakeClock())
    for i in range(20):
        throttle.succeeded(throttle.admit(username=f"user{i}", client="10.0.0.1"))
    throttle.admit(username="ada", client="10.0.0.1")


def test_every_failure_is_stored_to_expire_with_the_window() -> None:
    log = MemoryFailureLog()
    throttle = LoginThrottle(log, max_failures=5, window_s=299.5, clock=FakeClock())
    fail(throttle, 3)
    assert log.ttls == [300] * 6  # one row per key and attempt, kept the window rounded up


def test_a_refused_attempt_stores_nothing() -> None:
    log = MemoryFailureLog()
    throttle = LoginThrottle(log, max_failures=5, window_s=300, clock=FakeClock())
    fail(throttle, 5)
    for _ in range(3):
        with pytest.raises(TooManyAttemptsError):
            throttle.admit(username="ada", client="10.0.0.1")
    assert {key: len(held) for key, held in log.failures.items()} == {
        ("user", "ada"): 5,
        ("client", "10.0.0.1"): 5,
    }


def admitted_in_parallel(throttle: LoginThrottle, threads: int) -> int:
    start = threading.Barrier(threads)
    admitted: list[str] = []

    def guess(i: int) -> None:
        start.wait()
        try:
            throttle.admit(username="ada", client=f"10.0.0.{i}")
        except TooManyAttemptsError:
            return
        admitted.append(f"10.0.0.{i}")  # list.append is atomic

    workers = [threading.Thread(target=guess, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return len(admitted)


def test_parallel_attempts_cannot_slip_past_the_limit() -> None:
    # Switch threads as often as possible, so that a check-then-record would race, as
    # replicas sharing the log do.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    counts = set()
    try:
        for _ in range(100):
            throttle = throttle_in_memory(FakeClock())
            admitted = admitted_in_parallel(throttle, 16)
            counts.add(admitted)
            # Attempts refused in the race took their failures back: later ones are admitted
            # up to the limit, and no further.
            fail(throttle, 5 - admitted, client="10.0.1.1")
            with pytest.raises(TooManyAttemptsError, match="for user 'ada'"):
                throttle.admit(username="ada", client="10.0.1.2")
    finally:
        sys.setswitchinterval(interval)
    assert max(counts) <= 5


def test_the_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHENOCASCADE_UI_LOGIN_MAX_FAILURES", "3")
    monkeypatch.setenv("PHENOCASCADE_UI_LOGIN_WINDOW_S", "60")
    settings = Settings()
    assert (settings.ui_login_max_failures, settings.ui_login_window_s) == (3, 60.0)
    monkeypatch.setenv("PHENOCASCADE_UI_LOGIN_MAX_FAILURES", "0")
    with pytest.raises(SettingsError, match="ui_login_max_failures"):
        Settings()


# The login route, with the store replaced by a dict and passwords counted.


class LoginApp:
    """The session routes with a fake clock, a user table and a count of password checks."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.clock = FakeClock()
        self.password_checks = 0
        # Cost 4 keeps the test fast; verify_password reads the cost from the hash.
        hashed = bcrypt.hashpw(RIGHT.encode(), bcrypt.gensalt(rounds=4)).decode()
        users = {
            name: {
                "username": name,
                "password_hash": hashed,
                "role": "annotator",
                "session_epoch": "e0",
            }
            for name in ("ada", "bob")
        }

        def get_user(*, session: object, username: str) -> dict[str, Any] | None:
            return users.get(username)

        def verify_password(password: str, password_hash: str | None) -> bool:
            self.password_checks += 1
            return security.verify_password(password, password_hash)

        monkeypatch.setattr(login_routes, "get_user", get_user)
        monkeypatch.setattr(login_routes, "verify_password", verify_password)
        self.app = FastAPI(dependencies=[Depends(check_csrf)])
        install_error_handlers(self.app)
        self.app.include_router(login_routes.router)
        # The login routes use only the cookies, the throttle and the (replaced) store.
        self.app.state.ctx = AppContext(
            settings=None,
            topology=None,
            session=None,
            cookies=SessionCodec("test-secret"),
            logins=throttle_in_memory(self.clock),
            publisher=None,
            pixels=None,
            trusted_proxies=frozenset({"10.0.0.254"}),
        )

    def login(
        self,
        username: str,
        password: str,
        *,
        client: str = "10.0.0.1",
        forwarded_for: str | None = None,
    ) -> httpx.Response:
        """Open the login page in a fresh browser at ``client`` and submit the form."""

        async def submit() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app, client=(client, 40000))
            # https: the session cookie is Secure.
            async with httpx.AsyncClient(
                transport=transport, base_url="https://testserver"
            ) as browser:
                page = await browser.get("/login")
                token = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
                assert token is not None
                headers = {CSRF_HEADER: token.group(1)}
                if forwarded_for is not None:
                    headers["X-Forwarded-For"] = forwarded_for
                return await browser.post(
                    "/login", json={"username": username, "password": password}, headers=headers
                )

        return asyncio.run(submit())


@pytest.fixture
def ui(monkeypatch: pytest.MonkeyPatch) -> Iterator[LoginApp]:
    yield LoginApp(monkeypatch)


def test_after_five_wrong_passwords_even_the_right_one_gets_429(ui: LoginApp) -> None:
    for _ in range(5):
        assert ui.login("ada", WRONG).status_code == 401
    ui.clock.now += 100
    refused = ui.login("ada", RIGHT, client="10.0.0.2")
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "200"
    assert refused.json()["error"] == "too_many_attempts"
    assert "too many failed logins for user 'ada'" in refused.json()["detail"]
    assert "set-cookie" not in refused.headers
    assert ui.password_checks == 5  # the refused attempt cost no bcrypt check


def test_once_the_window_passed_the_right_password_logs_in(ui: LoginApp) -> None:
    for _ in range(5):
        ui.login("ada", WRONG)
    ui.clock.now += 299
    assert ui.login("ada", RIGHT).status_code == 429
    ui.clock.now += 1
    accepted = ui.login("ada", RIGHT)
    assert accepted.status_code == 200
    assert accepted.json()["username"] == "ada"


def test_a_successful_login_resets_the_user_names_failures(ui: LoginApp) -> None:
    for _ in range(4):
        assert ui.login("ada", WRONG, client="10.0.0.1").status_code == 401
    assert ui.login("ada", RIGHT, client="10.0.0.1").status_code == 200
    for _ in range(4):
        assert ui.login("ada", WRONG, client="10.0.0.2").status_code == 401
    assert ui.login("ada", RIGHT, client="10.0.0.2").status_code == 200


def test_a_blocked_user_and_address_leave_others_alone(ui: LoginApp) -> None:
    for _ in range(5):
        ui.login("ada", WRONG, client="10.0.0.1")
    assert ui.login("bob", RIGHT, client="10.0.0.2").status_code == 200
    assert ui.login("bob", RIGHT, client="10.0.0.1").status_code == 429  # the address is blocked


def test_behind_the_trusted_proxy_failures_count_per_forwarded_client(ui: LoginApp) -> None:
    proxy = "10.0.0.254"
    for name in ("u1", "u2", "u3", "u4", "u5"):
        assert ui.login(name, WRONG, client=proxy, forwarded_for="203.0.113.9").status_code == 401
    # That client is throttled; another one behind the same proxy is not.
    blocked = ui.login("ada", RIGHT, client=proxy, forwarded_for="203.0.113.9")
    assert blocked.status_code == 429
    assert "203.0.113.9" in blocked.json()["detail"]
    assert ui.login("ada", RIGHT, client=proxy, forwarded_for="198.51.100.7").status_code == 200


def test_a_forwarded_header_from_an_untrusted_peer_is_ignored(ui: LoginApp) -> None:
    # A client rotating its X-Forwarded-For still has its failures counted on its address.
    for k in range(5):
        forged = f"192.0.2.{k}"
        assert ui.login(f"u{k}", WRONG, client="10.0.0.9", forwarded_for=forged).status_code == 401
    refused = ui.login("ada", RIGHT, client="10.0.0.9", forwarded_for="192.0.2.77")
    assert refused.status_code == 429
    assert "10.0.0.9" in refused.json()["detail"]
