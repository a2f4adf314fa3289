"""The JSON the API reads and answers, as pydantic models (so ``/openapi.json`` documents every answer).

Answers are built from the database rows by the ``from_*`` constructors; a new field is added to a model
and filled there, and every endpoint that returns the model answers with it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from covidscan.service.cases import current_review
from covidscan.service.errors import ErrorCode
from covidscan.service.models import Case, CaseImage, Review, Site
from covidscan.service.sites import reader_first_applies

CaseStatus = Literal["queued", "running", "ready", "failed", "signed"]
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
    def from_image(cls, im: CaseImage) -> ImageOut:
        return cls(
            position=im.position,
            name=im.original_name,
            sha256=im.sha256,
            size=im.size,
            width=im.width,
            height=im.height,
            p_covid=im.p_covid,
            label=im.label,
            uncertain=im.uncertain,
            lungs_found=im.lungs_found,
            warnings=im.warnings or [],
            error=im.error,
            group_id=im.group_id,
            has_cam=im.cam_sha256 is not None,
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


class SiteRef(BaseModel):
    """The site a case came from, as shown beside its result."""

    id: int
    name: str
    status: str = Field(description="The model's standing at this site (see the site's page)")
    reader_first: bool = Field(description="Doctors record their own finding before seeing the model's")

    @classmethod
    def from_site(cls, site: Site) -> SiteRef:
        return cls(id=site.id, name=site.name, status=site.status, reader_first=reader_first_applies(site))


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

    @classmethod
    def from_case(cls, case: Case) -> CaseOut:
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
            group=case.group,
            images=[ImageOut.from_image(im) for im in case.images],
            warnings=sorted({w for im in case.images for w in (im.warnings or [])}),
            review=ReviewOut.from_review(review) if review else None,
            versions=len(case.reviews),
        )


class WorklistItem(BaseModel):
    """One row of the worklist."""

    id: int
    status: CaseStatus
    patient_id: str | None
    site: SiteRef
    n_images: int
    p_covid: float | None = Field(description="The group prediction's p(covid); null until predicted")
    uncertain: bool = Field(description="An image's probability lies in the model's uncertainty band")
    created_at: datetime

    @classmethod
    def from_case(cls, case: Case) -> WorklistItem:
        return cls(
            id=case.id,
            status=case.status,
            patient_id=case.patient_id,
            site=SiteRef.from_site(case.site),
            n_images=len(case.images),
            p_covid=case.group["p_covid"] if case.group else None,
            uncertain=any(im.uncertain for im in case.images),
            created_at=case.created_at,
        )
