"""What every result record of a case is written from: one frozen :class:`CaseRecord`, read once.

:func:`gather` reads a case, its images (the DICOM headers from the stored originals), the model's result,
the current verdict and its history, the site's standing and the run's intended use; the writers
(:mod:`.sr`, :mod:`.sc`, :mod:`.pdf`, :mod:`.fhir`) are pure functions of that object. UIDs are derived
from the case's content and its report version (:func:`CaseRecord.uid`), so writing the same version again
gives the same instances.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload, selectinload

from covidscan.errors import CovidscanError
from covidscan.evaluation.model_card import intended_use
from covidscan.service.cases import current_review
from covidscan.service.errors import Conflict, ErrorCode, NotFound
from covidscan.service.models import Case, Review
from covidscan.service.schemas import SiteRef
from covidscan.service.storage import BlobStore

CAM_OPACITY = 0.6  # the heat layer's weight over the image: the case page viewer's default opacity
NOT_A_DIAGNOSIS = "This result is not a diagnosis on its own."
_REFERENCE_TAGS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")


@dataclass(frozen=True)
class Verdict:
    """One version of the doctor's verdict."""

    version: int
    agree: bool
    finding: str  # one of covidscan.service.models.FINDINGS
    comment: str
    doctor: str
    signed_at: datetime | None
    amendment_reason: str | None

    @classmethod
    def from_review(cls, review: Review) -> Verdict:
        return cls(
            review.version,
            review.agree,
            review.finding,
            review.comment,
            review.reviewer.name,
            review.signed_at,
            review.amendment_reason,
        )


@dataclass(frozen=True)
class SourceImage:
    """One image of the case: what the model said about it, its display PNG, its Grad-CAM heat layer and,
    for a DICOM original that names its instance, its header (without pixel data)."""

    position: int
    name: str
    p_covid: float | None
    label: str | None
    uncertain: bool | None
    warnings: tuple[str, ...]
    error: str | None
    display_png: bytes
    cam_png: bytes | None
    dicom: Dataset | None

    def overlay(self) -> np.ndarray | None:
        """RGB uint8 (H, W, 3): the heat layer laid over the display image as the viewer shows it; None
        for an image without a Grad-CAM."""
        if self.cam_png is None:
            return None
        base = Image.open(io.BytesIO(self.display_png)).convert("RGBA")
        heat = (
            Image.open(io.BytesIO(self.cam_png)).convert("RGBA").resize(base.size, Image.Resampling.BILINEAR)
        )
        alpha = np.asarray(heat.getchannel("A"), np.float32) * CAM_OPACITY
        heat.putalpha(Image.fromarray(alpha.astype(np.uint8)))
        return np.asarray(Image.alpha_composite(base, heat).convert("RGB"))


@dataclass(frozen=True)
class ModelInfo:
    """The model that predicted the case (:meth:`covidscan.service.scoring.Scorer.identity`)."""

    run: str
    model_name: str
    modality: str  # ct or cxr
    covidscan_version: str
    weights_sha256: str | None
    threshold: float | None
    band: float | None
    intended_use: tuple[str, ...]  # the run's model card, section "Intended use" (Markdown paragraphs)


@dataclass(frozen=True)
class CaseRecord:
    """Everything a result record of one case says, as of its current verdict version."""

    case_id: int
    patient_id: str | None
    created_at: datetime
    site: SiteRef
    images: tuple[SourceImage, ...]
    p_covid: float
    label: str
    group_threshold: float
    model: ModelInfo
    verdict: Verdict | None  # the newest version (signed or a draft); None before any verdict
    history: tuple[Verdict, ...]  # the earlier versions, oldest first
    identity: str  # what makes this case unique beyond this installation (its images' digests)

    @property
    def signed(self) -> bool:
        return self.verdict is not None and self.verdict.signed_at is not None

    @property
    def amended(self) -> bool:
        return self.signed and self.verdict.amendment_reason is not None

    @property
    def version(self) -> int:
        """The verdict's version number; 0 before any verdict."""
        return self.verdict.version if self.verdict else 0

    @property
    def version_key(self) -> str:
        """What the records' UIDs depend on: a signed version, or a draft's content (a draft is edited in
        place, and an edited draft is another preliminary record), or the model's result alone."""
        if self.verdict is None:
            return "model"
        if self.signed:
            return f"v{self.version}-signed"
        draft = json.dumps([self.verdict.agree, self.verdict.finding, self.verdict.comment])
        return f"v{self.version}-draft-{hashlib.sha256(draft.encode()).hexdigest()[:16]}"

    @property
    def finding(self) -> str:
        """The finding the records state: the doctor's (signed or draft), else the model's label."""
        return self.verdict.finding if self.verdict else self.label

    @property
    def uncertain(self) -> bool:
        """Whether any image's probability lies in the run's uncertainty band around its threshold."""
        return any(im.uncertain for im in self.images)

    @property
    def warnings(self) -> tuple[str, ...]:
        """Every image's warnings, once each, in order."""
        return tuple(dict.fromkeys(w for im in self.images for w in im.warnings))

    @property
    def dicom_sources(self) -> tuple[Dataset, ...]:
        """The headers of the images that are DICOM instances (they can be referenced)."""
        return tuple(im.dicom for im in self.images if im.dicom is not None)

    def uuid(self, *parts: object) -> uuid.UUID:
        """A name-based UUID for this case and ``parts`` (SHA-256 of them): the same every time."""
        name = "\0".join(["covidscan", self.identity, *map(str, parts)])
        return uuid.UUID(bytes=hashlib.sha256(name.encode()).digest()[:16], version=5)

    def uid(self, *parts: object) -> str:
        """A DICOM UID for this case and ``parts``: ``2.25.`` and :meth:`uuid` (PS3.5 B.2)."""
        return f"2.25.{self.uuid(*parts).int}"

    def versioned_uid(self, *parts: object) -> str:
        """A UID of this report version (a new verdict version, a new instance)."""
        return self.uid(self.version_key, *parts)


def _dicom_header(path: Path) -> Dataset | None:
    """The header of a stored DICOM original when it names its instance (else it cannot be referenced)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, ValueError, EOFError, OSError):
        return None
    return ds if all(ds.get(tag) for tag in _REFERENCE_TAGS) else None


def _checkpoint_weights(run_dir: str | None) -> str | None:
    """The weights' SHA-256 from a run's checkpoint.json (cases predicted before the identity held it)."""
    try:
        return json.loads((Path(run_dir) / "checkpoint.json").read_text())["weights_sha256"]
    except (TypeError, OSError, ValueError, KeyError):
        return None


def _intended_use(run_dir: str | None) -> tuple[str, ...]:
    try:
        return tuple(intended_use(run_dir)) if run_dir else ()
    except CovidscanError:  # the run's folder moved or was damaged since: the record says so
        return ()


def gather(session: Session, case_id: int, store: BlobStore) -> CaseRecord:
    """The :class:`CaseRecord` of ``case_id`` (the caller checked that its user may see it).

    Raises 404 for an unknown case and a 409 while there is no model result to report: ``not_ready``
    while it is queued or running, ``no_result`` when the model gave it none (then only the doctor's own
    finding exists, which these records, built around the model's result, do not carry).
    """
    case = (
        session.scalars(
            select(Case)
            .where(Case.id == case_id)
            .options(
                joinedload(Case.images),
                selectinload(Case.reviews).selectinload(Review.reviewer),
                selectinload(Case.site),
            )
        )
        .unique()
        .first()
    )
    if case is None:
        raise NotFound(f"no case {case_id}; give the id of an existing case (the worklist lists them)")
    if case.status in ("queued", "running"):
        raise Conflict(
            f"case {case_id} is {case.status}: ask again once it is predicted (its status then says ready)",
            ErrorCode.NOT_READY,
        )
    if case.group is None:
        raise Conflict(
            f"case {case_id} has no model result ({case.no_result}); its verdict is on the case page, and "
            "these records, built around the model's result, are not written for it",
            ErrorCode.NO_RESULT,
        )
    images = tuple(
        SourceImage(
            position=im.position,
            name=im.original_name,
            p_covid=im.p_covid,
            label=im.label,
            uncertain=im.uncertain,
            warnings=tuple(im.warnings or ()),
            error=im.error,
            display_png=store.read(im.display_sha256),
            cam_png=store.read(im.cam_sha256) if im.cam_sha256 else None,
            dicom=_dicom_header(store.path(im.sha256)) if im.suffix == ".dcm" else None,
        )
        for im in case.images
    )
    m: dict[str, Any] = case.model or {}
    latest = current_review(case)
    return CaseRecord(
        case_id=case.id,
        patient_id=case.patient_id,
        created_at=case.created_at,
        site=SiteRef.from_site(case.site),
        images=images,
        p_covid=float(case.group["p_covid"]),
        label=case.group["label"],
        group_threshold=float(case.group["threshold"]),
        model=ModelInfo(
            run=m.get("run") or Path(case.run or "unknown").name,
            model_name=m.get("model_name") or "unknown",
            modality=m.get("modality") or "ct",
            covidscan_version=m.get("covidscan_version") or "unknown",
            weights_sha256=m.get("weights_sha256") or _checkpoint_weights(case.run),
            threshold=m.get("threshold"),
            band=m.get("band"),
            intended_use=_intended_use(case.run),
        ),
        verdict=Verdict.from_review(latest) if latest else None,
        history=tuple(Verdict.from_review(r) for r in case.reviews[:-1]),
        identity=":".join([str(case.id), case.created_at.isoformat(), *(im.sha256 for im in case.images)]),
    )


def plain(markdown: str) -> str:
    """Markdown emphasis and code marks removed (the model card's text, for records that are not HTML)."""
    return re.sub(r"\*+|`", "", markdown)


FINDING_WORDS = {"covid": "COVID-19", "non_covid": "not COVID-19", "indeterminate": "indeterminate"}


def _figure(name: str, figure: Any) -> str:
    if figure.value is None:
        return f"{name} not yet measurable"
    ci = f" (95% CI {figure.low:.2f}–{figure.high:.2f})" if figure.low is not None else ""
    return f"{name} {figure.value:.2f}{ci}"


def site_summary(site: SiteRef) -> str:
    """One sentence on the model's standing at the case's site: status, local figures, shift alarm."""
    parts = [f"site {site.name}: {site.status}"]
    if site.local is None:
        parts.append("no local validation figures yet (no signed cases of this site)")
    else:
        figures = ", ".join(_figure(n, getattr(site.local, n)) for n in ("sensitivity", "specificity"))
        parts.append(f"local validation on {site.local.n_patients} signed patient(s): {figures}")
    if site.shift is not None and site.shift.alarm:
        parts.append("its images differ from the model's training images (shift alarm)")
    return "; ".join(parts)


def status_words(record: CaseRecord) -> str:
    """The record's standing as printed on it."""
    if not record.signed:
        return "NOT SIGNED — preliminary"
    return f"AMENDED (version {record.version})" if record.amended else "SIGNED"
