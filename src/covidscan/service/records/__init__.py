"""A case's result, as the hospital's systems take it: DICOM SR, Secondary Capture, PDF and FHIR R4.

:func:`gather` reads one case into a :class:`CaseRecord`; each format is a pure function of it
(:mod:`.sr`, :mod:`.sc`, :mod:`.pdf`, :mod:`.fhir`). :func:`render` gives one format as bytes (what the API
and ``covidscan report`` send), :func:`dicom_outputs` the DICOM instances of the current version (what is
sent to a PACS).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from pydicom.dataset import Dataset
from sqlalchemy.orm import Session

from covidscan.service.errors import NotFound
from covidscan.service.records.content import CaseRecord, gather
from covidscan.service.storage import BlobStore

FORMATS = ("sr", "sc", "pdf", "fhir")
MEDIA_TYPES = {
    "sr": "application/dicom",
    "sc": "application/dicom",
    "pdf": "application/pdf",
    "fhir": "application/fhir+json",
}
SUFFIXES = {"sr": "sr.dcm", "sc": "sc.dcm", "pdf": "report.pdf", "fhir": "fhir.json"}


@dataclass(frozen=True)
class Rendered:
    """One record as bytes, with its media type and a file name for downloads."""

    data: bytes
    media_type: str
    filename: str


def dicom_bytes(ds: Dataset) -> bytes:
    """A DICOM instance as a Part 10 file."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def render(record: CaseRecord, fmt: str, *, image: int | None = None) -> Rendered:
    """``fmt`` (one of :data:`FORMATS`) of the record's current version; ``image`` picks the Secondary
    Capture by image position (default: the first image with a Grad-CAM overlay)."""
    from covidscan.service.records import fhir, pdf, sc, sr

    if fmt == "sr":
        data = dicom_bytes(sr.structured_report(record))
    elif fmt == "sc":
        with_cam = [im for im in record.images if im.cam_png is not None]
        chosen = next((im for im in with_cam if image is None or im.position == image), None)
        if chosen is None:
            which = f"image {image} has no" if image is not None else "no image has a"
            raise NotFound(
                f"case {record.case_id}: {which} Grad-CAM overlay; images with one: "
                f"{[im.position for im in with_cam] or 'none'}"
            )
        position = chosen.position
        data = dicom_bytes(sc.secondary_capture(record, chosen))
    elif fmt == "pdf":
        data = pdf.report_pdf(record)
    elif fmt == "fhir":
        data = fhir.bundle(record).model_dump_json(indent=2).encode()
    else:
        raise ValueError(f"unknown record format {fmt!r}")
    extra = f"-image{position}" if fmt == "sc" else ""
    name = f"case{record.case_id}-v{record.version}{extra}-{SUFFIXES[fmt]}"
    return Rendered(data, MEDIA_TYPES[fmt], name)


def dicom_outputs(session: Session, case_id: int, store: BlobStore) -> list[Dataset]:
    """The DICOM instances of a case's current report version, for a PACS: its SR, then its Secondary
    Captures (one per image with a Grad-CAM overlay). Raises the 409s of :func:`gather`."""
    from covidscan.service.records.sc import secondary_captures
    from covidscan.service.records.sr import structured_report

    record = gather(session, case_id, store)
    return [structured_report(record), *secondary_captures(record)]


__all__ = ["FORMATS", "CaseRecord", "Rendered", "dicom_outputs", "gather", "render"]
