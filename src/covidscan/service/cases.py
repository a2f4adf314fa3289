"""Cases: creating them from uploads, showing them, the worklist, verdicts with signatures and amendments,
the verdict export that ``covidscan adapt`` reads, and doctor-model agreement."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd
from sqlalchemy import Select, select
from sqlalchemy import case as sql_case
from sqlalchemy.orm import Session, selectinload

from covidscan.errors import ConfigError
from covidscan.outputs import csv_text
from covidscan.service.audit import record, review_digest
from covidscan.service.errors import Conflict, ErrorCode, NotAllowed, UploadRejected
from covidscan.service.models import FINDINGS, Case, CaseImage, Job, Review, Site, User, utcnow
from covidscan.service.scoring import UploadInfo, inspect_upload
from covidscan.service.storage import BlobStore

WORKLIST_FILTERS = ("pending", "reviewed", "all")


@dataclass(frozen=True)
class Upload:
    """One file as received: the name the sender gave and its bytes."""

    name: str
    data: bytes


@dataclass(frozen=True)
class CheckedUpload:
    """An upload that decoded as an image, with what the check found."""

    upload: Upload
    info: UploadInfo


def check_uploads(uploads: list[Upload], *, max_pixels: int) -> list[CheckedUpload]:
    """Decode every upload in full (no database transaction is open meanwhile); the first bad file raises
    :class:`UploadRejected` naming it, so a rejected request leaves no trace."""
    if not uploads:
        raise UploadRejected("files", "no files were sent; attach at least one image", ErrorCode.NO_FILES)
    return [CheckedUpload(up, inspect_upload(up.data, up.name, max_pixels=max_pixels)) for up in uploads]


def create_case(
    db: Session,
    store: BlobStore,
    user: User,
    checked: list[CheckedUpload],
    patient_id: str | None,
    *,
    site: str | None = None,
) -> Case:
    """Store checked uploads (content-addressed) as a new case and queue its prediction job.

    The case's site is ``site`` (the name the sender gave), else the first DICOM upload's InstitutionName
    or StationName, else the submitter account's (:func:`covidscan.service.sites.resolve_site`).
    """
    from covidscan.service.sites import resolve_site  # sites builds on this module

    if user.role not in ("submitter", "admin"):
        raise NotAllowed(f"user {user.name} ({user.role}) cannot submit cases")
    dicom = next((item.info.dicom for item in checked if item.info.dicom), None)
    case_site = resolve_site(db, explicit=site, submitter=user, dicom=dicom)
    case = Case(
        patient_id=(patient_id or None) and patient_id[:128],
        submitted_by=user.id,
        site_id=case_site.id,
        status="queued",
    )
    db.add(case)
    db.flush()
    for position, item in enumerate(checked):
        up, info = item.upload, item.info
        db.add(
            CaseImage(
                case_id=case.id,
                position=position,
                original_name=up.name[:255],
                sha256=store.put(up.data),
                size=len(up.data),
                suffix=info.suffix,
                display_sha256=store.put(info.display_png),
                width=info.width,
                height=info.height,
            )
        )
    db.add(Job(case_id=case.id))
    record(
        db,
        "upload",
        actor=user.name,
        target=f"case:{case.id}",
        n_files=len(checked),
        patient_id=case.patient_id,
        site=case_site.name,
    )
    return case


def visible_cases(user: User) -> Select[tuple[Case]]:
    """Cases ``user`` may see: a submitter only its own; doctors and admins all."""
    query = select(Case)
    return query.where(Case.submitted_by == user.id) if user.role == "submitter" else query


def get_case(db: Session, user: User, case_id: int) -> Case | None:
    """The case if it exists and ``user`` may see it (None otherwise: no hint that it exists)."""
    query = (
        visible_cases(user)
        .where(Case.id == case_id)
        .options(
            selectinload(Case.images),
            selectinload(Case.reviews).selectinload(Review.reviewer),
            selectinload(Case.site),
        )
    )
    return db.scalar(query)


def worklist(
    db: Session, user: User, which: str = "pending", limit: int = 200, *, site: Site | None = None
) -> list[Case]:
    """Pending cases first (ready before still-predicting), uncertain and high-probability ones on top;
    with ``site``, only that site's cases."""
    if which not in WORKLIST_FILTERS:
        raise ConfigError(f"worklist filter must be one of {', '.join(WORKLIST_FILTERS)}, got {which!r}")
    query = visible_cases(user).options(selectinload(Case.images), selectinload(Case.site))
    if site is not None:
        query = query.where(Case.site_id == site.id)
    if which == "pending":
        query = query.where(Case.status.in_(("queued", "running", "ready", "failed")))
    elif which == "reviewed":
        query = query.where(Case.status == "signed")
    pending_first = sql_case((Case.status == "signed", 1), else_=0)
    ready_first = sql_case((Case.status == "ready", 0), else_=1)
    query = query.order_by(pending_first, ready_first, Case.priority.desc().nulls_last(), Case.id)
    return list(db.scalars(query.limit(limit)))


def priority(uncertain: bool, group: dict[str, Any] | None) -> float:
    """Worklist rank: a case with an uncertain image lies above all certain ones; then higher p first."""
    return (1.0 if uncertain else 0.0) + (group["p_covid"] if group else 0.0)


def current_review(case: Case) -> Review | None:
    """The newest version of the verdict (signed or a draft), or None."""
    return case.reviews[-1] if case.reviews else None


def submit_review(
    db: Session,
    case: Case,
    doctor: User,
    *,
    agree: bool,
    finding: str,
    comment: str,
    sign: bool,
    amendment_reason: str | None = None,
) -> Review:
    """Record a verdict. A draft is overwritten; a signed verdict is locked, and changing it takes an
    amendment: a new signed version with a reason, the old versions kept as they were."""
    if doctor.role != "doctor":
        raise NotAllowed(f"only doctors review cases; {doctor.name} is {doctor.role}")
    if finding not in FINDINGS:
        raise ConfigError(f"finding must be one of {', '.join(FINDINGS)}, got {finding!r}")
    if case.status not in ("ready", "signed"):
        raise Conflict(
            f"case {case.id} is {case.status}: it can be reviewed once its prediction is ready",
            ErrorCode.NOT_READY,
        )
    # Lock the case row, then read its verdicts afresh: a second doctor signing at the same moment waits,
    # then sees the first signature and gets the 409 below on PostgreSQL as on SQLite (whose BEGIN
    # IMMEDIATE already serialises writers), instead of a unique-key clash on the new version.
    db.execute(select(Case.id).where(Case.id == case.id).with_for_update())
    for stale in case.reviews:
        db.expire(stale)
    db.refresh(case, ["status", "reviews"])
    latest = current_review(case)
    amending = latest is not None and latest.signed_at is not None
    if amending and not (amendment_reason and amendment_reason.strip()):
        raise Conflict(
            f"case {case.id} is signed and locked; an amendment needs a reason",
            ErrorCode.ALREADY_SIGNED,
        )
    if amending and not sign:
        raise Conflict("an amendment must be signed", ErrorCode.AMENDMENT_UNSIGNED)
    comment = comment[:5000]
    if latest is not None and not amending:  # a draft: edit it in place
        review = latest
        review.reviewer_id, review.agree, review.finding, review.comment = doctor.id, agree, finding, comment
    else:
        review = Review(
            case_id=case.id,
            version=(latest.version + 1) if latest else 1,
            reviewer_id=doctor.id,
            agree=agree,
            finding=finding,
            comment=comment,
            amendment_reason=amendment_reason.strip()[:2000] if amending else None,
        )
        db.add(review)
        case.reviews.append(review)
    if sign:
        review.signed_at = utcnow()
        case.status = "signed"
    db.flush()
    db.refresh(review, ["reviewer"])
    action = "amendment" if amending else ("signature" if sign else "verdict")
    record(
        db,
        action,
        actor=doctor.name,
        target=f"case:{case.id}",
        version=review.version,
        agree=agree,
        finding=finding,
        reason=review.amendment_reason,
        # what was signed, so that `audit-log verify` catches a verdict edited in the table later
        **({"review_id": review.id, "review_sha256": review_digest(review)} if sign else {}),
    )
    if sign:
        # The site's local figures and status follow every signed verdict at once (cheap, no training).
        from covidscan.service.monitoring import refresh_site  # monitoring builds on this module

        refresh_site(db, case.site)
    return review


def signed_latest(
    db: Session, *, site: Site | None = None, since: datetime | None = None
) -> list[tuple[Case, Review]]:
    """Every signed case with its newest signed verdict, by case id; with ``site``, only that site's, and
    with ``since``, only cases predicted at or after that time (e.g. since the site's run was switched)."""
    query = (
        select(Case)
        .where(Case.status == "signed")
        .order_by(Case.id)
        .options(selectinload(Case.images), selectinload(Case.reviews), selectinload(Case.site))
    )
    if site is not None:
        query = query.where(Case.site_id == site.id)
    if since is not None:
        query = query.where(Case.predicted_at >= since)
    cases = db.scalars(query)
    out = []
    for case in cases:
        signed = [r for r in case.reviews if r.signed_at is not None]
        if signed:
            out.append((case, signed[-1]))
    return out


def export_verdicts(
    db: Session, store: BlobStore, *, site: Site | None = None, since: datetime | None = None
) -> str:
    """A manifest CSV ``path,label,patient_id,site`` of signed verdicts, one row per stored original.

    ``label`` is the doctor's finding (``covid``/``non_covid``); indeterminate verdicts are left out.
    ``patient_id`` is the case's, else ``case-N``, so a later patient split keeps a case together. The
    store keeps identical bytes once, so an image sent in two cases is one row; when its signed findings
    disagree it is left out rather than given either label. ``site`` is the case's site name (the first
    case's, for an image sent from two sites); ``site`` and ``since`` filter as in :func:`signed_latest`.
    """
    rows: dict[str, tuple[str, str, str]] = {}
    conflicting: set[str] = set()
    for case, review in signed_latest(db, site=site, since=since):
        if review.finding == "indeterminate":
            continue
        for im in case.images:
            path = str(store.path(im.sha256))
            if path in rows and rows[path][0] != review.finding:
                conflicting.add(path)
            rows.setdefault(path, (review.finding, case.patient_id or f"case-{case.id}", case.site.name))
    table = pd.DataFrame(
        [(path, *row) for path, row in rows.items() if path not in conflicting],
        columns=["path", "label", "patient_id", "site"], dtype=object,
    )
    return csv_text(table)  # patient ids are typed by users: escaped against spreadsheet formula injection


def agreement_by_month(db: Session) -> list[dict[str, Any]]:
    """Per month of signature: signed cases, how many the doctor agreed with, and the rate."""
    months: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for _case, review in signed_latest(db):
        month = review.signed_at.strftime("%Y-%m")
        months[month][0] += 1
        months[month][1] += int(review.agree)
    return [
        {"month": m, "signed": n, "agreed": a, "agreement": a / n} for m, (n, a) in sorted(months.items())
    ]
