"""Who is asking: a bearer token (API clients) or the session cookie (browser pages), and their role."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import HTTPException, Request
from sqlalchemy.orm import Session

from covidscan.errors import ConfigError, CovidscanError
from covidscan.service.auth import csrf_ok, session_for_cookie, user_for_token
from covidscan.service.cases import Conflict, NotAllowed
from covidscan.service.models import User, WebSession
from covidscan.service.scoring import UploadRejected

SESSION_COOKIE = "covidscan_session"
LOGIN_CSRF_COOKIE = "covidscan_login_csrf"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class LoginRequired(Exception):
    """A page was asked for without a live session: answered with a redirect to the login page."""


@dataclass(frozen=True)
class Principal:
    """The authenticated user, and the browser session when the request came with the cookie."""

    user: User
    session: WebSession | None = None


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def identify(request: Request, db: Session) -> Principal | None:
    """The bearer token's user, else the session cookie's, else None."""
    token = _bearer(request)
    if token is not None:
        user = user_for_token(db, token)
        return Principal(user) if user is not None else None
    sid = request.cookies.get(SESSION_COOKIE)
    session = session_for_cookie(db, sid) if sid else None
    return Principal(session.user, session) if session is not None else None


def api_principal(request: Request, db: Session, *roles: str) -> Principal:
    """For ``/api``: 401 without credentials, 403 for a role not in ``roles``; a cookie-authenticated
    state-changing call must carry the session's CSRF token in ``X-CSRF-Token``."""
    who = identify(request, db)
    if who is None:
        raise HTTPException(
            401,
            "authentication required: send 'Authorization: Bearer TOKEN'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if (
        who.session is not None
        and request.method in UNSAFE_METHODS
        and not csrf_ok(who.session.csrf_token, request.headers.get("x-csrf-token"))
    ):
        raise HTTPException(403, "missing or wrong CSRF token (X-CSRF-Token header)")
    _require_role(who.user, roles)
    return who


def page_principal(request: Request, db: Session, *roles: str) -> Principal:
    """For HTML pages: a redirect to the login page without a session, 403 for a role not in ``roles``."""
    sid = request.cookies.get(SESSION_COOKIE)
    session = session_for_cookie(db, sid) if sid else None
    if session is None:
        raise LoginRequired()
    _require_role(session.user, roles)
    return Principal(session.user, session)


def check_form_csrf(who: Principal, given: str | None) -> None:
    """403 unless a page form carried its session's CSRF token."""
    if who.session is None or not csrf_ok(who.session.csrf_token, given):
        raise HTTPException(403, "missing or wrong CSRF token; reload the page and try again")


def _require_role(user: User, roles: tuple[str, ...]) -> None:
    if roles and user.role not in roles:
        raise HTTPException(403, f"{user.role} accounts cannot do this (needs {' or '.join(roles)})")


def http_status(exc: CovidscanError) -> int:
    """The HTTP status for a library error: 422/413 for refused uploads, 403, 409, else its own or 400."""
    if isinstance(exc, UploadRejected):
        return exc.status
    if isinstance(exc, NotAllowed):
        return 403
    if isinstance(exc, Conflict):
        return 409
    return getattr(exc, "http_status", 400 if isinstance(exc, ConfigError) else 500)
