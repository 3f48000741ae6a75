"""The login gate: every request needs a login, bar the login page's, checked before all else.

FastAPI reads a route's body before its dependencies run, so a login check made there
would answer an anonymous malformed body with 400 or 422, telling a caller without a login
how the route parses it. The gate runs first, as ASGI middleware: without a login an API
call gets 401 and a page load is sent to ``/login``, whatever the route, method or body,
and whether or not the path exists.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from phenocascade.errors import PhenocascadeError
from phenocascade.ui.deps import authenticate, get_context, read_session
from phenocascade.ui.errors import error_response

# What the login page loads (pages/login.html): the only files served without a login.
LOGIN_PAGE_ASSETS = frozenset({"style.css", "common.js", "login.js"})
# Exact paths: any other spelling of them (e.g. with "..") needs a login.
OPEN_PATHS = frozenset({"/login", *(f"/static/{name}" for name in LOGIN_PAGE_ASSETS)})


class LoginGate:
    """ASGI middleware letting in only requests of a logged-in user, or to :data:`OPEN_PATHS`.

    The user it lets in is ``request.state.user``, which
    :func:`~phenocascade.ui.deps.current_user` returns to the routes.

    Parameters
    ----------
    app : starlette.types.ASGIApp
        The app behind the gate.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer a request without a login, or pass it on with its user."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if request.url.path not in OPEN_PATHS:
            ctx = get_context(request)
            try:
                # Re-reads the user from Cassandra: blocking I/O, kept off the event loop.
                user = await run_in_threadpool(authenticate, read_session(request, ctx), ctx)
            except PhenocascadeError as exc:
                await error_response(request, exc)(scope, receive, send)
                return
            request.state.user = user
        await self.app(scope, receive, send)
