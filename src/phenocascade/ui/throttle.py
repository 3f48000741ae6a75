"""The login throttle: refuse logins for a user name, or from an address, after too many failures.

Three parts:

* :func:`retry_after`, the pure policy: given the times of a key's failures, whether the key
  is locked and for how long;
* :class:`FailureLog`, where failures are kept: :class:`CassandraFailureLog` keeps them in
  Cassandra (:mod:`phenocascade.store.logins`), one row per failure with a TTL of the
  window, so every replica of the app counts the same failures;
* :class:`LoginThrottle`, which applies the policy to the log around each login.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from cassandra.cluster import Session

from phenocascade.errors import TooManyAttemptsError
from phenocascade.store.logins import (
    add_login_failure,
    clear_login_failures,
    delete_login_failure,
    recent_login_failures,
)

# (scope, name): ("user", a user name) or ("client", a client address).
ThrottleKey = tuple[str, str]


def retry_after(
    failures: Iterable[float], *, now: float, max_failures: int, window_s: float
) -> int | None:
    """Return the whole seconds a key must wait before its next login attempt, or ``None``.

    A sliding window: a key is locked while it has ``max_failures`` or more failures in the
    last ``window_s`` seconds, until enough of them leave the window to bring it under
    ``max_failures``, i.e. until its ``max_failures``-th newest failure is ``window_s``
    seconds old.

    Parameters
    ----------
    failures : iterable of float
        Times of the key's failures (seconds, any order); those older than the window are
        ignored.
    now : float
        The current time, on the clock of ``failures``.
    max_failures : int
        Failures in the window from which the key is locked.
    window_s : float
        Length of the window, in seconds.

    Returns
    -------
    int or None
        ``None`` if an attempt is allowed now, else the wait rounded up (at least 1).
    """
    recent = sorted((t for t in failures if t > now - window_s), reverse=True)
    if len(recent) < max_failures:
        return None
    return math.ceil(recent[max_failures - 1] + window_s - now)


class FailureLog(Protocol):
    """Where the throttle keeps the failures of each key.

    Every operation is atomic, and a read sees every write completed before it, whichever
    process wrote it (the throttle's guarantee against racing replicas rests on this).
    """

    def add(self, key: ThrottleKey, at: float, ttl_s: int) -> uuid.UUID:
        """Record a failure of ``key`` made at ``at``, forgotten after ``ttl_s``; return its id."""
        ...

    def newest(self, key: ThrottleKey, limit: int) -> list[tuple[uuid.UUID, float]]:
        """Return the ``limit`` newest failures of ``key`` as ``(id, time)``, newest first."""
        ...

    def remove(self, key: ThrottleKey, failure: uuid.UUID) -> None:
        """Forget one failure of ``key`` (nothing happens if it is gone)."""
        ...

    def clear(self, key: ThrottleKey) -> None:
        """Forget every failure of ``key``."""
        ...


class CassandraFailureLog:
    """A :class:`FailureLog` in the ``login_failures`` table, shared by every app replica.

    Parameters
    ----------
    session : cassandra.cluster.Session
        Session bound to the phenocascade keyspace.
    """

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, key: ThrottleKey, at: float, ttl_s: int) -> uuid.UUID:
        """Insert one failure row ``USING TTL ttl_s``; return its id."""
        scope, name = key
        return add_login_failure(session=self.session, scope=scope, name=name, at=at, ttl_s=ttl_s)

    def newest(self, key: ThrottleKey, limit: int) -> list[tuple[uuid.UUID, float]]:
        """Read the ``limit`` newest failure rows of the key's partition."""
        scope, name = key
        return recent_login_failures(session=self.session, scope=scope, name=name, limit=limit)

    def remove(self, key: ThrottleKey, failure: uuid.UUID) -> None:
        """Delete one failure row."""
        scope, name = key
        delete_login_failure(session=self.session, scope=scope, name=name, attempt=failure)

    def clear(self, key: ThrottleKey) -> None:
        """Delete the key's partition."""
        scope, name = key
        clear_login_failures(session=self.session, scope=scope, name=name)


@dataclass(frozen=True, slots=True)
class LoginAttempt:
    """A login attempt :meth:`LoginThrottle.admit` let through; it counts as failed until told.

    ``failures`` holds the id of the failure recorded for each of its keys.
    """

    username: str
    client: str
    failures: Mapping[ThrottleKey, uuid.UUID]


class LoginThrottle:
    """Refuse logins for a user name, or from a client address, with too many recent failures.

    Once ``max_failures`` logins for one user name, or from one client address, failed
    within the last ``window_s`` seconds, every further attempt with that name or from that
    address is refused, without checking its password, as :func:`retry_after` says. A
    successful login clears the failures of its user name, but not those of its address: one
    valid account must not reset the count of guesses at the others.

    An admitted attempt counts as failed until :meth:`succeeded` says otherwise, so a burst
    of parallel guesses cannot slip past the limit while the first ones are being checked.
    The failures live in a :class:`FailureLog` that every replica of the app shares, and
    :meth:`admit` is correct when replicas admit attempts at once, without locks or
    transactions:

    1. it reads each key's newest failures and refuses if the key is locked (a locked key
       costs two bounded reads and no write);
    2. it records the attempt as a failure of both keys;
    3. it reads again, leaving its own failure out, and refuses, deleting what it recorded,
       if a key is now locked.

    Of any set of attempts admitted together, the one recorded last read, in step 3, every
    other one's record, so no more than ``max_failures`` can be admitted per window. Attempts
    racing at the limit may all be refused (the safe side); the next one is decided alone.
    The log forgets a failure after ``ceil(window_s)`` seconds (Cassandra's TTL), so a
    key's storage holds only its recent failures.

    The clock must be the same on every replica: wall-clock time, kept in step by NTP (a
    replica whose clock is ``d`` seconds off shifts the window by ``d``).

    Parameters
    ----------
    log : FailureLog
        Where failures are kept (:class:`CassandraFailureLog` in the app).
    max_failures : int, default 5
        Failures per key within the window after which attempts are refused.
    window_s : float, default 300.0
        Length of the sliding window, in seconds.
    clock : callable returning float, default time.time
        Seconds since the Unix epoch; tests pass a fake clock.
    """

    def __init__(
        self,
        log: FailureLog,
        max_failures: int = 5,
        window_s: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.log = log
        self.max_failures = max_failures
        self.window_s = window_s
        self.clock = clock

    def admit(self, *, username: str, client: str) -> LoginAttempt:
        """Let a login attempt through, counted as failed, unless its name or address is locked.

        Parameters
        ----------
        username : str
            The user name the attempt logs in as (whether or not that user exists).
        client : str
            The address the attempt comes from.

        Returns
        -------
        LoginAttempt
            Pass it to :meth:`succeeded` if the password is right.

        Raises
        ------
        TooManyAttemptsError
            If the user name or the address has ``max_failures`` failures in the window; its
            ``retry_after_s`` says when an attempt is accepted again.
        """
        keys = {("user", username): f"for user {username!r}", ("client", client): f"from {client}"}
        now = self.clock()
        for key, whom in keys.items():
            self._refuse_if_locked(key, whom, now)
        ttl_s = math.ceil(self.window_s)
        recorded = {key: self.log.add(key, now, ttl_s) for key in keys}
        try:
            for key, whom in keys.items():
                self._refuse_if_locked(key, whom, now, own=recorded[key])
        except TooManyAttemptsError:
            for key, failure in recorded.items():
                self.log.remove(key, failure)
            raise
        return LoginAttempt(username=username, client=client, failures=recorded)

    def succeeded(self, attempt: LoginAttempt) -> None:
        """Clear the failures of the attempt's user name and uncount it for its address."""
        self.log.clear(("user", attempt.username))
        key = ("client", attempt.client)
        self.log.remove(key, attempt.failures[key])

    def _refuse_if_locked(
        self, key: ThrottleKey, whom: str, now: float, own: uuid.UUID | None = None
    ) -> None:
        # max_failures others decide; one more row is read in case ``own`` is among them.
        limit = self.max_failures + (own is not None)
        others = [at for failure, at in self.log.newest(key, limit) if failure != own]
        wait = retry_after(others, now=now, max_failures=self.max_failures, window_s=self.window_s)
        if wait is not None:
            raise TooManyAttemptsError(
                f"too many failed logins {whom} ({self.max_failures} or more in the last "
                f"{self.window_s:g} s); wait {wait} s before trying again",
                retry_after_s=wait,
            )
