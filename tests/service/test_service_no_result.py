"""Issue 15 §1: a case the model gave no result says so (status ``no_result`` with the reason), cannot be
signed as agreeing with a result it does not have (409 ``no_result``), takes the doctor's own finding, and
its images are never exported as training labels -- through the real API and worker, on SQLite and
PostgreSQL.

The defect: a radiograph sent to a CT model (every image refused) was ``ready`` like a predicted case,
could be signed "agree" and was exported to ``verdicts.csv`` for adaptation.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_service_pages import _csrf, login

from covidscan.service.errors import ErrorCode
from dicom_files import write_dicom


@pytest.fixture(scope="module")
def radiograph(ct_slices, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes]:
    """A chest image in a DICOM file whose Modality says CR (a radiograph): the CT run refuses it."""
    pixels = np.asarray(Image.open(io.BytesIO(ct_slices[0][1])).convert("L"), dtype=np.uint16) * 16
    path = write_dicom(tmp_path_factory.mktemp("cr") / "chest.dcm", pixels, modality="CR")
    return path.name, path.read_bytes()


def review(service, case_id: int, **verdict):
    url, body = f"/api/v1/cases/{case_id}/review", {"finding": "covid", **verdict}
    return service.client.post(url, headers=service.auth("doctor"), json=body)


def exported_paths(service) -> set[str]:
    export = service.client.get("/api/v1/export/verdicts.csv", headers=service.auth("admin"))
    assert export.status_code == 200
    return {line.split(",")[0] for line in export.text.splitlines()[1:]}


def blob_path(service, sha256: str) -> str:
    return str(service.data_dir / "blobs" / sha256[:2] / sha256)


def test_a_case_without_any_result_says_so_and_takes_only_the_doctors_finding(service, radiograph) -> None:
    case_id = service.upload("lab", [radiograph], patient_id="NR-1").json()["id"]
    case = service.wait(case_id)
    assert case["status"] == "no_result" and case["group"] is None
    assert case["no_result"] and "wrong_modality" in case["images"][0]["error"]
    # in the doctor's words, naming the file as it was sent (not the name it is stored under)
    reason = case["no_result"]
    assert reason.startswith("none of its 1 image(s) has a result: ") and "chest.dcm" in reason
    listed = service.client.get("/api/v1/worklist", params={"q": "NR-1"}, headers=service.auth("doctor"))
    (row,) = listed.json()["items"]
    assert row["status"] == "no_result" and row["no_result"] == case["no_result"]

    refused = review(service, case_id, agree=True, sign=True)
    assert refused.status_code == 409 and refused.json()["code"] == ErrorCode.NO_RESULT
    draft = review(service, case_id, agree=True)  # not even as a draft
    assert draft.status_code == 409 and draft.json()["code"] == ErrorCode.NO_RESULT
    signed = review(service, case_id, agree=False, finding="non_covid", sign=True, comment="own reading")
    assert signed.status_code == 200 and signed.json()["status"] == "signed"
    after = service.client.get(f"/api/v1/cases/{case_id}", headers=service.auth("doctor")).json()
    assert after["status"] == "signed" and after["no_result"] == case["no_result"]  # still says so
    amend = review(service, case_id, agree=True, sign=True, amendment_reason="agree after all")
    assert amend.status_code == 409 and amend.json()["code"] == ErrorCode.NO_RESULT
    # the model could not read the image: its signed finding is no training label
    assert blob_path(service, case["images"][0]["sha256"]) not in exported_paths(service)


def test_only_the_images_the_model_read_are_exported(service, ct_slices, radiograph) -> None:
    case_id = service.upload("lab", [ct_slices[1], radiograph], patient_id="NR-2").json()["id"]
    case = service.wait(case_id)
    assert case["status"] == "ready" and case["no_result"] is None and case["group"]["n_images"] == 1
    read, refused = case["images"]
    assert read["p_covid"] is not None and refused["error"]
    signed = review(service, case_id, agree=True, finding=case["group"]["label"], sign=True)
    assert signed.status_code == 200
    paths = exported_paths(service)
    assert blob_path(service, read["sha256"]) in paths
    assert blob_path(service, refused["sha256"]) not in paths


def test_the_case_page_refuses_agreeing_with_no_result(service, radiograph) -> None:
    case_id = service.upload("lab", [radiograph], patient_id="NR-3").json()["id"]
    service.wait(case_id)
    with TestClient(service.client.app, base_url="http://127.0.0.1") as browser:
        login(browser, "doctor")
        page = browser.get(f"/cases/{case_id}")
        # the page offers the doctor's own finding, never an "agree" with a result it does not have
        assert 'id="verdict-form"' in page.text and 'id="no-result"' in page.text
        assert 'name="agree" value="yes"' not in page.text
        form = {"agree": "yes", "finding": "covid", "sign": "on", "csrf": _csrf(page.text)}
        r = browser.post(f"/cases/{case_id}/review", data=form)
        assert r.status_code == 409 and "no model result to agree with" in r.text
        form["agree"] = "no"
        r = browser.post(f"/cases/{case_id}/review", data=form, follow_redirects=False)
        assert r.status_code == 303
    after = service.client.get(f"/api/v1/cases/{case_id}", headers=service.auth("doctor")).json()
    assert after["review"]["agree"] is False and after["review"]["signed"]


def test_agreement_counts_only_cases_with_a_result(service) -> None:
    """Of this module's three signed cases (run above), two had no result to agree or disagree with."""
    from covidscan.service.cases import agreement_by_month
    from covidscan.service.settings import ServiceSettings, open_service

    db, _ = open_service(ServiceSettings(data_dir=service.data_dir, database_url=service.database_url))
    with db.session() as s:
        months = agreement_by_month(s)
    db.dispose()
    assert sum(m["signed"] for m in months) == 1 and sum(m["agreed"] for m in months) == 1  # NR-2 only


def test_the_result_field_is_in_the_openapi_schema(service) -> None:
    spec = service.client.get("/openapi.json").json()["components"]["schemas"]
    assert "no_result" in spec["CaseOut"]["properties"] and "no_result" in spec["WorklistItem"]["properties"]
    assert "no_result" in spec["CaseOut"]["properties"]["status"]["enum"]
