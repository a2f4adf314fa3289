"""The sites' pages: the list of sites and a site's page (status, shift test, local figures and their
course, challenger against champion, and the admins' forms: rules, reader-first, rename, merge, train,
promote, reject, roll back)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from covidscan.errors import ConfigError, CovidscanError
from covidscan.evaluation.site import LABELS, SiteRules
from covidscan.service import sites
from covidscan.service.deps import PageAdmin, PageUser, Principal, SessionDep, SessionRoute, check_form_csrf
from covidscan.service.pages import _render
from covidscan.service.routers.sites import run_or_404, site_or_404, site_out

router = APIRouter(route_class=SessionRoute, include_in_schema=False)
Csrf = Annotated[str, Form()]


def _site_page(
    request: Request, s: Session, who: Principal, site_id: int, status_code: int = 200, **notes: str | None
) -> HTMLResponse:
    site = site_or_404(s, site_id)
    others = [x.site for x in sites.list_sites(s) if x.site.id != site.id]
    return _render(
        request,
        "site.html",
        who,
        status_code=status_code,
        site=site_out(s, site),
        others=others,
        rule_fields=SiteRules.model_fields,
        labels=LABELS,
        **notes,
    )


def _act(
    request: Request, s: Session, who: Principal, site_id: int, csrf: str, change: Callable[[], Any]
) -> Response:
    """Run an admin's ``change`` to a site from a form: back to the site's page, or the page again with the
    error (the change undone) when it is refused."""
    check_form_csrf(who, csrf)
    try:
        with s.begin_nested():
            change()
    except CovidscanError as exc:
        s.expire_all()
        return _site_page(request, s, who, site_id, status_code=exc.http_status, error=str(exc))
    return RedirectResponse(f"/sites/{site_id}", status_code=303)


@router.get("/sites")
def sites_page(request: Request, s: SessionDep, who: PageUser) -> HTMLResponse:
    rows = [(x, sites.reader_first_applies(x.site)) for x in sites.list_sites(s)]
    return _render(request, "sites.html", who, sites=rows)


@router.get("/sites/{site_id}")
def site_page(request: Request, s: SessionDep, who: PageUser, site_id: int) -> HTMLResponse:
    return _site_page(request, s, who, site_id)


def _rules_from_form(form: dict[str, str]) -> dict[str, Any]:
    """The rules an admin typed (blank: the default), cast to their types; one clear error otherwise."""
    rules: dict[str, Any] = {}
    for name, field in SiteRules.model_fields.items():
        raw = (form.get(name) or "").strip()
        if raw:
            try:
                rules[name] = field.annotation(raw)  # type: ignore[misc]  # int or float
            except ValueError:
                raise ConfigError(f"rule {name}: {raw!r} is not a number") from None
    return rules


@router.post("/sites/{site_id}/rules")
async def rules_form(request: Request, s: SessionDep, who: PageAdmin, site_id: int) -> Response:
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}

    def act() -> Response:
        site = site_or_404(s, site_id)
        return _act(
            request, s, who, site_id, form.get("csrf", ""),
            lambda: sites.set_rules(s, site, _rules_from_form(form), who.user),
        )

    # The database work runs in a thread, never on the event loop: a SQLite write lock waited for there
    # would stall every request, the transaction holding it among them (its commit needs the loop).
    return await run_in_threadpool(act)


@router.post("/sites/{site_id}/reader-first")
def reader_first_form(
    request: Request,
    s: SessionDep,
    who: PageAdmin,
    site_id: int,
    reader_first: Annotated[Literal["default", "on", "off"], Form()],
    csrf: Csrf = "",
) -> Response:
    value = {"default": None, "on": True, "off": False}[reader_first]
    site = site_or_404(s, site_id)
    return _act(request, s, who, site_id, csrf, lambda: sites.set_reader_first(s, site, value, who.user))


@router.post("/sites/{site_id}/rename")
def rename_form(
    request: Request,
    s: SessionDep,
    who: PageAdmin,
    site_id: int,
    name: Annotated[str, Form(max_length=1024)],
    csrf: Csrf = "",
) -> Response:
    site = site_or_404(s, site_id)
    return _act(request, s, who, site_id, csrf, lambda: sites.rename_site(s, site, name, who.user))


@router.post("/sites/{site_id}/merge")
def merge_form(
    request: Request,
    s: SessionDep,
    who: PageAdmin,
    site_id: int,
    into: Annotated[int, Form()],
    csrf: Csrf = "",
) -> Response:
    source, target = site_or_404(s, site_id), site_or_404(s, into)
    response = _act(request, s, who, site_id, csrf, lambda: sites.merge_sites(s, source, target, who.user))
    # merged: the cases are on the other site's page now
    return RedirectResponse(f"/sites/{into}", status_code=303) if response.status_code == 303 else response


@router.post("/sites/{site_id}/challengers")
def challenger_form(
    request: Request, s: SessionDep, who: PageAdmin, site_id: int, csrf: Csrf = ""
) -> Response:
    site = site_or_404(s, site_id)
    return _act(request, s, who, site_id, csrf, lambda: sites.request_challenger(s, site, who.user))


@router.post("/sites/{site_id}/runs/{run_id}/{decision}")
def run_decision_form(
    request: Request,
    s: SessionDep,
    who: PageAdmin,
    site_id: int,
    run_id: int,
    decision: Literal["promote", "reject"],
    csrf: Csrf = "",
) -> Response:
    run = run_or_404(s, site_or_404(s, site_id), run_id)
    decide = sites.promote_site_run if decision == "promote" else sites.reject_site_run
    return _act(request, s, who, site_id, csrf, lambda: decide(s, run, who.user))


@router.post("/sites/{site_id}/rollback")
def rollback_form(request: Request, s: SessionDep, who: PageAdmin, site_id: int, csrf: Csrf = "") -> Response:
    site = site_or_404(s, site_id)
    return _act(request, s, who, site_id, csrf, lambda: sites.rollback_site(s, site, who.user))
