"""Per-study access on the real app, Kafka and Cassandra: an annotator granted study A works
on A and cannot list, read, fetch the image of, claim or annotate a task of study B; an admin's
grant makes B visible, a revocation hides it again, and only an admin can grant."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from annotating import PASSWORD, AnnotationWorld, ExpertClient, add_test_user, serve

from phenocascade.config import Settings
from phenocascade.store.annotations import add_task, annotations_for_image, get_task
from phenocascade.store.users import get_user
from phenocascade.ui.app import create_app

pytestmark = [pytest.mark.integration]
TIER = "quality"


@dataclass
class Studies:
    """Two studies with open tasks, an app serving them, and its users."""

    world: AnnotationWorld
    base_url: str
    a: str
    b: str
    tasks: dict[str, str]  # task name -> image id
    image_path: Path

    def user(self, role: str, studies: list[str] | None = None) -> str:
        return add_test_user(self.world.session, role, studies or [])


@pytest.fixture(scope="module")
def studies(infra: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Studies]:
    world = AnnotationWorld(infra)
    image = sorted((infra.datasets / "dsb2018" / "images").glob("*.png"))[0].resolve()
    a, b = f"{world.study}-a", f"{world.study}-b"
    tasks = {}
    for name, study in (("a1", a), ("a2", a), ("a3", a), ("b1", b), ("b2", b), ("b3", b)):
        request, _ = world.request(
            name, tier=TIER, path=image, scores={"clear": 0.5}, classes=["clear"], study=study
        )
        assert add_task(session=world.session, request=request)
        tasks[name] = request["image_id"]
    settings = world.settings.model_copy(update={"home": tmp_path_factory.mktemp("ui-home")})
    with serve(create_app(settings, world.topology, session=world.session)) as base_url:
        yield Studies(world, base_url, a, b, tasks, image)
    world.session.cluster.shutdown()


@pytest.fixture
def client(studies: Studies) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=studies.base_url, timeout=30) as c:
        yield c


def _get(expert: ExpertClient, url: str, **params: Any) -> httpx.Response:
    response: httpx.Response = expert._send("GET", url, params=params)
    return response


def _post(expert: ExpertClient, url: str, body: dict[str, Any] | None = None) -> httpx.Response:
    response: httpx.Response = expert._send(
        "POST", url, json=body, headers={"X-CSRF-Token": expert.token}
    )
    return response


def _patch(admin: ExpertClient, name: str, change: dict[str, Any]) -> httpx.Response:
    response: httpx.Response = admin._send(
        "PATCH", f"/admin/api/users/{name}", json=change, headers={"X-CSRF-Token": admin.token}
    )
    return response


def _listed(expert: ExpertClient, **params: Any) -> set[str]:
    response = _get(expert, "/api/tasks", tier=TIER, limit=1000, **params)
    assert response.status_code == 200, response.text
    return {t["image_id"] for t in response.json()["tasks"]}


def _annotate(expert: ExpertClient, image_id: str) -> httpx.Response:
    return _post(expert, "/api/annotations", {"image_id": image_id, "tier": TIER, "labels": []})


def _sees(expert: ExpertClient, studies: Studies, name: str) -> bool:
    """Whether every read route agrees that the user sees the task ``name``; fail if mixed."""
    image_id = studies.tasks[name]
    answers = {
        "listed": image_id in _listed(expert),
        "task": _get(expert, f"/api/tasks/{TIER}/{image_id}").status_code == 200,
        "image": _get(expert, f"/api/tasks/{TIER}/{image_id}/image").status_code == 200,
        "page": _get(expert, f"/tasks/{TIER}/{image_id}").status_code == 200,
    }
    assert len(set(answers.values())) == 1, answers
    return answers["listed"]


def _refused_like_a_missing_task(response: httpx.Response, studies: Studies) -> None:
    assert response.status_code == 404, response.text
    assert response.json()["error"] == "not_found"
    # Nothing of the server's layout, nor the study, reaches the client.
    for secret in (str(studies.image_path.parent), studies.b, "/work/"):
        assert secret not in response.text


def test_an_annotator_works_on_granted_studies_only(studies: Studies, client: httpx.Client) -> None:
    annotator = ExpertClient(client, studies.user("annotator", [studies.a]), PASSWORD)
    listed = _listed(annotator)
    assert {studies.tasks["a1"], studies.tasks["a2"]} <= listed
    assert not listed & {studies.tasks["b1"], studies.tasks["b2"]}
    tasks = _get(annotator, "/api/tasks", limit=1000).json()
    assert {t["study"] for t in tasks["tasks"]} == {studies.a}
    assert tasks["studies"] == [studies.a]
    assert _listed(annotator, study=studies.b) == set()

    b1 = studies.tasks["b1"]
    missing = _get(annotator, f"/api/tasks/{TIER}/{studies.world.prefix}no-such-image")
    for refused in (
        _get(annotator, f"/api/tasks/{TIER}/{b1}"),
        _get(annotator, f"/api/tasks/{TIER}/{b1}/image"),
        _post(annotator, f"/api/tasks/{TIER}/{b1}/claim"),
        _annotate(annotator, b1),
    ):
        _refused_like_a_missing_task(refused, studies)
        assert refused.json()["detail"] == missing.json()["detail"].replace(
            f"{studies.world.prefix}no-such-image", b1
        )
    assert _get(annotator, f"/tasks/{TIER}/{b1}").status_code == 404
    task = get_task(session=studies.world.session, image_id=b1, tier=TIER)
    assert task is not None and task["status"] == "open" and task["claimed_by"] is None
    assert annotations_for_image(session=studies.world.session, image_id=b1) == []

    a1 = studies.tasks["a1"]
    assert _get(annotator, f"/api/tasks/{TIER}/{a1}").json()["study"] == studies.a
    image = _get(annotator, f"/api/tasks/{TIER}/{a1}/image")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert _annotate(annotator, a1).status_code == 201
    done = get_task(session=studies.world.session, image_id=a1, tier=TIER)
    assert done is not None and done["status"] == "done"


def test_an_admin_grant_shows_a_study_and_a_revocation_hides_it(
    studies: Studies, client: httpx.Client
) -> None:
    name = studies.user("annotator", [studies.a])
    admin = ExpertClient(client, studies.user("admin"), PASSWORD)
    annotator = ExpertClient(client, name, PASSWORD)
    assert not _sees(annotator, studies, "b2")

    granted = _patch(admin, name, {"grant": [studies.b]})
    assert granted.status_code == 200, granted.text
    assert granted.json()["studies"] == sorted([studies.a, studies.b])
    # The same session sees study B at its next request: a grant ends no session.
    assert _sees(annotator, studies, "b2")

    assert _patch(admin, name, {"revoke": [studies.b]}).json()["studies"] == [studies.a]
    assert not _sees(annotator, studies, "b2")
    _refused_like_a_missing_task(_annotate(annotator, studies.tasks["b2"]), studies)

    # Every study, then back to the studies held.
    assert _patch(admin, name, {"all_studies": True}).json()["all_studies"] is True
    assert _sees(annotator, studies, "b2")
    assert _patch(admin, name, {"all_studies": False}).json()["studies"] == [studies.a]
    assert not _sees(annotator, studies, "b2")
    assert _sees(annotator, studies, "a2")


def test_only_an_admin_grants_and_bad_grants_are_refused(
    studies: Studies, client: httpx.Client
) -> None:
    name = studies.user("annotator", [studies.a])
    annotator = ExpertClient(client, name, PASSWORD)
    reviewer = ExpertClient(client, studies.user("reviewer", [studies.a]), PASSWORD)
    for expert in (annotator, reviewer):
        refused = _patch(expert, name, {"grant": [studies.b]})
        assert refused.status_code == 403, refused.text
    stored = get_user(session=studies.world.session, username=name)
    assert stored is not None and stored["studies"] == [studies.a]
    assert not _sees(annotator, studies, "b1")

    admin = ExpertClient(client, studies.user("admin"), PASSWORD)
    for change in (
        {"grant": [""]},
        {"grant": ["bad\x00study"]},
        {"grant": [" padded"]},
        {"grant": ["x" * 201]},
        {"grant": [studies.b], "revoke": [studies.b]},
    ):
        bad = _patch(admin, name, change)
        assert bad.status_code == 422, (change, bad.text)
    assert _patch(admin, "nobody-here", {"grant": [studies.b]}).status_code == 404
    stored = get_user(session=studies.world.session, username=name)
    assert stored is not None and stored["studies"] == [studies.a]
    assert not stored["all_studies"]


def test_a_user_without_a_grant_sees_nothing_and_an_admin_sees_everything(
    studies: Studies, client: httpx.Client
) -> None:
    nobody = ExpertClient(client, studies.user("annotator"), PASSWORD)
    queue = _get(nobody, "/api/tasks", limit=1000).json()
    assert (queue["tasks"], queue["studies"]) == ([], [])
    assert not _sees(nobody, studies, "a2")

    admin = ExpertClient(client, studies.user("admin"), PASSWORD)
    assert _sees(admin, studies, "a2") and _sees(admin, studies, "b1")
    assert _get(admin, "/api/tasks", limit=1).json()["studies"] is None


def test_a_reviewer_reviews_the_annotations_of_granted_studies_only(
    studies: Studies, client: httpx.Client
) -> None:
    admin = ExpertClient(client, studies.user("admin"), PASSWORD)
    reviewer = ExpertClient(client, studies.user("reviewer", [studies.a]), PASSWORD)
    annotator = ExpertClient(client, studies.user("annotator", [studies.a]), PASSWORD)
    a3, b3 = studies.tasks["a3"], studies.tasks["b3"]
    assert _annotate(annotator, a3).status_code == 201
    assert _annotate(admin, b3).status_code == 201  # the newest annotation of the tier

    def newest(expert: ExpertClient, **params: Any) -> list[str]:
        response = _get(expert, "/api/annotations", **params)
        assert response.status_code == 200, response.text
        return [a["image_id"] for a in response.json()["annotations"]]

    assert newest(admin, tier=TIER, limit=1) == [b3]
    assert newest(reviewer, tier=TIER, limit=1) == [a3]
    assert newest(reviewer, image_id=b3) == []
    assert newest(reviewer, image_id=a3) == [a3]
    assert newest(admin, image_id=b3) == [b3]
