"""Per-study access, the pure parts: who may access which study, study names, and the
``phenocascade users`` commands that grant and revoke (store calls replaced by fakes)."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from phenocascade.cli import annotate
from phenocascade.errors import NotFoundError, ValidationError
from phenocascade.ui.security import Role, User
from phenocascade.ui.validation import (
    IMAGE_ID_MAX_LEN,
    STUDIES_PER_REQUEST,
    check_image_id,
    check_studies,
    check_study,
)


def test_a_user_accesses_the_granted_studies_and_no_other() -> None:
    user = User("ann", Role.ANNOTATOR, studies=frozenset({"lung", "liver"}))
    assert user.accessible_studies() == {"lung", "liver"}
    assert user.may_access("lung") and user.may_access("liver")
    assert not user.may_access("brain")
    assert not user.may_access("")  # a task submitted without a study


@pytest.mark.parametrize("role", [Role.ANNOTATOR, Role.REVIEWER])
def test_without_a_grant_a_user_accesses_nothing(role: Role) -> None:
    user = User("new", role)
    assert user.accessible_studies() == frozenset()
    assert not user.may_access("default")


@pytest.mark.parametrize(
    "user",
    [
        User("root", Role.ADMIN),
        User("root", Role.ADMIN, studies=frozenset({"lung"})),
        User("lead", Role.REVIEWER, studies=frozenset({"lung"}), all_studies=True),
    ],
)
def test_an_admin_or_an_all_studies_user_accesses_every_study(user: User) -> None:
    assert user.accessible_studies() is None
    assert user.may_access("brain") and user.may_access("")


@pytest.mark.parametrize("name", ["default", "lung-2026", "Étude 3 (rat)", "a/b", "x" * 200])
def test_a_study_name_is_kept(name: str) -> None:
    assert check_study(name) == name


@pytest.mark.parametrize(
    "name", ["", " lung", "lung ", "lu\x00ng", "lung\n", "lu\u200bng", "x" * 201]
)
def test_a_bad_study_name_is_refused_saying_what_is_allowed(name: str) -> None:
    with pytest.raises(ValidationError, match="1 to 200 characters, no control characters"):
        check_study(name)


def test_study_lists_are_deduplicated_sorted_and_bounded() -> None:
    assert check_studies(["b", "a", "b"]) == ["a", "b"]
    assert check_studies([]) == []
    with pytest.raises(ValidationError, match="at most 1000"):
        check_studies([f"s{i}" for i in range(STUDIES_PER_REQUEST + 1)])
    with pytest.raises(ValidationError, match="study name ''"):
        check_studies(["ok", ""])


def test_an_image_id_is_checked_before_it_reaches_a_query() -> None:
    assert check_image_id("al-1-3f2a9c0d") == "al-1-3f2a9c0d"
    for bad in ("", "a\nb", "x" * (IMAGE_ID_MAX_LEN + 1)):
        with pytest.raises(ValidationError, match="image id"):
            check_image_id(bad)


class FakeStore:
    """Stands in for Cassandra: records each study change, knows one user."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def change(self, *, session: object, username: str, **change: Any) -> bool:
        self.calls.append({"username": username, **change})
        return username == "alice"


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> FakeStore:
    fake = FakeStore()
    monkeypatch.setattr(annotate, "connect", lambda _settings: object())
    monkeypatch.setattr(annotate, "change_user_studies", fake.change)
    return fake


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    annotate.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["users", *argv])
    rc: int = args.func(args)
    return rc


def test_users_grant_and_revoke_change_only_what_they_name(store: FakeStore) -> None:
    assert _run("grant", "alice", "lung", "brain") == 0
    assert _run("revoke", "alice", "lung") == 0
    assert _run("grant", "alice", "--all-studies") == 0
    assert _run("revoke", "alice", "--all-studies") == 0
    assert store.calls == [
        {"username": "alice", "grant": ["brain", "lung"], "revoke": (), "all_studies": None},
        {"username": "alice", "grant": (), "revoke": ["lung"], "all_studies": None},
        {"username": "alice", "grant": [], "revoke": (), "all_studies": True},
        {"username": "alice", "grant": (), "revoke": [], "all_studies": False},
    ]


def test_users_grant_refuses_nothing_to_do_a_bad_name_and_an_unknown_user(
    store: FakeStore,
) -> None:
    with pytest.raises(ValidationError, match="name the studies to revoke, or --all-studies"):
        _run("revoke", "alice")
    with pytest.raises(ValidationError, match="study name"):
        _run("grant", "alice", "bad\tname")
    with pytest.raises(NotFoundError, match="no user 'bob'"):
        _run("grant", "bob", "lung")
    assert [c["username"] for c in store.calls] == ["bob"]
