"""The browser pages: login, worklist, case page (overlay, verdict, signature), upload and admin."""

from __future__ import annotations

import secrets
from datetime import timedelta
from functools import partial
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from covidscan.errors import CovidscanError
from covidscan.inference.predictor import OOD_WARNING
from covidscan.service.api import hidden_results, read_uploads, wake_worker
from covidscan.service.audit import record, verify_chain
from covidscan.service.auth import (
    DEVICE_LIFETIME,
    add_user,
    authenticate,
    csrf_ok,
    end_session,
    remember_device,
    start_session,
)
from covidscan.service.cases import (
    WORKLIST_SORTS,
    WorklistQuery,
    agreement_by_month,
    check_uploads,
    create_case,
    current_review,
    get_case,
    submit_review,
    visible_cases,
    worklist,
)
from covidscan.service.delivery import list_destinations
from covidscan.service.deps import (
    DEVICE_COOKIE,
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    PageAdmin,
    PageDoctor,
    PageSubmitter,
    PageUser,
    Principal,
    SessionDep,
    SessionRoute,
    SettingsDep,
    StoreDep,
    check_form_csrf,
    client_of,
)
from covidscan.service.errors import (
    Conflict,
    CsrfRejected,
    ErrorCode,
    LoginThrottled,
    NotFound,
    WrongPassword,
)
from covidscan.service.models import CASE_STATES, AuditEvent, Case, CaseImage, User
from covidscan.service.settings import active_run
from covidscan.service.sites import first_read_for, reader_first_applies, record_first_read
from covidscan.service.worker import set_active_run

router = APIRouter(route_class=SessionRoute, include_in_schema=False)
MEDIA = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".dcm": "application/dicom",
}


def _render(
    request: Request, name: str, who: Principal | None, status_code: int = 200, **context: Any
) -> HTMLResponse:
    templates = request.app.state.templates
    user, csrf = (who.user, who.csrf) if who else (None, None)
    return templates.TemplateResponse(
        request, name, {"user": user, "csrf": csrf, **context}, status_code=status_code
    )


def _safe_next(target: str | None) -> str:
    """Only same-site paths: an open redirect to another host would be a phishing aid."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/worklist"


def _set_cookie(
    response: Response, name: str, value: str, request: Request, max_age: int | None = None
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
        path="/",
    )


@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/worklist", status_code=303)


@router.get("/login")
def login_page(request: Request, next: str = "/worklist") -> HTMLResponse:
    # Before there is a session, CSRF is a double-submit token: the cookie and the form field must match.
    token = secrets.token_urlsafe(32)
    response = _render(request, "login.html", None, next=_safe_next(next), login_csrf=token)
    _set_cookie(response, LOGIN_CSRF_COOKIE, token, request)
    return response


@router.post("/login")
def login(
    request: Request,
    s: SessionDep,
    settings: SettingsDep,
    name: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    csrf: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/worklist",
) -> Response:
    if not csrf_ok(request.cookies.get(LOGIN_CSRF_COOKIE), csrf):
        raise CsrfRejected("missing or wrong CSRF token; reload the login page")
    try:
        user = authenticate(s, name, password, client_of(request))
    except LoginThrottled as exc:
        # (not audited one by one: a guesser's flood would flood the audit log; login_failures has them)
        response = _render(
            request,
            "login.html",
            None,
            status_code=429,
            next=_safe_next(next),
            login_csrf=csrf,
            error=f"Too many failed attempts from here. Wait {exc.retry_after} seconds and try again.",
        )
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    except WrongPassword:
        record(s, "login_failed", actor=name)
        return _render(
            request,
            "login.html",
            None,
            status_code=401,
            next=_safe_next(next),
            login_csrf=csrf,
            error="Wrong name or password.",
        )
    old = request.cookies.get(SESSION_COOKIE)
    if old:
        end_session(s, old)  # never keep (or adopt) a session id from before the login
    sid = start_session(s, user, timedelta(hours=settings.session_hours))
    device = remember_device(s, user, request.cookies.get(DEVICE_COOKIE))
    record(s, "login", actor=user.name)
    response = RedirectResponse(_safe_next(next), status_code=303)
    _set_cookie(response, SESSION_COOKIE, sid, request)
    _set_cookie(response, DEVICE_COOKIE, device, request, max_age=int(DEVICE_LIFETIME.total_seconds()))
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/")
    return response


@router.post("/logout")
def logout(
    request: Request, s: SessionDep, who: PageUser, csrf: Annotated[str, Form()] = ""
) -> RedirectResponse:
    check_form_csrf(who, csrf)
    end_session(s, request.cookies[SESSION_COOKIE])
    record(s, "logout", actor=who.user.name)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


def worklist_link(query: WorklistQuery, **changes: Any) -> str:
    """The worklist page's URL for ``query`` with ``changes``: ``filter`` always (the filter links are
    addressed by it), the other parameters only where they differ from their defaults."""
    values, defaults = query.model_copy(update=changes), WorklistQuery()
    params: dict[str, Any] = {"filter": values.filter}
    for name in WorklistQuery.model_fields:
        if name != "filter" and getattr(values, name) != getattr(defaults, name):
            params[name] = getattr(values, name)
    return "/worklist?" + urlencode(params, doseq=True)


@router.get("/worklist")
def worklist_page(
    request: Request,
    s: SessionDep,
    who: PageUser,
    store: StoreDep,
    query: Annotated[WorklistQuery, Query()],
) -> HTMLResponse:
    page = worklist(s, who.user, query, store=store)
    return _render(
        request,
        "worklist.html",
        who,
        page=page,
        query=query,
        link=partial(worklist_link, query),
        hidden=hidden_results(s, page.cases, who.user),
        states=CASE_STATES,
        sorts=WORKLIST_SORTS,
    )


def _priors(s: Session, user: User, case: Case) -> list[Case]:
    """Other cases of the same patient that ``user`` may see, newest first. Same site too: a patient id is
    a hospital's own, and another hospital's same id is another person."""
    if not case.patient_id:
        return []
    query = visible_cases(user).where(
        Case.patient_id == case.patient_id, Case.site_id == case.site_id, Case.id != case.id
    )
    return list(s.scalars(query.order_by(Case.created_at.desc(), Case.id.desc())))


def _neighbours(s: Session, user: User, case_id: int) -> tuple[int | None, int | None]:
    """The previous and next case of the pending worklist, for the case page's keys; once this case has
    left the list (signed), the next is the list's first case: reading goes on where it stands."""
    ids = worklist(s, user, ids_only=True)
    if case_id not in ids:
        return None, next((i for i in ids if i != case_id), None)
    at = ids.index(case_id)
    return (ids[at - 1] if at > 0 else None), (ids[at + 1] if at + 1 < len(ids) else None)


def viewer_source(image: CaseImage) -> str:
    """The file kind the viewer loads an image from: DICOM from its own bytes (pixel data, rescale and
    VOI); PNG, JPEG and BMP from their original; others (TIFF: browsers cannot decode it) from the
    display PNG rendered at upload."""
    if image.suffix == ".dcm":
        return "dicom"
    return "original" if image.suffix in (".png", ".jpg", ".jpeg", ".bmp") else "display"


def image_notes(image: CaseImage) -> list[str]:
    """An image's warnings but the out-of-distribution one, which the case page states once per case."""
    return [w for w in image.warnings or [] if not w.startswith(OOD_WARNING)]


def _case_page(
    request: Request,
    s: Session,
    who: Principal,
    case_id: int,
    status_code: int = 200,
    error: str | None = None,
) -> HTMLResponse:
    case = get_case(s, who.user, case_id)
    if case is None:
        raise NotFound(f"no case {case_id}")
    review = current_review(case)
    # One message per case, however many images were flagged: the doctor needs the meaning, not scores.
    unlike = sum(any(w.startswith(OOD_WARNING) for w in im.warnings or []) for im in case.images)
    hidden = bool(hidden_results(s, [case], who.user))
    previous_case, next_case = _neighbours(s, who.user, case_id)
    return _render(
        request,
        "case.html",
        who,
        status_code=status_code,
        case=case,
        review=review,
        locked=review is not None and review.signed_at is not None,
        unlike=unlike,
        hidden=hidden,
        reader_first=reader_first_applies(case.site),
        first_read=first_read_for(s, case, who.user),
        priors=_priors(s, who.user, case),
        previous_case=previous_case,
        next_case=next_case,
        viewer_source=viewer_source,
        image_notes=image_notes,
        error=error,
    )


@router.get("/cases/{case_id}")
def case_page(request: Request, s: SessionDep, who: PageUser, case_id: int) -> HTMLResponse:
    response = _case_page(request, s, who, case_id)
    record(s, "view", actor=who.user.name, target=f"case:{case_id}", via="page")
    return response


@router.post("/cases/{case_id}/review")
def review_form(
    request: Request,
    s: SessionDep,
    who: PageDoctor,
    case_id: int,
    agree: Annotated[Literal["yes", "no"], Form()],
    finding: Annotated[str, Form()],
    comment: Annotated[str, Form(max_length=5000)] = "",
    sign: Annotated[str | None, Form()] = None,
    amendment_reason: Annotated[str | None, Form(max_length=2000)] = None,
    csrf: Annotated[str, Form()] = "",
) -> Response:
    check_form_csrf(who, csrf)
    case = get_case(s, who.user, case_id)
    if case is None:
        raise NotFound(f"no case {case_id}")
    try:
        with s.begin_nested():
            submit_review(
                s,
                case,
                who.user,
                agree=agree == "yes",
                finding=finding,
                comment=comment,
                sign=sign is not None,
                amendment_reason=amendment_reason,
            )
    except CovidscanError as exc:
        s.expire_all()
        return _case_page(request, s, who, case_id, status_code=exc.http_status, error=str(exc))
    # ?saved tells the page's script that the verdict reached the server, so its browser draft can go.
    return RedirectResponse(f"/cases/{case_id}?saved=1", status_code=303)


@router.post("/cases/{case_id}/first-read")
def first_read_form(
    request: Request,
    s: SessionDep,
    who: PageDoctor,
    case_id: int,
    finding: Annotated[str, Form()],
    csrf: Annotated[str, Form()] = "",
) -> Response:
    check_form_csrf(who, csrf)
    case = get_case(s, who.user, case_id)
    if case is None:
        raise NotFound(f"no case {case_id}")
    try:
        with s.begin_nested():
            record_first_read(s, case, who.user, finding)
    except CovidscanError as exc:
        s.expire_all()
        return _case_page(request, s, who, case_id, status_code=exc.http_status, error=str(exc))
    return RedirectResponse(f"/cases/{case_id}", status_code=303)


@router.get("/cases/{case_id}/files/{position}/{kind}")
def case_file(
    s: SessionDep,
    who: PageUser,
    store: StoreDep,
    case_id: int,
    position: int,
    kind: Literal["original", "display", "cam", "dicom"],
) -> Response:
    """An image of a case, by position: never by the name the sender gave it. ``dicom`` is the original
    DICOM for the viewer (inline; 404 for other formats), ``original`` the same bytes as a download."""
    case = get_case(s, who.user, case_id)
    image = next((im for im in case.images if im.position == position), None) if case else None
    digest = (
        None
        if image is None
        else {
            "original": image.sha256,
            "dicom": image.sha256 if image.suffix == ".dcm" else None,
            "display": image.display_sha256,
            "cam": image.cam_sha256,
        }[kind]
    )
    if digest is None:
        raise NotFound("no such image")
    if kind == "cam" and hidden_results(s, [case], who.user):
        raise Conflict(
            f"case {case_id} is read reader-first: record your first read before the Grad-CAM is shown",
            ErrorCode.HIDDEN_UNTIL_FIRST_READ,
        )
    s.commit()  # the file is read outside a transaction: SQLite would hold its write lock meanwhile
    data = store.read(digest)
    cache = {"Cache-Control": "private, max-age=3600"}
    if kind == "dicom":
        return Response(data, media_type=MEDIA[".dcm"], headers=cache)
    if kind != "original":
        return Response(data, media_type="image/png", headers=cache)
    filename = f"case{case_id}-image{position}{image.suffix}"
    return Response(
        data,
        media_type=MEDIA.get(image.suffix, "application/octet-stream"),
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.get("/upload")
def upload_page(request: Request, who: PageSubmitter) -> HTMLResponse:
    return _render(request, "upload.html", who)


@router.post("/upload")
def upload_form(
    request: Request,
    s: SessionDep,
    who: PageSubmitter,
    settings: SettingsDep,
    store: StoreDep,
    files: Annotated[list[UploadFile], File()],
    patient_id: Annotated[str | None, Form(max_length=128)] = None,
    site: Annotated[str | None, Form(max_length=1024)] = None,
    csrf: Annotated[str, Form()] = "",
) -> Response:
    check_form_csrf(who, csrf)
    s.commit()  # decoding happens outside a transaction: SQLite would hold its write lock meanwhile
    try:
        checked = check_uploads(
            read_uploads(files, settings.max_upload_bytes), max_pixels=settings.max_pixels
        )
        case_id = create_case(s, store, who.user, checked, patient_id, site=site).id
    except CovidscanError as exc:
        s.rollback()
        return _render(request, "upload.html", who, status_code=exc.http_status, error=str(exc))
    s.commit()  # before the worker is woken: it must find the job
    wake_worker(request)
    return RedirectResponse(f"/cases/{case_id}", status_code=303)


def _admin_page(
    request: Request,
    s: Session,
    who: Principal,
    status_code: int = 200,
    message: str | None = None,
    error: str | None = None,
) -> HTMLResponse:
    users = list(s.scalars(select(User).order_by(User.name)))
    counts = dict(s.execute(select(Case.status, func.count()).group_by(Case.status)).all())
    events = list(s.scalars(select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(50)))
    return _render(
        request,
        "admin.html",
        who,
        status_code=status_code,
        users=users,
        counts=counts,
        events=events,
        chain=verify_chain(s),
        agreement=agreement_by_month(s),
        run=active_run(s),
        destinations=list_destinations(s),
        message=message,
        error=error,
    )


@router.get("/admin")
def admin_page(request: Request, s: SessionDep, who: PageAdmin) -> HTMLResponse:
    return _admin_page(request, s, who)


@router.post("/admin/users")
def admin_add_user(
    request: Request,
    s: SessionDep,
    who: PageAdmin,
    name: Annotated[str, Form(max_length=64)],
    role: Annotated[str, Form()],
    password: Annotated[str, Form(max_length=1024)] = "",
    csrf: Annotated[str, Form()] = "",
) -> HTMLResponse:
    check_form_csrf(who, csrf)
    try:
        with s.begin_nested():
            add_user(s, name, role, password or None)
            record(s, "user_add", actor=who.user.name, target=f"user:{name}", role=role)
    except CovidscanError as exc:
        return _admin_page(request, s, who, status_code=exc.http_status, error=str(exc))
    return _admin_page(request, s, who, message=f"added {role} {name}")


@router.post("/admin/model")
def admin_model(
    request: Request,
    s: SessionDep,
    who: PageAdmin,
    run: Annotated[str, Form(max_length=4096)],
    csrf: Annotated[str, Form()] = "",
) -> HTMLResponse:
    check_form_csrf(who, csrf)
    s.commit()  # set_active_run loads the model and writes in a transaction of its own
    try:
        path = set_active_run(request.app.state.db, run, actor=who.user.name)
        message, error, code = f"new cases are now predicted by {path}", None, 200
    except CovidscanError as exc:
        message, error, code = None, str(exc), exc.http_status
    return _admin_page(request, s, who, status_code=code, message=message, error=error)
