"""The case's result as a DICOM Structured Report: a TID 1500 Measurement Report in a Comprehensive 3D SR.

Its one TID 1501 measurement group holds the finding as a coded qualitative evaluation
(:data:`FINDING_CODES`), the calibrated probability as a numeric measurement, the algorithm that made it
(TID 4019: name, version, run, weights' SHA-256, threshold) and the images it was read from. The doctor is
the person observer, the model the device observer. Before signing, the document is PARTIAL, UNVERIFIED
and PRELIMINARY and states the doctor's draft finding (or, without one, the model's label); once signed it
is COMPLETE, VERIFIED (by the doctor, for the case's site) and FINAL. An amendment is a new instance in the
same SR series (instance number = verdict version) that names the version it replaces in its Predecessor
Documents Sequence.

The references go to the DICOM originals (same study, patient and study copied from the first). A case sent
as PNG/JPEG has no DICOM original: its SR lives in the new study of its Secondary Captures
(:mod:`.sc`) and references those.
"""

from __future__ import annotations

from datetime import datetime

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ComprehensiveSRStorage
from pydicom.valuerep import PersonName

from covidscan.service.records.content import CaseRecord
from covidscan.service.records.sc import CHARSET, MANUFACTURER, dicom_text, secondary_captures, study_dataset

SR_SERIES_NUMBER = 9900
LOCAL_SCHEME = "99COVIDSCAN"  # covidscan's own codes (a "99" designator is a local coding scheme)
# Not (121071, DCM, "Finding"): TID 1501 uses that concept for the group's finding type, and readers
# (highdicom among them) do not take an item of that name as a qualitative evaluation.
FINDING_NAME = Code("121073", "DCM", "Impression")
FINDING_CODES = {
    "covid": Code("840539006", "SCT", "Disease caused by SARS-CoV-2"),
    "non_covid": Code("260415000", "SCT", "Not detected"),
    "indeterminate": Code("82334004", "SCT", "Indeterminate"),
}
PROBABILITY_NAME = Code("p_covid", LOCAL_SCHEME, "Calibrated probability of COVID-19")
PROBABILITY_UNIT = Code("{probability}", "UCUM", "probability")
PROCEDURES = {  # the procedure reported, by the run's modality
    "ct": Code("169069000", "SCT", "Computed tomography of chest"),
    "cxr": Code("399208008", "SCT", "Plain chest X-ray"),
}
COMMENT_NAME = Code("121106", "DCM", "Comment")


def person_name(name: str) -> PersonName:
    """An account name as a DICOM person name: the family name component alone (``^``, ``=`` separate)."""
    return PersonName(dicom_text(name.replace("^", " ").replace("=", " "), 63) + "^")


def sr_uid(record: CaseRecord, version_key: str) -> str:
    """The SOP Instance UID of the SR of one report version."""
    return record.uid(version_key, "sr")


def _algorithm(record: CaseRecord) -> hd.sr.AlgorithmIdentification:
    m = record.model
    parameters = [
        f"run={m.run}",
        f"weights_sha256={m.weights_sha256 or 'unknown'}",
        f"patient_threshold={record.group_threshold:.6f}",
    ]
    return hd.sr.AlgorithmIdentification(
        name=f"covidscan {m.model_name}"[:64], version=m.covidscan_version[:64], parameters=parameters
    )


def _when(record: CaseRecord) -> datetime:
    """The content's time: the signature's, else the case's (so a re-export writes the same document)."""
    return record.verdict.signed_at if record.signed else record.created_at


def structured_report(record: CaseRecord) -> hd.sr.Comprehensive3DSR:
    """The SR of the record's current version (see the module's description)."""
    evidence = list(record.dicom_sources) or list(secondary_captures(record))
    study = study_dataset(record)
    # highdicom takes patient and study from its first evidence: the header with the module filled in
    first = Dataset()
    first.update(evidence[0])
    first.update(study)
    evidence[0] = first
    algorithm = _algorithm(record)
    tracking = hd.sr.TrackingIdentifier(
        uid=record.uid("tracking"), identifier=f"covidscan case {record.case_id}"
    )
    measurement = hd.sr.Measurement(
        name=PROBABILITY_NAME,
        value=round(record.p_covid, 6),
        unit=PROBABILITY_UNIT,
        tracking_identifier=None,
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        algorithm_id=algorithm,
        measurements=[measurement],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(FINDING_NAME, FINDING_CODES[record.finding])],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in evidence],
    )
    if record.verdict is not None and record.verdict.comment.strip():
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=COMMENT_NAME,
                value=record.verdict.comment.strip()[:5000],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    person = None
    if record.verdict is not None:
        person = hd.sr.ObserverContext(
            observer_type=hd.sr.CodedConcept.from_code(codes.cid270.Person),
            observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
                name=person_name(record.verdict.doctor),
                login_name=record.verdict.doctor[:64],
            ),
        )
    device = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept.from_code(codes.cid270.Device),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(record.uid("device", record.model.weights_sha256 or record.model.run)),
            name=f"covidscan {record.model.run}"[:64],
            manufacturer_name=MANUFACTURER,
            model_name=record.model.model_name[:64],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_person_context=person, observer_device_context=device
        ),
        procedure_reported=PROCEDURES.get(record.model.modality, PROCEDURES["ct"]),
        imaging_measurements=[group],
    )
    previous = None
    if record.amended and record.history:
        before = Dataset()
        before.SOPClassUID, before.SOPInstanceUID = (
            ComprehensiveSRStorage,
            sr_uid(record, f"v{record.history[-1].version}-signed"),
        )
        before.StudyInstanceUID, before.SeriesInstanceUID = study.StudyInstanceUID, record.uid("sr-series")
        previous = [before]
    when = _when(record)
    signed = record.signed
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=record.uid("sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sr_uid(record, record.version_key),
        instance_number=max(record.version, 1),
        manufacturer=MANUFACTURER,
        is_complete=signed,
        is_final=signed,
        is_verified=signed,
        verifying_observer_name=person_name(record.verdict.doctor) if signed else None,
        verifying_organization=dicom_text(record.site.name) if signed else None,
        previous_versions=previous,
        coding_schemes=[
            CodingSchemeIdentificationItem(
                designator=LOCAL_SCHEME,
                name="covidscan local codes"[:64],
                responsible_organization="covidscan",
            )
        ],
        series_description="covidscan report",
        manufacturer_model_name=dicom_text(record.model.model_name),
        software_versions=dicom_text(record.model.covidscan_version),
        specific_character_set=CHARSET,
        content_date=when.date(),
        content_time=when.time().replace(microsecond=0),
    )
    if signed:
        sr.VerifyingObserverSequence[0].VerificationDateTime = when.strftime("%Y%m%d%H%M%S")
    return sr
