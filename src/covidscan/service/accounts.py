"""What admins and users do to accounts, each step audited: deactivate and reactivate, revoke tokens with
sessions, reset a password (admins) and change one's own. The API, the admin page and `covidscan users`
all call these, so the three behave and audit alike."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from covidscan.service.audit import record
from covidscan.service.auth import (
    Client,
    Revoked,
    authenticate,
    revoke_access,
    set_active,
    set_password,
)
from covidscan.service.errors import NotFound
from covidscan.service.models import User, WebSession


def find_user(db: Session, name: str) -> User:
    """The account called ``name``; 404 naming it when there is none."""
    user = db.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFound(f"no user {name!r}; `covidscan users add {name} --role ...` creates one")
    return user


def deactivate(db: Session, name: str, *, actor: str) -> tuple[User, Revoked]:
    """Stop ``name`` logging in; their tokens and sessions end now (a reactivation does not revive them)."""
    user = find_user(db, name)
    revoked = set_active(db, user, False)
    record(
        db,
        "user_deactivate",
        actor=actor,
        target=f"user:{name}",
        tokens=revoked.tokens,
        sessions=revoked.sessions,
    )
    return user, revoked


def reactivate(db: Session, name: str, *, actor: str) -> tuple[User, Revoked]:
    """Let ``name`` log in again (with new tokens and sessions: the old ones stay revoked)."""
    user = find_user(db, name)
    revoked = set_active(db, user, True)
    record(db, "user_activate", actor=actor, target=f"user:{name}")
    return user, revoked


def revoke(db: Session, name: str, *, actor: str) -> tuple[User, Revoked]:
    """End every API token and browser session of ``name`` (e.g. a lost laptop); the account stays."""
    user = find_user(db, name)
    revoked = revoke_access(db, user)
    record(
        db,
        "access_revoke",
        actor=actor,
        target=f"user:{name}",
        tokens=revoked.tokens,
        sessions=revoked.sessions,
    )
    return user, revoked


def reset_password(db: Session, name: str, password: str, *, actor: str) -> tuple[User, Revoked]:
    """An admin sets ``name``'s password (policy checked); their browser sessions end."""
    user = find_user(db, name)
    ended = set_password(db, user, password)
    record(db, "password_reset", actor=actor, target=f"user:{name}", sessions=ended)
    return user, Revoked(0, ended)


def change_own_password(
    db: Session, user: User, current: str, new: str, client: Client, keep: WebSession | None
) -> Revoked:
    """``user`` changes their password, confirming the current one (throttled as a login is, so a stolen
    session is no guessing oracle); their other browser sessions end, ``keep`` (this one) stays."""
    authenticate(db, user.name, current, client)
    ended = set_password(db, user, new, keep)
    record(db, "password_change", actor=user.name, target=f"user:{user.name}", sessions=ended)
    return Revoked(0, ended)
