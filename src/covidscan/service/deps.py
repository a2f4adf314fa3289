"""FastAPI dependencies: the request's database session, who is asking (a bearer token for API clients,
the session cookie for browsers), their role, the settings and the file store.

Route handlers declare what they need as ``Annotated`` aliases (``SessionDep``, ``CurrentUser``,
``DoctorUser``, ``PageUser``, ...) instead of looking it up themselves.
"""

import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session

from covidscan.service.auth import Client, csrf_ok, session_for_cookie, throttle_address, user_for_token
from covidscan.service.errors import AuthRequired, CsrfRejected, LoginRequired, NotAllowed
from covidscan.service.models import User, WebSession
from covidscan.service.settings import ServiceSettings
from covidscan.service.storage import BlobStore

SESSION_COOKIE = "covidscan_session"
DEVICE_COOKIE = "covidscan_device"  # marks a browser that logged in before (see auth.py, throttling)
LOGIN_CSRF_COOKIE = "covidscan_login_csrf"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def get_session(request: Request) -> Iterator[Session]:
    """One database session per request: committed when the handler returns (before the answer is sent),
    rolled back when it raises, then closed."""
    with request.app.state.db.session() as s:
        yield s


# scope="function": the commit happens before the response goes out, so a failed commit is the answer.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def _ending_transactions(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """``endpoint`` committing its request's session in its own thread as it returns (sync handlers)."""
    if inspect.iscoroutinefunction(endpoint):
        return endpoint

    @functools.wraps(endpoint)  # FastAPI reads the signature and annotations through __wrapped__
    def handler(*args: Any, **kwargs: Any) -> Any:
        answer = endpoint(*args, **kwargs)
        for value in kwargs.values():
            if isinstance(value, Session):
                value.commit()
        return answer

    return handler


class SessionRoute(APIRoute):
    """A route whose sync handler ends its transaction before FastAPI validates the answer.

    FastAPI checks a sync handler's return value against its response model in another threadpool hop,
    and a ``SessionDep`` commits only after that. A transaction left open across the hop holds SQLite's
    write lock while waiting for a free thread, as every thread waits for the lock: under a login flood
    with doctors signing, every request stalled until its wait ran out. Every router uses this class.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, _ending_transactions(endpoint), **kwargs)


def get_settings(request: Request) -> ServiceSettings:
    """The settings the application was created with."""
    return request.app.state.settings


def get_store(request: Request) -> BlobStore:
    """The content-addressed file store."""
    return request.app.state.store


SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]
StoreDep = Annotated[BlobStore, Depends(get_store)]


@dataclass(frozen=True)
class Principal:
    """The authenticated user, and the browser session when the request came with the cookie."""

    user: User
    session: WebSession | None = None

    @property
    def csrf(self) -> str | None:
        """The session's CSRF token that pages put in their forms (None for bearer tokens)."""
        return self.session.csrf_token if self.session else None


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, or None."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _cookie_session(request: Request, db: Session) -> WebSession | None:
    sid = request.cookies.get(SESSION_COOKIE)
    idle = timedelta(minutes=get_settings(request).session_idle_minutes)
    return session_for_cookie(db, sid, idle) if sid else None


def client_of(request: Request) -> Client:
    """Who is trying a password: the connection's address (Uvicorn's, see auth.py) and device cookie."""
    host = request.client.host if request.client else None
    return Client(throttle_address(host), request.cookies.get(DEVICE_COOKIE))


def _end_lookup(db: Session) -> None:
    """End the look-up's transaction before the handler runs: on SQLite every transaction holds the write
    lock, and the handler runs in another threadpool thread; a lock held across that hand-over stalls
    (until "database is locked") once every thread is busy waiting for it, as under 50 concurrent uploads."""
    db.commit()


def api_principal(request: Request, db: SessionDep) -> Principal:
    """For ``/api``: the bearer token's user, else the session cookie's (401 without either); a
    cookie-authenticated state-changing call must carry the session's CSRF token in ``X-CSRF-Token``."""
    token = bearer_token(request)
    if token is not None:
        user = user_for_token(db, token)
        who = Principal(user) if user is not None else None
    else:
        session = _cookie_session(request, db)
        who = Principal(session.user, session) if session is not None else None
    _end_lookup(db)
    if who is None:
        raise AuthRequired("authentication required: send 'Authorization: Bearer TOKEN'")
    if (
        who.session is not None
        and request.method in UNSAFE_METHODS
        and not csrf_ok(who.session.csrf_token, request.headers.get("x-csrf-token"))
    ):
        raise CsrfRejected("missing or wrong CSRF token (X-CSRF-Token header)")
    return who


def page_principal(request: Request, db: SessionDep) -> Principal:
    """For HTML pages: the session cookie's user and session; a redirect to the login page without one."""
    session = _cookie_session(request, db)
    _end_lookup(db)
    if session is None:
        raise LoginRequired()
    return Principal(session.user, session)


def check_role(user: User, roles: tuple[str, ...]) -> None:
    """403 (``forbidden_role``) unless ``user`` has one of ``roles``."""
    if user.role not in roles:
        raise NotAllowed(f"{user.role} accounts cannot do this (needs {' or '.join(roles)})")


def require_role(*roles: str, page: bool = False) -> Callable[[Principal], Principal]:
    """A dependency: the API's (or with ``page`` the pages') principal, 403 unless it has one of ``roles``."""
    # (deps.py has no `from __future__ import annotations`: FastAPI must resolve this local name.)
    principal = page_principal if page else api_principal

    def dependency(who: Annotated[Principal, Depends(principal)]) -> Principal:
        check_role(who.user, roles)
        return who

    return dependency


def check_form_csrf(who: Principal, given: str | None) -> None:
    """403 unless a page form carried its session's CSRF token."""
    if not csrf_ok(who.csrf, given):
        raise CsrfRejected("missing or wrong CSRF token; reload the page and try again")


CurrentUser = Annotated[Principal, Depends(api_principal)]
SubmitterUser = Annotated[Principal, Depends(require_role("submitter", "admin"))]
DoctorUser = Annotated[Principal, Depends(require_role("doctor"))]
AdminUser = Annotated[Principal, Depends(require_role("admin"))]

PageUser = Annotated[Principal, Depends(page_principal)]
PageSubmitter = Annotated[Principal, Depends(require_role("submitter", "admin", page=True))]
PageDoctor = Annotated[Principal, Depends(require_role("doctor", page=True))]
PageAdmin = Annotated[Principal, Depends(require_role("admin", page=True))]
