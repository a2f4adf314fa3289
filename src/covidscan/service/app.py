"""The review service's FastAPI application: settings, start-up (migrations, worker), headers, errors."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from covidscan.errors import ConfigError, CovidscanError
from covidscan.evaluation import format_value_ci
from covidscan.service.auth import session_for_cookie, user_for_token
from covidscan.service.db import Database
from covidscan.service.deps import SESSION_COOKIE, UNSAFE_METHODS, bearer_token, get_settings
from covidscan.service.errors import (
    AuthRequired,
    ErrorCode,
    LoginRequired,
    LoginThrottled,
    code_for_status,
    error_code,
)
from covidscan.service.schemas import ErrorBody
from covidscan.service.settings import ServiceSettings, active_run, open_service
from covidscan.service.storage import BlobStore
from covidscan.service.worker import Worker

if TYPE_CHECKING:
    from covidscan.service.dicom_listener import DicomListener

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
# No inline scripts or styles anywhere, so a stored <script> can never run even if escaping failed.
# 'wasm-unsafe-eval' lets the viewer's worker compile its WebAssembly DICOM codecs (it allows no JS eval);
# blob: images are the viewer tools' cursors (SVGs it makes in the page).
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)
DOCS_CSP = "default-src 'self'; img-src 'self' data:; script-src 'self' 'unsafe-inline'; style-src 'self'"


# Routes whose errors are JSON whoever asks: the API, DICOMweb, the health check and the OpenAPI document.
JSON_PREFIXES = ("/api/", "/dicomweb", "/healthz", "/openapi.json")


def error_response(
    status: int, detail: str, code: ErrorCode, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The one shape of every JSON error: ``{"detail": ..., "code": ...}``."""
    return JSONResponse(ErrorBody(detail=detail, code=code).model_dump(), status_code=status, headers=headers)


def wants_page(request: Request) -> bool:
    """Whether an error goes to a person: a page route (not :data:`JSON_PREFIXES`) asked for by a client
    that accepts HTML, as browsers do when they open a page or send a form."""
    return not request.url.path.startswith(JSON_PREFIXES) and "text/html" in request.headers.get("accept", "")


def same_site_path(request: Request, url: str | None) -> str | None:
    """The path and query of ``url`` (e.g. the Referer) when it is a page of this site; None otherwise."""
    if not url:
        return None
    parts = urlsplit(url)
    if parts.netloc != request.url.netloc or not parts.path.startswith("/") or parts.path.startswith("//"):
        return None
    return parts.path + (f"?{parts.query}" if parts.query else "")


def error_answer(
    request: Request, status: int, detail: str, code: ErrorCode, headers: dict[str, str] | None = None
) -> Response:
    """An error as a page for people (``templates/error.html``: what happened, what to do, the way back) or
    as JSON with its ``code`` for programs (:func:`wants_page` decides)."""
    if not wants_page(request):
        return error_response(status, detail, code, headers)
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    context = {
        "user": None,
        "status": status,
        "code": str(code),
        "detail": detail if status < 500 else None,  # a server fault's message is for the log, not the user
        "back": same_site_path(request, request.headers.get("referer")),
        "login": f"/login?next={quote(here if request.method == 'GET' else '/worklist')}",
    }
    return request.app.state.templates.TemplateResponse(
        request, "error.html", context, status_code=status, headers=headers
    )


def _validation_detail(exc: RequestValidationError) -> str:
    """FastAPI's list of validation errors as one line: ``body.finding: Input should be ...; ...``."""
    return (
        "; ".join(f"{'.'.join(str(part) for part in err['loc'])}: {err['msg']}" for err in exc.errors())
        or "invalid request"
    )


class AuthBeforeBody:
    """Pure ASGI middleware: a state-changing request (other than the login form) is refused before its
    body is read when it has no live token or session; FastAPI would otherwise parse (and spool to disk) a
    whole multipart upload before the route's authentication dependency runs. Roles and CSRF tokens are
    still checked by the routes."""

    OPEN_PATHS = frozenset({"/login"})

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in UNSAFE_METHODS
            or scope["path"] in self.OPEN_PATHS
        ):
            await self.app(scope, receive, send)
            return
        request = Request(scope)  # headers and cookies only: ``receive`` is not given, so no body is read
        if await run_in_threadpool(_authenticated, request):
            await self.app(scope, receive, send)
            return
        if scope["path"].startswith(("/api/", "/dicomweb/")):
            response: Response = error_response(
                401,
                "authentication required: send 'Authorization: Bearer TOKEN'",
                ErrorCode.AUTH_REQUIRED,
                {"WWW-Authenticate": "Bearer", "Connection": "close"},
            )
        else:
            target = quote(login_target(request))
            headers = {"Connection": "close"}
            response = RedirectResponse(f"/login?next={target}", status_code=303, headers=headers)
        await response(scope, receive, send)


def login_target(request: Request) -> str:
    """Where to go back after logging in. A form posted with an expired session comes back to the page it
    was sent from (its draft is kept in the browser), never to the POST-only action, which a GET after
    login would refuse."""
    if request.method == "GET":
        return request.url.path + (f"?{request.url.query}" if request.url.query else "")
    referer = same_site_path(request, request.headers.get("referer"))
    return referer or request.url.path.rsplit("/", 1)[0] or "/"


def _authenticated(request: Request) -> bool:
    """Whether the request carries a live bearer token or session cookie (one short read transaction)."""
    token, sid = bearer_token(request), request.cookies.get(SESSION_COOKIE)
    with request.app.state.db.session() as s:
        if token is not None:
            return user_for_token(s, token) is not None
        idle = timedelta(minutes=get_settings(request).session_idle_minutes)
        return sid is not None and session_for_cookie(s, sid, idle) is not None


def dicom_listener(
    settings: ServiceSettings, db: Database, store: BlobStore, worker: Worker | None
) -> DicomListener | None:
    """The DICOM listener the settings ask for (``dicom_port``), not started; None without a port."""
    if settings.dicom_port is None:
        return None
    from covidscan.service.dicom_listener import DicomListener

    return DicomListener(
        db,
        store,
        host=settings.dicom_host,
        port=settings.dicom_port,
        ae_title=settings.dicom_ae_title,
        quiet_seconds=settings.dicom_quiet_seconds,
        max_pixels=settings.max_pixels,
        on_case=worker.wake if worker is not None else None,
    )


def create_app(settings: ServiceSettings) -> FastAPI:
    """The application; the database is migrated and the worker started when it starts serving."""
    from covidscan.service import api, pages
    from covidscan.service.routers import (
        account_pages,
        accounts,
        destination_pages,
        destinations,
        dicomweb,
        records,
        site_pages,
        sites,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db, store = open_service(settings)
        with db.session() as s:
            current = active_run(s)
        if current is None:
            raise ConfigError(f"no run is active in {settings.data_dir}; start with --run RUN")
        app.state.db, app.state.store = db, store
        worker = (
            Worker(
                db,
                store,
                poll_seconds=settings.poll_seconds,
                orphan_minutes=settings.orphan_minutes,
                delivery_retry_seconds=settings.delivery_retry_seconds,
            )
            if settings.worker
            else None
        )
        app.state.worker = worker
        if worker is not None:
            worker.scorer()  # load the model now: the first case should not wait for it
            worker.start()
        app.state.dicom_listener = listener = dicom_listener(settings, db, store, worker)
        try:
            if listener is not None:
                listener.start()
            yield
        finally:
            if listener is not None:
                listener.stop()
            if worker is not None:
                worker.stop()
            db.dispose()

    app = FastAPI(
        title="covidscan review service", lifespan=lifespan, docs_url=None, redoc_url=None, version="1"
    )
    app.state.settings = settings
    app.state.templates = Jinja2Templates(directory=HERE / "templates")  # autoescape is on for .html
    # a metric as "0.912 (95% CI 0.850–0.960, 40 patients)", or without an interval where too few to have one
    app.state.templates.env.filters["value_ci"] = format_value_ci
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(api.router)
    app.include_router(sites.router)
    app.include_router(pages.router)
    app.include_router(site_pages.router)
    app.include_router(accounts.router)
    app.include_router(account_pages.router)
    app.include_router(records.router)
    app.include_router(destinations.router)
    app.include_router(destination_pages.router)
    app.include_router(dicomweb.router)

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="covidscan API",
            swagger_js_url="/static/swagger/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger/swagger-ui.css",
            swagger_favicon_url="",
            swagger_ui_parameters={"validatorUrl": None},  # no calls to an outside validator
        )

    app.add_middleware(AuthBeforeBody)  # added before `guard`, so inside it: its answers get the headers

    @app.middleware("http")
    async def guard(request: Request, call_next):  # type: ignore[no-untyped-def]
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_upload_bytes:
            return error_answer(
                request,
                413,
                f"request too large: at most {settings.max_upload_bytes} bytes",
                ErrorCode.UPLOAD_TOO_LARGE,
            )
        response: Response = await call_next(request)
        response.headers["Content-Security-Policy"] = DOCS_CSP if request.url.path == "/docs" else CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "same-origin"
        # Static files are revalidated (ETag -> 304), not sent again: the viewer's 4 MB on every case page.
        static = request.url.path.startswith("/static/")
        response.headers.setdefault("Cache-Control", "no-cache" if static else "no-store")
        return response

    @app.exception_handler(LoginRequired)
    async def to_login(request: Request, _exc: LoginRequired) -> RedirectResponse:
        return RedirectResponse(f"/login?next={quote(login_target(request))}", status_code=303)

    @app.exception_handler(CovidscanError)
    async def covidscan_error(request: Request, exc: CovidscanError) -> Response:
        if exc.http_status >= 500:
            log.error("%s %s failed: %s", request.method, request.url.path, exc)
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, AuthRequired) else None
        if isinstance(exc, LoginThrottled):
            headers = {"Retry-After": str(exc.retry_after)}
        return error_answer(request, exc.http_status, str(exc), error_code(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        return error_answer(request, 422, _validation_detail(exc), ErrorCode.INVALID_REQUEST)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = code_for_status(exc.status_code)
        return error_answer(request, exc.status_code, str(exc.detail), code, exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, _exc: Exception) -> Response:
        # Starlette logs the traceback (it re-raises after answering); the client gets no internals.
        detail = "internal error; the server log has the details"
        return error_answer(request, 500, detail, ErrorCode.INTERNAL)

    return app
