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
from pydicom.sr.codedict import codes
from pypdf import PdfReader
from sqlalchemy.orm import Session
from test_service_pages import login
from test_service_viewer import SHARED_DICOM, ct_series

from dicom_files import write_dicom

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


def review(
    service,
    case_id: int,
    finding: str,
    *,
    sign: bool,
    reason: str | None = None,
    comment: str = "",
    agree: bool | None = None,
):
    if agree is None:  # agreeing means giving the model's own finding
        group = service.client.get(f"/api/v1/cases/{case_id}", headers=service.auth("doctor")).json()["group"]
        agree = group is not None and finding == group["label"]
    body = {"agree": agree, "finding": finding, "comment": comment, "sign": sign}
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
    assert (signed.VerificationFlag, signed.CompletionFlag, signed.PreliminaryFlag) == (
        "VERIFIED",
        "COMPLETE",
        "FINAL",
    )
    assert signed.VerifyingObserverSequence[0].VerifyingObserverName.family_name == "doctor"
    check_content(service, signed, case_id, finding="840539006")
    raw = get(service, case_id, "sr.dcm").content
    assert dciodvfy_errors(raw, tmp_path) == []
    (tmp_path / "signed-sr.dcm").write_bytes(raw)  # the README's dsrdump excerpt

    review(service, case_id, "indeterminate", sign=True, reason="second look: artefact", agree=False)
    amended = sr_of(service, case_id)
    assert amended.SOPInstanceUID not in (signed.SOPInstanceUID, first.SOPInstanceUID)
    assert amended.SeriesInstanceUID == signed.SeriesInstanceUID and amended.InstanceNumber == 2
    pre = amended.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert pre.ReferencedSOPInstanceUID == signed.SOPInstanceUID
    check_content(service, amended, case_id, finding="82334004")
    raw = get(service, case_id, "sr.dcm").content
    assert dciodvfy_errors(raw, tmp_path) == []
    (tmp_path / "amended-sr.dcm").write_bytes(raw)


def check_content(service, sr: hd.sr.Comprehensive3DSR, case_id: int, *, finding: str) -> None:
    """The SR's TID 1501 group as highdicom reads it: the finding code, the probability, the algorithm;
    the doctor as person observer."""
    case = service.client.get(f"/api/v1/cases/{case_id}", headers=service.auth("doctor")).json()
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    (group,) = report.get_image_measurement_groups()
    (evaluation,) = group.get_qualitative_evaluations()
    assert (evaluation.name.value, evaluation.value.value) == ("121073", finding)
    (probability,) = group.get_measurements()
    assert probability.value == pytest.approx(case["group"]["p_covid"], abs=1e-6)
    assert probability.unit.value == "{probability}"
    texts = {
        it.ConceptNameCodeSequence[0].CodeMeaning: it.TextValue
        for it in flatten(sr.ContentSequence)
        if it.ValueType == "TEXT"
    }
    assert texts["Algorithm Name"].startswith("covidscan ")
    assert texts["Algorithm Version"] == case["model"]["covidscan_version"]
    (person,) = report.get_observer_contexts(observer_type=codes.DCM.Person)
    assert person.observer_identifying_attributes.name.family_name == "doctor"


def flatten(sequence) -> list:
    out = []
    for item in sequence:
        out.append(item)
        if "ContentSequence" in item:
            out += flatten(item.ContentSequence)
    return out


def test_secondary_captures_of_a_dicom_case(service, dicom_case, tmp_path: Path) -> None:
    case_id, sources = dicom_case
    sr = sr_of(service, case_id)
    for position in range(len(sources)):
        answer = get(service, case_id, "sc.dcm", image=position)
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "application/dicom"
        assert dciodvfy_errors(answer.content, tmp_path) == []
        sc = pydicom.dcmread(io.BytesIO(answer.content))
        assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        assert sc.StudyInstanceUID == sources[0].StudyInstanceUID == sr.StudyInstanceUID
        assert sc.PatientID == sources[0].PatientID
        assert (sc.PhotometricInterpretation, sc.SamplesPerPixel, sc.BurnedInAnnotation) == ("RGB", 3, "NO")
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == sources[position].SOPInstanceUID
        assert sc.pixel_array.shape == (sc.Rows, sc.Columns, 3)
    (tmp_path / "sc.png").write_bytes(png_of(sc))
    missing = get(service, case_id, "sc.dcm", image=99)
    assert (missing.status_code, missing.json()["code"]) == (404, "not_found")


def png_of(sc: pydicom.Dataset) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(sc.pixel_array).save(buf, format="PNG")
    return buf.getvalue()


def test_png_case_gets_a_new_study_with_stable_uids(service, png_case, tmp_path: Path) -> None:
    sr = sr_of(service, png_case)
    assert sr.PatientID == "PNG-7" and sr.StudyInstanceUID.startswith("2.25.")
    assert sr_of(service, png_case).SOPInstanceUID == sr.SOPInstanceUID  # re-export: the same instance
    assert dciodvfy_errors(get(service, png_case, "sr.dcm").content, tmp_path) == []
    captures = [
        pydicom.dcmread(io.BytesIO(get(service, png_case, "sc.dcm", image=i).content)) for i in (0, 1)
    ]
    for sc in captures:
        assert sc.StudyInstanceUID == sr.StudyInstanceUID and sc.PatientID == "PNG-7"
        assert "SourceImageSequence" not in sc
    assert dciodvfy_errors(get(service, png_case, "sc.dcm", image=1).content, tmp_path) == []
    # without DICOM originals the SR references its case's Secondary Captures
    refs = {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert refs == {sc.SOPInstanceUID for sc in captures}


def pdf_text(data: bytes) -> str:
    return " ".join((page.extract_text() or "") for page in PdfReader(io.BytesIO(data)).pages)


def test_pdf_and_fhir_follow_the_verdict(service, png_case, tmp_path: Path) -> None:
    case = service.client.get(f"/api/v1/cases/{png_case}", headers=service.auth("doctor")).json()
    answer = get(service, png_case, "report.pdf")
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/pdf"
    text = pdf_text(answer.content)
    for words in (
        "NOT SIGNED — preliminary",
        "PNG-7",
        f"case {png_case}",
        f"{case['group']['p_covid']:.3f}",
        "not a diagnosis on its own",
        "Intended use",
        "site lab",
    ):
        assert words in text, words
    fhir = Bundle.model_validate_json(get(service, png_case, "fhir.json").content)
    report = fhir.entry[0].resource
    assert (report.__resource_type__, report.status) == ("DiagnosticReport", "preliminary")

    review(service, png_case, "non_covid", sign=True, comment="clear lungs")
    text = pdf_text(get(service, png_case, "report.pdf").content)
    for words in ("SIGNED", "not COVID-19", "doctor", "clear lungs", "not a diagnosis on its own"):
        assert words in text, words
    assert "NOT SIGNED" not in text
    answer = get(service, png_case, "fhir.json")
    assert answer.headers["content-type"] == "application/fhir+json"
    fhir = Bundle.model_validate_json(answer.content)
    kinds = {entry.resource.__resource_type__: entry.resource for entry in fhir.entry}
    report, observation, device = kinds["DiagnosticReport"], kinds["Observation"], kinds["Device"]
    assert report.status == "final"
    assert report.conclusionCode[0].coding[0].code == "260415000"
    assert report.resultsInterpreter[0].reference == next(
        e.fullUrl for e in fhir.entry if e.resource.__resource_type__ == "Practitioner"
    )
    assert report.subject.identifier.value == "PNG-7"
    assert float(observation.valueQuantity.value) == pytest.approx(case["group"]["p_covid"], abs=1e-6)
    assert observation.device.reference == next(e.fullUrl for e in fhir.entry if e.resource is device)
    assert device.version[0].value == case["model"]["covidscan_version"]

    review(service, png_case, "covid", sign=True, reason="new clinical information", agree=False)
    amended = Bundle.model_validate_json(get(service, png_case, "fhir.json").content)
    assert amended.entry[0].resource.status == "amended"
    assert amended.entry[0].fullUrl != fhir.entry[0].fullUrl
    data = get(service, png_case, "report.pdf").content
    text = pdf_text(data)
    for words in ("AMENDED (version 2)", "new clinical information", "Earlier versions", "not COVID-19"):
        assert words in text, words
    (tmp_path / "report.pdf").write_bytes(data)
    if shutil.which("pdftoppm"):  # the page as an image, to look at (tests/service/README: records)
        subprocess.run(
            [
                "pdftoppm",
                "-png",
                "-r",
                "60",
                "-f",
                "1",
                "-l",
                "1",
                str(tmp_path / "report.pdf"),
                str(tmp_path / "page"),
            ],
            check=True,
            timeout=60,
        )


def test_who_may_download_and_when(service, dicom_case) -> None:
    case_id, _ = dicom_case
    assert get(service, case_id, "report.pdf", name="lab").status_code == 200  # the sender's own case
    hidden = get(service, case_id, "report.pdf", name="lab2")
    assert (hidden.status_code, hidden.json()["code"]) == (404, "not_found")
    anonymous = service.client.get(f"/api/v1/cases/{case_id}/sr.dcm")
    assert anonymous.status_code == 401


def test_no_records_before_a_prediction(service, dicom_case) -> None:
    """A case still queued (its row set back, in a rolled-back transaction) has no records: 409 not_ready."""
    from covidscan.service.db import Database
    from covidscan.service.errors import Conflict, ErrorCode
    from covidscan.service.models import Case
    from covidscan.service.records import gather
    from covidscan.service.storage import BlobStore

    case_id, _ = dicom_case
    db = Database(service.database_url)
    try:
        with db.engine.connect() as conn, Session(bind=conn) as s:
            s.get(Case, case_id).status = "queued"
            s.flush()
            with pytest.raises(Conflict) as caught:
                gather(s, case_id, BlobStore(service.data_dir / "blobs"))
            assert caught.value.code == ErrorCode.NOT_READY
            s.rollback()
    finally:
        db.dispose()


def test_dicom_outputs_and_report_command(service, dicom_case, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from covidscan.cli import app
    from covidscan.service.db import Database
    from covidscan.service.records import dicom_outputs
    from covidscan.service.storage import BlobStore

    case_id, sources = dicom_case
    db = Database(service.database_url)
    try:
        with db.session() as s:
            outputs = dicom_outputs(s, case_id, BlobStore(service.data_dir / "blobs"))
    finally:
        db.dispose()
    assert [ds.Modality for ds in outputs] == ["SR"] + ["OT"] * len(sources)
    assert outputs[0].SOPInstanceUID == sr_of(service, case_id).SOPInstanceUID

    runner = CliRunner()
    common = ["--data-dir", str(service.data_dir), "--database-url", service.database_url]
    for fmt in ("sr", "sc", "pdf", "fhir"):
        out = tmp_path / f"out.{fmt}"
        done = runner.invoke(app, ["report", str(case_id), "--format", fmt, "--out", str(out), *common])
        assert done.exit_code == 0, done.output
        assert out.stat().st_size > 0
    assert pydicom.dcmread(tmp_path / "out.sr").SOPInstanceUID == outputs[0].SOPInstanceUID
    bad = runner.invoke(app, ["report", str(case_id), "--format", "docx", "--out", str(out), *common])
    assert bad.exit_code == 2 and "error:" in bad.output and "sr, sc, pdf, fhir" in bad.output
    unknown = runner.invoke(app, ["report", "999999", "--format", "sr", "--out", str(out), *common])
    assert unknown.exit_code == 2 and "no case 999999" in unknown.output


def test_case_page_offers_the_downloads(service, dicom_case) -> None:
    from fastapi.testclient import TestClient

    case_id, sources = dicom_case
    with TestClient(service.client.app, base_url="http://127.0.0.1") as browser:
        assert login(browser, "doctor").status_code == 303
        page = browser.get(f"/cases/{case_id}").text
        links = [f"/api/v1/cases/{case_id}/{what}" for what in ("report.pdf", "sr.dcm", "fhir.json")]
        links += [f"/api/v1/cases/{case_id}/sc.dcm?image={i}" for i in range(len(sources))]
        for link in links:
            assert f'href="{link}"' in page, link
        answer = browser.get(links[0])  # the session cookie is enough for a download
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/pdf"


def test_a_case_without_a_model_result_has_no_records(service, ct_slices, tmp_path: Path) -> None:
    """A radiograph sent to the CT run (write_dicom, Modality CR): no result, so 409 no_result."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(ct_slices[0][1])).convert("L"), dtype=np.uint16) * 16
    path = write_dicom(tmp_path / "chest.dcm", pixels, modality="CR")
    case_id = service.upload("lab", [(path.name, path.read_bytes())]).json()["id"]
    assert service.wait(case_id)["status"] == "no_result"
    for what in ("sr.dcm", "sc.dcm", "report.pdf", "fhir.json"):
        answer = get(service, case_id, what)
        assert (answer.status_code, answer.json()["code"]) == (409, "no_result"), what


@pytest.mark.shared
@pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason=f"no real DICOM samples at {SHARED_DICOM} (../shared)")
def test_records_of_a_real_ct_file(service, tmp_path: Path) -> None:
    """A real scanner's CT file (pydicom's CT_small.dcm from ../shared): its patient and study carry over."""
    data = (SHARED_DICOM / "CT_small.dcm").read_bytes()
    source = pydicom.dcmread(io.BytesIO(data))
    case_id = service.upload("lab", [("CT_small.dcm", data)]).json()["id"]
    assert service.wait(case_id)["status"] == "ready"
    review(service, case_id, "covid", sign=True)
    for what in ("sr.dcm", "sc.dcm"):
        raw = get(service, case_id, what).content
        assert dciodvfy_errors(raw, tmp_path) == [], what
        ds = pydicom.dcmread(io.BytesIO(raw))
        assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientName == source.PatientName
        assert ds.PatientID == source.PatientID and ds.get("StudyDate") == source.get("StudyDate")


def test_any_text_makes_valid_dicom(service, ct_slices, tmp_path: Path) -> None:
    """A patient id with a backslash (DICOM's value separator) and letters beyond ASCII, a comment in
    another script: the SR and SC are UTF-8 (ISO_IR 192) and still valid."""
    case_id = service.upload("lab", ct_slices[2:3], patient_id="Zoë\\Ø-7").json()["id"]
    assert service.wait(case_id)["status"] == "ready"
    review(service, case_id, "covid", sign=True, comment="opacités en verre dépoli; 磨玻璃影")
    sr = sr_of(service, case_id)
    assert sr.SpecificCharacterSet == "ISO_IR 192" and sr.PatientID == "Zoë_Ø-7"
    texts = [it.TextValue for it in flatten(sr.ContentSequence) if it.ValueType == "TEXT"]
    assert "opacités en verre dépoli; 磨玻璃影" in texts
    for what in ("sr.dcm", "sc.dcm"):
        assert dciodvfy_errors(get(service, case_id, what).content, tmp_path) == [], what
    assert "Zoë\\Ø-7" in pdf_text(get(service, case_id, "report.pdf").content)


def test_a_doctor_downloads_the_records_in_chromium(service, dicom_case, tiny_run, tmp_path: Path) -> None:
    """The case page's buttons in a real browser on a real server: the PDF and the SR download."""
    from service_helpers import uvicorn_server
    from test_service_browser import chromium_page

    from conftest import PASSWORD
    from covidscan.service.settings import ServiceSettings

    case_id, _ = dicom_case
    settings = ServiceSettings(
        data_dir=service.data_dir, database_url=service.database_url, run=tiny_run, worker=False
    )
    with uvicorn_server(settings) as url, chromium_page(1280, 1000) as page:
        page.goto(f"{url}/cases/{case_id}")
        page.fill("input[name=name]", "doctor")
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(f"{url}/cases/{case_id}")
        for label, magic in (("PDF report", b"%PDF-"), ("DICOM SR", b"DICM")):
            with page.expect_download() as download:
                page.click(f"#records a:text('{label}')")
            data = Path(download.value.path()).read_bytes()
            assert magic in data[:132], label
        page.locator("#records").screenshot(path=str(tmp_path / "records-panel.png"))


def test_reader_first_withholds_the_records_until_the_first_read(service, ct_slices) -> None:
    """A new site is read reader-first: its records, like its result, wait for the doctor's own read."""
    answer = service.client.post(
        "/api/v1/cases",
        headers=service.auth("lab"),
        data={"site": "records-new-site"},
        files=[("files", (n, b, "application/octet-stream")) for n, b in ct_slices[3:4]],
    )
    case_id = answer.json()["id"]
    assert service.wait(case_id, name="lab")["status"] == "ready"
    withheld = get(service, case_id, "fhir.json")
    assert (withheld.status_code, withheld.json()["code"]) == (409, "hidden_until_first_read")
    assert get(service, case_id, "fhir.json", name="lab").status_code == 200  # the sender is not a reader
    read = service.client.post(
        f"/api/v1/cases/{case_id}/first-read", headers=service.auth("doctor"), json={"finding": "covid"}
    )
    assert read.status_code == 201, read.text
    assert get(service, case_id, "fhir.json").status_code == 200
