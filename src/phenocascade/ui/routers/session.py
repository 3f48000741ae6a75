"""The login session: the login page, log in, log out, and who am I."""

from __future__ import annotations

import unicodedata
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from phenocascade.errors import AuthError
from phenocascade.store.users import get_user, update_user
from phenocascade.ui.deps import BrowserSession, Ctx, CurrentUser
from phenocascade.ui.security import (
    SESSION_COOKIE,
    SESSION_MAX_AGE_S,
    SessionData,
    new_session,
    verify_password,
)
from phenocascade.ui.templates import render_page

router = APIRouter(tags=["session"])


class Credentials(BaseModel):
    """The login form."""

    # Stored names are 1 to 64 characters (check_username); the bounds also keep the
    # throttle's keys non-empty (Cassandra refuses an empty key) and short.
    username: str = Field(min_length=1, max_length=64)
    password: str
    next: str = "/queue"


def set_session_cookie(response: Response, ctx: Ctx, data: SessionData) -> None:
    """Attach the signed session cookie (Secure, HttpOnly, SameSite=Strict)."""
    response.set_cookie(
        SESSION_COOKIE,
        ctx.cookies.dumps(data),
        max_age=SESSION_MAX_AGE_S,
        path="/",
        secure=True,
        httponly=True,
        samesite="strict",
    )


def local_target(target: str) -> str:
    r"""Return ``target`` if it is a path on this site, else ``/queue`` (no open redirect).

    A local target is ``/`` alone or ``/`` followed by anything but ``/`` or ``\``, and
    holds no control or whitespace character anywhere. Browsers drop tabs and line breaks
    from a URL and read ``\`` as ``/``, so ``/\evil.example`` and ``/<TAB>/evil.example``
    would both lead to another site.
    """
    if any(unicodedata.category(c) == "Cc" or c.isspace() for c in target):
        return "/queue"
    if target == "/" or (target.startswith("/") and target[1] not in "/\\"):
        return target
    return "/queue"


@router.get("/login", response_class=HTMLResponse)
def login_page(ctx: Ctx, browser: BrowserSession) -> HTMLResponse:
    """Show the login form, with an anonymous session whose token protects it."""
    session = browser if browser is not None and browser.username is None else new_session()
    response = render_page("login", browser=session)
    set_session_cookie(response, ctx, session)
    return response


def client_address(request: Request, trusted: frozenset[str] = frozenset()) -> str:
    """Return the address a request comes from, for the login throttle.

    The socket's peer, unless that is one of the ``trusted`` proxies: then the rightmost
    address of ``X-Forwarded-For`` that is not itself a trusted proxy (what the outermost
    trusted proxy saw). From any other peer the header is ignored, so a client cannot
    pick the address its failures are counted under.
    """
    peer = request.client.host if request.client is not None else "unknown"
    if peer not in trusted:
        return peer
    forwarded = [part.strip() for part in request.headers.get("x-forwarded-for", "").split(",")]
    for address in reversed(forwarded):
        if address and address not in trusted:
            return address
    return peer


@router.post("/login")
def login(
    credentials: Credentials, request: Request, ctx: Ctx, response: Response
) -> dict[str, Any]:
    """Check the password and start a session with a fresh CSRF token.

    Raises
    ------
    TooManyAttemptsError
        Before any password check, if the user name or the client address has too many
        recent failed logins (see :class:`~phenocascade.ui.throttle.LoginThrottle`).
    AuthError
        If the user does not exist or the password is wrong.
    """
    client = client_address(request, ctx.trusted_proxies)
    attempt = ctx.logins.admit(username=credentials.username, client=client)
    stored = get_user(session=ctx.session, username=credentials.username)
    if not verify_password(credentials.password, stored["password_hash"] if stored else None):
        raise AuthError("wrong user name or password")
    assert stored is not None
    ctx.logins.succeeded(attempt)
    epoch = stored["session_epoch"] or update_user(session=ctx.session, username=stored["username"])
    set_session_cookie(response, ctx, new_session(stored["username"], epoch))
    return {
        "username": stored["username"],
        "role": stored["role"],
        "next": local_target(credentials.next),
    }


@router.post("/logout")
def logout(ctx: Ctx, response: Response, user: CurrentUser) -> dict[str, str]:
    """End every session of the user, this one included; the browser keeps an anonymous one.

    A copy of the old cookie is refused from then on (the user's session epoch changes).
    """
    update_user(session=ctx.session, username=user.username)
    set_session_cookie(response, ctx, new_session())
    return {"next": "/login"}


@router.get("/api/me")
def me(user: CurrentUser) -> dict[str, Any]:
    """Return the logged-in user's name, role and studies (``null``: every study)."""
    studies = user.accessible_studies()
    return {
        "username": user.username,
        "role": user.role.value,
        "studies": None if studies is None else sorted(studies),
    }
