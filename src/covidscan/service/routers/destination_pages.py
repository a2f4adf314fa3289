"""The admin page's PACS destinations section: add, deactivate or activate, check and remove (forms with
the session's CSRF token, like the admin page's others); answered with the admin page again."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse

from covidscan.errors import CovidscanError
from covidscan.service import delivery
from covidscan.service.deps import PageAdmin, SessionDep, SessionRoute, check_form_csrf
from covidscan.service.errors import DestinationInvalid
from covidscan.service.pages import _admin_page
from covidscan.service.routers.destinations import destination_or_404

router = APIRouter(route_class=SessionRoute, include_in_schema=False)
Csrf = Annotated[str, Form()]
Text = Annotated[str, Form(max_length=4096)]


def _act(
    request: Request, s: SessionDep, who: PageAdmin, csrf: str, change: Callable[[], Any]
) -> HTMLResponse:
    """Run an admin's ``change``; the admin page with its message, or with the error (the change undone)."""
    check_form_csrf(who, csrf)
    try:
        with s.begin_nested():
            message = change()
    except CovidscanError as exc:
        s.expire_all()
        return _admin_page(request, s, who, status_code=exc.http_status, error=str(exc))
    return _admin_page(request, s, who, message=message)


@router.post("/admin/destinations")
def add_form(
    request: Request,
    s: SessionDep,
    who: PageAdmin,
    name: Annotated[str, Form(max_length=64)],
    kind: Annotated[Literal["dicom", "stow"], Form()],
    host: Text = "",
    port: Text = "",
    called_ae: Text = "",
    calling_ae: Text = "",
    url: Text = "",
    bearer_token: Text = "",
    basic_user: Text = "",
    basic_password: Text = "",
    csrf: Csrf = "",
) -> HTMLResponse:
    values = {
        "name": name,
        "kind": kind,
        "host": host,
        "port": port,
        "called_ae": called_ae,
        "calling_ae": calling_ae,
        "url": url,
        "bearer_token": bearer_token,
        "basic_user": basic_user,
        "basic_password": basic_password,
    }

    def add() -> str:
        if port.strip() and not port.strip().isdigit():
            raise DestinationInvalid(f"port: the PACS's DICOM port, 1 to 65535, got {port!r}")
        dest = delivery.add_destination(s, {**values, "port": int(port) if port.strip() else None}, who.user)
        return f"added destination {dest.name}"

    return _act(request, s, who, csrf, add)


@router.post("/admin/destinations/{destination_id}/{action}")
def destination_action(
    request: Request,
    s: SessionDep,
    who: PageAdmin,
    destination_id: int,
    action: Literal["activate", "deactivate", "delete", "check"],
    csrf: Csrf = "",
) -> HTMLResponse:
    dest = destination_or_404(s, destination_id)
    if action == "check":  # it commits before the PACS answers: no savepoint around it
        check_form_csrf(who, csrf)
        name, result = dest.name, delivery.check_destination(s, dest, who.user)
        return _admin_page(
            request, s, who, message=f"{name}: {'OK' if result.ok else 'FAILED'}: {result.detail}"
        )

    def act() -> str:
        name = dest.name
        if action == "delete":
            delivery.delete_destination(s, dest, who.user)
            return f"removed destination {name}"
        delivery.change_destination(s, dest, {"active": action == "activate"}, who.user)
        return f"{name} is {'active' if dest.active else 'inactive'}"

    return _act(request, s, who, csrf, act)
