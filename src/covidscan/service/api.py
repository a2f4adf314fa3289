"""REST API under ``/api/v1`` (bearer tokens; the browser's session cookie works too, with CSRF)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import PlainTextResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from covidscan.errors import CovidscanError
from covidscan.service.audit import record
from covidscan.service.cases import (
    Upload,
    WorklistQuery,
    check_uploads,
    create_case,
    export_verdicts,
    get_case,
    submit_review,
    worklist,
)
from covidscan.service.deps import (
    AdminUser,
    CurrentUser,
    DoctorUser,
    Principal,
    SessionDep,
    SessionRoute,
    SettingsDep,
    StoreDep,
    SubmitterUser,
)
from covidscan.service.errors import ErrorCode, NotFound, UploadRejected
from covidscan.service.models import Case, FirstRead, Job, User
from covidscan.service.schemas import (
    CaseCreated,
    CaseOut,
    ErrorBody,
    FirstReadIn,
    FirstReadOut,
    Health,
    ReviewIn,
    ReviewOut,
    ReviewResult,
    WorklistItem,
    WorklistOut,
)
from covidscan.service.settings import active_run, run_label
from covidscan.service.sites import first_read_for, reader_first_applies, record_first_read

# Every error the API answers has this body; listed so /openapi.json shows it for each route.
ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 403, 404, 409, 413, 422)}
router = APIRouter(route_class=SessionRoute, responses=ERRORS)


def read_uploads(files: list[UploadFile], max_bytes: int) -> list[Upload]:
    """The uploaded files' bytes, refusing (413) a request over ``max_bytes`` in total."""
    uploads, total = [], 0
    for f in files:
        data = f.file.read(max_bytes - total + 1)
        total += len(data)
        if total > max_bytes:
            raise UploadRejected(
                f.filename or "upload",
                f"request too large: at most {max_bytes} bytes",
                ErrorCode.UPLOAD_TOO_LARGE,
            )
        uploads.append(Upload(f.filename or "upload", data))
    return uploads


def visible_case(db: Session, who: Principal, case_id: int) -> Case:
    """The case ``case_id`` if this user may see it; 404 otherwise (no hint that it exists)."""
    case = get_case(db, who.user, case_id)
    if case is None:
        raise NotFound(f"no case {case_id}")
    return case


def hidden_results(db: Session, cases: list[Case], user: User) -> set[int]:
    """The ids of ``cases`` whose model result is withheld from ``user`` (reader-first): a doctor, a ready
    case of a site where reader-first applies, and neither a first read nor a verdict of theirs on it yet.

    Signed cases are never hidden (a first read is no longer taken then); nor are other roles' views.
    """
    if user.role != "doctor":
        return set()
    candidates = {
        c.id
        for c in cases
        if c.status in ("ready", "no_result")  # that the model refused a case is a result too
        and reader_first_applies(c.site)
        and not any(r.reviewer_id == user.id for r in c.reviews)
    }
    if not candidates:
        return set()
    read = db.scalars(
        select(FirstRead.case_id).where(FirstRead.reader_id == user.id, FirstRead.case_id.in_(candidates))
    )
    return candidates - set(read)


@router.get("/healthz", tags=["service"])
def healthz(db: SessionDep, store: StoreDep, settings: SettingsDep) -> Health:
    """Liveness, the active run (by name and weights digest, never a path), the queue depth, and whether
    the files can still be written (degraded: too little free space, or the last write failed)."""
    queued = db.scalar(select(func.count()).select_from(Job).where(Job.state.in_(("queued", "running"))))
    run = active_run(db)
    try:
        label = run_label(run) if run else None
    except CovidscanError:  # the run's files went missing or were damaged since it was made active
        return Health(status="degraded", run=None, queued=queued, problem="the active run cannot be loaded")
    problem = store.write_failed
    if problem is None and store.free_bytes() < settings.min_free_bytes:
        problem = f"less than {settings.min_free_bytes // 2**20} MiB free for the service's files"
    return Health(status="degraded" if problem else "ok", run=label, queued=queued, problem=problem)


@router.post("/api/v1/cases", status_code=201, tags=["cases"])
def post_case(
    db: SessionDep,
    who: SubmitterUser,
    settings: SettingsDep,
    store: StoreDep,
    request: Request,
    files: Annotated[list[UploadFile], File(description="Images of one patient or series")],
    patient_id: Annotated[str | None, Form(max_length=128)] = None,
    site: Annotated[
        str | None, Form(max_length=1024, description="Site of the images (default: DICOM, else you)")
    ] = None,
) -> CaseCreated:
    """Create a case from uploaded images (422 naming a non-image; 413 when too large); predicted later."""
    # Decoding happens between two short transactions: SQLite would otherwise hold its write lock meanwhile
    # (the look-up of `who` ended its own; this commit keeps the rule whatever ran before).
    db.commit()
    checked = check_uploads(read_uploads(files, settings.max_upload_bytes), max_pixels=settings.max_pixels)
    case = create_case(db, store, who.user, checked, patient_id, site=site)
    db.commit()  # before the worker is woken: it must find the job
    wake_worker(request)
    return CaseCreated(id=case.id, status=case.status)


def wake_worker(request: Request) -> None:
    """Tell this process's worker thread (if it runs one) that a case was queued."""
    if request.app.state.worker is not None:
        request.app.state.worker.wake()


@router.get("/api/v1/cases/{case_id}", tags=["cases"])
def get_case_api(db: SessionDep, who: CurrentUser, case_id: int) -> CaseOut:
    """A case: status (queued, running, ready, failed, signed), predictions, warnings, review."""
    case = visible_case(db, who, case_id)
    record(db, "view", actor=who.user.name, target=f"case:{case_id}", via="api")
    first = first_read_for(db, case, who.user)
    return CaseOut.from_case(
        case,
        hidden=bool(hidden_results(db, [case], who.user)),
        first_read=first.finding if first else None,
    )


@router.post("/api/v1/cases/{case_id}/first-read", status_code=201, tags=["cases"])
def post_first_read(db: SessionDep, who: DoctorUser, case_id: int, body: FirstReadIn) -> FirstReadOut:
    """Record your own finding before seeing the model's (reader-first); once per doctor and case, before
    any verdict of yours (409 ``first_read_refused`` after). The case's result is then shown to you."""
    case = visible_case(db, who, case_id)
    first = record_first_read(db, case, who.user, body.finding)
    return FirstReadOut(
        case=case_id, reader=who.user.name, finding=first.finding, created_at=first.created_at
    )


@router.post("/api/v1/cases/{case_id}/review", tags=["cases"])
def post_review(db: SessionDep, who: DoctorUser, case_id: int, body: ReviewIn) -> ReviewResult:
    """Record (and with ``sign`` lock) a doctor's verdict; doctors only."""
    case = visible_case(db, who, case_id)
    review = submit_review(
        db,
        case,
        who.user,
        agree=body.agree,
        finding=body.finding,
        comment=body.comment,
        sign=body.sign,
        amendment_reason=body.amendment_reason,
    )
    return ReviewResult(case=case_id, status=case.status, review=ReviewOut.from_review(review))


@router.get("/api/v1/worklist", tags=["cases"])
def get_worklist(
    db: SessionDep, who: CurrentUser, store: StoreDep, query: Annotated[WorklistQuery, Query()]
) -> WorklistOut:
    """One page of the cases you may see, in review order unless ``sort`` says otherwise, with ``total``
    (page with ``offset`` and ``limit``: nothing is ever cut off); the model's result is withheld where
    reader-first applies and you have not read the case yet (``hidden_until_first_read``)."""
    page = worklist(db, who.user, query, store=store)
    hidden = hidden_results(db, page.cases, who.user)
    return WorklistOut(
        items=[WorklistItem.from_case(c, hidden=c.id in hidden) for c in page.cases],
        total=page.total,
        offset=page.offset,
        limit=page.limit,
    )


@router.get(
    "/api/v1/export/verdicts.csv",
    response_class=PlainTextResponse,
    tags=["admin"],
    responses={200: {"content": {"text/csv": {}}, "description": "path,label,patient_id rows"}},
)
def get_export(db: SessionDep, who: AdminUser, store: StoreDep) -> PlainTextResponse:
    """Signed verdicts as a manifest (``path,label,patient_id``) for ``covidscan adapt``; admins only."""
    text = export_verdicts(db, store)
    record(db, "export", actor=who.user.name, target="verdicts.csv", rows=text.count("\n") - 1)
    return PlainTextResponse(
        text, media_type="text/csv", headers={"Content-Disposition": 'attachment; filename="verdicts.csv"'}
    )
