"""DICOMweb against a real Uvicorn server, on SQLite and PostgreSQL: STOW-RS with the `dicomweb-client`
package creates one case per series and lists refused instances with their FailureReason; QIDO-RS finds
what a caller may see; WADO-RS returns the very bytes stored; migration 0004 goes up and down."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
import test_sites
from dicomweb_client import DICOMwebClient
from requests.exceptions import HTTPError
from service_helpers import migrations_head, uvicorn_server
from sqlalchemy import text
from test_dicom_listener import _jpeg_lossless, series

from conftest import add_accounts
from covidscan.service.db import Database
from covidscan.service.settings import ServiceSettings

FAILED = "00081198"  # FailedSOPSequence
REFERENCED = "00081199"  # ReferencedSOPSequence
FAILURE_REASON = "00081197"


@dataclass
class Web:
    url: str
    tokens: dict[str, str]

    def headers(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[name]}"}

    def client(self, name: str) -> DICOMwebClient:
        return DICOMwebClient(url=f"{self.url}/dicomweb", headers=self.headers(name))

    def cases(self, patient: str) -> list[dict]:
        page = httpx.get(
            f"{self.url}/api/v1/worklist",
            params={"filter": "all", "q": patient},
            headers=self.headers("doctor"),
            timeout=30,
        ).json()
        return [item for item in page["items"] if item["patient_id"] == patient]


@pytest.fixture(scope="module")
def web(database_url: str, tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    data_dir = tmp_path_factory.mktemp("dicomweb")
    tokens = add_accounts(data_dir, database_url)
    settings = ServiceSettings(
        data_dir=data_dir, database_url=database_url, run=tiny_run, max_pixels=4_000_000, poll_seconds=0.05
    )
    with uvicorn_server(settings) as url:
        yield Web(url, tokens)


def encoded(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def stow_raw(web: Web, name: str, parts: list[bytes], content_type: str | None = None) -> httpx.Response:
    """A STOW-RS request built by hand (its exact bytes known)."""
    boundary = "covidscan-test-boundary"
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n" for p in parts
    )
    body += f"--{boundary}--\r\n".encode()
    kind = content_type or f'multipart/related; type="application/dicom"; boundary={boundary}'
    return httpx.post(
        f"{web.url}/dicomweb/studies",
        content=body,
        headers={**web.headers(name), "Content-Type": kind, "Accept": "application/dicom+json"},
        timeout=60,
    )


def test_stow_makes_one_case_per_series(web: Web) -> None:
    first = series("stow-one", n=2, InstitutionName="Hill Clinic")
    second = series("stow-one", n=3)
    answer = web.client("lab").store_instances(first + second)
    assert [item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence] == [
        ds.SOPInstanceUID for ds in first + second
    ]
    assert "FailedSOPSequence" not in answer
    assert answer.ReferencedSOPSequence[0].RetrieveURL.endswith(
        f"/dicomweb/studies/{first[0].StudyInstanceUID}/series/{first[0].SeriesInstanceUID}"
        f"/instances/{first[0].SOPInstanceUID}"
    )
    cases = sorted(web.cases("stow-one"), key=lambda c: c["n_images"])  # at once: no quiet period
    assert [(c["n_images"], c["site"]["name"]) for c in cases] == [(2, "Hill Clinic"), (3, "lab")]


def test_stow_lists_refused_instances_and_keeps_the_good_ones(web: Web) -> None:
    good = series("stow-mixed", n=2)
    no_pixels = series("stow-mixed", n=1)[0]
    del no_pixels.PixelData
    mr = series("stow-mixed", n=1, Modality="MR")[0]
    undecodable = _jpeg_lossless(series("stow-mixed", n=1)[0])
    response = stow_raw(web, "lab", [encoded(ds) for ds in (good[0], no_pixels, mr, good[1], undecodable)])
    assert response.status_code == 202
    assert response.headers["content-type"] == "application/dicom+json"
    answer = response.json()
    assert [i["00081155"]["Value"][0] for i in answer[REFERENCED]["Value"]] == [
        ds.SOPInstanceUID for ds in good
    ]
    failed = {i["00081155"]["Value"][0]: i[FAILURE_REASON]["Value"][0] for i in answer[FAILED]["Value"]}
    assert failed == {
        no_pixels.SOPInstanceUID: 0xA900,
        mr.SOPInstanceUID: 0xC001,
        undecodable.SOPInstanceUID: 0xC122,
    }
    assert len(response.headers.get_list("warning")) == 3  # each reason in words
    (case,) = web.cases("stow-mixed")
    assert case["n_images"] == 2


def test_stow_of_only_bad_instances_is_409_and_stores_nothing(web: Web) -> None:
    bad = series("stow-bad", n=1, BodyPartExamined="KNEE")[0]
    truncated = encoded(series("stow-bad", n=1)[0])[:-1000]  # cut off in its pixel data
    response = stow_raw(web, "lab", [encoded(bad), b"not dicom at all", truncated])
    assert response.status_code == 409
    reasons = [i[FAILURE_REASON]["Value"][0] for i in response.json()[FAILED]["Value"]]
    assert reasons == [0xC001, 0xC000, 0xC000]
    assert web.cases("stow-bad") == []
    with pytest.raises(HTTPError):  # dicomweb-client raises for a 409
        web.client("lab").store_instances([bad])


def test_stow_refuses_without_a_submitter_or_dicom(web: Web) -> None:
    ds = series("stow-refused", n=1)[0]
    assert stow_raw(web, "doctor", [encoded(ds)]).json()["code"] == "forbidden_role"
    unauthenticated = httpx.post(f"{web.url}/dicomweb/studies", content=b"x", headers={"Content-Type": "a/b"})
    assert (unauthenticated.status_code, unauthenticated.json()["code"]) == (401, "auth_required")
    wrong = stow_raw(web, "lab", [encoded(ds)], content_type="application/dicom")
    assert (wrong.status_code, wrong.json()["code"]) == (415, "unsupported_media_type")
    empty = stow_raw(web, "lab", [])
    assert (empty.status_code, empty.json()["code"]) == (422, "no_files")
    assert web.cases("stow-refused") == []


def test_qido_finds_what_the_caller_may_see(web: Web) -> None:
    mine = series("qido-lab", n=3, StudyDate="20261201")
    theirs = series("qido-lab2", n=2)
    web.client("lab").store_instances(mine)
    web.client("lab2").store_instances(theirs)
    study, uid = mine[0].StudyInstanceUID, mine[0].SeriesInstanceUID
    (found,) = web.client("lab").search_for_studies(search_filters={"PatientID": "qido-lab"})
    ds = pydicom.Dataset.from_json(found)
    assert (ds.StudyInstanceUID, ds.PatientID, ds.StudyDate, ds.ModalitiesInStudy) == (
        study,
        "qido-lab",
        "20261201",
        "CT",
    )
    assert (ds.NumberOfStudyRelatedSeries, ds.NumberOfStudyRelatedInstances) == (1, 3)
    assert web.client("lab2").search_for_studies(search_filters={"PatientID": "qido-lab"}) == []  # not theirs
    lab2_sees = {
        pydicom.Dataset.from_json(s).StudyInstanceUID for s in web.client("lab2").search_for_studies()
    }
    assert theirs[0].StudyInstanceUID in lab2_sees and study not in lab2_sees
    doctor = web.client("doctor")
    assert len(doctor.search_for_studies(search_filters={"StudyInstanceUID": study})) == 1
    (one_series,) = doctor.search_for_series(study)
    s = pydicom.Dataset.from_json(one_series)
    assert (s.SeriesInstanceUID, s.Modality, s.NumberOfSeriesRelatedInstances) == (uid, "CT", 3)
    instances = [pydicom.Dataset.from_json(i) for i in doctor.search_for_instances(study, uid)]
    assert [(i.SOPInstanceUID, i.SOPClassUID, i.InstanceNumber) for i in instances] == [
        (d.SOPInstanceUID, d.SOPClassUID, d.InstanceNumber) for d in mine
    ]
    assert web.client("lab2").search_for_instances(study, uid) == []
    page = doctor.search_for_studies(limit=1, offset=0)
    assert len(page) == 1


def test_wado_returns_the_very_bytes_stored(web: Web) -> None:
    slices = series("wado", n=2)
    sent = [encoded(ds) for ds in slices]
    assert stow_raw(web, "lab", sent).status_code == 200
    study, uid, sop = slices[0].StudyInstanceUID, slices[0].SeriesInstanceUID, slices[0].SOPInstanceUID
    got = web.client("lab").retrieve_instance(study, uid, sop)
    assert got.SOPInstanceUID == sop and got.PixelData == slices[0].PixelData
    assert [ds.SOPInstanceUID for ds in web.client("doctor").retrieve_series(study, uid)] == [
        ds.SOPInstanceUID for ds in slices
    ]
    assert len(web.client("doctor").retrieve_study(study)) == 2
    raw = httpx.get(f"{web.url}/dicomweb/studies/{study}", headers=web.headers("doctor"), timeout=60)
    assert raw.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    assert all(b"\r\n\r\n" + data + b"\r\n--" in raw.content for data in sent)  # byte for byte
    hidden = httpx.get(f"{web.url}/dicomweb/studies/{study}", headers=web.headers("lab2"), timeout=60)
    assert (hidden.status_code, hidden.json()["code"]) == (404, "not_found")


def test_a_viewer_reads_metadata_then_frames(web: Web) -> None:
    """What a DICOMweb viewer (OHIF) asks for: a series' metadata, then each instance's frame."""
    slices = series("viewer", n=2)
    web.client("lab").store_instances(slices)
    study, uid = slices[0].StudyInstanceUID, slices[0].SeriesInstanceUID
    doctor = web.client("doctor")
    metadata = [pydicom.Dataset.from_json(m) for m in doctor.retrieve_series_metadata(study, uid)]
    assert [(m.SOPInstanceUID, m.Rows, m.RescaleIntercept) for m in metadata] == [
        (ds.SOPInstanceUID, ds.Rows, ds.RescaleIntercept) for ds in slices
    ]
    raw = doctor.retrieve_series_metadata(study, uid)[0]["7FE00010"]
    assert raw["BulkDataURI"].endswith(f"/instances/{slices[0].SOPInstanceUID}/frames/1")
    assert len(doctor.retrieve_study_metadata(study)) == 2
    (frame,) = doctor.retrieve_instance_frames(study, uid, slices[1].SOPInstanceUID, frame_numbers=[1])
    assert frame == slices[1].PixelData
    # (dicomweb-client sends a Host header without the port, so the URI it got names none: its path is used)
    path = httpx.URL(raw["BulkDataURI"]).path
    missing = httpx.get(f"{web.url}{path[:-1]}2", headers=web.headers("doctor"), timeout=30)
    assert (missing.status_code, missing.json()["code"]) == (404, "not_found")
    with pytest.raises(HTTPError):  # not theirs
        web.client("lab2").retrieve_series_metadata(study, uid)


def test_uploaded_dicom_is_listed_too(web: Web) -> None:
    """Uploads of DICOM files (POST /api/v1/cases) keep the same identifiers, so DICOMweb shows them."""
    slices = series("upload-dicom", n=2)
    files = [("files", (f"{k}.dcm", encoded(ds), "application/dicom")) for k, ds in enumerate(slices)]
    created = httpx.post(
        f"{web.url}/api/v1/cases",
        headers=web.headers("lab"),
        files=files,
        data={"patient_id": "upload-dicom"},
    )
    assert created.status_code == 201
    (found,) = web.client("lab").search_for_studies(search_filters={"PatientID": "upload-dicom"})
    assert pydicom.Dataset.from_json(found).NumberOfStudyRelatedInstances == 2


# ------------------------------------------------------------------ migration 0004
_alembic = test_sites._alembic
empty_url = test_sites.empty_url  # the fixture: a fresh, empty database per test


def test_migration_0004_up_and_down(empty_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import inspect

    from covidscan.service.models import Base

    db = Database(empty_url)
    _alembic(db, "0003")
    at = "2026-01-01 10:00:00"
    with db.engine.begin() as conn:  # a service as 0003 left it: a case with an image
        conn.execute(
            text(
                f"INSERT INTO users (id, name, role, active, created_at) VALUES (1, 'lab', 'submitter', "
                f"true, '{at}')"
            )
        )
        conn.execute(
            text(
                f"INSERT INTO sites (id, name, created_at, status, status_since) VALUES (1, 'lab', "
                f"'{at}', 'new', '{at}')"
            )
        )
        conn.execute(
            text(
                f"INSERT INTO cases (id, submitted_by, site_id, status, created_at) VALUES (1, 1, 1, "
                f"'ready', '{at}')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO case_images (id, case_id, position, original_name, sha256, size, suffix, "
                f"display_sha256, width, height) VALUES (1, 1, 0, 'a.dcm', '{'a' * 64}', 10, '.dcm', "
                f"'{'b' * 64}', 8, 8)"
            )
        )
    _alembic(db, "0004")
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT original_name, study_uid, sop_uid FROM case_images")).all() == [
            ("a.dcm", None, None)  # files are not read by the migration: older images stay unlisted
        ]
        assert conn.execute(text("SELECT count(*) FROM dicom_pending")).scalar() == 0
        if migrations_head() == "0004":
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    _alembic(db, "0003", down=True)
    with db.engine.connect() as conn:
        names = {c["name"] for c in inspect(conn).get_columns("case_images")}
        assert "study_uid" not in names and not inspect(conn).has_table("dicom_pending")
        assert conn.execute(text("SELECT count(*) FROM case_images")).scalar() == 1
    _alembic(db, "head")
    db.dispose()
