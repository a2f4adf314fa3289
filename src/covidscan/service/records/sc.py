"""Secondary Capture images (highdicom ``SCImage``, RGB) of the Grad-CAM overlays, in the case's study.

One single-frame SC per image that has an overlay (a DICOM SC holds one frame; the images of a case can
differ in size). The study is the source images' own (patient and study attributes copied from the first
DICOM original), or for a case sent as PNG/JPEG a new study whose UID is derived from the case. Each report
version gets its own SC series: an amendment sends new instances, as the SR does; the old ones stay valid.
No text is burnt in (only the heat colours and the outline of the region the model looked at), so
BurnedInAnnotation is ``NO``.
"""

from __future__ import annotations

import re

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import PersonName

from covidscan.service.records.content import CAM_OPACITY, CaseRecord, SourceImage

MANUFACTURER = "covidscan"
CHARSET = "ISO_IR 192"  # UTF-8
SC_SERIES_BASE = 9910  # the SC series of report version N is number 9910 + N (the SR series is 9900)
PATIENT_STUDY_TAGS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)  # the Patient and General Study modules' Type 1 and 2 attributes
# ImageOrientationPatient's dominant axis, as a PatientOrientation letter (LPS patient coordinates)
_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))


def study_dataset(record: CaseRecord) -> Dataset:
    """The case's patient and study: copied from its first DICOM original, else new, derived from the
    case (so every record of the case, and every version, lands in the same study)."""
    ds = Dataset()
    source = record.dicom_sources[0] if record.dicom_sources else None
    for tag in PATIENT_STUDY_TAGS:
        value = source.get(tag) if source is not None else None
        setattr(ds, tag, value if value not in (None, "") else None)
    if source is None:
        ds.StudyInstanceUID = record.uid("study")
        ds.StudyDate = record.created_at.strftime("%Y%m%d")
        ds.StudyTime = record.created_at.strftime("%H%M%S")
        ds.StudyID = f"CS{record.case_id}"[:16]
    if not ds.PatientID:  # sanitised before it is set: pydicom splits a value at each backslash
        ds.PatientID = dicom_text(record.patient_id or f"case-{record.case_id}")
    if ds.PatientName is None:
        ds.PatientName = PersonName("")
    # UTF-8 whatever the originals used: pydicom decoded their names, and comments may be in any script
    ds.SpecificCharacterSet = CHARSET
    return ds


def dicom_text(text: str, limit: int = 64) -> str:
    """``text`` as a single DICOM LO/SH value: no backslash (the value separator), no control characters."""
    return re.sub(r"[\\\x00-\x1f]", "_", text)[:limit]


def patient_orientation(image: SourceImage, modality: str) -> tuple[str, str]:
    """The rows' and columns' directions: from the original's PatientOrientation or
    ImageOrientationPatient, else the usual display (axial CT: L, P; frontal chest X-ray: L, F)."""
    ds = image.dicom
    given = list(ds.get("PatientOrientation") or ()) if ds is not None else []
    if len(given) == 2 and all(given):
        return given[0][:1], given[1][:1]
    cosines = ds.get("ImageOrientationPatient") if ds is not None else None
    if cosines is not None and len(cosines) == 6:
        letters = []
        for vector in (cosines[:3], cosines[3:]):
            axis = int(np.argmax(np.abs(vector)))
            letters.append(_AXIS_LETTERS[axis][0 if float(vector[axis]) > 0 else 1])
        return letters[0], letters[1]
    return ("L", "P") if modality == "ct" else ("L", "F")


def secondary_capture(record: CaseRecord, image: SourceImage) -> hd.sc.SCImage | None:
    """The RGB Secondary Capture of one image's Grad-CAM overlay; None for an image without one."""
    pixels = image.overlay()
    if pixels is None:
        return None
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=study_dataset(record),
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=record.versioned_uid("sc-series"),
        series_number=SC_SERIES_BASE + record.version,
        sop_instance_uid=record.versioned_uid("sc", image.position),
        instance_number=image.position + 1,
        manufacturer=MANUFACTURER,
        patient_orientation=patient_orientation(image, record.model.modality),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=f"covidscan Grad-CAM overlay, report v{record.version}",
        manufacturer_model_name=dicom_text(record.model.model_name),
        software_versions=dicom_text(record.model.covidscan_version),
        specific_character_set=CHARSET,
    )
    # Type 2C: dciodvfy wants it present; a chest is not a paired body part, so usually empty
    sc.Laterality = image.dicom.get("Laterality", "") if image.dicom is not None else ""
    sc.BurnedInAnnotation = "NO"  # heat colours and an outline only: no text, nothing identifying
    sc.DerivationDescription = (
        f"Grad-CAM of {record.model.run} over image {image.position + 1} at {CAM_OPACITY:.0%} opacity"
    )[:1024]
    if image.dicom is not None:
        ref = Dataset()
        ref.ReferencedSOPClassUID = image.dicom.SOPClassUID
        ref.ReferencedSOPInstanceUID = image.dicom.SOPInstanceUID
        sc.SourceImageSequence = [ref]
    return sc


def secondary_captures(record: CaseRecord) -> list[hd.sc.SCImage]:
    """One RGB Secondary Capture per image with a Grad-CAM overlay, in image order."""
    return [sc for image in record.images if (sc := secondary_capture(record, image)) is not None]
