"""How the model does at each site: the shift alarm, local figures from signed verdicts, the site's status.

Cheap and training-free, so a request that signs a verdict refreshes its site's figures in the same
transaction (:func:`refresh_site`), and the worker runs the shift test after each predicted case
(:func:`check_shift`). The results are cached on the site (``Site.shift``, ``Site.local``) for the API and
the pages; the history of shift tests is in ``site_shift_checks``.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from covidscan.evaluation.shift import MIN_IMAGES, ShiftTest
from covidscan.evaluation.site import (
    LocalFigures,
    course,
    course_plot,
    local_figures,
    recent,
    site_status,
    teaching_order,
)
from covidscan.service.models import Case, CaseImage, Site, SiteRun, utcnow
from covidscan.service.settings import active_run
from covidscan.service.sites import (
    SignedCase,
    read_features,
    record_shift_check,
    request_challenger,
    set_status,
    signed_patients,
    signed_site_cases,
    site_features,
    site_rules,
)
from covidscan.service.storage import BlobStore

# The shift test looks at the site's most recent images only: enough for its power (the README's table
# goes to 100), and a site with thousands of images costs no more than one with 500.
SHIFT_WINDOW = 500
_LABEL = {"covid": 1, "non_covid": 0}


def serving_run(db: Session, site: Site) -> str | None:
    """The run that predicts ``site``'s new cases: its own, else the service's active run."""
    return site.active_run or active_run(db)


def _same_run(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def _predicted_after(db: Session, site: Site, when: str) -> bool:
    """Whether a case of ``site`` was predicted after ``when`` (an ISO time)."""
    newer = select(Case.id).where(Case.site_id == site.id, Case.predicted_at > datetime.fromisoformat(when))
    return db.scalar(newer.limit(1)) is not None


def check_shift(db: Session, store: BlobStore, site: Site, run: str, reference: np.ndarray) -> bool:
    """Test ``site``'s images predicted by ``run`` (since its switch) against ``reference`` (the run's
    validation images' shift features) once there are :data:`MIN_IMAGES` and a new image since the last
    test; record the result. Returns whether a test ran."""
    last = site.shift or {}
    if _same_run(last.get("run"), run) and not _predicted_after(db, site, last["computed_at"]):
        return False
    sample = site_features(db, store, site, run=run, since=site.run_since, last=SHIFT_WINDOW)
    n = len(sample)
    if n < MIN_IMAGES:
        return False
    result = ShiftTest().fit(reference).test(sample)
    record_shift_check(db, site, run=run, n_images=n, auc=result.auc, p_value=result.p_value,
                       alarm=result.alarm, details=result.to_dict())
    return True


def after_prediction(
    db: Session, store: BlobStore, site: Site, run: str, reference: np.ndarray | None
) -> None:
    """What the worker does for ``site`` after ``run`` predicted one of its cases: the shift test when due
    (``reference`` None: the run has none), then the status again. Cached figures of another run (the
    global run was switched) say nothing about this one: they are recomputed for it first."""
    tested = reference is not None and check_shift(db, store, site, run, reference)
    if site.local is not None and not _same_run(site.local.get("run"), run):
        refresh_site(db, site)
    elif tested or (site.shift is not None and not _same_run(site.shift.get("run"), run)):
        update_status(db, site)  # the figures depend on signed cases only: unchanged


def _signed_rows(db: Session, site: Site) -> list[SignedCase]:
    """The site's signed cases predicted by its serving run since the run began serving it."""
    run = serving_run(db, site)
    return [r for r in signed_site_cases(db, site, since=site.run_since) if _same_run(r.run, run)]


def _arrays(rows: list[SignedCase]) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, np.ndarray]:
    """Labels, p, patient ids, the operating point and the first reads of ``rows``.

    A case's threshold depends on its number of images (the group threshold), so the figures use the
    threshold most of the site's cases were labelled with. A case without a first read (or an
    indeterminate one) counts with its final verdict: agreement is then the model's with that verdict.
    """
    y = np.array([r.label for r in rows], dtype=np.int64)
    p = np.array([r.p_covid for r in rows], dtype=np.float64)
    ids = np.array([r.patient_id for r in rows], dtype=object)
    cuts = [r.threshold for r in rows if r.threshold is not None]
    threshold = float(np.median(cuts)) if cuts else 0.5
    first = np.array([_LABEL.get(r.first_read or "", r.label) for r in rows], dtype=np.int64)
    return y, p, ids, threshold, first


def refresh_site(db: Session, site: Site) -> dict[str, Any] | None:
    """Recompute ``site``'s local figures (all signed cases of its serving run since the switch, and the
    last ``recent_window`` patients), cache them in ``Site.local`` and update the status. Called when a
    verdict is signed or amended, and after a shift test."""
    rows = _signed_rows(db, site)
    rules = site_rules(site)
    if rows:
        y, p, ids, threshold, first = _arrays(rows)
        figures = local_figures(y, p, ids, threshold, first_read=first)
        window = recent(y, p, ids, threshold, rules.recent_window, first_read=first)
        site.local = {
            "run": serving_run(db, site),
            "since": site.run_since.isoformat() if site.run_since else None,
            "computed_at": utcnow().isoformat(),
            "figures": figures.to_dict(),
            "recent": window.to_dict() if window is not None else None,
            "rules": rules.model_dump(),
        }
    else:
        site.local = None
    update_status(db, site)
    _maybe_challenge(db, site, signed_patients(db, site))
    return site.local


def _maybe_challenge(db: Session, site: Site, n_patients: int) -> None:
    """Queue a challenger once the site has ``adapt_min_patients`` signed patients under its serving run,
    unless one was already asked for since that run began serving it (a rejected one is not retried
    automatically: an admin's button does that)."""
    if n_patients < site_rules(site).adapt_min_patients or serving_run(db, site) is None:
        return
    asked = select(SiteRun.id).where(SiteRun.site_id == site.id)
    if site.run_since is not None:
        asked = asked.where(SiteRun.created_at >= site.run_since)
    if db.scalar(asked.limit(1)) is None:
        request_challenger(db, site, None)


def _figures(entry: dict[str, Any] | None) -> LocalFigures | None:
    return None if entry is None else LocalFigures(**entry)


def _images_seen(db: Session, site: Site) -> int:
    query = select(func.count(CaseImage.id)).join(Case, Case.id == CaseImage.case_id).where(
        Case.site_id == site.id, CaseImage.p_covid.is_not(None))
    if site.run_since is not None:
        query = query.where(Case.predicted_at >= site.run_since)
    return db.scalar(query)


def update_status(db: Session, site: Site) -> str:
    """Set ``site.status`` from its cached shift result and local figures by the site's rules (a shift
    result of another run than the serving one does not count)."""
    local, shift = site.local or {}, site.shift or {}
    alarm = shift.get("alarm") if _same_run(shift.get("run"), serving_run(db, site)) else None
    status = site_status(alarm, _figures(local.get("figures")),
                         _figures(local.get("recent")), site_rules(site), _images_seen(db, site))
    set_status(db, site, status, reason="shift test" if not local else "local figures")
    return status


def site_course(db: Session, site: Site) -> list[LocalFigures]:
    """The serving run's local figures on the first 10, 20, ... signed patients since the switch."""
    rows = _signed_rows(db, site)
    if not rows:
        return []
    y, p, ids, threshold, first = _arrays(rows)
    return course(y, p, ids, threshold, first_read=first, n_boot=300)


def course_png(db: Session, site: Site) -> bytes:
    """The course plot (sensitivity, specificity, ROC AUC with CIs against signed patients) as a PNG."""
    return course_plot(site_course(db, site), rules=site_rules(site), title=site.name)


def teaching_queue(db: Session, store: BlobStore, site: Site) -> list[int]:
    """The site's predicted, unsigned cases, the ones whose verdict would teach adaptation most first
    (:func:`covidscan.evaluation.site.teaching_order` on each case's mean image features)."""
    cases = db.scalars(select(Case).where(Case.site_id == site.id, Case.status == "ready",
                                          Case.group.is_not(None)).order_by(Case.id)).all()
    signed = db.scalars(select(Case).where(Case.site_id == site.id, Case.status == "signed")).all()

    def vector(case: Case) -> np.ndarray | None:
        rows = [read_features(store, im.features_sha256) for im in case.images if im.features_sha256]
        return np.mean(rows, axis=0) if rows else None

    pending = [(c, vector(c)) for c in cases]
    pending = [(c, v) for c, v in pending if v is not None]
    if not pending:
        return [c.id for c in cases]
    done = [v for v in map(vector, signed) if v is not None]
    order = teaching_order(
        np.array([c.group["p_covid"] for c, _ in pending]),
        np.stack([v for _, v in pending]),
        np.stack(done) if done else None,
        float(np.median([c.group.get("threshold") or 0.5 for c, _ in pending])),
    )
    ranked = [pending[i][0].id for i in order]
    return ranked + [c.id for c in cases if c.id not in set(ranked)]
