"""Result records (issue 16 §2): DICOM SR, Secondary Capture, PDF and FHIR of real cases, through the real
API on SQLite and PostgreSQL, checked with dciodvfy, highdicom, pypdf and fhir.resources."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle
from pypdf import PdfReader

from tests.service.test_service_viewer import ct_series

DCIODVFY = shutil.which("dciodvfy")


def dciodvfy_errors(data: bytes, tmp_path: Path) -> list[str]:
    """The "Error" lines dciodvfy (dicom3tools) prints for a DICOM file."""
    if DCIODVFY is None:
        pytest.skip("dciodvfy NOT RUN: install Debian's dicom3tools (apt install dicom3tools)")
    path = tmp_path / "check.dcm"
    path.write_bytes(data)
    done = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


def get(service, case_id: int, what: str, name: str = "doctor", **params):
    return service.client.get(f"/api/v1/cases/{case_id}/{what}", headers=service.auth(name), params=params)


def review(service, case_id: int, finding: str, *, sign: bool, reason: str | None = None, comment: str = ""):
    body = {"agree": True, "finding": finding, "comment": comment, "sign": sign}
    if reason:
        body["amendment_reason"] = reason
    answer = service.client.post(f"/api/v1/cases/{case_id}/review", headers=service.auth("doctor"), json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.fixture(scope="module")
def dicom_case(service) -> tuple[int, list[pydicom.Dataset]]:
    files = ct_series(3)
    answer = service.upload("lab", files)
    assert answer.status_code == 201, answer.text
    case_id = answer.json()["id"]
    assert service.wait(case_id)["status"] == "ready"
    return case_id, [pydicom.dcmread(io.BytesIO(data)) for _, data in files]


@pytest.fixture(scope="module")
def png_case(service, ct_slices) -> int:
    answer = service.upload("lab", ct_slices[:2], patient_id="PNG-7")
    assert answer.status_code == 201, answer.text
    case_id = answer.json()["id"]
    assert service.wait(case_id)["status"] == "ready"
    return case_id


def sr_of(service, case_id: int) -> hd.sr.Comprehensive3DSR:
    answer = get(service, case_id, "sr.dcm")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/dicom"
    return hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(answer.content)))


def test_sr_before_and_after_signing_and_amended(service, dicom_case, tmp_path: Path) -> None:
    case_id, sources = dicom_case
    first = sr_of(service, case_id)
    assert first.VerificationFlag == "UNVERIFIED" and first.CompletionFlag == "PARTIAL"
    assert first.PreliminaryFlag == "PRELIMINARY"
    # same study and patient as the CT series; every slice referenced
    assert first.StudyInstanceUID == sources[0].StudyInstanceUID
    assert first.PatientID == sources[0].PatientID
    refs = {
        ref.ReferencedSOPInstanceUID
        for study in first.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert refs == {ds.SOPInstanceUID for ds in sources}
    raw = get(service, case_id, "sr.dcm").content
    assert dciodvfy_errors(raw, tmp_path) == []
    again = sr_of(service, case_id)
    assert again.SOPInstanceUID == first.SOPInstanceUID  # the same version: the same instance

    review(service, case_id, "covid", sign=True, comment="bilateral ground glass")
    signed = sr_of(service, case_id)
    assert signed.SOPInstanceUID != first.SOPInstanceUID
    assert (signed.VerificationFlag, signed.CompletionFlag, signed.PreliminaryFlag) == ("VERIFIED", "COMPLETE",
                                                                                        "FINAL")
    assert signed.VerifyingObserverSequence[0].VerifyingObserverName.family_name == "doctor"
    check_content(service, signed, case_id, finding="840539006")
    assert dciodvfy_errors(get(service, case_id, "sr.dcm").content, tmp_path) == []

    review(service, case_id, "indeterminate", sign=True, reason="second look: artefact")
    amended = sr_of(service, case_id)
    assert amended.SOPInstanceUID not in (signed.SOPInstanceUID, first.SOPInstanceUID)
    assert amended.SeriesInstanceUID == signed.SeriesInstanceUID and amended.InstanceNumber == 2
    pre = amended.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert pre.ReferencedSOPInstanceUID == signed.SOPInstanceUID
    check_content(service, amended, case_id, finding="82334004")
    assert dciodvfy_errors(get(service, case_id, "sr.dcm").content, tmp_path) == []


def check_content(service, sr: hd.sr.Comprehensive3DSR, case_id: int, *, finding: str) -> None:
    """The SR's TID 1501 group: the finding code, the probability, the algorithm; the person observer."""
    case = service.client.get(f"/api/v1/cases/{case_id}", headers=service.auth("doctor")).json()
    items = flatten(sr.ContentSequence)
    codes = [it.ConceptCodeSequence[0].CodeValue for it in items if it.ValueType == "CODE"]
    assert finding in codes
    nums = [it for it in items if it.ValueType == "NUM"]
    assert len(nums) == 1
    value = float(nums[0].MeasuredValueSequence[0].NumericValue)
    assert value == pytest.approx(case["group"]["p_covid"], abs=1e-6)
    assert nums[0].MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "{probability}"
    texts = {it.ConceptNameCodeSequence[0].CodeMeaning: it.TextValue for it in items if it.ValueType == "TEXT"}
    assert texts["Algorithm Name"].startswith("covidscan ")
    assert texts["Algorithm Version"] == case["model"]["covidscan_version"]
    names = [it.PersonName.family_name for it in items if it.ValueType == "PNAME"]
    assert names == ["doctor"]


def flatten(sequence) -> list:
    out = []
    for item in sequence:
        out.append(item)
        if "ContentSequence" in item:
            out += flatten(item.ContentSequence)
    return out
