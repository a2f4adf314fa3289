"""DICOM in, shared by the DICOM listener (C-STORE) and DICOMweb (STOW-RS): the check of one received
instance, which ends in a DICOM failure status when it fails; the account the listener's cases belong to;
and a series of checked instances made into one case through :func:`covidscan.service.cases.create_case`,
so a case that came by DICOM is stored, queued and audited exactly as an upload is.

Failure statuses (PS3.4 C-STORE, the same values as PS3.18 STOW-RS FailureReason):

========  =====================================================================================
0xA700    out of resources: the disk of the files or of the database is full
0xA900    data set does not match SOP class: no pixel data (a report, a document) or no UIDs
0xC000    cannot understand: not DICOM, pixel data that cannot be decoded, too many pixels
0xC001    cannot understand: a modality or body part the active run does not read (CT for a CT run;
          CR, DX, DR, RG for an X-ray run) or no Modality at all
0xC122    transfer syntax not supported: no decoder for it is installed
0x0124    not authorised: the ``dicom`` account is deactivated or is not a submitter
0x0110    processing failure: anything else (the log has the details)
========  =====================================================================================
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import pydicom
from pydicom.pixels.decoders.base import get_decoder
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from covidscan.errors import CovidscanError
from covidscan.service.audit import record
from covidscan.service.cases import CheckedUpload, Upload, create_case
from covidscan.service.errors import ErrorCode, UploadRejected
from covidscan.service.models import Case, User
from covidscan.service.scoring import inspect_upload
from covidscan.service.settings import active_run
from covidscan.service.storage import BlobStore

OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
NOT_READ_BY_RUN = 0xC001
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
NOT_AUTHORISED = 0x0124
PROCESSING_FAILURE = 0x0110

DICOM_ACCOUNT = "dicom"
"""The submitter account of the cases the DICOM listener creates (made on first use, without a password;
an admin deactivates it to stop DICOM intake: instances are then refused with 0x0124)."""

_UPLOAD_STATUS = {ErrorCode.WRONG_MODALITY: NOT_READ_BY_RUN}
_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


class InstanceRefused(CovidscanError):
    """A received instance that is not kept: ``status`` is its DICOM failure status, the message why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class Instance:
    """A received instance that passed the check: its bytes as received, decoded, with its identifiers."""

    checked: CheckedUpload

    def tag(self, keyword: str) -> str:
        """A DICOM attribute :data:`covidscan.service.scoring.ID_TAGS` names ("" when absent)."""
        return (self.checked.info.dicom or {}).get(keyword, "")

    @property
    def study_uid(self) -> str:
        return self.tag("StudyInstanceUID")

    @property
    def series_uid(self) -> str:
        return self.tag("SeriesInstanceUID")

    @property
    def sop_uid(self) -> str:
        return self.tag("SOPInstanceUID")


@functools.lru_cache(maxsize=8)
def _run_modality(run_dir: str) -> str:
    from covidscan.runs import load_checkpoint  # reads the run's checkpoint.json (no weights)

    return load_checkpoint(run_dir).modality


def served_modality(db: Session) -> str | None:
    """The modality (``ct``, ``cxr``) of the active run, which DICOM intake accepts; None when no run is
    active. A site's own run is adapted from it, so it reads the same modality."""
    run = active_run(db)
    return _run_modality(run) if run else None


def _dataset(data: bytes) -> pydicom.Dataset:
    """The data set (pixel data not decoded); refuses what is not DICOM or lacks the identifying UIDs."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # pydicom raises many types on what is not (complete) DICOM
        raise InstanceRefused(CANNOT_UNDERSTAND, f"not a DICOM file ({type(exc).__name__}: {exc})") from None
    missing = [uid for uid in _UIDS if not str(ds.get(uid, "") or "").strip()]
    if missing:
        raise InstanceRefused(DOES_NOT_MATCH_SOP_CLASS, f"no {', '.join(missing)}")
    return ds


def check_instance(data: bytes, *, modality: str | None, max_pixels: int) -> Instance:
    """Check one received DICOM instance (a Part 10 file's bytes) as an upload is checked, and more: its
    pixel data must be there and decodable here, and with ``modality`` (:func:`served_modality`) it must
    be a chest image of that modality. Raises :class:`InstanceRefused` with the failure status."""
    ds = _dataset(data)
    sop = str(ds.SOPInstanceUID)
    if not any(pixels in ds for pixels in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        kind = getattr(ds.SOPClassUID, "name", str(ds.SOPClassUID))
        raise InstanceRefused(DOES_NOT_MATCH_SOP_CLASS, f"no pixel data (SOP class {kind}): not an image")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is not None and syntax.is_compressed:
        try:
            available = get_decoder(syntax).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise InstanceRefused(
                TRANSFER_SYNTAX_NOT_SUPPORTED, f"no decoder here for transfer syntax {syntax.name} ({syntax})"
            )
    try:
        info = inspect_upload(data, f"{sop}.dcm", max_pixels=max_pixels, modality=modality)
    except UploadRejected as exc:
        raise InstanceRefused(_UPLOAD_STATUS.get(exc.code, CANNOT_UNDERSTAND), exc.reason) from None
    return Instance(CheckedUpload(Upload(f"{sop}.dcm", data), info))


def dicom_account(db: Session) -> User:
    """The :data:`DICOM_ACCOUNT` submitter, created (audit-logged) on first use; refused (0x0124) while
    deactivated or when an account of that name has another role."""
    from covidscan.service.auth import add_user  # argon2 and friends: only once DICOM arrives

    user = db.scalar(select(User).where(User.name == DICOM_ACCOUNT))
    if user is None:
        try:
            with db.begin_nested():  # a savepoint: a concurrent creation only undoes this one
                user = add_user(db, DICOM_ACCOUNT, "submitter", None)
            record(db, "user_add", actor="dicom listener", target=f"user:{DICOM_ACCOUNT}", role="submitter")
        except IntegrityError:
            user = db.scalar(select(User).where(User.name == DICOM_ACCOUNT))
    if user is None or not user.active or user.role != "submitter":
        why = "is deactivated" if user is not None and not user.active else "is not a submitter"
        raise InstanceRefused(
            NOT_AUTHORISED, f"the account {DICOM_ACCOUNT!r} that DICOM cases belong to {why}"
        )
    return user


def _order(instance: Instance) -> tuple[int, str]:
    """Slices in InstanceNumber order (those without one last), then by SOP Instance UID."""
    number = instance.tag("InstanceNumber")
    return (int(number) if number.lstrip("-").isdigit() else 2**31, instance.sop_uid)


def create_series_case(
    db: Session, store: BlobStore, user: User, instances: list[Instance], *, sender_ae: str | None = None
) -> Case:
    """One case of the instances of one series (in slice order), for ``user``; its patient is the
    PatientID, its site the calling AE title when it came by C-STORE, else InstitutionName (see
    :func:`covidscan.service.sites.resolve_site`)."""
    ordered = sorted(instances, key=_order)
    patient = next((p for i in ordered if (p := i.tag("PatientID"))), None)
    return create_case(db, store, user, [i.checked for i in ordered], patient, sender_ae=sender_ae)
