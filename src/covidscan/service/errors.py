"""What the service answers when it refuses: an :class:`ErrorCode` and the typed errors that carry one.

Every JSON error body is ``{"detail": "<one line for a person>", "code": "<ErrorCode>"}``; clients and tests
branch on ``code``, never on the wording of ``detail``.
"""

from __future__ import annotations

from enum import Enum

from covidscan.errors import (
    ConfigError,
    CovidscanError,
    InputError,
    ManifestError,
    ResourceNotFoundError,
    StorageError,
)


class ErrorCode(str, Enum):  # enum.StrEnum once Python 3.10 is no longer supported
    """The machine-readable reason of an error answer."""

    def __str__(self) -> str:
        return self.value

    AUTH_REQUIRED = "auth_required"  # 401: no or an unknown/revoked token or session
    CSRF = "csrf"  # 403: a state-changing call without its session's CSRF token
    FORBIDDEN_ROLE = "forbidden_role"  # 403: the account's role may not do this
    NOT_FOUND = "not_found"  # 404: no such case, image or route (or not visible to this account)
    METHOD_NOT_ALLOWED = "method_not_allowed"  # 405
    NOT_READY = "not_ready"  # 409: the case's prediction is not ready for a verdict
    ALREADY_SIGNED = "already_signed"  # 409: a signed verdict is locked; changing it needs an amendment
    AMENDMENT_UNSIGNED = "amendment_unsigned"  # 409: an amendment must be signed
    SITE_NAME_TAKEN = "site_name_taken"  # 409: another site holds that name (merge the two instead)
    SITE_MERGED = "site_merged"  # 409: the site was merged into another (or into itself)
    FIRST_READ_REFUSED = "first_read_refused"  # 409: a first read after the reader saw the model's result
    HIDDEN_UNTIL_FIRST_READ = "hidden_until_first_read"  # 409: the result waits for a first read
    CHALLENGER_OPEN = "challenger_open"  # 409: the site's challenger is still training or awaiting a decision
    CHALLENGER_NOT_CANDIDATE = "challenger_not_candidate"  # 409: only a candidate is promoted or rejected
    NOTHING_TO_ROLL_BACK = "nothing_to_roll_back"  # 409: the site is served by the global run
    NO_FILES = "no_files"  # 422: an upload without files
    NOT_AN_IMAGE = "not_an_image"  # 422: a file that no image decoder reads
    IMAGE_REFUSED = "image_refused"  # 422: read, but refused by the quality gate
    TOO_MANY_PIXELS = "too_many_pixels"  # 413: an image over the pixel limit (checked before decoding)
    UPLOAD_TOO_LARGE = "upload_too_large"  # 413: a request over the byte limit
    INVALID_REQUEST = "invalid_request"  # 422: a parameter or body field of the wrong form
    BAD_REQUEST = "bad_request"  # 400: a value the library refuses (a setting, a name, a filter)
    STORAGE = "storage"  # 500: the database or file store failed
    INTERNAL = "internal"  # 500: a bug
    # accounts (issue 15):
    LOGIN_THROTTLED = "login_throttled"  # 429: too many failed logins from this client; Retry-After says when
    WRONG_PASSWORD = "wrong_password"  # 403: the current password given to change it is wrong
    WEAK_PASSWORD = "weak_password"  # 422: a new password that is too short, too simple or common
    LAST_ADMIN = "last_admin"  # 409: deactivating the last active admin would leave nobody to manage accounts
    # issue 15: a verdict agreeing with a model result the case does not have
    NO_RESULT = "no_result"  # 409: the model gave the case no result; give your own finding (agree=false)
    # issue 15 §2 (integrity helper):
    STORAGE_FULL = "storage_full"  # 507: the disk holding the files or the database is full
    # issue 16 §3 (destinations, pacsout helper):
    DESTINATION_INVALID = "destination_invalid"  # 422: a destination setting that cannot be sent to
    DESTINATION_NAME_TAKEN = "destination_name_taken"  # 409: another destination has that name
    # issue 16 §1 (DICOM in):
    WRONG_MODALITY = "wrong_modality"  # 422: a DICOM image of a modality or body part the run does not read
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"  # 415: a STOW-RS body not of multipart/related DICOM
    # a verdict that agrees with the model but gives another finding (it would count as agreement)
    CONTRADICTS_MODEL = "contradicts_model"  # 409: agree=true with a finding other than the model's label
    DATABASE_BUSY = "database_busy"  # 503: the request waited too long for its turn to write; try again


class ServiceError(CovidscanError):
    """An error the service answers with ``http_status`` and ``code``."""

    http_status = 400
    code = ErrorCode.BAD_REQUEST

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class AuthRequired(ServiceError):
    """No valid bearer token or session (HTTP 401)."""

    http_status = 401
    code = ErrorCode.AUTH_REQUIRED


class CsrfRejected(ServiceError):
    """A cookie-authenticated change without the session's CSRF token (HTTP 403)."""

    http_status = 403
    code = ErrorCode.CSRF


class NotAllowed(ServiceError):
    """The user may not do this (HTTP 403)."""

    http_status = 403
    code = ErrorCode.FORBIDDEN_ROLE


class NotFound(ServiceError):
    """Nothing by that id that this user may see (HTTP 404)."""

    http_status = 404
    code = ErrorCode.NOT_FOUND


class Conflict(ServiceError):
    """The case is not in a state that allows this (HTTP 409); ``code`` says which state."""

    http_status = 409

    def __init__(self, message: str, code: ErrorCode) -> None:
        super().__init__(message, code)


# 413 for what is too big, 422 for what is not an acceptable image.
_UPLOAD_STATUS = {ErrorCode.TOO_MANY_PIXELS: 413, ErrorCode.UPLOAD_TOO_LARGE: 413}


class UploadRejected(ServiceError):
    """An uploaded file cannot become part of a case; the message names it."""

    def __init__(self, name: str, reason: str, code: ErrorCode) -> None:
        self.name, self.reason = name, reason
        self.http_status = _UPLOAD_STATUS.get(code, 422)
        super().__init__(f"{name}: {reason}", code)


class LoginThrottled(ServiceError):
    """Too many failed password attempts from this client (HTTP 429); ``retry_after`` seconds to wait."""

    http_status = 429
    code = ErrorCode.LOGIN_THROTTLED

    def __init__(self, retry_after: int) -> None:
        self.retry_after = retry_after
        super().__init__(f"too many failed password attempts: wait {retry_after} s and try again")


class WrongPassword(ServiceError):
    """A password that does not match (HTTP 403 where a logged-in user confirms theirs)."""

    http_status = 403
    code = ErrorCode.WRONG_PASSWORD


class WeakPassword(ServiceError):
    """A new password the policy refuses (HTTP 422); the message says why."""

    http_status = 422
    code = ErrorCode.WEAK_PASSWORD


class StorageFull(ServiceError):
    """A write failed because the disk is full (HTTP 507); nothing of the request was kept."""

    http_status = 507
    code = ErrorCode.STORAGE_FULL


class DatabaseBusy(ServiceError):
    """The request waited too long for its turn at the database (HTTP 503); nothing of it was kept."""

    http_status = 503
    code = ErrorCode.DATABASE_BUSY


class DestinationInvalid(ServiceError):
    """A destination's settings that nothing can be sent to (HTTP 422); the message names the field."""

    http_status = 422
    code = ErrorCode.DESTINATION_INVALID


class LoginRequired(Exception):
    """A page was asked for without a live session: answered with a redirect to the login page."""


# The library's own errors, by class (the first match wins).
_LIBRARY_CODES: tuple[tuple[type[CovidscanError], ErrorCode], ...] = (
    (InputError, ErrorCode.NOT_AN_IMAGE),
    (ConfigError, ErrorCode.BAD_REQUEST),
    (ManifestError, ErrorCode.BAD_REQUEST),
    (ResourceNotFoundError, ErrorCode.NOT_FOUND),
    (StorageError, ErrorCode.STORAGE),
)
# Errors FastAPI and Starlette raise themselves (unknown routes, wrong methods), by status.
_STATUS_CODES = {
    401: ErrorCode.AUTH_REQUIRED,
    403: ErrorCode.FORBIDDEN_ROLE,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.UPLOAD_TOO_LARGE,
    422: ErrorCode.INVALID_REQUEST,
}


def error_code(exc: CovidscanError) -> ErrorCode:
    """The code of any covidscan error: its own for service errors, else by its class."""
    if isinstance(exc, ServiceError):
        return exc.code
    return next((code for cls, code in _LIBRARY_CODES if isinstance(exc, cls)), ErrorCode.INTERNAL)


def code_for_status(status: int) -> ErrorCode:
    """The code of an HTTP error raised by the framework rather than by covidscan."""
    return _STATUS_CODES.get(status, ErrorCode.INTERNAL if status >= 500 else ErrorCode.BAD_REQUEST)


class UnsupportedMediaType(ServiceError):
    """A request body of a type the route does not take (HTTP 415); the message names the right one."""

    http_status = 415
    code = ErrorCode.UNSUPPORTED_MEDIA_TYPE
