"""The sites API under ``/api/v1/sites``: status, shift test, local figures, rules, reader-first, renames and
merges, and the challenger-against-champion loop (train now, promote, reject, roll back; admins)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from covidscan.errors import CovidscanError, ManifestError
from covidscan.service import sites
from covidscan.service.api import ERRORS
from covidscan.service.deps import AdminUser, CurrentUser, SessionDep, SessionRoute
from covidscan.service.errors import NotFound
from covidscan.service.models import Site, SiteRun
from covidscan.service.schemas import (
    LocalOut,
    LocalSummary,
    ShiftOut,
    ShiftSummary,
    SiteListItem,
    SiteMerge,
    SiteMerged,
    SiteOut,
    SitePatch,
    SiteRunOut,
)
from covidscan.service.settings import active_run, run_label

router = APIRouter(route_class=SessionRoute, prefix="/api/v1/sites", tags=["sites"], responses=ERRORS)


def site_or_404(db: Session, site_id: int) -> Site:
    """The site with this id (merged ones too); 404 otherwise."""
    site = sites.get_site(db, site_id)
    if site is None:
        raise NotFound(f"no site {site_id}; GET /api/v1/sites lists them")
    return site


def run_or_404(db: Session, site: Site, run_id: int) -> SiteRun:
    """The site run ``run_id`` of ``site``; 404 otherwise (also for another site's run)."""
    run = db.get(SiteRun, run_id)
    if run is None or run.site_id != site.id:
        raise NotFound(f"site {site.id} has no run {run_id}")
    return run


def shown_run(path: str | None) -> str | None:
    """A run as shown outside the server: NAME@SHA256-PREFIX, or its name alone when its files are gone."""
    if path is None:
        return None
    try:
        return run_label(path)
    except CovidscanError:
        return Path(path).name


def list_item(summary: sites.SiteSummary) -> SiteListItem:
    """A site with its counts, as listed."""
    site = summary.site
    return SiteListItem(
        **sites_ref(site),
        n_cases=summary.n_cases,
        n_signed=summary.n_signed,
        merged_into=site.merged_into_id,
    )


def sites_ref(site: Site) -> dict:
    """The fields every site answer shares (those of :class:`SiteRef`)."""
    return {
        "id": site.id,
        "name": site.name,
        "status": site.status,
        "reader_first": sites.reader_first_applies(site),
        "local": LocalSummary.from_figures((site.local or {}).get("figures")),
        "shift": ShiftSummary.from_shift(site.shift),
    }


def site_out(db: Session, site: Site) -> SiteOut:
    """Everything the service knows about ``site``."""
    summary = next(s for s in sites.list_sites(db, include_merged=True) if s.site.id == site.id)
    runs = db.scalars(select(SiteRun).where(SiteRun.site_id == site.id).order_by(SiteRun.id.desc()))
    return SiteOut(
        **list_item(summary).model_dump(),
        status_since=site.status_since,
        reader_first_setting=site.reader_first,
        rules=sites.site_rules(site).model_dump(),
        run=shown_run(site.active_run or active_run(db)),
        own_run=site.active_run is not None,
        run_since=site.run_since,
        local_figures=LocalOut(**{k: v for k, v in site.local.items() if k not in ("run", "rules")})
        if site.local
        else None,
        shift_test=ShiftOut.from_shift(site.shift),
        runs=[SiteRunOut.from_run(r) for r in runs],
    )


@router.get("")
def get_sites(db: SessionDep, who: CurrentUser) -> list[SiteListItem]:
    """Every site (merged ones left out) by name: status, reader-first, local figures summary, shift test
    and numbers of cases."""
    return [list_item(s) for s in sites.list_sites(db)]


@router.get("/{site_id}")
def get_site_api(db: SessionDep, who: CurrentUser, site_id: int) -> SiteOut:
    """A site: status, shift test, local figures with their CIs, rules, reader-first, the run serving it
    (NAME@SHA) and the challengers trained for it with their comparison against the champion."""
    return site_out(db, site_or_404(db, site_id))


@router.get(
    "/{site_id}/course.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "The local figures' course"}},
)
def get_course(db: SessionDep, who: CurrentUser, site_id: int) -> Response:
    """The course of the site's local figures (sensitivity, specificity, ROC AUC with 95% CIs) against
    the number of signed patients; 404 before the first signed case."""
    from covidscan.service.monitoring import course_png

    site = site_or_404(db, site_id)
    try:
        png = course_png(db, site)
    except ManifestError:  # no signed case of the run that serves the site (since it does)
        raise NotFound(f"site {site.name!r} has no signed cases yet: there is no course to plot") from None
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.patch("/{site_id}")
def patch_site(db: SessionDep, who: AdminUser, site_id: int, body: SitePatch) -> SiteOut:
    """Rename a site, set its validation rules, force reader-first on/off (admins; audit-logged). 409
    ``site_name_taken`` for a name another site holds (merge instead), ``site_merged`` for a merged site."""
    site = site_or_404(db, site_id)
    given = body.model_fields_set
    if "name" in given and body.name is not None:
        sites.rename_site(db, site, body.name, who.user)
    if "rules" in given:
        sites.set_rules(db, site, body.rules, who.user)
    if "reader_first" in given:
        sites.set_reader_first(db, site, body.reader_first, who.user)
    return site_out(db, site)


@router.post("/{site_id}/merge")
def merge_site(db: SessionDep, who: AdminUser, site_id: int, body: SiteMerge) -> SiteMerged:
    """Merge this site into ``into`` (admins; audit-logged): its cases move there and images named after
    it land there from now on."""
    source, target = site_or_404(db, site_id), site_or_404(db, body.into)
    moved = sites.merge_sites(db, source, target, who.user)
    return SiteMerged(site=site_out(db, target), moved=moved)


@router.post("/{site_id}/challengers", status_code=202)
def post_challenger(db: SessionDep, who: AdminUser, site_id: int) -> SiteRunOut:
    """Train a challenger for this site now from its signed verdicts (admins): the worker adapts the
    site's run and compares the two out of fold; the run is ``training``, then ``candidate`` or ``failed``."""
    return SiteRunOut.from_run(sites.request_challenger(db, site_or_404(db, site_id), who.user))


@router.post("/{site_id}/runs/{run_id}/promote")
def promote_run(db: SessionDep, who: AdminUser, site_id: int, run_id: int) -> SiteOut:
    """Serve this site with a candidate challenger from now on (admins; audit-logged); local validation
    starts again from the switch."""
    site = site_or_404(db, site_id)
    sites.promote_site_run(db, run_or_404(db, site, run_id), who.user)
    return site_out(db, site)


@router.post("/{site_id}/runs/{run_id}/reject")
def reject_run(db: SessionDep, who: AdminUser, site_id: int, run_id: int) -> SiteRunOut:
    """Turn a candidate challenger down (admins; audit-logged)."""
    run = run_or_404(db, site_or_404(db, site_id), run_id)
    sites.reject_site_run(db, run, who.user)
    return SiteRunOut.from_run(run)


@router.post("/{site_id}/rollback")
def rollback(db: SessionDep, who: AdminUser, site_id: int) -> SiteOut:
    """Serve this site with its previous promoted run, or the service's run (admins; audit-logged)."""
    site = site_or_404(db, site_id)
    sites.rollback_site(db, site, who.user)
    return site_out(db, site)
