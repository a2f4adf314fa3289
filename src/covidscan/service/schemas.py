"""The JSON the API reads and answers, as pydantic models (so ``/openapi.json`` documents every answer).

Answers are built from the database rows by the ``from_*`` constructors; a new field is added to a model
and filled there, and every endpoint that returns the model answers with it.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

from covidscan.evaluation.site import COURSE_FIGURES
from covidscan.service.cases import current_review
from covidscan.service.errors import ErrorCode
from covidscan.service.models import Case, CaseImage, Delivery, Destination, Review, Site, SiteRun, User
from covidscan.service.sites import reader_first_applies

CaseStatus = Literal["queued", "running", "ready", "failed", "signed", "no_result"]
Finding = Literal["covid", "non_covid", "indeterminate"]
Label = Literal["covid", "non_covid"]


class ErrorBody(BaseModel):
    """Every error answer: one line for a person, and a code for a program to branch on."""

    detail: str
    code: ErrorCode


class Health(BaseModel):
    """Liveness: which run predicts (its name and weights digest, never a server path) and the queue."""

    status: Literal["ok", "degraded"]
    run: str | None = Field(description="The active run as NAME@SHA256-PREFIX of its weights; null if none")
    queued: int = Field(description="Cases waiting for or in prediction")
    problem: str | None = Field(None, description="Why the status is degraded (null when ok)")


class CaseCreated(BaseModel):
    """Answer to an upload: the new case and its status (``queued``)."""

    id: int
    status: CaseStatus


class ReviewIn(BaseModel):
    """A doctor's verdict; ``sign`` locks it; changing a signed one needs ``amendment_reason``."""

    agree: bool
    finding: Finding
    comment: str = Field("", max_length=5000)
    sign: bool = False
    amendment_reason: str | None = Field(None, max_length=2000)


class FirstReadIn(BaseModel):
    """A doctor's own finding, recorded before the model's result is shown (reader-first)."""

    finding: Finding


class FirstReadOut(BaseModel):
    """A recorded first read."""

    case: int
    reader: str
    finding: Finding
    created_at: datetime


class ReviewOut(BaseModel):
    """One version of a case's verdict."""

    version: int
    reviewer: str
    agree: bool
    finding: Finding
    comment: str
    signed: bool
    signed_at: datetime | None
    amendment_reason: str | None

    @classmethod
    def from_review(cls, review: Review) -> ReviewOut:
        return cls(
            version=review.version,
            reviewer=review.reviewer.name,
            agree=review.agree,
            finding=review.finding,
            comment=review.comment,
            signed=review.signed_at is not None,
            signed_at=review.signed_at,
            amendment_reason=review.amendment_reason,
        )


class ReviewResult(BaseModel):
    """Answer to a verdict: the case's new status and the version recorded."""

    case: int
    status: CaseStatus
    review: ReviewOut


class ImageOut(BaseModel):
    """One image of a case and the model's answer for it (``error`` when it could not be predicted)."""

    position: int
    name: str = Field(description="The file name as sent (shown escaped; never used as a path)")
    sha256: str
    size: int
    width: int
    height: int
    p_covid: float | None
    label: Label | None
    uncertain: bool | None
    lungs_found: bool | None
    warnings: list[str]
    error: str | None
    group_id: str | None
    has_cam: bool

    @classmethod
    def from_image(cls, im: CaseImage, *, hidden: bool = False) -> ImageOut:
        """``hidden``: without the model's answer (reader-first, before this reader's first read)."""
        return cls(
            position=im.position,
            name=im.original_name,
            sha256=im.sha256,
            size=im.size,
            width=im.width,
            height=im.height,
            p_covid=None if hidden else im.p_covid,
            label=None if hidden else im.label,
            uncertain=None if hidden else im.uncertain,
            lungs_found=im.lungs_found,
            warnings=im.warnings or [],
            error=im.error,
            group_id=im.group_id,
            has_cam=not hidden and im.cam_sha256 is not None,
        )


class GroupPrediction(BaseModel):
    """The case's patient/series-level prediction over its readable images."""

    model_config = ConfigDict(extra="allow")  # stored as JSON: keys of newer versions pass through

    n_images: int
    p_covid: float
    label: Label
    threshold: float


class ModelIdentity(BaseModel):
    """The model that predicted a case: its run, calibration and held-out test figures."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())  # stored JSON; ``model_name`` is ours

    run: str
    model_name: str | None = None
    modality: str | None = None
    covidscan_version: str | None = None
    threshold: float | None = None
    patient_threshold: float | None = None
    temperature: float | None = None
    band: Any = None
    test_metrics: dict[str, Any] = Field(default_factory=dict)
    test_n_images: int | None = None


class Figure(BaseModel):
    """A local figure with its patient-bootstrap 95% CI (``low``/``high`` null where too few to have one)."""

    value: float | None
    low: float | None
    high: float | None

    @classmethod
    def from_entry(cls, entry: dict[str, Any] | None) -> Figure:
        """From a metrics.json-style entry (``value``, ``ci95``) of ``LocalFigures.to_dict()``."""
        entry = entry or {}
        low, high = entry.get("ci95") or (None, None)
        return cls(value=entry.get("value"), low=low, high=high)


class LocalSummary(BaseModel):
    """The serving run's figures on the site's own signed cases (since it serves the site)."""

    n_patients: int
    sensitivity: Figure
    specificity: Figure
    roc_auc: Figure

    @classmethod
    def from_figures(cls, figures: dict[str, Any] | None) -> LocalSummary | None:
        """From ``LocalFigures.to_dict()`` (``Site.local["figures"]``); None when there are none yet."""
        if not figures:
            return None
        metrics = figures.get("metrics", {})
        return cls(
            n_patients=figures["n_patients"],
            **{name: Figure.from_entry(metrics.get(name)) for name in COURSE_FIGURES},
        )


class ShiftSummary(BaseModel):
    """The site's latest shift test: do its images differ from the run's own validation images?"""

    alarm: bool = Field(description="The images differ: the model is not yet validated here (not: wrong)")
    auc: float | None = Field(description="Effect size: how well a classifier tells the two groups apart")
    p_value: float | None
    n_images: int

    @classmethod
    def from_shift(cls, shift: dict[str, Any] | None) -> ShiftSummary | None:
        """From ``Site.shift``; None before the first test (fewer than 30 images)."""
        if not shift:
            return None
        return cls(alarm=shift["alarm"], auc=shift.get("auc"), p_value=shift.get("p_value"),
                   n_images=shift["n_images"])


class SiteRef(BaseModel):
    """The site a case came from, as shown beside its result: its status, local figures and shift test."""

    id: int
    name: str
    status: str = Field(description="The model's standing at this site (see the site's page)")
    reader_first: bool = Field(description="Doctors record their own finding before seeing the model's")
    local: LocalSummary | None = Field(description="The model's figures on this site's signed cases")
    shift: ShiftSummary | None = Field(description="The latest shift test of this site's images")

    @classmethod
    def from_site(cls, site: Site) -> SiteRef:
        return cls(
            id=site.id,
            name=site.name,
            status=site.status,
            reader_first=reader_first_applies(site),
            local=LocalSummary.from_figures((site.local or {}).get("figures")),
            shift=ShiftSummary.from_shift(site.shift),
        )


class CaseOut(BaseModel):
    """A case: status, per-image predictions, group prediction, warnings and the current verdict."""

    id: int
    status: CaseStatus
    patient_id: str | None
    site: SiteRef
    created_at: datetime
    predicted_at: datetime | None
    error: str | None
    model: ModelIdentity | None
    group: GroupPrediction | None
    images: list[ImageOut]
    warnings: list[str] = Field(description="Every image's warnings, once each")
    review: ReviewOut | None = Field(description="The newest version of the verdict (signed or a draft)")
    versions: int = Field(description="How many versions the verdict has (amendments add one each)")
    hidden_until_first_read: bool = Field(
        False,
        description="Reader-first: the model's result (p_covid, label, group, CAM) is withheld until you "
        "record your own finding with POST /api/v1/cases/{id}/first-read",
    )
    first_read: Finding | None = Field(None, description="Your first read of this case, if you made one")
    no_result: str | None = Field(
        None,
        description="Why the model gave this case no usable result (every image unreadable or refused, or "
        "the prediction failed); null when it has one. Such a case takes only your own finding "
        "(agree=false; agreeing is a 409 no_result) and is never a model-agreement statistic",
    )
    deliveries: list[DeliveryOut] = Field(
        default_factory=list, description="The signed versions sent (or being sent) to the PACS destinations"
    )

    @classmethod
    def from_case(cls, case: Case, *, hidden: bool = False, first_read: str | None = None) -> CaseOut:
        """``hidden``: without the model's result (see ``hidden_until_first_read``)."""
        review = current_review(case)
        return cls(
            id=case.id,
            status=case.status,
            patient_id=case.patient_id,
            site=SiteRef.from_site(case.site),
            created_at=case.created_at,
            predicted_at=case.predicted_at,
            error=case.error,
            model=case.model,
            group=None if hidden else case.group,
            images=[ImageOut.from_image(im, hidden=hidden) for im in case.images],
            warnings=sorted({w for im in case.images for w in (im.warnings or [])}),
            review=ReviewOut.from_review(review) if review else None,
            versions=len(case.reviews),
            hidden_until_first_read=hidden,
            first_read=first_read,
            no_result=case.no_result,
            deliveries=[DeliveryOut.from_delivery(d) for d in case.deliveries],
        )


class WorklistItem(BaseModel):
    """One row of the worklist."""

    id: int
    status: CaseStatus
    patient_id: str | None
    site: SiteRef
    n_images: int
    p_covid: float | None = Field(description="The group prediction's p(covid); null until predicted")
    uncertain: bool | None = Field(description="An image's probability lies in the model's uncertainty band")
    created_at: datetime
    hidden_until_first_read: bool = Field(False, description="As in the case: the result waits for your read")
    no_result: str | None = Field(None, description="As in the case: why the model gave it no result")

    @classmethod
    def from_case(cls, case: Case, *, hidden: bool = False) -> WorklistItem:
        return cls(
            id=case.id,
            status=case.status,
            patient_id=case.patient_id,
            site=SiteRef.from_site(case.site),
            n_images=len(case.images),
            p_covid=case.group["p_covid"] if case.group and not hidden else None,
            uncertain=None if hidden else any(im.uncertain for im in case.images),
            created_at=case.created_at,
            hidden_until_first_read=hidden,
            no_result=case.no_result,
        )


class LocalOut(BaseModel):
    """The serving run's figures on a site's signed cases since it serves the site (``LocalFigures``
    dicts: each figure a metrics.json entry with ``value`` and ``ci95``), and on the most recent ones."""

    model_config = ConfigDict(extra="allow")  # stored JSON: keys of newer versions pass through

    since: datetime | None = Field(None, description="Local validation counts from here (the run switch)")
    computed_at: datetime | None = None
    figures: dict[str, Any] | None = None
    recent: dict[str, Any] | None = None


class ShiftOut(ShiftSummary):
    """The latest shift test with its details (effect size CI, level, method, verdict)."""

    computed_at: datetime | None = None
    details: dict[str, Any] | None = None

    @classmethod
    def from_shift(cls, shift: dict[str, Any] | None) -> ShiftOut | None:
        if not shift:
            return None
        return cls(**{k: v for k, v in shift.items() if k in cls.model_fields})


class SiteRunOut(BaseModel):
    """A run trained for one site (challenger) and its out-of-fold comparison with the site's champion."""

    id: int
    run: str | None = Field(description="The run's name (never its server path); null until training starts")
    parent_run: str | None
    state: str = Field(description="training, candidate, promoted, rejected, rolled_back or failed")
    comparison: dict[str, Any] | None = Field(
        description="champion and challenger figures (metrics.json entries) on the same signed cases"
    )
    error: str | None
    created_at: datetime
    promoted_at: datetime | None
    n_patients: int | None

    @classmethod
    def from_run(cls, run: SiteRun) -> SiteRunOut:
        comparison = None
        if run.comparison is not None:  # the stored dict names the run directory: a server path
            comparison = {k: v for k, v in run.comparison.items() if k != "run_dir"}
        return cls(
            id=run.id,
            run=Path(run.run).name or None,
            parent_run=Path(run.parent_run).name if run.parent_run else None,
            state=run.state,
            comparison=comparison,
            error=run.error,
            created_at=run.created_at,
            promoted_at=run.promoted_at,
            n_patients=run.n_patients,
        )


class SiteListItem(SiteRef):
    """A site in the list of sites, with its numbers of cases."""

    n_cases: int
    n_signed: int
    merged_into: int | None = Field(description="The site this one was merged into (it holds no cases)")


class SiteOut(SiteListItem):
    """A site: status, shift test, local figures, rules, reader-first, the run serving it and its runs."""

    status_since: datetime
    reader_first_setting: bool | None = Field(
        description="The admin's choice; null: reader-first unless the site is validated"
    )
    rules: dict[str, Any] = Field(description="The validation rules in force (SiteRules)")
    run: str | None = Field(description="The run serving this site as NAME@SHA256-PREFIX")
    own_run: bool = Field(description="The site has its own (promoted) run rather than the service's")
    run_since: datetime | None
    local_figures: LocalOut | None = Field(description="Full local figures (every figure with its CI)")
    shift_test: ShiftOut | None
    runs: list[SiteRunOut] = Field(description="Challengers trained for this site, newest first")


class SitePatch(BaseModel):
    """An admin's change to a site; fields left out stay as they are (``null`` rules or reader_first: back
    to the defaults)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=1024)
    rules: dict[str, Any] | None = None
    reader_first: bool | None = None


class SiteMerge(BaseModel):
    """Merge this site into another (by id): its cases move there."""

    into: int


class SiteMerged(BaseModel):
    """Answer to a merge: the site that now holds the cases and how many moved."""

    site: SiteOut
    moved: int


class UserOut(BaseModel):
    """An account as admins see it (never its password hash or tokens)."""

    name: str
    role: Literal["admin", "doctor", "submitter"]
    active: bool = Field(description="False: deactivated, cannot log in or use its tokens")
    has_password: bool = Field(description="False: a token-only submitter")
    created_at: datetime

    @classmethod
    def from_user(cls, user: User) -> UserOut:
        return cls(
            name=user.name,
            role=user.role,  # type: ignore[arg-type]
            active=user.active,
            has_password=user.password_hash is not None,
            created_at=user.created_at,
        )


class AccessChanged(BaseModel):
    """Answer to an account action: the account as it is now and what the action ended."""

    user: UserOut
    tokens_revoked: int = Field(description="API tokens revoked by this action")
    sessions_ended: int = Field(description="Browser sessions ended by this action")


class PasswordIn(BaseModel):
    """An admin's new password for an account (checked against the password policy)."""

    model_config = ConfigDict(extra="forbid")

    password: str = Field(max_length=1024)


class PasswordChangeIn(BaseModel):
    """Your own new password, with the current one (a stolen session alone cannot change it)."""

    model_config = ConfigDict(extra="forbid")

    current_password: str = Field(max_length=1024)
    new_password: str = Field(max_length=1024)


class WorklistOut(BaseModel):
    """One page of the worklist (offset paging): its rows, and how many cases match in all."""

    items: list[WorklistItem]
    total: int = Field(description="Cases matching the filters and search, on every page together")
    offset: int = Field(description="Cases skipped before this page")
    limit: int = Field(description="The most rows a page holds; the next page starts at offset + limit")


# issue 16 §3: PACS destinations and deliveries
DestinationKind = Literal["dicom", "stow"]
DeliveryState = Literal["queued", "sending", "sent", "failed", "superseded"]


class DestinationIn(BaseModel):
    """A PACS to send signed results to: a DICOM node (C-STORE) or a DICOMweb server (STOW-RS).
    Credentials are stored as given (plain text in the database)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=64, description="Unique, shown on case pages and in the audit log")
    kind: DestinationKind = Field(description="dicom: C-STORE to host/port/AE title; stow: STOW-RS to url")
    host: str | None = Field(None, max_length=255, description="dicom: the PACS's host name or address")
    port: int | None = Field(None, description="dicom: its DICOM port")
    called_ae: str | None = Field(None, max_length=16, description="dicom: the PACS's AE title")
    calling_ae: str | None = Field(
        None, max_length=16, description="dicom: covidscan's AE title in the PACS (default COVIDSCAN)"
    )
    url: str | None = Field(None, max_length=2048, description="stow: the DICOMweb root (POST {url}/studies)")
    bearer_token: str | None = Field(None, max_length=4096, description="stow: sent as Authorization: Bearer")
    basic_user: str | None = Field(None, max_length=255, description="stow: HTTP basic authentication")
    basic_password: str | None = Field(None, max_length=4096)
    active: bool = Field(True, description="Only active destinations are sent to")


class DestinationPatch(BaseModel):
    """The fields of a destination to change (those left out keep their values)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=64)
    kind: DestinationKind | None = None
    host: str | None = Field(None, max_length=255)
    port: int | None = None
    called_ae: str | None = Field(None, max_length=16)
    calling_ae: str | None = Field(None, max_length=16)
    url: str | None = Field(None, max_length=2048)
    bearer_token: str | None = Field(None, max_length=4096)
    basic_user: str | None = Field(None, max_length=255)
    basic_password: str | None = Field(None, max_length=4096)
    active: bool | None = None


class DestinationOut(BaseModel):
    """A destination as shown: its settings, never its secrets."""

    id: int
    name: str
    kind: DestinationKind
    host: str | None
    port: int | None
    called_ae: str | None
    calling_ae: str | None
    url: str | None
    auth: Literal["none", "bearer", "basic"] = Field(description="How covidscan logs in (STOW-RS)")
    basic_user: str | None
    active: bool
    created_at: datetime

    @classmethod
    def from_destination(cls, dest: Destination) -> DestinationOut:
        from covidscan.service.delivery import auth_kind

        fields = ("id", "name", "kind", "host", "port", "called_ae", "calling_ae", "url", "basic_user")
        return cls(
            **{f: getattr(dest, f) for f in fields},
            auth=auth_kind(dest),
            active=dest.active,
            created_at=dest.created_at,
        )


class DestinationCheckOut(BaseModel):
    """What a destination answered to a C-ECHO (DICOM) or a QIDO-RS search (STOW-RS)."""

    ok: bool
    detail: str


class DeliveryOut(BaseModel):
    """One signed version of a case sent to one destination."""

    id: int
    destination: str = Field(description="The destination's name (kept when it was deleted since)")
    destination_id: int | None = Field(description="null once the destination was deleted")
    review_version: int = Field(description="The verdict's version that is sent")
    state: DeliveryState = Field(
        description="queued (waiting for its next attempt), sending, sent, failed (after its last retry), "
        "superseded (a newer version was signed before it went out)"
    )
    attempts: int
    next_attempt_at: datetime | None = Field(description="When it is tried again (queued only)")
    last_error: str | None
    sop_instance_uids: list[str] = Field(description="What the destination accepted")
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None

    @classmethod
    def from_delivery(cls, d: Delivery) -> DeliveryOut:
        return cls(
            id=d.id,
            destination=d.destination_name,
            destination_id=d.destination_id,
            review_version=d.review_version,
            state=d.state,
            attempts=d.attempts,
            next_attempt_at=d.next_attempt_at if d.state == "queued" else None,
            last_error=d.last_error,
            sop_instance_uids=d.sent_uids or [],
            created_at=d.created_at,
            updated_at=d.updated_at,
            sent_at=d.sent_at,
        )


CaseOut.model_rebuild()  # its ``deliveries`` refer to DeliveryOut, defined after it


class DicomAttribute(BaseModel):
    """One attribute of a data set in the DICOM JSON model (PS3.18 F.2): its VR and its values."""

    model_config = ConfigDict(extra="allow")  # BulkDataURI or InlineBinary instead of Value

    vr: str = Field(description="Value representation, e.g. UI, DA, PN, SQ")
    Value: list[Any] | None = Field(None, description="The values (absent when the attribute is empty)")


class DicomJsonObject(RootModel[dict[str, DicomAttribute]]):
    """A data set in the DICOM JSON model (``application/dicom+json``), keyed by tag, e.g. ``0020000D``."""
