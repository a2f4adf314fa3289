"""REST API under ``/api/v1`` (bearer tokens; the browser's session cookie works too, with CSRF)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field
from sqlalchemy import func, select

from covidscan.service.audit import record
from covidscan.service.cases import (
    Upload,
    case_view,
    check_uploads,
    create_case,
    export_verdicts,
    get_case,
    review_view,
    submit_review,
    worklist,
)
from covidscan.service.deps import api_principal
from covidscan.service.models import Job
from covidscan.service.scoring import UploadRejected
from covidscan.service.settings import active_run

router = APIRouter()


class CaseCreated(BaseModel):
    """Answer to an upload: the new case and its status (``queued``)."""

    id: int
    status: str


class ReviewIn(BaseModel):
    """A doctor's verdict; ``sign`` locks it; changing a signed one needs ``amendment_reason``."""

    agree: bool
    finding: Literal["covid", "non_covid", "indeterminate"]
    comment: str = Field("", max_length=5000)
    sign: bool = False
    amendment_reason: str | None = Field(None, max_length=2000)


def read_uploads(files: list[UploadFile], max_bytes: int) -> list[Upload]:
    """The uploaded files' bytes, refusing (413) a request over ``max_bytes`` in total."""
    uploads, total = [], 0
    for f in files:
        data = f.file.read(max_bytes - total + 1)
        total += len(data)
        if total > max_bytes:
            raise UploadRejected(f.filename or "upload", f"request too large: at most {max_bytes} bytes", 413)
        uploads.append(Upload(f.filename or "upload", data))
    return uploads


@router.get("/healthz", tags=["service"])
def healthz(request: Request) -> dict[str, Any]:
    """Liveness and queue depth: ``{"status": "ok", "run", "queued"}``."""
    db = request.app.state.db
    with db.session() as s:
        queued = s.scalar(select(func.count()).select_from(Job).where(Job.state.in_(("queued", "running"))))
        return {"status": "ok", "run": active_run(s), "queued": queued}


@router.post("/api/v1/cases", status_code=201, response_model=CaseCreated, tags=["cases"])
def post_case(
    request: Request,
    files: Annotated[list[UploadFile], File(description="Images of one patient or series")],
    patient_id: Annotated[str | None, Form(max_length=128)] = None,
) -> CaseCreated:
    """Create a case from uploaded images (422 naming a non-image; 413 when too large); predicted later."""
    config, app_state = request.app.state.config, request.app.state
    with app_state.db.session() as s:
        user = api_principal(request, s, "submitter", "admin").user
    # Decoding happens between two short transactions: SQLite would otherwise hold its write lock meanwhile.
    checked = check_uploads(read_uploads(files, config.max_upload_bytes), max_pixels=config.max_pixels)
    with app_state.db.session() as s:
        case = create_case(s, app_state.store, user, checked, patient_id)
        created = CaseCreated(id=case.id, status=case.status)
    if app_state.worker is not None:
        app_state.worker.wake()
    return created


@router.get("/api/v1/cases/{case_id}", tags=["cases"])
def get_case_api(request: Request, case_id: int) -> dict[str, Any]:
    """A case: status (queued, running, ready, failed, signed), predictions, warnings, review."""
    with request.app.state.db.session() as s:
        who = api_principal(request, s)
        case = get_case(s, who.user, case_id)
        if case is None:
            raise HTTPException(404, f"no case {case_id}")
        record(s, "view", actor=who.user.name, target=f"case:{case_id}", via="api")
        return case_view(case)


@router.post("/api/v1/cases/{case_id}/review", tags=["cases"])
def post_review(request: Request, case_id: int, body: ReviewIn) -> dict[str, Any]:
    """Record (and with ``sign`` lock) a doctor's verdict; doctors only."""
    with request.app.state.db.session() as s:
        who = api_principal(request, s, "doctor")
        case = get_case(s, who.user, case_id)
        if case is None:
            raise HTTPException(404, f"no case {case_id}")
        review = submit_review(
            s,
            case,
            who.user,
            agree=body.agree,
            finding=body.finding,
            comment=body.comment,
            sign=body.sign,
            amendment_reason=body.amendment_reason,
        )
        return {"case": case_id, "status": case.status, "review": review_view(review)}


@router.get("/api/v1/worklist", tags=["cases"])
def get_worklist(
    request: Request, filter: Annotated[Literal["pending", "reviewed", "all"], Query()] = "pending"
) -> list[dict[str, Any]]:
    """Cases in review order: pending first, uncertain and high-probability on top."""
    with request.app.state.db.session() as s:
        who = api_principal(request, s)
        return [
            {
                "id": c.id,
                "status": c.status,
                "patient_id": c.patient_id,
                "n_images": len(c.images),
                "p_covid": c.group["p_covid"] if c.group else None,
                "uncertain": any(im.uncertain for im in c.images),
                "created_at": c.created_at.isoformat(),
            }
            for c in worklist(s, who.user, filter)
        ]


@router.get("/api/v1/export/verdicts.csv", response_class=PlainTextResponse, tags=["admin"])
def get_export(request: Request) -> PlainTextResponse:
    """Signed verdicts as a manifest (``path,label,patient_id``) for ``covidscan adapt``; admins only."""
    with request.app.state.db.session() as s:
        who = api_principal(request, s, "admin")
        text = export_verdicts(s, request.app.state.store)
        record(s, "export", actor=who.user.name, target="verdicts.csv", rows=text.count("\n") - 1)
    return PlainTextResponse(
        text, media_type="text/csv", headers={"Content-Disposition": 'attachment; filename="verdicts.csv"'}
    )
