"""The case's result in FHIR R4 (``fhir.resources.R4B``): one Bundle (type ``collection``) holding a
``DiagnosticReport`` (preliminary before signing, final once signed, amended after an amendment; the doctor
as ``resultsInterpreter``; the finding as a SNOMED CT ``conclusionCode``), an ``Observation`` of the model's
calibrated probability made by a ``Device`` (the model: name, version, run, weights' SHA-256), and the
``Practitioner``. The patient is referred to by identifier only: the hospital's record holds the patient.
"""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B.bundle import Bundle

from covidscan.service.records.content import FINDING_WORDS, CaseRecord, site_summary
from covidscan.service.records.sr import FINDING_CODES, PROCEDURES

SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
SYSTEM = "urn:covidscan"  # covidscan's identifier systems: urn:covidscan:patient, :user, :report, ...
CODES = f"{SYSTEM}:codes"  # the local code of the probability (as the SR's 99COVIDSCAN scheme)


def _urn(record: CaseRecord, kind: str) -> str:
    """A fullUrl that is the same for the same report version (``urn:uuid:`` from the record's UIDs)."""
    return f"urn:uuid:{record.uuid(record.version_key, kind)}"


def report_status(record: CaseRecord) -> str:
    """preliminary (not signed), final (signed), amended (a signed amendment)."""
    if not record.signed:
        return "preliminary"
    return "amended" if record.amended else "final"


def _snomed(code: Any) -> dict[str, Any]:
    return {"coding": [{"system": SNOMED, "code": code.value, "display": code.meaning}], "text": code.meaning}


def bundle(record: CaseRecord) -> Bundle:
    """The FHIR Bundle of the record's current version."""
    m, v = record.model, record.verdict
    status = report_status(record)
    patient = {
        "identifier": {"system": f"{SYSTEM}:patient", "value": record.patient_id or f"case-{record.case_id}"},
        "display": record.patient_id or f"patient of case {record.case_id}",
    }
    urls = {k: _urn(record, k) for k in ("report", "observation", "device", "practitioner")}
    device = {
        "resourceType": "Device",
        "identifier": [
            {"system": f"{SYSTEM}:weights-sha256", "value": m.weights_sha256 or "unknown"},
            {"system": f"{SYSTEM}:run", "value": m.run},
        ],
        "deviceName": [
            {"name": f"covidscan {m.model_name}", "type": "model-name"},
            {"name": m.run, "type": "user-friendly-name"},
        ],
        "manufacturer": "covidscan",
        "version": [
            {"type": {"text": "covidscan"}, "value": m.covidscan_version},
            {"type": {"text": "weights SHA-256"}, "value": m.weights_sha256 or "unknown"},
        ],
    }
    observation = {
        "resourceType": "Observation",
        "status": status,
        "code": {
            "coding": [{"system": CODES, "code": "p_covid", "display": "Calibrated probability of COVID-19"}]
        },
        "subject": patient,
        "device": {"reference": urls["device"]},
        "valueQuantity": {
            "value": round(record.p_covid, 6),
            "unit": "probability",
            "system": UCUM,
            "code": "1",
        },
        "interpretation": [
            {"text": f"model: {FINDING_WORDS[record.label]}" + (" (uncertain)" if record.uncertain else "")}
        ],
        "note": [{"text": f"patient threshold {record.group_threshold:.3f}; {site_summary(record.site)}"}]
        + [{"text": f"warning: {w}"} for w in record.warnings],
    }
    conclusion = f"{FINDING_WORDS[record.finding]}"
    if v is not None and v.comment.strip():
        conclusion += f". {v.comment.strip()}"
    if v is not None and v.amendment_reason:
        conclusion += f" (amended: {v.amendment_reason})"
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "meta": {"versionId": str(record.version)},
        "identifier": [{"system": f"{SYSTEM}:report", "value": f"case-{record.case_id}-v{record.version}"}],
        "status": status,
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                        "code": "RAD",
                        "display": "Radiology",
                    }
                ]
            }
        ],
        "code": _snomed(PROCEDURES.get(m.modality, PROCEDURES["ct"])),
        "subject": patient,
        "effectiveDateTime": record.created_at.isoformat(),
        "result": [{"reference": urls["observation"]}],
        "conclusion": conclusion,
        "conclusionCode": [_snomed(FINDING_CODES[record.finding])],
    }
    entries = [("report", report), ("observation", observation), ("device", device)]
    if v is not None:
        report["resultsInterpreter"] = [{"reference": urls["practitioner"], "display": v.doctor}]
        entries.append(
            (
                "practitioner",
                {
                    "resourceType": "Practitioner",
                    "identifier": [{"system": f"{SYSTEM}:user", "value": v.doctor}],
                    "name": [{"text": v.doctor}],
                },
            )
        )
    if record.signed:
        report["issued"] = v.signed_at.isoformat()
    return Bundle.model_validate(
        {
            "resourceType": "Bundle",
            "type": "collection",
            "identifier": {
                "system": f"{SYSTEM}:report",
                "value": f"case-{record.case_id}-{record.version_key}",
            },
            "timestamp": (v.signed_at if record.signed else record.created_at).isoformat(),
            "entry": [{"fullUrl": urls[kind], "resource": resource} for kind, resource in entries],
        }
    )
