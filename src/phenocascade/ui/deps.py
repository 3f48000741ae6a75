"""The app's shared state and its ``Annotated`` dependency aliases.

Routers declare what they need by type: ``ctx: Ctx``, ``user: CurrentUser``,
``user: ReviewerUser`` or ``user: AdminUser``. The login itself is checked before (by
:class:`~phenocascade.ui.gate.LoginGate`, with :func:`authenticate`), so a missing or stale
login gets 401 / a redirect to ``/login`` before any body is read; a too-low role raises
:class:`~phenocascade.errors.PermissionDeniedError` (403). The user carries the studies they
may access (:meth:`~phenocascade.ui.security.User.may_access`); the routers of tasks, images
and annotations answer 404 for anything of another study, as for something that does not
exist, so its existence is not revealed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from cassandra.cluster import Session
from fastapi import Depends, Request

from phenocascade.config import Settings, Topology
from phenocascade.errors import AuthError, PermissionDeniedError
from phenocascade.store.users import get_user
from phenocascade.ui.images import PixelCache
from phenocascade.ui.publish import AnnotationPublisher
from phenocascade.ui.security import (
    CSRF_HEADER,
    SESSION_COOKIE,
    Role,
    SessionCodec,
    SessionData,
    User,
    csrf_matches,
)
from phenocascade.ui.throttle import LoginThrottle

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass
class AppContext:
    """Everything a request handler may use, built once at start-up."""

    settings: Settings
    topology: Topology
    session: Session
    cookies: SessionCodec
    logins: LoginThrottle
    publisher: AnnotationPublisher
    pixels: PixelCache
    # Reverse proxies whose X-Forwarded-For is believed (Settings.ui_trusted_proxies).
    trusted_proxies: frozenset[str] = frozenset()


def get_context(request: Request) -> AppContext:
    """Return the app's :class:`AppContext`."""
    ctx: AppContext = request.app.state.ctx
    return ctx


Ctx = Annotated[AppContext, Depends(get_context)]


def read_session(request: Request, ctx: Ctx) -> SessionData | None:
    """Return the request's verified session cookie, or ``None``."""
    return ctx.cookies.loads(request.cookies.get(SESSION_COOKIE))


BrowserSession = Annotated[SessionData | None, Depends(read_session)]


def check_csrf(request: Request, browser: BrowserSession) -> None:
    """Refuse a state-changing request whose ``X-CSRF-Token`` does not match its session.

    Installed on the whole app, so no ``POST``/``PUT``/``PATCH``/``DELETE`` route can
    forget it. Only the login itself is called without a login (the login gate answers
    every other request without one): it needs the token of the anonymous session that
    ``GET /login`` hands out.
    """
    if request.method not in UNSAFE_METHODS:
        return
    if not csrf_matches(browser, request.headers.get(CSRF_HEADER)):
        raise PermissionDeniedError(
            f"missing or invalid CSRF token (header {CSRF_HEADER}); reload the page and try again"
        )


def authenticate(browser: SessionData | None, ctx: AppContext) -> User:
    """Return the user logged in with session ``browser``.

    Re-read from the store, so role and study changes apply at once (blocking I/O).

    Raises
    ------
    AuthError
        If ``browser`` is no session or an anonymous one, its user no longer exists, or
        the session has ended (a logout, or a password or role change).
    """
    if browser is None or browser.username is None:
        raise AuthError("not logged in; log in at /login")
    stored = get_user(session=ctx.session, username=browser.username)
    if stored is None:
        raise AuthError(f"user {browser.username!r} no longer exists; log in again")
    if stored["session_epoch"] != browser.epoch:
        raise AuthError(
            "this session has ended (a logout, or a password or role change); log in again"
        )
    return User(
        username=stored["username"],
        role=Role(stored["role"]),
        studies=frozenset(stored["studies"]),
        all_studies=stored["all_studies"],
    )


def current_user(request: Request) -> User:
    """Return the logged-in user whom the login gate let in (``request.state.user``).

    Raises
    ------
    AuthError
        If the gate let the request in without a login (the login page's own paths).
    """
    user = getattr(request.state, "user", None)
    if not isinstance(user, User):
        raise AuthError("not logged in; log in at /login")
    return user


CurrentUser = Annotated[User, Depends(current_user)]


def _require(role: Role, user: User) -> User:
    if user.role.rank < role.rank:
        raise PermissionDeniedError(
            f"user {user.username!r} has role {user.role.value}; this needs {role.value} "
            "(ask an admin)"
        )
    return user


def reviewer_user(user: CurrentUser) -> User:
    """Return the logged-in user if a reviewer or admin."""
    return _require(Role.REVIEWER, user)


def admin_user(user: CurrentUser) -> User:
    """Return the logged-in user if an admin."""
    return _require(Role.ADMIN, user)


ReviewerUser = Annotated[User, Depends(reviewer_user)]
AdminUser = Annotated[User, Depends(admin_user)]
