"""Accounts, passwords (Argon2id, a policy), API tokens, server-side browser sessions, CSRF and login
throttling.

Throttling slows a guesser down without letting anyone lock a doctor out:

- Each client address may fail ``FREE_FAILURES`` times within ``THROTTLE_WINDOW``; after that every
  further attempt from it waits a delay that doubles with each failure (1 s, 2 s, 4 s, ... at most
  ``MAX_DELAY``). An attempt made while the address must wait is refused (429 with Retry-After) without
  checking the password, and counts as a failure: hammering only lengthens the wait (up to the cap).
- An account whose password was wrong ``ACCOUNT_FAILURES`` times within the window (from anywhere) is
  under attack: then an address has no free failures for it (its first wrong guess starts the delay),
  which stops guessing spread over many addresses. The account itself is never locked: a right password
  from a client that is not throttled logs in.
- A browser that logged in to the account before carries a device cookie; it is throttled by its own
  failures only, so a guesser behind the same address (a hospital's NAT) cannot lock it out either.

The client address is what the server sees (``request.client``; for IPv6 its /64 network): Uvicorn takes
it from ``X-Forwarded-For`` only when the connection comes from an address in ``FORWARDED_ALLOW_IPS`` (by
default 127.0.0.1, a reverse proxy on the same host), so clients cannot choose it.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import hmac
import ipaddress
import math
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, func, or_, select, text, update
from sqlalchemy.orm import Session

from covidscan.errors import ConfigError
from covidscan.service.errors import Conflict, ErrorCode, LoginThrottled, WeakPassword, WrongPassword
from covidscan.service.models import (
    ROLES,
    ApiToken,
    KnownDevice,
    LoginFailure,
    User,
    WebSession,
    utcnow,
)

THROTTLE_WINDOW = timedelta(hours=1)  # failures older than this are forgotten
FREE_FAILURES = 5  # per client address (or known browser) before the delays start
ACCOUNT_FAILURES = 10  # per account: above this, addresses get no free failures for it
MAX_DELAY = timedelta(minutes=15)
MIN_PASSWORD = 12
MIN_DISTINCT = 5  # "aaaaaaaaaaaa" and "abababababab" are not passwords
COMMON_PASSWORDS = Path(__file__).with_name("data") / "common-passwords.txt.gz"  # see data/README.md
DEVICE_LIFETIME = timedelta(days=365)  # how long a browser stays known after its login
SEEN_EVERY = timedelta(minutes=1)  # how stale a session's last_seen_at may get before it is written

_hasher = PasswordHasher()  # argon2-cffi's defaults: Argon2id, RFC 9106 low-memory profile
# Verifying against this for unknown names costs the same time as for real ones (no user enumeration).
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def sha256_hex(text: str) -> str:
    """Hex SHA-256 of a string: the stored form of tokens, session ids and device cookies (all 256-bit
    random)."""
    return hashlib.sha256(text.encode()).hexdigest()


@functools.cache
def _common_passwords() -> frozenset[str]:
    with gzip.open(COMMON_PASSWORDS, "rt", encoding="utf-8") as f:
        return frozenset(line.strip() for line in f if line.strip())


def check_password_policy(password: str, name: str | None = None) -> None:
    """Refuse (:class:`WeakPassword`) a password shorter than ``MIN_PASSWORD``, of fewer than
    ``MIN_DISTINCT`` different characters, containing the account's name, or a common password (the shipped
    list, also with digits or symbols added at either end: ``password1234``)."""
    lowered = password.strip().lower()
    if len(password) < MIN_PASSWORD or not password.strip():
        raise WeakPassword(f"password too short: use at least {MIN_PASSWORD} characters, not only spaces")
    if len(set(lowered)) < MIN_DISTINCT:
        raise WeakPassword(f"password too simple: use at least {MIN_DISTINCT} different characters")
    if name and len(name) >= 4 and name.lower() in lowered:  # (a 2-letter name is in many a good password)
        raise WeakPassword("the password contains the account's name: choose another")
    padding = "0123456789!@#$%^&*()-_=+.,;:?~ "
    cores = {lowered, lowered.strip(padding), lowered.rstrip(padding), lowered.lstrip(padding)}
    if any(core in _common_passwords() for core in cores if core):
        raise WeakPassword(
            "that is one of the most common passwords (or one with digits added): choose another, e.g. "
            "four unrelated words"
        )


def hash_password(password: str, name: str | None = None) -> str:
    """Argon2id hash of a password that passes :func:`check_password_policy`."""
    check_password_policy(password, name)
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
    user = User(
        name=name, role=role, password_hash=None if password is None else hash_password(password, name)
    )
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


def revoke_sessions(db: Session, user: User, keep: WebSession | None = None) -> int:
    """End every live browser session of ``user`` (but ``keep``); returns how many."""
    query = update(WebSession).where(
        WebSession.user_id == user.id, WebSession.revoked_at.is_(None), WebSession.expires_at > utcnow()
    )
    if keep is not None:
        query = query.where(WebSession.id_hash != keep.id_hash)
    return db.execute(query.values(revoked_at=utcnow())).rowcount


@dataclass(frozen=True)
class Revoked:
    """How many API tokens and browser sessions an action ended."""

    tokens: int
    sessions: int


def revoke_access(db: Session, user: User) -> Revoked:
    """End every API token and browser session of ``user`` at once."""
    return Revoked(revoke_tokens(db, user), revoke_sessions(db, user))


def active_admins(db: Session) -> int:
    """How many admin accounts can still log in."""
    return db.scalar(
        select(func.count()).select_from(User).where(User.role == "admin", User.active.is_(True))
    )


def set_active(db: Session, user: User, active: bool) -> Revoked:
    """Deactivate (no login; tokens and sessions end now and stay ended) or reactivate an account.

    The last active admin is never deactivated: nobody could manage the accounts after that.
    """
    if not active and user.active and user.role == "admin" and active_admins(db) <= 1:
        raise Conflict(
            f"{user.name} is the last active admin: add or reactivate another admin first",
            ErrorCode.LAST_ADMIN,
        )
    user.active = active
    revoked = revoke_access(db, user) if not active else Revoked(0, 0)
    db.flush()
    return revoked


def set_password(db: Session, user: User, password: str, keep: WebSession | None = None) -> int:
    """Give ``user`` a new password (policy checked); ends their other browser sessions, which may be an
    intruder's. Returns how many sessions ended. API tokens are separate credentials and stay."""
    user.password_hash = hash_password(password, user.name)
    db.flush()
    return revoke_sessions(db, user, keep)


def user_for_token(db: Session, token: str) -> User | None:
    """The active user a bearer token belongs to, or None (unknown, revoked or deactivated)."""
    row = db.scalar(
        select(ApiToken).where(ApiToken.token_hash == sha256_hex(token), ApiToken.revoked_at.is_(None))
    )
    return row.user if row is not None and row.user.active else None


@dataclass(frozen=True)
class Client:
    """Who is trying a password: the client's address and the device cookie its browser sent."""

    address: str | None
    device: str | None = None  # the cookie's value, as sent (only its hash is stored)


def throttle_address(host: str | None) -> str | None:
    """The address a client is throttled by: its IPv4 address, or its IPv6 /64 network (one household or
    machine holds a whole /64, and would otherwise have 2**64 fresh addresses to guess from)."""
    try:
        ip = ipaddress.ip_address(host or "")
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    if ip.ipv4_mapped is not None:  # an IPv4 client of a dual-stack socket
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))


def _delay(failures: int, free: int) -> timedelta:
    """The wait after ``failures`` failures of which ``free`` cost nothing: doubling, at most MAX_DELAY."""
    if failures < free:
        return timedelta(0)
    return min(timedelta(seconds=2.0 ** min(failures - free, 20)), MAX_DELAY)


def _failures(db: Session, *where: object) -> tuple[int, datetime | None]:
    """How many failures match ``where`` within the window, and when the latest was."""
    count, latest = db.execute(
        select(func.count(), func.max(LoginFailure.at)).where(
            LoginFailure.at >= utcnow() - THROTTLE_WINDOW, *where
        )
    ).one()
    return count, latest


def _known_device(db: Session, name: str, client: Client) -> str | None:
    """The hash of ``client``'s device cookie when it belongs to the account ``name``, else None."""
    if not client.device:
        return None
    digest = sha256_hex(client.device)
    owner = db.scalar(
        select(User.name)
        .join(KnownDevice, KnownDevice.user_id == User.id)
        .where(KnownDevice.token_hash == digest, KnownDevice.created_at > utcnow() - DEVICE_LIFETIME)
    )
    return digest if owner == name else None


@dataclass(frozen=True)
class _Wait:
    """Where a client stands: the seconds it must still wait, and whether one more failure would lengthen
    that wait (at the cap it would not)."""

    seconds: int
    grows: bool


def _wait(db: Session, name: str, address: str | None, device: str | None) -> _Wait:
    """How long a client at ``address`` (with the known ``device`` of ``name``, if any) must wait."""
    if device is not None:  # a browser that logged in here before: only its own failures hold it back
        count, latest = _failures(db, LoginFailure.device == device)
        free = FREE_FAILURES
    else:
        attacked = _failures(db, LoginFailure.name == name, LoginFailure.refused.is_(False))[0]
        where = LoginFailure.address.is_(None) if address is None else LoginFailure.address == address
        count, latest = _failures(db, where)
        free = 1 if attacked >= ACCOUNT_FAILURES else FREE_FAILURES
    delay = _delay(count, free)
    seconds = 0 if latest is None else math.ceil((latest + delay - utcnow()).total_seconds())
    return _Wait(max(0, seconds), delay < MAX_DELAY)


def check_password(db: Session, name: str, password: str) -> User | None:
    """The active user ``name`` if ``password`` is theirs, else None (no throttling: see authenticate).

    The Argon2 check (tens of milliseconds of CPU, on purpose) runs after ``db``'s transaction has ended,
    so it holds neither a pooled connection nor, on SQLite, the write lock: a login flood must not make
    every other request (signing, uploads) wait for it.
    """
    user = db.scalar(select(User).where(User.name == name, User.active.is_(True)))
    stored = user.password_hash if user is not None else None
    db.commit()
    try:
        ok = _hasher.verify(stored or _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        ok = False
    return user if ok and stored else None


def authenticate(db: Session, name: str, password: str, client: Client) -> User:
    """The user if ``password`` is right and ``client`` may try now.

    :class:`LoginThrottled` (429, with the seconds to wait) while the client must wait, without checking
    the password; :class:`WrongPassword` otherwise. Both failures are committed before they are raised.
    """
    device = _known_device(db, name, client)

    def attempt(refused: bool) -> LoginFailure:  # committed at once: a failed request's rollback keeps it
        row = LoginFailure(name=name[:64], address=client.address, device=device, refused=refused)
        db.add(row)
        db.commit()
        return row

    wait = _wait(db, name, client.address, device)
    if wait.seconds == 0 and db.get_bind().dialect.name == "postgresql":
        # One attempt at a time per address, as SQLite's BEGIN IMMEDIATE serialises them: guesses sent
        # at once must each see the others' attempts, or a burst would all pass the same free-tries check.
        # A client that must wait is refused without the lock (others' attempts only lengthen its wait):
        # a flood of refusals queued on it would hold the server's threads that signing needs.
        db.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"login:{client.address}"})
        wait = _wait(db, name, client.address, device)
    if wait.seconds > 0:
        if wait.grows:  # at the cap a refusal is not written: a flood of them would only cost writes
            attempt(refused=True)
        raise LoginThrottled(wait.seconds)
    # Counted as a failure before the password is checked (outside any transaction, see check_password),
    # so that guesses sent at once see each other's attempts; forgotten below if the password is right.
    tried = attempt(refused=False)
    user = check_password(db, name, password)
    if user is None:
        # The wait runs from the failure, not from the start of a check that may take a while under load.
        db.execute(update(LoginFailure).where(LoginFailure.id == tried.id).values(at=utcnow()))
        db.commit()
        raise WrongPassword("wrong name or password")
    # Forget this attempt, what is stale, and this browser's own typos; others' failures (a guesser's) stay.
    forget = or_(LoginFailure.id == tried.id, LoginFailure.at < utcnow() - THROTTLE_WINDOW)
    db.execute(delete(LoginFailure).where(or_(forget, LoginFailure.device == device) if device else forget))
    return user


def remember_device(db: Session, user: User, device: str | None) -> str:
    """The device cookie for ``user``'s browser after a login: a new one each time (a browser is known to
    one account at a time, for ``DEVICE_LIFETIME``); the cookie it sent, and expired ones, are forgotten."""
    forget = KnownDevice.created_at <= utcnow() - DEVICE_LIFETIME
    if device:
        forget = or_(forget, KnownDevice.token_hash == sha256_hex(device))
    db.execute(delete(KnownDevice).where(forget))
    fresh = secrets.token_urlsafe(32)
    db.add(KnownDevice(token_hash=sha256_hex(fresh), user_id=user.id))
    db.flush()
    return fresh


def start_session(db: Session, user: User, lifetime: timedelta) -> str:
    """A new session (a fresh random id at every login, so a planted id is useless); returns the cookie."""
    sid = secrets.token_urlsafe(32)
    now = utcnow()
    db.add(
        WebSession(
            id_hash=sha256_hex(sid),
            user_id=user.id,
            csrf_token=secrets.token_urlsafe(32),
            expires_at=now + lifetime,
            last_seen_at=now,
        )
    )
    db.flush()
    return sid


def session_for_cookie(db: Session, sid: str, idle: timedelta) -> WebSession | None:
    """The live session behind a cookie value, or None (unknown, expired, idle for ``idle``, revoked, or
    its user deactivated). A live session's idle clock restarts (written at most every ``SEEN_EVERY``, or a
    quarter of ``idle`` when that is shorter)."""
    row = db.get(WebSession, sha256_hex(sid))
    now = utcnow()
    if row is None or row.revoked_at is not None or row.expires_at <= now or not row.user.active:
        return None
    seen = row.last_seen_at or row.created_at
    if seen + idle <= now:
        return None
    if now - seen >= min(SEEN_EVERY, idle / 4):
        row.last_seen_at = now
        db.flush()
    return row


def end_session(db: Session, sid: str) -> None:
    """Revoke the session behind a cookie value (logout): the id stops working at once."""
    db.execute(update(WebSession).where(WebSession.id_hash == sha256_hex(sid)).values(revoked_at=utcnow()))


def csrf_ok(expected: str | None, given: str | None) -> bool:
    """Constant-time comparison of CSRF tokens; a missing one never matches."""
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))
