"""User management (admins only): list, add, change and delete users, and grant studies.

A user other than an admin sees only the studies granted to them (or every study with
``all_studies``); with no grant they see nothing. Grants are read at every request, so a
grant or a revocation applies to the user's next request without ending their sessions; a
password or role change ends every session of theirs.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, status
from pydantic import BaseModel, Field

from phenocascade.errors import ConflictError, NotFoundError, ValidationError
from phenocascade.store.users import (
    add_user,
    change_user_studies,
    delete_user,
    get_user,
    list_users,
    update_user,
)
from phenocascade.ui.deps import AdminUser, Ctx
from phenocascade.ui.security import check_role, check_username, hash_password
from phenocascade.ui.validation import STUDIES_PER_REQUEST, check_studies

router = APIRouter(prefix="/admin/api/users", tags=["users"])

StudyNames = Annotated[list[str], Field(max_length=STUDIES_PER_REQUEST)]


class NewUser(BaseModel):
    """A user to create, with the studies they may access."""

    username: str
    password: str
    role: str = "annotator"
    studies: StudyNames = Field(default_factory=list)
    all_studies: bool = False


def user_view(stored: dict[str, Any]) -> dict[str, Any]:
    """Return what the admin page shows of a stored user (never the hash or the epoch)."""
    return {
        key: stored[key] for key in ("username", "role", "created_at", "studies", "all_studies")
    }


@router.get("")
def read_users(ctx: Ctx, _admin: AdminUser) -> dict[str, Any]:
    """List every user with their role and studies."""
    return {"users": list_users(session=ctx.session)}


@router.post("", status_code=status.HTTP_201_CREATED)
def create_user(body: NewUser, ctx: Ctx, _admin: AdminUser) -> dict[str, Any]:
    """Create a user; 409 if the name is taken."""
    username = check_username(body.username)
    role = check_role(body.role)
    studies = check_studies(body.studies)
    if not add_user(
        session=ctx.session,
        username=username,
        password_hash=hash_password(body.password),
        role=role,
        studies=studies,
        all_studies=body.all_studies,
    ):
        raise ConflictError(f"user {username!r} already exists")
    return {
        "username": username,
        "role": role.value,
        "studies": studies,
        "all_studies": body.all_studies,
    }


class UserChange(BaseModel):
    """A new password and/or role for a user, and studies to grant or revoke."""

    password: str | None = None
    role: str | None = None
    grant: StudyNames = Field(default_factory=list)
    revoke: StudyNames = Field(default_factory=list)
    all_studies: bool | None = None


@router.patch("/{username}")
def change_user(username: str, body: UserChange, ctx: Ctx, _admin: AdminUser) -> dict[str, Any]:
    """Change a user (404 if no such user) and return them as :func:`user_view` does.

    A new password or role ends every session of the user; granting or revoking studies
    (or ``all_studies``) applies to their next request and ends none.
    """
    name = check_username(username)
    changes_access = bool(body.grant or body.revoke) or body.all_studies is not None
    if body.password is None and body.role is None and not changes_access:
        raise ValidationError(
            "give a new password, a new role, studies to grant or revoke, or all_studies"
        )
    role = check_role(body.role) if body.role is not None else None
    password_hash = hash_password(body.password) if body.password is not None else None
    grant, revoke = check_studies(body.grant), check_studies(body.revoke)
    found = True
    if changes_access:
        found = change_user_studies(
            session=ctx.session,
            username=name,
            grant=grant,
            revoke=revoke,
            all_studies=body.all_studies,
        )
    if found and (role is not None or password_hash is not None):
        found = (
            update_user(session=ctx.session, username=name, password_hash=password_hash, role=role)
            is not None
        )
    stored = get_user(session=ctx.session, username=name) if found else None
    if stored is None:
        raise NotFoundError(f"no user {name!r}")
    return user_view(stored)


@router.delete("/{username}")
def remove_user(username: str, ctx: Ctx, admin: AdminUser) -> dict[str, str]:
    """Delete a user (not oneself, so the last admin cannot lock everyone out by mistake)."""
    if username == admin.username:
        raise ConflictError("you cannot delete your own account; ask another admin")
    if not delete_user(session=ctx.session, username=check_username(username)):
        raise NotFoundError(f"no user {username!r}")
    return {"deleted": username}
