"""User management (admins only): list, add, change and delete users."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, status
from pydantic import BaseModel

from phenocascade.errors import ConflictError, NotFoundError, ValidationError
from phenocascade.store.annotations import add_user, delete_user, list_users, update_user
from phenocascade.ui.deps import AdminUser, Ctx
from phenocascade.ui.security import check_role, check_username, hash_password

router = APIRouter(prefix="/admin/api/users", tags=["users"])


class NewUser(BaseModel):
    """A user to create."""

    username: str
    password: str
    role: str = "annotator"


@router.get("")
def read_users(ctx: Ctx, _admin: AdminUser) -> dict[str, Any]:
    """List every user with their role."""
    return {"users": list_users(session=ctx.session)}


@router.post("", status_code=status.HTTP_201_CREATED)
def create_user(body: NewUser, ctx: Ctx, _admin: AdminUser) -> dict[str, str]:
    """Create a user; 409 if the name is taken."""
    username = check_username(body.username)
    role = check_role(body.role)
    if not add_user(
        session=ctx.session,
        username=username,
        password_hash=hash_password(body.password),
        role=role,
    ):
        raise ConflictError(f"user {username!r} already exists")
    return {"username": username, "role": role.value}


class UserChange(BaseModel):
    """A new password and/or role for a user."""

    password: str | None = None
    role: str | None = None


@router.patch("/{username}")
def change_user(username: str, body: UserChange, ctx: Ctx, _admin: AdminUser) -> dict[str, str]:
    """Set a user's password and/or role; every session of theirs ends (404 if no such user)."""
    if body.password is None and body.role is None:
        raise ValidationError("give a new password, a new role, or both")
    role = check_role(body.role) if body.role is not None else None
    password_hash = hash_password(body.password) if body.password is not None else None
    if (
        update_user(
            session=ctx.session,
            username=check_username(username),
            password_hash=password_hash,
            role=role,
        )
        is None
    ):
        raise NotFoundError(f"no user {username!r}")
    return {"username": username, **({"role": role.value} if role is not None else {})}


@router.delete("/{username}")
def remove_user(username: str, ctx: Ctx, admin: AdminUser) -> dict[str, str]:
    """Delete a user (not oneself, so the last admin cannot lock everyone out by mistake)."""
    if username == admin.username:
        raise ConflictError("you cannot delete your own account; ask another admin")
    if not delete_user(session=ctx.session, username=username):
        raise NotFoundError(f"no user {username!r}")
    return {"deleted": username}
