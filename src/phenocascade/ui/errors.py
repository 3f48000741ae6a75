"""Domain errors, and the refusals of FastAPI and Starlette themselves, -> HTTP responses.

API requests get ``{"error": <kind>, "detail": <message>}`` JSON (:class:`ErrorBody`); a page
request (a ``GET`` outside ``/api/``) gets a short HTML page instead, or without a login is
redirected to ``/login``. A refusal for too many attempts (429) says in ``Retry-After`` how
many seconds to wait. Messages reach the browser without the server's absolute paths
(:func:`public_message`).
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from http import HTTPStatus
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from phenocascade.errors import (
    AuthError,
    BadInputError,
    ConflictError,
    InfraError,
    NotFoundError,
    PermissionDeniedError,
    PhenocascadeError,
    TooManyAttemptsError,
    ValidationError,
)

# Most specific first: the first matching class decides the status.
STATUS_BY_ERROR: tuple[tuple[type[PhenocascadeError], int], ...] = (
    (AuthError, 401),
    (PermissionDeniedError, 403),
    (NotFoundError, 404),
    (ConflictError, 409),
    (TooManyAttemptsError, 429),
    (ValidationError, 422),
    (BadInputError, 422),
    (InfraError, 503),
    (PhenocascadeError, 500),
)

API_PREFIXES = ("/api/", "/admin/api/")


class ErrorBody(BaseModel):
    """What an API request that fails answers: the error's kind and what to do about it."""

    error: str
    detail: str


# The refusals any API route may answer, documented in the OpenAPI schema (in place of
# FastAPI's default 422 body, which this app never sends).
ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorBody, "description": description}
    for code, description in (
        (400, "A body that cannot be parsed"),
        (401, "Not logged in, or the session has ended"),
        (403, "Role too low, or a missing or wrong CSRF token"),
        (404, "No such object, or one of a study the user may not access"),
        (409, "Conflicts with the current state (e.g. a task claimed by another user)"),
        (422, "Invalid request"),
        (429, "Too many failed logins; Retry-After says when to try again"),
        (503, "Kafka or Cassandra is unavailable"),
    )
}

# An absolute path of two or more segments, bare or as a file: URI. Not the tail of a relative
# path or of a URL ("var/a/b", "http://host/a/b"): those follow a name character or ":".
_SEGMENT = r"[^\s/'\"`<>,;()\[\]{}]+"
_ABSOLUTE_PATH = re.compile(rf"(?<![\w.~:/-])(?:file:)?/+{_SEGMENT}(?:/+{_SEGMENT})+/?")


def status_of(exc: PhenocascadeError) -> int:
    """Return the HTTP status of a domain error."""
    return next(code for cls, code in STATUS_BY_ERROR if isinstance(exc, cls))


def public_message(message: str) -> str:
    """Return ``message`` with every absolute path of the server replaced by its base name.

    Error messages name files for the operator's logs; the browser must not learn the
    server's layout (allowed roots, home, datasets). ``/data/scans/a.tif`` and
    ``file:///data/scans/a.tif`` become ``a.tif``; a one-segment path such as ``/login``, a
    relative path and a URL are kept.
    """
    return _ABSOLUTE_PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1], message)


def is_page_request(request: Request) -> bool:
    """Whether the request is a browser page load rather than an API call."""
    path = request.url.path
    return request.method == "GET" and not path.startswith(API_PREFIXES)


def error_response(request: Request, exc: PhenocascadeError) -> Response:
    """Return the answer to ``request`` that failed with ``exc``."""
    headers = (
        {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, TooManyAttemptsError) else None
    )
    return _respond(request, status_of(exc), exc.kind, str(exc), headers)


def _respond(
    request: Request, status: int, kind: str, message: str, headers: Mapping[str, str] | None
) -> Response:
    detail = public_message(message)
    if is_page_request(request):
        if status == 401:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
        page = (
            f"<!doctype html><title>{status}</title><h1>{status}</h1><p>{html.escape(detail)}</p>"
        )
        return HTMLResponse(page, status_code=status, headers=headers)
    body = ErrorBody(error=kind, detail=detail)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _http_kind(status: int) -> str:
    """Return the ``error`` of a refusal by the framework: ``not_found``, ``method_not_allowed``."""
    try:
        return HTTPStatus(status).name.lower()
    except ValueError:
        return "http_error"


def install_error_handlers(app: FastAPI) -> None:
    """Map every :class:`PhenocascadeError`, request-validation error and HTTP error to a response.

    The HTTP errors are those of FastAPI and Starlette themselves: a body that cannot be
    parsed (400), a path no route has (404), a method the route lacks (405, with ``Allow``).
    """

    async def domain_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, PhenocascadeError)
        return error_response(request, exc)

    async def request_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return error_response(request, ValidationError(f"invalid request: {problems}"))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        detail = str(exc.detail)
        return _respond(request, exc.status_code, _http_kind(exc.status_code), detail, exc.headers)

    app.add_exception_handler(PhenocascadeError, domain_error)
    app.add_exception_handler(RequestValidationError, request_error)
    app.add_exception_handler(HTTPException, http_error)
