"""A case's result records for download: ``GET /api/v1/cases/{id}/sr.dcm | sc.dcm | report.pdf | fhir.json``.

Whoever may see the case (``GET /api/v1/cases/{id}``) may download them. Before signing they are written
as preliminary (SR: PARTIAL, UNVERIFIED; PDF: "NOT SIGNED — preliminary"; FHIR: ``preliminary``), so a
referring doctor can be told early without mistaking it for the signed result. 409 ``not_ready`` while the
case is predicted, ``no_result`` when the model gave it none, ``hidden_until_first_read`` where the case's
result is still withheld from this doctor.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response

from covidscan.service.api import ERRORS, hidden_results, visible_case
from covidscan.service.audit import record
from covidscan.service.deps import CurrentUser, SessionDep, SessionRoute, StoreDep
from covidscan.service.errors import Conflict, ErrorCode
from covidscan.service.records import MEDIA_TYPES, gather, render

router = APIRouter(route_class=SessionRoute, responses=ERRORS, tags=["records"])


def _download(
    db: SessionDep, who: CurrentUser, store: StoreDep, case_id: int, fmt: str, image: int | None = None
) -> Response:
    case = visible_case(db, who, case_id)
    if hidden_results(db, [case], who.user):
        raise Conflict(
            f"case {case_id} is read reader-first: record your first read before its result is exported",
            ErrorCode.HIDDEN_UNTIL_FIRST_READ,
        )
    found = gather(db, case_id, store)
    record(db, "export", actor=who.user.name, target=f"case:{case_id}", format=fmt, version=found.version)
    db.commit()  # written outside a transaction: SQLite would hold its write lock meanwhile
    rendered = render(found, fmt, image=image)
    return Response(
        rendered.data,
        media_type=rendered.media_type,
        headers={"Content-Disposition": f'attachment; filename="{rendered.filename}"'},
    )


def _content(fmt: str) -> dict:
    return {200: {"content": {MEDIA_TYPES[fmt]: {}}, "description": f"the case's {fmt.upper()} record"}}


@router.get("/api/v1/cases/{case_id}/sr.dcm", response_class=Response, responses=_content("sr"))
def get_sr(db: SessionDep, who: CurrentUser, store: StoreDep, case_id: int) -> Response:
    """The DICOM SR (TID 1500, Comprehensive 3D SR): VERIFIED once signed, UNVERIFIED before."""
    return _download(db, who, store, case_id, "sr")


@router.get("/api/v1/cases/{case_id}/sc.dcm", response_class=Response, responses=_content("sc"))
def get_sc(
    db: SessionDep,
    who: CurrentUser,
    store: StoreDep,
    case_id: int,
    image: Annotated[
        int | None, Query(ge=0, description="Image position (default: the first with an overlay)")
    ] = None,
) -> Response:
    """A Secondary Capture of one image's Grad-CAM overlay, in the case's study."""
    return _download(db, who, store, case_id, "sc", image)


@router.get("/api/v1/cases/{case_id}/report.pdf", response_class=Response, responses=_content("pdf"))
def get_pdf(db: SessionDep, who: CurrentUser, store: StoreDep, case_id: int) -> Response:
    """The PDF report for a referring doctor."""
    return _download(db, who, store, case_id, "pdf")


@router.get("/api/v1/cases/{case_id}/fhir.json", response_class=Response, responses=_content("fhir"))
def get_fhir(db: SessionDep, who: CurrentUser, store: StoreDep, case_id: int) -> Response:
    """A FHIR R4 Bundle: DiagnosticReport, Observation of the probability, Device, Practitioner."""
    return _download(db, who, store, case_id, "fhir")
