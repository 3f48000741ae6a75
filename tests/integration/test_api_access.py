"""Who may call what, route by route, on the real app and the real Cassandra.

Every route of the annotation app refuses a visitor without a login (401, 403 or a redirect to
``/login``), bar the login page and the assets it loads, listed here. Each route answers each
role as the table below says. A route added to the app without a row in the table fails
:func:`test_every_route_of_the_app_is_in_the_table`.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from importlib import resources
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from fastapi import FastAPI
from served_app import PASSWORD, TIER, Caller, ServedApp, served_app

from phenocascade.config import Settings, load_topology
from phenocascade.ui.app import create_app

try:
    from fastapi.routing import iter_route_contexts
except ImportError:  # FastAPI before lazily included routers: app.routes is already flat.
    iter_route_contexts = None

pytestmark = [pytest.mark.integration]

Route = tuple[str, str]
# An HTTP status, or the path a 303 redirect leads to.
Outcome = int | str
LOGIN = "-> /login"
QUEUE = "-> /queue"

# The columns of EXPECTED: a visitor holding only the login page's anonymous session (and its
# CSRF token), annotators granted study A or study B, a reviewer granted study A, an admin.
ROLES = ("anonymous", "annotator of A", "annotator of B", "reviewer of A", "admin")
# Each role and the studies granted to it ("a", "b"); the anonymous visitor has no user.
PERSONAS = {
    "annotator of A": ("annotator", "a"),
    "annotator of B": ("annotator", "b"),
    "reviewer of A": ("reviewer", "a"),
    "admin": ("admin", ""),
}

# From ui/deps.py: CurrentUser routes take any logged-in user, ReviewerUser routes a reviewer or
# an admin, AdminUser routes an admin; a missing login is 401 (a page: redirect to /login), a
# too-low role 403, and a task of a study the user may not access 404, as a missing task.
# Tasks, images and annotations are all of study A.
EXPECTED: dict[Route, tuple[Outcome, ...]] = {
    # route                                          anonymous annot A annot B review A admin
    ("GET", "/login"):                               (200,     200,    200,    200,     200),
    ("POST", "/login"):                              (200,     200,    200,    200,     200),
    ("POST", "/logout"):                             (401,     200,    200,    200,     200),
    ("GET", "/api/me"):                              (401,     200,    200,    200,     200),
    ("GET", "/"):                                    (LOGIN,   QUEUE,  QUEUE,  QUEUE,   QUEUE),
    ("GET", "/queue"):                               (LOGIN,   200,    200,    200,     200),
    ("GET", "/tasks/{tier}/{image_id}"):             (LOGIN,   200,    404,    200,     200),
    ("GET", "/review"):                              (LOGIN,   403,    403,    200,     200),
    ("GET", "/admin/users"):                         (LOGIN,   403,    403,    403,     200),
    ("GET", "/api/tasks"):                           (401,     200,    200,    200,     200),
    ("GET", "/api/tasks/{tier}/{image_id}"):         (401,     200,    404,    200,     200),
    ("POST", "/api/tasks/{tier}/{image_id}/claim"):  (401,     200,    404,    200,     200),
    ("GET", "/api/tasks/{tier}/{image_id}/image"):   (401,     200,    404,    200,     200),
    ("POST", "/api/annotations"):                    (401,     201,    404,    201,     201),
    ("GET", "/api/annotations"):                     (401,     403,    403,    200,     200),
    ("GET", "/admin/api/users"):                     (401,     403,    403,    403,     200),
    ("POST", "/admin/api/users"):                    (401,     403,    403,    403,     201),
    ("PATCH", "/admin/api/users/{username}"):        (401,     403,    403,    403,     200),
    ("DELETE", "/admin/api/users/{username}"):       (401,     403,    403,    403,     200),
}  # fmt: skip

# What a visitor with no session at all may load: the login page and what it loads.
PUBLIC = {("GET", "/login")}
LOGIN_PAGE_ASSETS = {"style.css", "common.js", "login.js"}
STATIC = ("GET", "/static/{path}")
STATIC_FILES = sorted(
    f.name for f in resources.files("phenocascade.ui").joinpath("static").iterdir() if f.is_file()
)
# Routes whose call changes what it acts on: each call gets an open task of its own.
FRESH_TASK = {
    ("POST", "/api/tasks/{tier}/{image_id}/claim"),
    ("POST", "/api/annotations"),
}


def _app_routes(app: FastAPI) -> set[Route]:
    """Every (method, path) the app answers; a mount of files counts as ``GET <mount>/{path}``."""
    routes = iter_route_contexts(app.routes) if iter_route_contexts else app.routes
    found = set()
    for route in routes:
        methods = getattr(route, "methods", None)
        if methods is None:
            found.add(("GET", f"{route.path}/{{path}}"))
        else:
            found.update((method, route.path) for method in methods)
    return found


@pytest.fixture(scope="module")
def served(infra: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedApp]:
    with served_app(infra, tmp_path_factory.mktemp("ui-home")) as app:
        yield app


@pytest.fixture(scope="module")
def shared_task(served: ServedApp) -> str:
    """A task of study A that the read-only routes look at."""
    return served.task(served.study_a)


def _persona(served: ServedApp, role: str) -> str:
    kind, study = PERSONAS[role]
    studies = {"a": [served.study_a], "b": [served.study_b], "": []}[study]
    return served.user(kind, studies)


@pytest.fixture(scope="module")
def callers(served: ServedApp) -> dict[str, Caller]:
    """A logged-in session of each role, and the anonymous visitor's session."""
    found = {role: served.login(_persona(served, role)) for role in PERSONAS}
    return {"anonymous": served.anonymous(), **found}


def _outcome(response: Any) -> Outcome:
    if 300 <= response.status_code < 400:
        return f"-> {urlsplit(response.headers['location']).path}"
    return int(response.status_code)


def _call(served: ServedApp, route: Route, caller: Caller, image_id: str) -> Any:
    """Call ``route`` as ``caller`` with inputs that a permitted caller gets a success for."""
    method, template = route
    # Whom the user admin routes act on, and who logs in.
    acts_on_user = "{username}" in template or route == ("POST", "/login")
    username = served.user("annotator") if acts_on_user else ""
    url = template.format(tier=TIER, image_id=quote(image_id, safe=""), username=username)
    bodies: dict[Route, Any] = {
        ("POST", "/login"): {"username": username, "password": PASSWORD},
        ("POST", "/api/annotations"): {"image_id": image_id, "tier": TIER, "labels": []},
        ("POST", "/admin/api/users"): {
            "username": f"{served.user_prefix}new-{uuid.uuid4().hex[:8]}",
            "password": "another long password",
        },
        ("PATCH", "/admin/api/users/{username}"): {"grant": [served.study_a]},
    }
    params = {"tier": TIER} if route == ("GET", "/api/annotations") else None
    return served.send(caller, method, url, bodies.get(route), params=params)


def test_every_route_of_the_app_is_in_the_table() -> None:
    routes = _app_routes(create_app(Settings(), load_topology()))
    assert routes - set(EXPECTED) - {STATIC} == set(), "add these routes to EXPECTED"
    assert (set(EXPECTED) | {STATIC}) - routes == set(), "these routes are gone: remove them"
    assert STATIC in routes


@pytest.mark.parametrize("route", list(EXPECTED), ids=" ".join)
def test_a_visitor_without_a_session_is_refused(served: ServedApp, route: Route) -> None:
    response = _call(served, route, Caller(), "no-such-image")
    if route in PUBLIC:
        assert response.status_code == 200, response.text
    elif route == ("POST", "/login"):
        assert response.status_code == 403, response.text  # no login page's CSRF token
    else:
        # As for the login page's anonymous session: 401, or a page sent to /login.
        assert _outcome(response) == EXPECTED[route][0], response.text


# A body that is not JSON, and one that is not even UTF-8; logged in, the first gets 422 and
# the second 400 (see test_the_frameworks_refusals_of_api_calls_have_the_error_shape).
MALFORMED_BODIES = [b'{"labels": [', b'{"labels": "\xff"}']
JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    "route", [r for r in EXPECTED if r[0] != "GET" and r[1] != "/login"], ids=" ".join
)
def test_a_malformed_body_without_a_login_gets_401_before_it_is_read(
    served: ServedApp, callers: dict[str, Caller], route: Route
) -> None:
    method, template = route
    url = template.format(tier=TIER, image_id="no-such-image", username="no-such-user")
    for caller in (Caller(), callers["anonymous"]):
        for body in MALFORMED_BODIES:
            response = served.send(caller, method, url, content=body, headers=JSON)
            assert response.status_code == 401, (caller, body, response.text)
            assert response.json() == {
                "error": "unauthenticated",
                "detail": "not logged in; log in at /login",
            }


def test_the_frameworks_refusals_of_api_calls_have_the_error_shape(
    served: ServedApp, callers: dict[str, Caller]
) -> None:
    user = callers["annotator of A"]
    unknown = served.send(user, "GET", "/api/no-such-route")
    assert (unknown.status_code, unknown.json()) == (
        404,
        {"error": "not_found", "detail": "Not Found"},
    )
    wrong_method = served.send(user, "DELETE", "/api/me")
    assert (wrong_method.status_code, wrong_method.json()) == (
        405,
        {"error": "method_not_allowed", "detail": "Method Not Allowed"},
    )
    assert wrong_method.headers["allow"] == "GET"
    not_json, not_utf8 = (
        served.send(user, "POST", "/api/annotations", content=body, headers=JSON)
        for body in MALFORMED_BODIES
    )
    assert (not_json.status_code, not_json.json()["error"]) == (422, "validation")
    assert (not_utf8.status_code, not_utf8.json()) == (
        400,
        {"error": "bad_request", "detail": "There was an error parsing the body"},
    )
    page = served.send(user, "GET", "/no-such-page")
    assert page.status_code == 404
    assert page.headers["content-type"].startswith("text/html")
    assert "<h1>404</h1>" in page.text


@pytest.mark.parametrize("route", list(EXPECTED), ids=" ".join)
def test_each_role_gets_what_the_table_says(
    served: ServedApp, callers: dict[str, Caller], shared_task: str, route: Route
) -> None:
    answers = {}
    for role in ROLES:
        caller = callers[role]
        if route == ("POST", "/logout") and role in PERSONAS:
            # A logout ends every session of its user: log out a user of its own.
            caller = served.login(_persona(served, role))
        image_id = served.task(served.study_a) if route in FRESH_TASK else shared_task
        answers[role] = _outcome(_call(served, route, caller, image_id))
    assert answers == dict(zip(ROLES, EXPECTED[route], strict=True))


@pytest.mark.parametrize("name", STATIC_FILES)
def test_only_the_login_pages_assets_are_served_without_a_login(
    served: ServedApp, callers: dict[str, Caller], name: str
) -> None:
    anonymous = served.send(Caller(), "GET", f"/static/{name}")
    logged_in = served.send(callers["annotator of B"], "GET", f"/static/{name}")
    assert logged_in.status_code == 200
    if name in LOGIN_PAGE_ASSETS:
        assert anonymous.status_code == 200
        assert anonymous.content == logged_in.content
    else:
        assert _outcome(anonymous) == LOGIN, anonymous.text


def test_the_login_page_loads_only_its_listed_assets(served: ServedApp) -> None:
    page = served.send(Caller(), "GET", "/login").text
    loaded = set(re.findall(r'(?:src|href)="/static/([^"]+)"', page))
    assert loaded == LOGIN_PAGE_ASSETS
