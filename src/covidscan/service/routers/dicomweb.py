"""DICOMweb (PS3.18): STOW-RS to send images, QIDO-RS to find them, WADO-RS to read them back.

``POST /dicomweb/studies`` takes ``multipart/related; type="application/dicom"`` from a submitter (bearer
token); each instance is checked as the DICOM listener checks it, and each series in the request becomes a
case at once (a request is complete: no quiet period). The answer lists the stored instances
(ReferencedSOPSequence) and the refused ones with their FailureReason (FailedSOPSequence): 200 when all
were stored, 202 when some were, 409 when none; a ``Warning`` header per refusal says why in words.

QIDO-RS and WADO-RS show the DICOM images of the cases the caller may see (a submitter its own, doctors
and admins all), from the identifiers stored with each case image; PatientID is the case's patient id.
"""

from __future__ import annotations

import io
import secrets
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import pydicom
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy import select
from sqlalchemy.orm import Session

from covidscan.service.api import ERRORS, wake_worker
from covidscan.service.audit import record
from covidscan.service.cases import visible_cases
from covidscan.service.deps import CurrentUser, SessionDep, SessionRoute, SettingsDep, StoreDep, SubmitterUser
from covidscan.service.dicom_in import (
    OUT_OF_RESOURCES,
    Instance,
    InstanceRefused,
    check_instance,
    create_series_case,
    served_modality,
)
from covidscan.service.errors import ErrorCode, NotFound, StorageFull, UnsupportedMediaType, UploadRejected
from covidscan.service.models import Case, CaseImage, User
from covidscan.service.schemas import DicomJsonObject, ErrorBody
from covidscan.service.storage import BlobStore

STOW_SCHEMA = f"#/components/schemas/{DicomJsonObject.__name__}"
# Errors are JSON (ErrorBody) whatever the route's own media type, which a "model" entry would take.
ERROR_BODY = {"application/json": {"schema": {"$ref": f"#/components/schemas/{ErrorBody.__name__}"}}}
router = APIRouter(
    route_class=SessionRoute,
    prefix="/dicomweb",
    tags=["dicomweb"],
    responses={status: {"description": "Error", "content": ERROR_BODY} for status in [*ERRORS, 415]},
)
DICOM_JSON = "application/dicom+json"
STUDY_HEADER = ("PatientName", "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription")
SERIES_HEADER = ("Modality", "SeriesNumber", "SeriesDescription")
INSTANCE_HEADER = ("InstanceNumber", "Rows", "Columns")
Uid = Annotated[str, Path(max_length=64, pattern=r"^[0-9.]+$", description="A DICOM UID")]


class DicomJSONResponse(JSONResponse):
    """JSON in the DICOM JSON model (PS3.18 F.2)."""

    media_type = DICOM_JSON


class DicomFilesResponse(StreamingResponse):
    """DICOM Part 10 files, one part each: ``multipart/related; type="application/dicom"``."""

    media_type = 'multipart/related; type="application/dicom"'


# ------------------------------------------------------------------ STOW-RS
@dataclass(frozen=True)
class StowBody:
    """A STOW-RS request body as received, with the multipart boundary of its content type."""

    boundary: bytes
    data: bytes

    def parts(self) -> list[bytes]:
        """The body's parts (CPU-bound: called in the route's worker thread, not on the event loop)."""
        parts: list[bytearray] = []
        parser = MultipartParser(
            self.boundary,
            {
                "on_part_begin": lambda: parts.append(bytearray()),
                "on_part_data": lambda data, start, end: parts[-1].extend(data[start:end]),
            },
        )
        parser.write(self.data)
        parser.finalize()
        if not parts:
            raise UploadRejected(
                "body", "no DICOM parts in the request; attach at least one", ErrorCode.NO_FILES
            )
        return [bytes(p) for p in parts]


async def stow_body(request: Request) -> StowBody:
    """The body of a ``multipart/related; type="application/dicom"`` request (415 for another type, 413
    past the upload limit also without a Content-Length)."""
    media, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if media != b"multipart/related" or options.get(b"type", b"application/dicom") != b"application/dicom":
        raise UnsupportedMediaType(
            f'send multipart/related; type="application/dicom" (DICOM Part 10 files), not {media.decode()!r}'
        )
    if not boundary:
        raise UnsupportedMediaType("the multipart/related content type has no boundary parameter")
    chunks, total, limit = [], 0, request.app.state.settings.max_upload_bytes
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise UploadRejected(
                "body", f"request too large: at most {limit} bytes", ErrorCode.UPLOAD_TOO_LARGE
            )
        chunks.append(chunk)
    return StowBody(boundary, b"".join(chunks))


@dataclass
class _Outcome:
    """What became of one part of a STOW request."""

    sop_class: str | None
    sop: str | None
    instance: Instance | None = None
    failure: int | None = None
    reason: str = ""


def _outcome(data: bytes, modality: str | None, max_pixels: int) -> _Outcome:
    try:
        instance = check_instance(data, modality=modality, max_pixels=max_pixels)
    except InstanceRefused as exc:
        try:
            head = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            sop_class, sop = head.get("SOPClassUID"), head.get("SOPInstanceUID")
        except Exception:  # not DICOM at all: the failure is reported without its UIDs
            sop_class = sop = None
        return _Outcome(sop_class and str(sop_class), sop and str(sop), failure=exc.status, reason=exc.reason)
    return _Outcome(instance.tag("SOPClassUID"), instance.sop_uid, instance=instance)


def _item(**attrs: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in attrs.items():
        if value is not None:
            setattr(ds, keyword, value)
    return ds


@router.post(
    "/studies",
    response_class=DicomJSONResponse,
    response_model=DicomJsonObject,
    responses={
        status: {"description": what, "content": {DICOM_JSON: {"schema": {"$ref": STOW_SCHEMA}}}}
        for status, what in [(202, "Some instances stored, some refused"), (409, "No instance stored")]
    },
)
def stow(
    request: Request,
    db: SessionDep,
    who: SubmitterUser,
    store: StoreDep,
    settings: SettingsDep,
    body: Annotated[StowBody, Depends(stow_body)],
) -> DicomJSONResponse:
    """STOW-RS: store DICOM instances; each series becomes a case (submitters and admins)."""
    modality = served_modality(db)
    db.commit()  # decoding happens outside any transaction (SQLite's write lock)
    outcomes = [_outcome(data, modality, settings.max_pixels) for data in body.parts()]
    series: dict[str, list[_Outcome]] = defaultdict(list)
    for item in outcomes:
        if item.instance is not None:
            series[item.instance.series_uid].append(item)
    for members in series.values():
        try:
            create_series_case(db, store, who.user, [m.instance for m in members if m.instance])
            db.commit()
        except StorageFull as exc:
            db.rollback()
            for m in members:
                m.instance, m.failure, m.reason = None, OUT_OF_RESOURCES, str(exc)
    if series:
        wake_worker(request)
    base = str(request.base_url).rstrip("/") + "/dicomweb/studies"
    stored = [
        _item(
            ReferencedSOPClassUID=o.sop_class,
            ReferencedSOPInstanceUID=o.sop,
            RetrieveURL=f"{base}/{o.instance.study_uid}/series/{o.instance.series_uid}/instances/{o.sop}",
        )
        for o in outcomes
        if o.instance is not None
    ]
    failed = [o for o in outcomes if o.instance is None]
    answer = Dataset()
    studies = {o.instance.study_uid for o in outcomes if o.instance is not None}
    if len(studies) == 1:
        answer.RetrieveURL = f"{base}/{studies.pop()}"
    if stored:
        answer.ReferencedSOPSequence = stored
    if failed:
        answer.FailedSOPSequence = [
            _item(ReferencedSOPClassUID=o.sop_class, ReferencedSOPInstanceUID=o.sop, FailureReason=o.failure)
            for o in failed
        ]
    status = 409 if not stored else 202 if failed else 200
    warnings = [f'299 covidscan "{o.sop or "part"}: {_header_text(o.reason)}"' for o in failed[:20]]
    response = DicomJSONResponse(answer.to_json_dict(), status_code=status)
    for warning in warnings:
        response.headers.append("Warning", warning)
    return response


def _header_text(reason: str) -> str:
    """A reason fit for an HTTP header's quoted string: printable ASCII without quotes, one line."""
    text = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else " " for c in reason)
    return text[:300]


# ------------------------------------------------------------------ QIDO-RS
@dataclass(frozen=True)
class _Held:
    """A DICOM image of a visible case: its identifiers, file and case."""

    study: str
    series: str
    sop: str
    sop_class: str
    sha256: str
    case_id: int
    patient_id: str | None


def _held(
    db: Session,
    user: User,
    *,
    study: str | None = None,
    series: str | None = None,
    sop: str | None = None,
    patient_id: str | None = None,
) -> list[_Held]:
    """The DICOM images ``user`` may see, newest copy of each SOP instance only, in study, series, case
    and position order."""
    query = (
        select(CaseImage, Case.patient_id)
        .join(Case, Case.id == CaseImage.case_id)
        .where(CaseImage.sop_uid.is_not(None), Case.id.in_(visible_cases(user).with_only_columns(Case.id)))
        .order_by(CaseImage.id)
    )
    for column, value in (
        (CaseImage.study_uid, study),
        (CaseImage.series_uid, series),
        (CaseImage.sop_uid, sop),
        (Case.patient_id, patient_id),
    ):
        if value is not None:
            query = query.where(column == value)
    newest: dict[str, _Held] = {}
    for image, patient in db.execute(query):
        newest[image.sop_uid] = _Held(
            image.study_uid or "",
            image.series_uid or "",
            image.sop_uid,
            image.sop_class_uid or "",
            image.sha256,
            image.case_id,
            patient,
        )
    return sorted(newest.values(), key=lambda h: (h.study, h.series, h.case_id))


def _header(store: BlobStore, held: _Held, keywords: tuple[str, ...]) -> Dataset:
    """Some attributes of a stored file, read without its pixel data."""
    return pydicom.dcmread(store.path(held.sha256), stop_before_pixels=True, specific_tags=list(keywords))


def _copy(target: Dataset, source: Dataset, keywords: tuple[str, ...]) -> None:
    for keyword in keywords:
        if keyword in source:
            setattr(target, keyword, source[keyword].value)


def _filters(request: Request, *names: tuple[str, str]) -> dict[str, str | None]:
    """QIDO match parameters by keyword or tag (``PatientID`` or ``00100020``); empty means no filter."""
    params = request.query_params
    return {keyword: (params.get(keyword) or params.get(tag) or None) for keyword, tag in names}


def _page(request: Request, rows: list[Any]) -> list[Any]:
    """QIDO's ``offset`` and ``limit``."""

    def number(name: str) -> int | None:
        value = request.query_params.get(name, "")
        return int(value) if value.isdigit() else None

    offset = number("offset") or 0
    limit = number("limit")
    return rows[offset : offset + limit if limit is not None else None]


def _json(datasets: list[Dataset]) -> DicomJSONResponse:
    return DicomJSONResponse([ds.to_json_dict() for ds in datasets])


@router.get("/studies", response_class=DicomJSONResponse, response_model=list[DicomJsonObject])
def search_studies(request: Request, db: SessionDep, who: CurrentUser, store: StoreDep) -> DicomJSONResponse:
    """QIDO-RS: the studies you may see (match ``PatientID``, ``StudyInstanceUID``; ``offset``, ``limit``)."""
    match = _filters(request, ("PatientID", "00100020"), ("StudyInstanceUID", "0020000D"))
    held = _held(db, who.user, study=match["StudyInstanceUID"], patient_id=match["PatientID"])
    studies: dict[str, list[_Held]] = defaultdict(list)
    for h in held:
        studies[h.study].append(h)
    answers = []
    for study, images in _page(request, list(studies.items())):
        first_of_series = {h.series: h for h in reversed(images)}
        ds = Dataset()
        _copy(ds, _header(store, images[0], STUDY_HEADER), STUDY_HEADER)
        ds.StudyInstanceUID, ds.PatientID = study, images[-1].patient_id or ""
        modalities = {
            str(_header(store, h, ("Modality",)).get("Modality", "")) for h in first_of_series.values()
        }
        ds.ModalitiesInStudy = sorted(m for m in modalities if m)
        ds.NumberOfStudyRelatedSeries = len(first_of_series)
        ds.NumberOfStudyRelatedInstances = len(images)
        ds.RetrieveURL = f"{str(request.base_url).rstrip('/')}/dicomweb/studies/{study}"
        answers.append(ds)
    return _json(answers)


@router.get("/studies/{study}/series", response_class=DicomJSONResponse, response_model=list[DicomJsonObject])
def search_series(
    request: Request, db: SessionDep, who: CurrentUser, store: StoreDep, study: Uid
) -> DicomJSONResponse:
    """QIDO-RS: the series of a study (match ``SeriesInstanceUID``, ``Modality``)."""
    match = _filters(request, ("SeriesInstanceUID", "0020000E"), ("Modality", "00080060"))
    series: dict[str, list[_Held]] = defaultdict(list)
    for h in _held(db, who.user, study=study, series=match["SeriesInstanceUID"]):
        series[h.series].append(h)
    answers = []
    for uid, images in series.items():
        ds = Dataset()
        _copy(ds, _header(store, images[0], SERIES_HEADER), SERIES_HEADER)
        if match["Modality"] is not None and ds.get("Modality") != match["Modality"]:
            continue
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, uid
        ds.NumberOfSeriesRelatedInstances = len(images)
        ds.RetrieveURL = f"{str(request.base_url).rstrip('/')}/dicomweb/studies/{study}/series/{uid}"
        answers.append(ds)
    return _json(_page(request, answers))


@router.get(
    "/studies/{study}/series/{series}/instances",
    response_class=DicomJSONResponse,
    response_model=list[DicomJsonObject],
)
def search_instances(
    request: Request, db: SessionDep, who: CurrentUser, store: StoreDep, study: Uid, series: Uid
) -> DicomJSONResponse:
    """QIDO-RS: the instances of a series (match ``SOPInstanceUID``), in InstanceNumber order."""
    match = _filters(request, ("SOPInstanceUID", "00080018"))
    answers = []
    for h in _held(db, who.user, study=study, series=series, sop=match["SOPInstanceUID"]):
        ds = Dataset()
        _copy(ds, _header(store, h, INSTANCE_HEADER), INSTANCE_HEADER)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID, ds.SOPClassUID = h.sop, h.sop_class
        ds.RetrieveURL = (
            f"{str(request.base_url).rstrip('/')}/dicomweb/studies/{study}/series/{series}/instances/{h.sop}"
        )
        answers.append(ds)
    answers.sort(key=lambda ds: int(ds.get("InstanceNumber") or 2**31))
    return _json(_page(request, answers))


# ------------------------------------------------------------------ WADO-RS
def _multipart(parts: Iterator[tuple[str, bytes]], kind: str) -> DicomFilesResponse:
    """``multipart/related; type=kind`` of (content type, bytes) parts, produced while sending."""
    boundary = secrets.token_hex(16)

    def body() -> Iterator[bytes]:
        for content_type, data in parts:
            yield f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode()
            yield data
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    return DicomFilesResponse(body(), media_type=f'multipart/related; type="{kind}"; boundary={boundary}')


def _visible(db: Session, who: Any, what: str, *, audit: bool = True, **where: str) -> list[_Held]:
    """The images a retrieval asks for (404 when the caller may see none); each case's view is audited."""
    held = _held(db, who.user, **where)
    if not held:
        raise NotFound(f"no {what} you may see")
    if audit:
        for case_id in sorted({h.case_id for h in held}):
            record(db, "view", actor=who.user.name, target=f"case:{case_id}", via="wado-rs")
    return held


def _files(store: BlobStore, held: list[_Held]) -> DicomFilesResponse:
    """The stored files, as received (read one at a time while sending)."""
    return _multipart((("application/dicom", store.read(h.sha256)) for h in held), "application/dicom")


@router.get("/studies/{study}", response_class=DicomFilesResponse)
def retrieve_study(db: SessionDep, who: CurrentUser, store: StoreDep, study: Uid) -> DicomFilesResponse:
    """WADO-RS: every instance of a study you may see, as stored."""
    return _files(store, _visible(db, who, f"study {study}", study=study))


@router.get("/studies/{study}/series/{series}", response_class=DicomFilesResponse)
def retrieve_series(
    db: SessionDep, who: CurrentUser, store: StoreDep, study: Uid, series: Uid
) -> DicomFilesResponse:
    """WADO-RS: every instance of a series, as stored."""
    return _files(store, _visible(db, who, f"series {series}", study=study, series=series))


@router.get("/studies/{study}/series/{series}/instances/{sop}", response_class=DicomFilesResponse)
def retrieve_instance(
    db: SessionDep, who: CurrentUser, store: StoreDep, study: Uid, series: Uid, sop: Uid
) -> DicomFilesResponse:
    """WADO-RS: one instance, as stored."""
    return _files(store, _visible(db, who, f"instance {sop}", study=study, series=series, sop=sop))


def _metadata(request: Request, store: BlobStore, held: list[_Held]) -> DicomJSONResponse:
    """Each instance's attributes without its pixel data, which is a BulkDataURI to its frame (what a
    DICOMweb viewer such as OHIF reads before asking for the pixels)."""
    base = str(request.base_url).rstrip("/") + "/dicomweb/studies"
    answers = []
    for h in held:
        ds = pydicom.dcmread(store.path(h.sha256), stop_before_pixels=True)
        attributes = ds.to_json_dict(bulk_data_threshold=2**20)
        frames = f"{base}/{h.study}/series/{h.series}/instances/{h.sop}/frames/1"
        attributes["7FE00010"] = {"vr": "OW", "BulkDataURI": frames}
        answers.append(attributes)
    return DicomJSONResponse(answers)


@router.get(
    "/studies/{study}/metadata", response_class=DicomJSONResponse, response_model=list[DicomJsonObject]
)
def study_metadata(
    request: Request, db: SessionDep, who: CurrentUser, store: StoreDep, study: Uid
) -> DicomJSONResponse:
    """WADO-RS: the metadata of every instance of a study (pixel data by BulkDataURI)."""
    return _metadata(request, store, _visible(db, who, f"study {study}", study=study))


@router.get(
    "/studies/{study}/series/{series}/metadata",
    response_class=DicomJSONResponse,
    response_model=list[DicomJsonObject],
)
def series_metadata(
    request: Request, db: SessionDep, who: CurrentUser, store: StoreDep, study: Uid, series: Uid
) -> DicomJSONResponse:
    """WADO-RS: the metadata of every instance of a series (pixel data by BulkDataURI)."""
    return _metadata(request, store, _visible(db, who, f"series {series}", study=study, series=series))


@router.get(
    "/studies/{study}/series/{series}/instances/{sop}/frames/{frames}", response_class=DicomFilesResponse
)
def retrieve_frames(
    db: SessionDep,
    who: CurrentUser,
    store: StoreDep,
    study: Uid,
    series: Uid,
    sop: Uid,
    frames: Annotated[str, Path(max_length=64, pattern=r"^[0-9]+(,[0-9]+)*$")],
) -> DicomFilesResponse:
    """WADO-RS: an instance's frame as uncompressed pixel values (explicit VR little endian); the
    instances held here are single-frame, so the only frame is 1."""
    wanted = [int(f) for f in frames.split(",")]
    (held,) = _visible(db, who, f"instance {sop}", audit=False, study=study, series=series, sop=sop)
    if any(f != 1 for f in wanted):
        raise NotFound(f"instance {sop} has one frame (1); asked for {frames}")
    ds = pydicom.dcmread(store.path(held.sha256))
    plain = ds.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    pixels = ds.PixelData if plain else ds.pixel_array.tobytes()  # decoded where it came compressed
    kind = f"application/octet-stream; transfer-syntax={ExplicitVRLittleEndian}"
    return _multipart(((kind, pixels) for _ in wanted), "application/octet-stream")
