"""Accounts, passwords (Argon2id), API tokens, server-side browser sessions, CSRF and login throttling."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from covidscan.errors import ConfigError
from covidscan.service.models import ROLES, ApiToken, LoginFailure, User, WebSession, utcnow

SESSION_LIFETIME = timedelta(hours=12)
THROTTLE_WINDOW = timedelta(minutes=15)
THROTTLE_FAILURES = 5  # failed logins per account name within the window before 429
MIN_PASSWORD = 10

_hasher = PasswordHasher()  # argon2-cffi's defaults: Argon2id, RFC 9106 low-memory profile
# Verifying against this for unknown names costs the same time as for real ones (no user enumeration).
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def sha256_hex(text: str) -> str:
    """Hex SHA-256 of a string: the stored form of tokens and session ids (both are 256-bit random)."""
    return hashlib.sha256(text.encode()).hexdigest()


def hash_password(password: str) -> str:
    """Argon2id hash of a password; refuses passwords shorter than ``MIN_PASSWORD`` or only blanks."""
    if len(password) < MIN_PASSWORD or not password.strip():
        raise ConfigError(f"password too short: use at least {MIN_PASSWORD} characters, not only spaces")
    return _hasher.hash(password)


def add_user(db: Session, name: str, role: str, password: str | None) -> User:
    """Create an account; names are unique, roles are admin, doctor or submitter.

    Admins and doctors log in with a password; a submitter may have none (it uses API tokens only).
    """
    if role not in ROLES:
        raise ConfigError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError(f"user name {name!r}: use 1-64 letters, digits, '.', '-' or '_'")
    if db.scalar(select(User).where(User.name == name)):
        raise ConfigError(f"user {name!r} already exists; pick another name")
    if password is None and role != "submitter":
        raise ConfigError(f"a {role} logs in with a password: give one of at least {MIN_PASSWORD} characters")
    user = User(name=name, role=role, password_hash=None if password is None else hash_password(password))
    db.add(user)
    db.flush()
    return user


def get_user(db: Session, name: str) -> User:
    """The account called ``name``; a ConfigError naming it when there is none."""
    user = db.scalar(select(User).where(User.name == name))
    if user is None:
        raise ConfigError(f"no user {name!r}; create it with `covidscan users add {name} --role ...`")
    return user


def new_token(db: Session, user: User) -> str:
    """A new API token for ``user``: returned once, only its hash is stored."""
    token = "cs_" + secrets.token_urlsafe(32)
    db.add(ApiToken(user_id=user.id, token_hash=sha256_hex(token), prefix=token[:10]))
    db.flush()
    return token


def revoke_tokens(db: Session, user: User) -> int:
    """Revoke every live token of ``user``; returns how many."""
    result = db.execute(
        update(ApiToken)
        .where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    return result.rowcount


def user_for_token(db: Session, token: str) -> User | None:
    """The active user a bearer token belongs to, or None (unknown, revoked or deactivated)."""
    row = db.scalar(
        select(ApiToken).where(ApiToken.token_hash == sha256_hex(token), ApiToken.revoked_at.is_(None))
    )
    return row.user if row is not None and row.user.active else None


def throttled(db: Session, name: str) -> bool:
    """True when ``name`` had ``THROTTLE_FAILURES`` failed logins within ``THROTTLE_WINDOW``."""
    since = utcnow() - THROTTLE_WINDOW
    count = db.scalar(
        select(func.count())
        .select_from(LoginFailure)
        .where(LoginFailure.name == name, LoginFailure.at >= since)
    )
    return count >= THROTTLE_FAILURES


def check_password(db: Session, name: str, password: str) -> User | None:
    """The user if ``password`` is right (a failure is recorded for throttling otherwise)."""
    user = db.scalar(select(User).where(User.name == name, User.active.is_(True)))
    try:
        ok = _hasher.verify(user.password_hash if user and user.password_hash else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        ok = False
    if ok and user is not None and user.password_hash:
        db.execute(delete(LoginFailure).where(LoginFailure.name == name))
        return user
    db.add(LoginFailure(name=name[:64]))
    return None


def start_session(db: Session, user: User) -> str:
    """A new session (a fresh random id at every login, so a planted id is useless); returns the cookie."""
    sid = secrets.token_urlsafe(32)
    db.add(
        WebSession(
            id_hash=sha256_hex(sid),
            user_id=user.id,
            csrf_token=secrets.token_urlsafe(32),
            expires_at=utcnow() + SESSION_LIFETIME,
        )
    )
    db.flush()
    return sid


def session_for_cookie(db: Session, sid: str) -> WebSession | None:
    """The live session behind a cookie value, or None (unknown, expired, revoked, user deactivated)."""
    row = db.get(WebSession, sha256_hex(sid))
    if row is None or row.revoked_at is not None or row.expires_at <= utcnow() or not row.user.active:
        return None
    return row


def end_session(db: Session, sid: str) -> None:
    """Revoke the session behind a cookie value (logout): the id stops working at once."""
    db.execute(update(WebSession).where(WebSession.id_hash == sha256_hex(sid)).values(revoked_at=utcnow()))


def csrf_ok(expected: str | None, given: str | None) -> bool:
    """Constant-time comparison of CSRF tokens; a missing one never matches."""
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))
