"""Cases: creating them from uploads, showing them, the worklist, verdicts with signatures and amendments,
the verdict export that ``covidscan adapt`` reads, and doctor-model agreement."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, Field, field_validator
from sqlalchemy import Select, case as sql_case, func, or_, select
from sqlalchemy.orm import Session, joinedload, selectinload

from covidscan.errors import ConfigError
from covidscan.outputs import csv_text
from covidscan.service.audit import record, review_digest
from covidscan.service.errors import Conflict, ErrorCode, NotAllowed, NotFound, UploadRejected
from covidscan.service.models import CASE_STATES, FINDINGS, Case, CaseImage, Job, Review, Site, User, utcnow
from covidscan.service.scoring import UploadInfo, inspect_upload
from covidscan.service.storage import BlobStore

WORKLIST_SORTS = ("priority", "received", "probability", "patient", "case")
# Each sort's own direction: most urgent, oldest waiting, most likely covid first; patients and ids ascending.
DEFAULT_DIRECTION = {
    "priority": "desc", "received": "asc", "probability": "desc", "patient": "asc", "case": "asc"
}
MAX_WORKLIST_LIMIT = 500


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
    sender_ae: str | None = None,
) -> Case:
    """Store checked uploads (content-addressed) as a new case and queue its prediction job.

    The case's site is ``site`` (the name the sender gave), else ``sender_ae`` (the calling AE title of a
    DICOM association), else the first DICOM upload's InstitutionName or StationName, else the submitter
    account's (:func:`covidscan.service.sites.resolve_site`). A DICOM file's UIDs are kept with its image.
    """
    from covidscan.service.sites import resolve_site  # sites builds on this module

    if user.role not in ("submitter", "admin"):
        raise NotAllowed(f"user {user.name} ({user.role}) cannot submit cases")
    dicom = next((item.info.dicom for item in checked if item.info.dicom), None)
    case_site = resolve_site(db, explicit=site, submitter=user, dicom=dicom, sender_ae=sender_ae)
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
        ids = info.dicom or {}
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
                study_uid=ids.get("StudyInstanceUID", "")[:64] or None,
                series_uid=ids.get("SeriesInstanceUID", "")[:64] or None,
                sop_uid=ids.get("SOPInstanceUID", "")[:64] or None,
                sop_class_uid=ids.get("SOPClassUID", "")[:64] or None,
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
            # joined, not selected apart: one statement sees the case and its images at the same moment,
            # never a case still "running" whose images the worker has just filled in (read skew)
            joinedload(Case.images),
            selectinload(Case.reviews).selectinload(Review.reviewer),
            selectinload(Case.site),
        )
    )
    return db.scalars(query).unique().first()


class WorklistQuery(BaseModel):
    """What a worklist shows: which cases (filters, a search) in which order, and which page of them.

    The API and the worklist page take these as query parameters; a value of the wrong form is a 422.
    """

    filter: Literal["pending", "reviewed", "all"] = Field(
        "pending", description="pending: not yet signed; reviewed: signed"
    )
    status: list[Literal[CASE_STATES]] = Field(  # type: ignore[valid-type]
        default_factory=list, description="Only cases in these states (repeat the parameter for several)"
    )
    site: str | None = Field(None, max_length=1024, description="Only this site's cases")
    q: str | None = Field(
        None, max_length=128, description="Search: a case id (42 or #42) or part of a patient id"
    )
    sort: Literal[WORKLIST_SORTS] = Field(  # type: ignore[valid-type]
        "priority",
        description="priority: pending first, uncertain and high-probability on top; received: when it was "
        "sent; probability: the case's p(covid); patient: patient id; case: case id",
    )
    dir: Literal["asc", "desc"] | None = Field(
        None,
        description="Direction; default: the sort's own (priority, probability: desc; received, patient, "
        "case: asc). Cases without a probability or patient id come last either way.",
    )
    order: Literal["review", "teaching"] = Field(
        "review",
        description="teaching (with site): the unsigned cases whose verdicts teach the site's validation "
        "and adaptation most first, the rest after them in the chosen sort",
    )
    offset: int = Field(0, ge=0, description="How many cases to skip (paging)")
    limit: int = Field(50, ge=1, le=MAX_WORKLIST_LIMIT, description="How many cases to return at most")

    @field_validator("site", "q", "dir", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        """An empty search box, site field or direction choice means none."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("status", mode="before")
    @classmethod
    def _no_blank_status(cls, value: Any) -> Any:
        """The page's "any" status choice is an empty value: no filter."""
        return [v for v in value if v != ""] if isinstance(value, list) else value

    @property
    def direction(self) -> str:
        """The direction in force: the one asked for, else the sort's own."""
        return self.dir or DEFAULT_DIRECTION[self.sort]


@dataclass(frozen=True)
class WorklistPage:
    """One page of a worklist: its cases and how many cases match in all."""

    cases: list[Case]
    total: int
    offset: int
    limit: int


def _sort_keys(sort: str, descending: bool) -> list[Any]:
    """ORDER BY terms; ``descending`` reverses the sort (for priority: exactly, so the last page of one
    direction is the first of the other), a case id breaks ties."""
    if sort == "priority":
        pending_first = sql_case((Case.status == "signed", 1), else_=0)
        ready_first = sql_case((Case.status == "ready", 0), else_=1)
        if descending:
            return [pending_first.asc(), ready_first.asc(), Case.priority.desc().nulls_last(), Case.id.asc()]
        return [pending_first.desc(), ready_first.desc(), Case.priority.asc().nulls_first(), Case.id.desc()]
    column = {
        "received": Case.created_at,
        "probability": Case.group["p_covid"].as_float(),
        "patient": Case.patient_id,
        "case": Case.id,
    }[sort]
    term = column.desc() if descending else column.asc()
    return [term.nulls_last(), Case.id.desc() if descending else Case.id.asc()]


def _search(q: str) -> Any:
    """A case id (``42``, ``#42``) matches that case; any text matches patient ids containing it."""
    text = q.strip()
    by_patient = Case.patient_id.icontains(text, autoescape=True)
    number = text.removeprefix("#").strip()
    return or_(Case.id == int(number), by_patient) if number.isdigit() and len(number) < 10 else by_patient


def worklist(
    db: Session,
    user: User,
    query: WorklistQuery | None = None,
    *,
    store: BlobStore | None = None,
    ids_only: bool = False,
) -> WorklistPage | list[int]:
    """One page of the cases ``user`` may see that match ``query``, in its order, with the number of all.

    Counting and paging happen in the database (COUNT, then LIMIT/OFFSET), so nothing is cut off and only
    the page's cases are loaded; ``ids_only``: the ids of every matching case in the sort's order instead
    (unpaged; not with teaching order). ``order=teaching`` ranks the site's cases by
    :func:`covidscan.service.monitoring.teaching_queue` (which needs ``store``); an unknown site is a 404.
    """
    from covidscan.service.sites import find_site  # sites builds on this module

    query = query or WorklistQuery()
    site = None
    if query.site is not None:
        site = find_site(db, query.site)
        if site is None:
            raise NotFound(f"no site called {query.site!r}; GET /api/v1/sites lists them")
    if query.order == "teaching" and site is None:
        raise ConfigError("order=teaching needs a site: add site=NAME (teaching order is per site)")
    chosen = visible_cases(user)
    if site is not None:
        chosen = chosen.where(Case.site_id == site.id)
    if query.filter == "pending":
        chosen = chosen.where(Case.status != "signed")
    elif query.filter == "reviewed":
        chosen = chosen.where(Case.status == "signed")
    if query.status:
        chosen = chosen.where(Case.status.in_(query.status))
    if query.q is not None:
        chosen = chosen.where(_search(query.q))
    total = db.scalar(select(func.count()).select_from(chosen.subquery()))
    ordered = chosen.order_by(*_sort_keys(query.sort, query.direction == "desc"))
    if ids_only:
        return list(db.scalars(ordered.with_only_columns(Case.id)))
    if query.order == "teaching":
        if store is None:
            raise ConfigError("teaching order needs the file store (the cases' image features)")
        from covidscan.service.monitoring import teaching_queue  # needs numpy features: only when asked

        rank = {case_id: i for i, case_id in enumerate(teaching_queue(db, store, site))}
        ids = list(db.scalars(ordered.with_only_columns(Case.id)))
        ids.sort(key=lambda case_id: rank.get(case_id, len(rank)))  # stable: the rest keep the sort's order
        page_ids = ids[query.offset : query.offset + query.limit]
        found = {c.id: c for c in db.scalars(_with_rows(select(Case).where(Case.id.in_(page_ids))))}
        cases = [found[case_id] for case_id in page_ids]
    else:
        cases = list(db.scalars(_with_rows(ordered).offset(query.offset).limit(query.limit)))
    return WorklistPage(cases, total, query.offset, query.limit)


def _with_rows(query: Select[tuple[Case]]) -> Select[tuple[Case]]:
    """What a worklist row shows, loaded for the whole page at once (not one query per case)."""
    return query.options(selectinload(Case.images), selectinload(Case.site), selectinload(Case.reviews))


def priority(uncertain: bool, group: dict[str, Any] | None) -> float:
    """Worklist rank: a case with an uncertain image lies above all certain ones; then higher p first."""
    return (1.0 if uncertain else 0.0) + (group["p_covid"] if group else 0.0)


def no_result_reason(images: list[CaseImage]) -> str:
    """What a case whose images all came back without a result says (stored as its ``error``)."""
    errors = [im.error for im in images if im.error]
    more = f" (and {len(errors) - 1} more like it)" if len(errors) > 1 else ""
    why = f": {errors[0]}{more}" if errors else ""
    return f"none of its {len(images)} image(s) has a result{why}"


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
    amendment: a new signed version with a reason, the old versions kept as they were.

    A case the model gave no result (:attr:`Case.no_result`) takes the doctor's own finding only
    (``agree=False``): agreeing with a result it does not have is a 409 ``no_result``."""
    if doctor.role != "doctor":
        raise NotAllowed(f"only doctors review cases; {doctor.name} is {doctor.role}")
    if finding not in FINDINGS:
        raise ConfigError(f"finding must be one of {', '.join(FINDINGS)}, got {finding!r}")
    if case.status in ("queued", "running"):
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
    if agree and case.no_result is not None:
        raise Conflict(
            f"case {case.id} has no model result to agree with ({case.no_result}); "
            "give your own finding with agree=false",
            ErrorCode.NO_RESULT,
        )
    latest = current_review(case)
    amending = latest is not None and latest.signed_at is not None
    if amending and not (amendment_reason and amendment_reason.strip()):
        raise Conflict(
            f"case {case.id} is signed and locked; an amendment needs a reason",
            ErrorCode.ALREADY_SIGNED,
        )
    if amending and not sign:
        raise Conflict("an amendment must be signed", ErrorCode.AMENDMENT_UNSIGNED)
    if agree and case.group is not None and finding != case.group["label"]:
        # Agreeing means the model's label is the finding; anything else would count as agreement in the
        # doctors' agreement figures while saying the opposite.
        raise Conflict(
            f"case {case.id}: the model says {case.group['label'].replace('_', '-')}; agreeing with it "
            f"gives that finding, not {finding.replace('_', '-')}: choose disagree, or the model's finding",
            ErrorCode.CONTRADICTS_MODEL,
        )
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
        from covidscan.service.delivery import queue_deliveries  # delivery builds on this module
        from covidscan.service.monitoring import refresh_site  # monitoring builds on this module

        refresh_site(db, case.site)
        queue_deliveries(db, case, review)  # the signed version goes to each PACS (issue 16 §3)
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


def read_by_model(image: CaseImage) -> bool:
    """Whether the model read ``image``: it gave it a probability, or computed its features and then
    refused it as unlike its training data (images it could not decode or whose quality gate refused them
    have neither)."""
    return image.p_covid is not None or image.features_sha256 is not None


def export_verdicts(
    db: Session, store: BlobStore, *, site: Site | None = None, since: datetime | None = None
) -> str:
    """A manifest CSV ``path,label,patient_id,site`` of signed verdicts, one row per stored original.

    ``label`` is the doctor's finding (``covid``/``non_covid``); indeterminate verdicts are left out.
    Only images the model read are training labels (:func:`read_by_model`): one it could not read
    (unreadable, wrong modality, over its pixel limit, refused by its quality gate) is never exported, nor
    is any image of a case whose prediction failed. An image the model read but refused as unlike its
    training data is exported with the doctor's finding: it stands on its own (a case without any result
    takes only the doctor's own finding, :func:`submit_review`), and such images are what adaptation is for.
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
        for im in filter(read_by_model, case.images):
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
    """Per month of signature: signed cases with a model result, how many the doctor agreed with, and the
    rate (a case without a result has nothing to agree with: it is not counted)."""
    months: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for case, review in signed_latest(db):
        if case.no_result is not None:
            continue
        month = review.signed_at.strftime("%Y-%m")
        months[month][0] += 1
        months[month][1] += int(review.agree)
    return [
        {"month": m, "signed": n, "agreed": a, "agreement": a / n} for m, (n, a) in sorted(months.items())
    ]
