"""The accounts' pages: your account (change your password) and the admin page's account controls
(deactivate, reactivate, revoke tokens with sessions, reset a password)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

from fastapi import APIRouter, Form, Path, Request
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session

from covidscan.errors import CovidscanError
from covidscan.service import accounts
from covidscan.service.auth import Revoked
from covidscan.service.deps import (
    PageAdmin,
    PageUser,
    Principal,
    SessionDep,
    SessionRoute,
    check_form_csrf,
    client_of,
)
from covidscan.service.errors import LoginThrottled
from covidscan.service.models import User
from covidscan.service.pages import _admin_page, _render

router = APIRouter(route_class=SessionRoute, include_in_schema=False)
Csrf = Annotated[str, Form()]
UserName = Annotated[str, Path(max_length=64)]
Secret = Annotated[str, Form(max_length=1024)]


@router.get("/account")
def account_page(request: Request, who: PageUser) -> HTMLResponse:
    return _render(request, "account.html", who)


@router.post("/account/password")
def account_password(
    request: Request,
    s: SessionDep,
    who: PageUser,
    current_password: Secret,
    new_password: Secret,
    confirm_password: Secret,
    csrf: Csrf = "",
) -> HTMLResponse:
    check_form_csrf(who, csrf)
    if new_password != confirm_password:
        return _render(request, "account.html", who, status_code=422, error="The two new passwords differ.")
    try:
        revoked = accounts.change_own_password(
            s, who.user, current_password, new_password, client_of(request), who.session
        )
    except CovidscanError as exc:
        s.rollback()
        response = _render(request, "account.html", who, status_code=exc.http_status, error=str(exc))
        if isinstance(exc, LoginThrottled):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response
    return _render(
        request,
        "account.html",
        who,
        message=f"Password changed; {revoked.sessions} other session(s) ended.",
    )


# What each of the admin page's account buttons does, and how the page then says it.
ACTIONS: dict[str, tuple[Callable[..., tuple[User, Revoked]], str]] = {
    "deactivate": (accounts.deactivate, "deactivated"),
    "activate": (accounts.reactivate, "reactivated"),
    "revoke": (accounts.revoke, "tokens and sessions revoked"),
}


def _admin_action(
    request: Request, s: Session, who: Principal, action: Callable[[], tuple[User, Revoked]], done: str
) -> HTMLResponse:
    """Run an account action for the admin page: the page again, with what it did or why it was refused."""
    try:
        with s.begin_nested():
            user, revoked = action()
    except CovidscanError as exc:
        return _admin_page(request, s, who, status_code=exc.http_status, error=str(exc))
    ended = f"{revoked.tokens} token(s) revoked, {revoked.sessions} session(s) ended"
    return _admin_page(request, s, who, message=f"{user.name}: {done} ({ended})")


@router.post("/admin/users/{name}/password")
def admin_password(
    request: Request, s: SessionDep, who: PageAdmin, name: UserName, password: Secret, csrf: Csrf = ""
) -> HTMLResponse:
    check_form_csrf(who, csrf)
    reset = accounts.reset_password
    return _admin_action(
        request, s, who, lambda: reset(s, name, password, actor=who.user.name), "password reset"
    )


@router.post("/admin/users/{name}/{action}")
def admin_account(
    request: Request,
    s: SessionDep,
    who: PageAdmin,
    name: UserName,
    action: Literal["deactivate", "activate", "revoke"],
    csrf: Csrf = "",
) -> HTMLResponse:
    check_form_csrf(who, csrf)
    run, done = ACTIONS[action]
    return _admin_action(request, s, who, lambda: run(s, name, actor=who.user.name), done)
