"""The review service's tables (SQLAlchemy 2). The schema itself is created by the Alembic migrations."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

ROLES = ("admin", "doctor", "submitter")
# ready: predicted, with a result; no_result: predicted, but the model gave no image a result (each one
# unreadable, refused by its quality gate or as unlike its training data); failed: the prediction failed.
CASE_STATES = ("queued", "running", "ready", "failed", "signed", "no_result")
FINDINGS = ("covid", "non_covid", "indeterminate")
# new: no verdicts and no alarm yet; shifted: the shift alarm rang before any verdict; validating: signed
# cases are coming in; validated: the site's own figures meet its rules; degraded: a recent window fell below.
SITE_STATUSES = ("new", "shifted", "validating", "validated", "degraded")
# superseded: promoted once, then replaced by a later promotion (a rollback returns to it)
SITE_RUN_STATES = ("training", "candidate", "promoted", "superseded", "rejected", "rolled_back", "failed")


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (what every timestamp column holds)."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on both back ends: SQLite keeps naive values, so they are tagged UTC on read."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; use covidscan.service.models.utcnow()")
        return value.astimezone(timezone.utc) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value


class Base(DeclarativeBase):
    """Declarative base of every service table."""


class User(Base):
    """An account: admin, doctor or submitter. Script-only submitters may have no password."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str | None] = mapped_column(String(255))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiToken(Base):
    """A bearer token; only its SHA-256 is stored (tokens are long random strings, so no salt is needed)."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(12))  # shown in listings so a token can be told apart
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    user: Mapped[User] = relationship()


class WebSession(Base):
    """A browser session kept on the server; the cookie holds a random id whose SHA-256 is the key."""

    __tablename__ = "web_sessions"
    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The idle timeout counts from here; refreshed at most once a minute (not a write per request).
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=utcnow)
    user: Mapped[User] = relationship()


class LoginFailure(Base):
    """One failed login (or wrong current password), counted per client address, per account name and
    per known browser to slow password guessing down (see :mod:`covidscan.service.auth`)."""

    __tablename__ = "login_failures"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    address: Mapped[str | None] = mapped_column(String(64), index=True)  # the client's IP address
    device: Mapped[str | None] = mapped_column(String(64))  # KnownDevice.token_hash, when it sent one
    refused: Mapped[bool] = mapped_column(Boolean, default=False)  # throttled: the password was not tried


class KnownDevice(Base):
    """A browser that logged in to an account before: its device cookie's SHA-256. Such a browser is not
    held back by the throttles that others' failures caused, so guessers cannot lock a doctor out."""

    __tablename__ = "known_devices"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Setting(Base):
    """Service-wide values, e.g. ``active_run`` (the run directory that predicts new cases)."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Site(Base):
    """Where images come from (a hospital, a scanner): by default the submitter account, else the sender's
    ``site`` or the DICOM InstitutionName/StationName. A merged site keeps its row (so its name still
    resolves, to ``merged_into``) but owns no cases."""

    __tablename__ = "sites"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    status: Mapped[str] = mapped_column(String(16), default="new")  # one of SITE_STATUSES
    status_since: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    reader_first: Mapped[bool | None] = mapped_column(Boolean)  # None: reader-first unless validated
    rules: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # admin's validation rules; None: defaults
    active_run: Mapped[str | None] = mapped_column(Text)  # the run serving this site; None: the global one
    run_since: Mapped[datetime | None] = mapped_column(UTCDateTime)  # local validation counts from here
    merged_into_id: Mapped[int | None] = mapped_column(ForeignKey("sites.id"))
    local: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # cache: the latest local figures
    shift: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # cache: the latest shift test result
    merged_into: Mapped[Site | None] = relationship(remote_side=[id])


class Case(Base):
    """Images of one patient or series sent together, their predictions and their reviews."""

    __tablename__ = "cases"
    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[str | None] = mapped_column(String(128))
    submitted_by: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    # Named: SQLite's batch migrations can only drop a foreign key that has a name.
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", name="fk_cases_site_id_sites"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    predicted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    run: Mapped[str | None] = mapped_column(Text)  # the run directory that predicted it
    model: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # model identity, threshold, band, metrics
    group: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # patient/series-level prediction
    priority: Mapped[float | None] = mapped_column(Float)  # worklist order: uncertain, then high p first
    error: Mapped[str | None] = mapped_column(Text)
    submitter: Mapped[User] = relationship()
    site: Mapped[Site] = relationship()
    images: Mapped[list[CaseImage]] = relationship(order_by="CaseImage.position", back_populates="case")
    reviews: Mapped[list[Review]] = relationship(order_by="Review.version", back_populates="case")
    deliveries: Mapped[list[Delivery]] = relationship(order_by="Delivery.id", viewonly=True)

    @property
    def no_result(self) -> str | None:
        """Why the model gave this case no usable result (its status is ``no_result`` or ``failed``, or
        ``signed`` on the doctor's own finding); None while it has one or is still to be predicted."""
        if self.group is not None or self.status in ("queued", "running"):
            return None
        return self.error or "the model gave no image of this case a result"


class CaseImage(Base):
    """One uploaded file: where its bytes are (content address), what it looked like, what the model said."""

    __tablename__ = "case_images"
    __table_args__ = (UniqueConstraint("case_id", "position"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    original_name: Mapped[str] = mapped_column(String(255))  # as sent; only ever shown escaped
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    suffix: Mapped[str] = mapped_column(String(16))  # normalised extension the decoder needs
    display_sha256: Mapped[str] = mapped_column(String(64))  # a PNG rendering browsers can show
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    p_covid: Mapped[float | None] = mapped_column(Float)
    label: Mapped[str | None] = mapped_column(String(16))
    uncertain: Mapped[bool | None] = mapped_column(Boolean)
    lungs_found: Mapped[bool | None] = mapped_column(Boolean)
    warnings: Mapped[list[str] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    group_id: Mapped[str | None] = mapped_column(String(128))
    cam_sha256: Mapped[str | None] = mapped_column(String(64))
    # The image's pooled backbone features (a float32 .npy blob): the shift test's and teaching order's input.
    features_sha256: Mapped[str | None] = mapped_column(String(64))
    # A DICOM file's identifiers (None for other images), so DICOMweb lists studies without reading files.
    study_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    series_uid: Mapped[str | None] = mapped_column(String(64))
    sop_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))
    case: Mapped[Case] = relationship(back_populates="images")


class Job(Base):
    """A queued prediction. Workers claim it with a conditional UPDATE; a lease lets a crash be recovered."""

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"), unique=True)
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)  # queued|running|done|failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    owner: Mapped[str | None] = mapped_column(String(128))  # host:pid:nonce of the claiming worker
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Review(Base):
    """A doctor's verdict. Signed versions are never changed; an amendment is a new version with a reason."""

    __tablename__ = "reviews"
    __table_args__ = (UniqueConstraint("case_id", "version"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    reviewer_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    agree: Mapped[bool] = mapped_column(Boolean)
    finding: Mapped[str] = mapped_column(String(16))
    comment: Mapped[str] = mapped_column(Text, default="")
    amendment_reason: Mapped[str | None] = mapped_column(Text)
    signed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    reviewer: Mapped[User] = relationship()
    case: Mapped[Case] = relationship(back_populates="reviews")


class FirstRead(Base):
    """A reader-first finding, recorded before the model's result was shown to that reader.

    Kept apart from :class:`Review` (the final verdict, which the model may have swayed): local
    validation compares the model with a read it did not influence. One per reader and case, never changed.
    """

    __tablename__ = "first_reads"
    __table_args__ = (UniqueConstraint("case_id", "reader_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"), index=True)
    reader_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    finding: Mapped[str] = mapped_column(String(16))  # one of FINDINGS
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    reader: Mapped[User] = relationship()


class SiteShiftCheck(Base):
    """One shift test of a site's images against a run's own validation images (the history)."""

    __tablename__ = "site_shift_checks"
    id: Mapped[int] = mapped_column(primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"), index=True)
    run: Mapped[str] = mapped_column(Text)  # the run whose validation images were the reference
    computed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    n_images: Mapped[int] = mapped_column(Integer)
    auc: Mapped[float | None] = mapped_column(Float)  # effect size: how well the two groups separate
    p_value: Mapped[float | None] = mapped_column(Float)
    alarm: Mapped[bool] = mapped_column(Boolean)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class SiteRun(Base):
    """A run trained for one site (a challenger) and what became of it: compared, promoted or not."""

    __tablename__ = "site_runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"), index=True)
    run: Mapped[str] = mapped_column(Text)  # the run directory (chosen before training starts)
    parent_run: Mapped[str | None] = mapped_column(Text)  # the run it was adapted from
    state: Mapped[str] = mapped_column(String(16), default="training")  # one of SITE_RUN_STATES
    comparison: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # challenger vs champion, with CIs
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    promoted_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    n_patients: Mapped[int | None] = mapped_column(Integer)  # signed patients it was adapted on
    owner: Mapped[str | None] = mapped_column(String(128))  # host:pid:nonce of the worker training it


class AuditHead(Base):
    """One row: the last audit entry's sequence number and hash. Updating it first serialises appends."""

    __tablename__ = "audit_head"
    id: Mapped[int] = mapped_column(primary_key=True)
    seq: Mapped[int] = mapped_column(Integer)
    hash: Mapped[str] = mapped_column(String(64))


class AuditEvent(Base):
    """An append-only record; ``hash`` = SHA-256 over the previous hash and this row's content."""

    __tablename__ = "audit_events"
    seq: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str | None] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32), index=True)
    target: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


# issue 16 §3: signed results sent back to the hospital's PACS
DESTINATION_KINDS = ("dicom", "stow")  # dicom: C-STORE to host/port/AE title; stow: a DICOMweb STOW-RS URL
# superseded: an amendment was signed before this older version went out; the newer version is sent instead
DELIVERY_STATES = ("queued", "sending", "sent", "failed", "superseded")


class Destination(Base):
    """Where signed results are sent (configured by an admin). Credentials are stored as given: the
    database must be protected like the PACS credentials it holds."""

    __tablename__ = "destinations"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(8))  # one of DESTINATION_KINDS
    host: Mapped[str | None] = mapped_column(String(255))
    port: Mapped[int | None] = mapped_column(Integer)
    called_ae: Mapped[str | None] = mapped_column(String(16))  # the PACS's AE title
    calling_ae: Mapped[str | None] = mapped_column(String(16))  # covidscan's own, as the PACS knows it
    url: Mapped[str | None] = mapped_column(Text)  # the DICOMweb root; STOW-RS posts to {url}/studies
    bearer_token: Mapped[str | None] = mapped_column(Text)
    basic_user: Mapped[str | None] = mapped_column(String(255))
    basic_password: Mapped[str | None] = mapped_column(Text)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Delivery(Base):
    """One signed version of a case sent to one destination: claimed by a worker like a job (owner and
    lease), retried with growing waits, ``sent`` or ``failed`` in the end."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("case_id", "review_version", "destination_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"), index=True)
    review_version: Mapped[int] = mapped_column(Integer)
    # Kept when the destination is deleted (its name stays here): the history of what went where.
    destination_id: Mapped[int | None] = mapped_column(
        ForeignKey("destinations.id", name="fk_deliveries_destination_id", ondelete="SET NULL"), index=True
    )
    destination_name: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)  # one of DELIVERY_STATES
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_uids: Mapped[list[str] | None] = mapped_column(JSON)  # SOP Instance UIDs the destination accepted
    owner: Mapped[str | None] = mapped_column(String(128))  # host:pid:nonce of the worker sending it
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    destination: Mapped[Destination | None] = relationship()


class DicomPending(Base):
    """An instance the DICOM listener accepted (its file already in the store) whose series is still
    arriving; the rows of a series become one case, in the transaction that deletes them, once the series
    has been quiet for a while (:mod:`covidscan.service.dicom_listener`). Kept in the database, so a
    restart loses nothing and no instance becomes two cases."""

    __tablename__ = "dicom_pending"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64))
    series_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str] = mapped_column(String(16))  # the sender's AE title: the case's site
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
