"""The annotation web app: FastAPI with plain HTML/JS/CSS pages served from package files.

Build it with :func:`create_app`; ``phenocascade ui`` serves it with uvicorn. Every page,
API route and asset needs a login, bar the login page and the assets it loads
(:class:`~phenocascade.ui.gate.LoginGate`); every state-changing request needs the
session's CSRF token.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from cassandra.cluster import Session
from fastapi import Depends, FastAPI, Request, Response
from fastapi.staticfiles import StaticFiles

from phenocascade.config import Settings, Topology, get_settings, load_topology
from phenocascade.store.cassandra import connect
from phenocascade.ui.deps import AppContext, check_csrf
from phenocascade.ui.errors import ERROR_RESPONSES, install_error_handlers
from phenocascade.ui.gate import LoginGate
from phenocascade.ui.images import PixelCache
from phenocascade.ui.publish import AnnotationPublisher
from phenocascade.ui.routers import annotations as labels
from phenocascade.ui.routers import pages, tasks, users
from phenocascade.ui.routers import session as login
from phenocascade.ui.security import SessionCodec, load_secret
from phenocascade.ui.throttle import CassandraFailureLog, LoginThrottle

# Scripts and styles come only from /static: no inline code, so injected markup cannot run.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


def create_app(
    settings: Settings | None = None,
    topology: Topology | None = None,
    *,
    session: Session | None = None,
) -> FastAPI:
    """Build the app; connections are opened when it starts.

    Parameters
    ----------
    settings : Settings or None, default None
        ``None`` reads the environment.
    topology : Topology or None, default None
        ``None`` loads ``settings.topology`` (or the packaged one).
    session : cassandra.cluster.Session or None, default None
        An open Cassandra session to use; ``None`` connects with ``settings.cassandra``.
    """
    conf = settings or get_settings()
    flow = topology or load_topology(conf.topology)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        publisher = AnnotationPublisher(conf.kafka, flow)
        store = session or connect(conf.cassandra)
        app.state.ctx = AppContext(
            settings=conf,
            topology=flow,
            session=store,
            cookies=SessionCodec(load_secret(conf)),
            logins=LoginThrottle(
                CassandraFailureLog(store), conf.ui_login_max_failures, conf.ui_login_window_s
            ),
            publisher=publisher,
            pixels=PixelCache(conf),
            trusted_proxies=frozenset(conf.ui_trusted_proxies),
        )
        try:
            yield
        finally:
            publisher.close()

    app = FastAPI(
        title="phenocascade annotation",
        lifespan=lifespan,
        dependencies=[Depends(check_csrf)],
        responses=ERROR_RESPONSES,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    install_error_handlers(app)
    for module in (login, pages, tasks, labels, users):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(packages=[("phenocascade.ui", "static")]), name="static")
    # Added first, so it runs inside security_headers: its refusals get the headers too.
    app.add_middleware(LoginGate)

    @app.middleware("http")
    async def security_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    return app
