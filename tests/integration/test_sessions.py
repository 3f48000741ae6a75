"""Sessions end when they should: logout, a password change and a role change each refuse
the cookies issued before them, on the real app and the real Cassandra."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
from annotating import ExpertClient, serve

from phenocascade.config import Settings, load_topology
from phenocascade.store.cassandra import connect
from phenocascade.store.users import add_user
from phenocascade.ui.app import create_app
from phenocascade.ui.security import hash_password

pytestmark = [pytest.mark.integration]
PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def app_url(infra: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    session = connect(infra.cassandra)
    settings = infra.model_copy(update={"home": tmp_path_factory.mktemp("ui-home")})
    with serve(create_app(settings, load_topology(), session=session)) as base_url:
        yield base_url
    session.cluster.shutdown()


def _user(infra: Settings, role: str) -> str:
    name = f"{role}-{uuid.uuid4().hex[:8]}"
    session = connect(infra.cassandra)
    assert add_user(
        session=session, username=name, password_hash=hash_password(PASSWORD), role=role
    )
    session.cluster.shutdown()
    return name


def _me(client: httpx.Client, cookie: str) -> httpx.Response:
    return client.get("/api/me", headers={"Cookie": cookie})


def test_a_copied_cookie_is_refused_after_logout(infra: Settings, app_url: str) -> None:
    name = _user(infra, "annotator")
    with httpx.Client(base_url=app_url, timeout=30) as client:
        expert = ExpertClient(client, name, PASSWORD)
        stolen = expert.cookie
        assert _me(client, stolen).json()["username"] == name
        other_device = ExpertClient(client, name, PASSWORD).cookie
        out = expert._send("POST", "/logout", headers={"X-CSRF-Token": expert.token})
        assert out.status_code == 200, out.text
        for cookie in (stolen, other_device):
            refused = _me(client, cookie)
            assert refused.status_code == 401, refused.text
            assert "session has ended" in refused.json()["detail"]
        # Logging in again starts a fresh session.
        assert _me(client, ExpertClient(client, name, PASSWORD).cookie).status_code == 200


def _patch(admin: ExpertClient, name: str, change: dict[str, str]) -> httpx.Response:
    return admin._send(  # type: ignore[no-any-return]
        "PATCH", f"/admin/api/users/{name}", json=change, headers={"X-CSRF-Token": admin.token}
    )


def test_a_role_or_password_change_ends_the_users_sessions(infra: Settings, app_url: str) -> None:
    name = _user(infra, "annotator")
    admin_name = _user(infra, "admin")
    new_password = PASSWORD + " 2"
    with httpx.Client(base_url=app_url, timeout=30) as client:
        admin = ExpertClient(client, admin_name, PASSWORD)
        before = ExpertClient(client, name, PASSWORD).cookie
        assert _patch(admin, name, {"role": "reviewer"}).status_code == 200
        assert _me(client, before).status_code == 401
        after_role = ExpertClient(client, name, PASSWORD).cookie
        assert _me(client, after_role).json()["role"] == "reviewer"

        assert _patch(admin, name, {"password": new_password}).status_code == 200
        assert _me(client, after_role).status_code == 401
        with pytest.raises(AssertionError, match="wrong user name or password"):
            ExpertClient(client, name, PASSWORD)
        assert _me(client, ExpertClient(client, name, new_password).cookie).status_code == 200

        # The admin's own session is untouched; an unknown user is a 404; nothing to change
        # is refused.
        assert _patch(admin, "nobody-here", {"role": "admin"}).status_code == 404
        assert _patch(admin, name, {}).status_code in (400, 422)


def test_a_non_admin_cannot_change_a_user(infra: Settings, app_url: str) -> None:
    name = _user(infra, "annotator")
    with httpx.Client(base_url=app_url, timeout=30) as client:
        expert = ExpertClient(client, name, PASSWORD)
        refused = _patch(expert, name, {"role": "admin"})
        assert refused.status_code == 403, refused.text
