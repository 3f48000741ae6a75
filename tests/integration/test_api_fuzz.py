"""The HTTP API fuzzed against its own OpenAPI schema (Schemathesis), as a logged-in admin, on
the real app, Kafka and Cassandra: no request, valid or not, gets a 5xx, and every answer
matches the schema. Fuzzed without a session, every operation but the login's answers 401 (a
page load: a redirect to /login), whatever its method and body.

Half the generated requests are aimed at real objects (an open task, a user of this run), so
the fuzzer reaches past "no such task" into windowing, annotation checks and user changes.
Every user name it sends starts with this run's prefix, so it can create, change or delete
only users of its own. Logging out is left to ``test_api_access``: it would end the admin's
session.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import hypothesis.strategies as st
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance
from served_app import TIER, Caller, ServedApp, served_app

from phenocascade.config import Settings, load_topology
from phenocascade.ui.app import create_app
from phenocascade.ui.errors import API_PREFIXES

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCHEMA = schemathesis.openapi.from_dict(create_app(Settings(), load_topology()).openapi())
AS_ADMIN = SCHEMA.exclude(path="/logout")
ANONYMOUS = SCHEMA.exclude(method="GET", path="/login")
CHECKS = [not_a_server_error, response_schema_conformance]
TASKS = 4  # open tasks to aim at
USERS = 3  # users to aim at


@dataclass
class Targets:
    """Real objects for the fuzzer to aim at, filled in by the ``api`` fixture."""

    user_prefix: str = ""
    image_ids: list[str] = field(default_factory=list)
    usernames: list[str] = field(default_factory=list)


TARGETS = Targets()


@dataclass(frozen=True)
class Api:
    """The served app and the admin session the fuzzer calls it with."""

    served: ServedApp
    admin: Caller


@pytest.fixture(scope="module")
def api(infra: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with served_app(infra, tmp_path_factory.mktemp("ui-home")) as served:
        TARGETS.user_prefix = served.user_prefix
        TARGETS.image_ids[:] = [served.task(served.study_a) for _ in range(TASKS)]
        TARGETS.usernames[:] = [served.user("annotator") for _ in range(USERS)]
        # Aimed names are the annotators', and a generated name matching the admin's 8 random
        # hex digits is not to be expected: the fuzzer never changes or deletes the admin.
        yield Api(served, served.login(served.user("admin")))


def _aim(case: schemathesis.Case, aimed: bool, image_id: str, username: str) -> schemathesis.Case:
    """If ``aimed``, point ``case`` at a real task or user."""
    if aimed:
        for part in (case.path_parameters, case.body):
            if isinstance(part, dict) and "image_id" in part:
                part.update(tier=TIER, image_id=image_id)
            if isinstance(part, dict) and "username" in part:
                part["username"] = username
    return case


@SCHEMA.hook
def flatmap_case(context: Any, case: schemathesis.Case) -> st.SearchStrategy[schemathesis.Case]:
    return st.builds(
        _aim,
        st.just(case),
        st.booleans(),
        st.sampled_from(TARGETS.image_ids),
        st.sampled_from(TARGETS.usernames),
    )


def _in_namespace(case: schemathesis.Case) -> None:
    """Prefix every user name ``case`` sends that is not a real target with this run's prefix.

    Every phase's cases pass here (the coverage phase's skip the hooks), so no request acts
    on a user of another test.
    """
    for part in (case.path_parameters, case.body):
        if isinstance(part, dict) and "username" in part:
            name = part["username"]
            if not (isinstance(name, str) and name.startswith(TARGETS.user_prefix)):
                part["username"] = f"{TARGETS.user_prefix}{name}"


# Bounded so the file runs in about a minute on two slow cores; Schemathesis' coverage phase
# adds its boundary and negative cases (other methods, bodies that are not JSON) to these.
FUZZ_SETTINGS = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@AS_ADMIN.parametrize()
@settings(FUZZ_SETTINGS, max_examples=10)
def test_no_request_gets_a_server_error(case: schemathesis.Case, api: Api) -> None:
    _in_namespace(case)
    headers = {**api.served.forwarded_for, **api.admin.headers()}
    case.call_and_validate(base_url=api.served.base_url, headers=headers, checks=CHECKS)


@ANONYMOUS.parametrize()
@settings(FUZZ_SETTINGS, max_examples=5)
def test_without_a_session_every_request_is_refused(case: schemathesis.Case, api: Api) -> None:
    _in_namespace(case)
    response = case.call(
        base_url=api.served.base_url, headers=api.served.forwarded_for, allow_redirects=False
    )
    if case.operation.path != "/login":
        # The login gate answers before any route, method or body is looked at: a page load
        # is sent to /login, anything else gets 401.
        page = case.method.upper() == "GET" and not case.formatted_path.startswith(API_PREFIXES)
        refused = {303} if page else {401}
    elif case.method.upper() != case.operation.method.upper():
        refused = {405}  # the coverage phase also tries methods the path does not have
    else:
        # The login is open, so its body is read: one that is not JSON may be refused (400 or
        # 422) before the CSRF check, which refuses any other (no login page's session).
        refused = {403} if _is_json(response.request.body) else {400, 403, 422}
    assert response.status_code in refused, (case.method, case.formatted_path, response.text)


def _is_json(body: bytes | str | None) -> bool:
    try:
        json.loads(body or "null")
    except ValueError:
        return False
    return True
