"""Passwords, signed session cookies and CSRF tokens of the annotation app.

* Passwords are stored as bcrypt hashes only.
* The session is a signed (itsdangerous, HMAC-SHA1 over a timestamped payload) cookie,
  ``Secure``, ``HttpOnly`` and ``SameSite=Strict``. It holds the user name and a random
  CSRF token (synchronizer token pattern): every state-changing request must echo that
  token in the ``X-CSRF-Token`` header. A visitor who is not logged in gets an anonymous
  session holding only a token, so the login form is protected too; logging in issues a
  fresh token.
* Logins are throttled (:class:`~phenocascade.ui.throttle.LoginThrottle`): too many recent
  failures for one user name or from one client address refuse further attempts before any
  password is checked.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import hmac
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

import bcrypt
from itsdangerous import BadSignature, URLSafeTimedSerializer

from phenocascade.config import Settings
from phenocascade.errors import ConfigError, ValidationError

SESSION_COOKIE = "phenocascade_session"
CSRF_HEADER = "X-CSRF-Token"
SESSION_MAX_AGE_S = 12 * 3600
MIN_PASSWORD_LEN = 8
BCRYPT_MAX_BYTES = 72  # bcrypt ignores (bcrypt>=5: refuses) anything longer
_USERNAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SECRET_FILE = "ui_secret"


class Role(enum.StrEnum):
    """What a user may do; each role includes the ones before it."""

    ANNOTATOR = "annotator"
    REVIEWER = "reviewer"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        """Position in the order annotator < reviewer < admin."""
        return list(Role).index(self)


@dataclass(frozen=True, slots=True)
class User:
    """A logged-in user and the studies they may access.

    An admin may access every study; anyone else only the studies granted to them, or every
    study when ``all_studies`` is set. A user with no grant accesses none (the secure
    default: a new annotator sees nothing until an admin grants a study).
    """

    username: str
    role: Role
    studies: frozenset[str] = frozenset()
    all_studies: bool = False

    def accessible_studies(self) -> frozenset[str] | None:
        """Return the studies this user may access, or ``None`` for every study."""
        if self.role is Role.ADMIN or self.all_studies:
            return None
        return self.studies

    def may_access(self, study: str) -> bool:
        """Whether this user may see, and annotate, the tasks and images of ``study``."""
        allowed = self.accessible_studies()
        return allowed is None or study in allowed


@dataclass(frozen=True, slots=True)
class SessionData:
    """The content of the session cookie.

    A CSRF token and, once logged in, the user name and the user's session epoch at login
    (the session ends when the stored epoch changes: logout, password or role change).
    """

    csrf: str
    username: str | None = None
    epoch: str | None = None


def check_username(username: str) -> str:
    """Return ``username`` if it is 1-64 of ``A-Z a-z 0-9 _ . -``.

    Raises
    ------
    ValidationError
        Otherwise, saying which characters are allowed.
    """
    if not _USERNAME.fullmatch(username):
        raise ValidationError(
            f"user name {username!r} is invalid: use 1 to 64 letters, digits, '_', '.' or '-'"
        )
    return username


def check_role(role: str) -> Role:
    """Return the :class:`Role` called ``role``.

    Raises
    ------
    ValidationError
        If there is no such role.
    """
    try:
        return Role(role)
    except ValueError:
        raise ValidationError(
            f"unknown role {role!r}; choose one of {[r.value for r in Role]}"
        ) from None


def hash_password(password: str) -> str:
    """Return the bcrypt hash of ``password``.

    Raises
    ------
    ValidationError
        If the password is shorter than 8 characters or longer than bcrypt's 72 bytes.
    """
    raw = password.encode("utf-8")
    if len(password) < MIN_PASSWORD_LEN:
        raise ValidationError(f"the password must have at least {MIN_PASSWORD_LEN} characters")
    if len(raw) > BCRYPT_MAX_BYTES:
        raise ValidationError(
            f"the password is {len(raw)} bytes long; bcrypt accepts at most {BCRYPT_MAX_BYTES}"
        )
    return bcrypt.hashpw(raw, bcrypt.gensalt()).decode("ascii")


@functools.cache
def _dummy_hash() -> bytes:
    # Checked when the user does not exist, so that a wrong name costs as long as a wrong
    # password and login timing does not reveal which names exist.
    return bcrypt.hashpw(b"phenocascade-no-such-user", bcrypt.gensalt())


def verify_password(password: str, password_hash: str | None) -> bool:
    """Whether ``password`` matches ``password_hash`` (``None``: no such user, always false)."""
    raw = password.encode("utf-8")[:BCRYPT_MAX_BYTES]
    if password_hash is None:
        bcrypt.checkpw(raw, _dummy_hash())
        return False
    return bcrypt.checkpw(raw, password_hash.encode("ascii"))


def load_secret(settings: Settings) -> str:
    """Return the cookie-signing secret.

    ``settings.ui_secret`` (env ``PHENOCASCADE_UI_SECRET``) wins; otherwise a random
    secret is generated once and kept, readable only by its owner, in
    ``settings.home / "ui_secret"``, so that sessions survive a restart. Processes starting
    together all get the secret of the first one to store it.

    Raises
    ------
    ConfigError
        If the stored secret is empty.
    """
    if settings.ui_secret is not None:
        return settings.ui_secret.get_secret_value()
    path: Path = settings.home / _SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        _store_first(path, secrets.token_urlsafe(48))
    secret = path.read_text().strip()
    if not secret:
        raise ConfigError(
            f"{path} is empty (left by an interrupted start); delete it and start again, "
            "or set PHENOCASCADE_UI_SECRET"
        )
    return secret


def _store_first(path: Path, secret: str) -> None:
    """Write ``secret`` to ``path`` (mode 0600) unless another process stored one first.

    The secret is written whole to a private temporary file beside ``path`` and then
    hard-linked to ``path``: a reader sees either no file or a complete one, never an empty
    one, and the link fails for every writer but the first.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secret)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)


class SessionCodec:
    """Sign and verify session cookies.

    Parameters
    ----------
    secret : str
        The signing secret (see :func:`load_secret`).
    max_age_s : int, default 43200
        Sessions older than this are refused (the user logs in again).
    """

    def __init__(self, secret: str, max_age_s: int = SESSION_MAX_AGE_S) -> None:
        self._serializer = URLSafeTimedSerializer(secret, salt="phenocascade-session")
        self.max_age_s = max_age_s

    def dumps(self, data: SessionData) -> str:
        """Return the signed cookie value of ``data``."""
        return str(self._serializer.dumps({"c": data.csrf, "u": data.username, "e": data.epoch}))

    def loads(self, value: str | None) -> SessionData | None:
        """Return the session in a cookie value, or ``None`` if absent, forged or expired."""
        if not value:
            return None
        try:
            raw = self._serializer.loads(value, max_age=self.max_age_s)
        except BadSignature:
            return None
        if not isinstance(raw, dict) or not isinstance(raw.get("c"), str):
            return None
        user, epoch = raw.get("u"), raw.get("e")
        return SessionData(
            csrf=raw["c"],
            username=user if isinstance(user, str) else None,
            epoch=epoch if isinstance(epoch, str) else None,
        )


def new_session(username: str | None = None, epoch: str | None = None) -> SessionData:
    """Return a session with a fresh random CSRF token."""
    return SessionData(csrf=secrets.token_urlsafe(32), username=username, epoch=epoch)


def csrf_matches(session: SessionData | None, token: str | None) -> bool:
    """Whether ``token`` equals the session's CSRF token (constant-time comparison)."""
    if session is None or not token:
        return False
    return hmac.compare_digest(session.csrf.encode(), token.encode())
