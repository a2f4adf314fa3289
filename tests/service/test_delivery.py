"""Signed results back to the PACS (issue 16 §3), against a real Orthanc (Debian's, with DICOMweb): the
destinations API and admin page, C-ECHO checks, C-STORE and STOW-RS deliveries of a signed case and of its
amendment, refusing destinations retried then failed (audited, on the case page), the retry schedule, a
worker restarted mid-send, and migration 0005 up and down (SQLite and PostgreSQL).

The DICOM outputs are built here (:func:`sc_outputs`: a highdicom Secondary Capture of the case's image,
the same UIDs on every retry of a version), standing in for the records module's SR and SC.
"""

from __future__ import annotations

import io
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
import test_sites
from fastapi.testclient import TestClient
from highdicom.sc import SCImage
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from service_helpers import free_port, png_bytes
from sqlalchemy import select
from sqlalchemy.orm import Session

from conftest import PASSWORD, Service, add_accounts
from covidscan.service.errors import ErrorCode
from covidscan.service.models import AuditEvent, Case, Delivery
from covidscan.service.storage import BlobStore

empty_url = test_sites.empty_url  # the fixture: a fresh, empty database per test (SQLite and PostgreSQL)
_alembic = test_sites._alembic
CSRF = re.compile(r'name="csrf" value="([^"]+)"')
RETRY = (0.3, 0.6)  # the service's waits between attempts here: 3 attempts, then failed


def sc_outputs(store: BlobStore) -> Callable[[Session, int], list[Dataset]]:
    """The DICOM outputs of a case's signed version: one Secondary Capture of its first image, in a study
    of the case, with UIDs derived from case and version (a retry sends the same instance again)."""

    def outputs(s: Session, case_id: int) -> list[Dataset]:
        case = s.get(Case, case_id)
        review = [r for r in case.reviews if r.signed_at is not None][-1]
        pixels = np.asarray(Image.open(io.BytesIO(store.read(case.images[0].display_sha256))).convert("L"))

        def uid(*parts: object) -> str:
            return generate_uid(entropy_srcs=["covidscan-test", str(case_id), *map(str, parts)])

        return [
            SCImage(
                pixel_array=pixels,
                photometric_interpretation="MONOCHROME2",
                bits_allocated=8,
                coordinate_system="PATIENT",
                patient_orientation=("L", "P"),
                study_instance_uid=uid("study"),
                series_instance_uid=uid("series", review.version),
                series_number=100 + review.version,
                sop_instance_uid=uid("sc", review.version),
                instance_number=1,
                manufacturer="covidscan tests",
                patient_id=case.patient_id or f"case-{case_id}",
                patient_name="Test^Patient",
                series_description=f"covidscan {review.finding} v{review.version}",
            )
        ]

    return outputs


@pytest.fixture(scope="module")
def pacs(database_url: str, tiny_run: Path, orthanc, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A service whose worker sends to PACS destinations (short retries), and the module's Orthanc."""
    from covidscan.service.app import create_app
    from covidscan.service.settings import ServiceSettings

    data_dir = tmp_path_factory.mktemp("service")
    tokens = add_accounts(data_dir, database_url)
    settings = ServiceSettings(
        data_dir=data_dir,
        database_url=database_url,
        run=tiny_run,
        poll_seconds=0.05,
        delivery_retry_seconds=RETRY,
    )
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        sender = client.app.state.worker.sender
        sender.outputs, sender.timeout = sc_outputs(client.app.state.store), 10.0
        yield Service(client, data_dir, database_url, tokens), orthanc


@pytest.fixture
def clean(pacs) -> Iterator:
    """An empty PACS and no destinations before each test, and none left after it."""
    service, orthanc = pacs
    orthanc.clear()
    yield pacs
    admin = service.auth("admin")
    for dest in service.client.get("/api/v1/destinations", headers=admin).json():
        assert service.client.delete(f"/api/v1/destinations/{dest['id']}", headers=admin).status_code == 204


def add_destination(service: Service, **body) -> int:
    r = service.client.post("/api/v1/destinations", headers=service.auth("admin"), json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def dicom_destination(service: Service, orthanc, name: str = "orthanc", **changes) -> int:
    body = {
        "name": name,
        "kind": "dicom",
        "host": "127.0.0.1",
        "port": orthanc.dicom_port,
        "called_ae": orthanc.ae_title,
        "calling_ae": "COVIDSCAN",
    }
    return add_destination(service, **(body | changes))


def signed_case(service: Service, finding: str = "covid") -> int:
    """A new case (one phantom-like image), predicted, then signed by a doctor."""
    r = service.upload("lab", [("slice.png", png_bytes((96, 96), 90))], patient_id="P-PACS")
    assert r.status_code == 201, r.text
    case_id = r.json()["id"]
    service.wait(case_id)
    review = {"agree": False, "finding": finding, "comment": "", "sign": True}
    r = service.client.post(f"/api/v1/cases/{case_id}/review", headers=service.auth("doctor"), json=review)
    assert r.status_code == 200, r.text
    return case_id


def amend(service: Service, case_id: int, finding: str) -> None:
    review = {"agree": False, "finding": finding, "sign": True, "amendment_reason": "second look"}
    r = service.client.post(f"/api/v1/cases/{case_id}/review", headers=service.auth("doctor"), json=review)
    assert r.status_code == 200, r.text


def settled(service: Service, case_id: int, n: int, timeout: float = 60.0) -> list[dict]:
    """The case's deliveries once ``n`` of them exist and none is queued or sending any more."""
    deadline = time.monotonic() + timeout
    while True:
        case = service.client.get(f"/api/v1/cases/{case_id}", headers=service.auth("doctor")).json()
        done = [d for d in case["deliveries"] if d["state"] not in ("queued", "sending")]
        if len(case["deliveries"]) == n and len(done) == n:
            return case["deliveries"]
        assert time.monotonic() < deadline, f"deliveries not settled in {timeout} s: {case['deliveries']}"
        time.sleep(0.1)


def audit(service: Service, db_action: str, target: str) -> list[AuditEvent]:
    with service.client.app.state.db.session() as s:
        query = select(AuditEvent).where(AuditEvent.action == db_action, AuditEvent.target == target)
        events = list(s.scalars(query.order_by(AuditEvent.seq)))
        s.expunge_all()
        return events


def test_destinations_api_checks_settings_hides_secrets_and_audits_every_change(clean) -> None:
    service, orthanc = clean
    admin = service.auth("admin")
    dest_id = dicom_destination(service, orthanc)
    stow = {"name": "web", "kind": "stow", "url": orthanc.dicomweb + "/", "bearer_token": "s3cret-token"}
    stow_id = add_destination(service, **stow)
    listed = {d["name"]: d for d in service.client.get("/api/v1/destinations", headers=admin).json()}
    assert listed["web"]["url"] == orthanc.dicomweb and listed["web"]["auth"] == "bearer"
    assert listed["orthanc"]["called_ae"] == orthanc.ae_title and listed["orthanc"]["active"] is True
    assert "s3cret-token" not in service.client.get("/api/v1/destinations", headers=admin).text

    def refused(body: dict, status: int, code: ErrorCode) -> None:
        r = service.client.post("/api/v1/destinations", headers=admin, json=body)
        assert (r.status_code, r.json()["code"]) == (status, code), r.text

    good = {"name": "x", "kind": "dicom", "host": "pacs", "port": 104, "called_ae": "PACS"}
    refused(good | {"called_ae": "BAD\\AE"}, 422, ErrorCode.DESTINATION_INVALID)
    refused(good | {"called_ae": "A" * 17}, 422, ErrorCode.INVALID_REQUEST)
    refused(good | {"port": 70000}, 422, ErrorCode.DESTINATION_INVALID)
    refused(good | {"host": None}, 422, ErrorCode.DESTINATION_INVALID)
    refused({"name": "w", "kind": "stow", "url": "ftp://pacs/x"}, 422, ErrorCode.DESTINATION_INVALID)
    refused(
        {"name": "w", "kind": "stow", "url": "http://p", "basic_user": "u"},
        422,
        ErrorCode.DESTINATION_INVALID,
    )
    refused(good | {"name": "orthanc"}, 409, ErrorCode.DESTINATION_NAME_TAKEN)
    r = service.client.post("/api/v1/destinations", headers=service.auth("doctor"), json=good)
    assert (r.status_code, r.json()["code"]) == (403, ErrorCode.FORBIDDEN_ROLE)

    r = service.client.patch(f"/api/v1/destinations/{dest_id}", headers=admin, json={"active": False})
    assert r.status_code == 200 and r.json()["active"] is False
    r = service.client.patch(f"/api/v1/destinations/{stow_id}", headers=admin, json={"name": "orthanc"})
    assert (r.status_code, r.json()["code"]) == (409, ErrorCode.DESTINATION_NAME_TAKEN)
    assert service.client.delete("/api/v1/destinations/99999", headers=admin).status_code == 404
    assert service.client.delete(f"/api/v1/destinations/{stow_id}", headers=admin).status_code == 204
    added = audit(service, "destination_add", f"destination:{stow_id}")
    assert added[-1].detail["auth"] == "bearer" and "s3cret-token" not in str(added[-1].detail)
    change = audit(service, "destination_change", f"destination:{dest_id}")[-1]
    assert change.detail["before"] == {"active": True} and change.detail["after"] == {"active": False}
    assert audit(service, "destination_delete", f"destination:{stow_id}")


def test_check_echoes_orthanc_and_names_what_a_refusing_destination_said(clean) -> None:
    service, orthanc = clean
    admin = service.auth("admin")

    def check(dest_id: int) -> dict:
        r = service.client.post(f"/api/v1/destinations/{dest_id}/check", headers=admin)
        assert r.status_code == 200, r.text
        return r.json()

    echo = check(dicom_destination(service, orthanc))
    assert echo["ok"] is True and "C-ECHO" in echo["detail"]
    wrong_ae_id = dicom_destination(service, orthanc, "wrong-ae", called_ae="NOT_ORTHANC")
    # Orthanc resets the connection right after refusing, which loses about 1 answer in 20 unless covidscan
    # asks again: 40 checks must all name the refusal
    for _ in range(40):
        wrong_ae = check(wrong_ae_id)
        assert wrong_ae["ok"] is False and "rejected the association" in wrong_ae["detail"]
        assert "Called AE title not recognised" in wrong_ae["detail"]
    nobody = check(dicom_destination(service, orthanc, "nobody", port=free_port()))
    assert nobody["ok"] is False and "nothing answered" in nobody["detail"]
    stow = check(add_destination(service, name="web", kind="stow", url=orthanc.dicomweb))
    assert stow["ok"] is True and "HTTP 200" in stow["detail"]
    bad_url = check(add_destination(service, name="web-404", kind="stow", url=orthanc.url + "/no-dicomweb"))
    assert bad_url["ok"] is False and "HTTP 404" in bad_url["detail"]
    with service.client.app.state.db.session() as s:
        checks = list(s.scalars(select(AuditEvent).where(AuditEvent.action == "destination_check")))
        assert sum(not e.detail["ok"] for e in checks) >= 3 and all(e.actor == "admin" for e in checks)


def test_signed_case_arrives_in_orthanc_by_c_store_and_an_amendment_sends_the_new_version(clean) -> None:
    service, orthanc = clean
    dicom_destination(service, orthanc)
    case_id = signed_case(service, "covid")
    (first,) = settled(service, case_id, 1)
    assert first["state"] == "sent" and first["review_version"] == 1 and first["attempts"] == 1
    stored = {ds.SOPInstanceUID: ds for ds in orthanc.datasets()}
    assert set(stored) == set(first["sop_instance_uids"])
    sc = stored[first["sop_instance_uids"][0]]
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    assert sc.PatientID == "P-PACS" and sc.SeriesDescription == "covidscan covid v1"
    assert sc.pixel_array.shape == (96, 96)
    sent = audit(service, "delivery_sent", f"case:{case_id}")
    assert [(e.detail["destination"], e.detail["version"]) for e in sent] == [("orthanc", 1)]
    assert sent[0].detail["sop_instance_uids"] == first["sop_instance_uids"]

    amend(service, case_id, "non_covid")
    deliveries = settled(service, case_id, 2)
    second = next(d for d in deliveries if d["review_version"] == 2)
    assert second["state"] == "sent" and second["sop_instance_uids"] != first["sop_instance_uids"]
    by_uid = {ds.SOPInstanceUID: ds for ds in orthanc.datasets()}
    assert (
        len(by_uid) == 2
        and by_uid[second["sop_instance_uids"][0]].SeriesDescription == "covidscan non_covid v2"
    )
    assert len({ds.StudyInstanceUID for ds in by_uid.values()}) == 1  # the new version joins the same study


def test_stow_rs_delivery_arrives_through_orthancs_dicomweb(clean) -> None:
    service, orthanc = clean
    add_destination(service, name="web", kind="stow", url=orthanc.dicomweb)
    case_id = signed_case(service, "indeterminate")
    (delivery,) = settled(service, case_id, 1)
    assert delivery["state"] == "sent", delivery
    (uid,) = delivery["sop_instance_uids"]
    found = httpx.get(f"{orthanc.dicomweb}/instances", params={"SOPInstanceUID": uid}, timeout=30).json()
    assert len(found) == 1 and found[0]["00080018"]["Value"] == [uid]  # QIDO-RS finds it
    study = found[0]["0020000D"]["Value"][0]
    wado = httpx.get(
        f"{orthanc.dicomweb}/studies/{study}",
        headers={"Accept": 'multipart/related; type="application/dicom"'},
        timeout=30,
    )
    assert wado.status_code == 200 and uid.encode() in wado.content  # WADO-RS gives it back
    (ds,) = orthanc.datasets()
    assert ds.SOPInstanceUID == uid and ds.SeriesDescription == "covidscan indeterminate v1"


def test_refusing_destinations_are_retried_then_failed_audited_and_shown_on_the_case_page(clean) -> None:
    service, orthanc = clean
    dicom_destination(service, orthanc, "wrong-ae", called_ae="NOT_ORTHANC")
    dicom_destination(service, orthanc, "nobody", port=free_port())
    case_id = signed_case(service)
    deliveries = {d["destination"]: d for d in settled(service, case_id, 2)}
    for name, said in (("wrong-ae", "rejected the association"), ("nobody", "nothing answered")):
        assert deliveries[name]["state"] == "failed" and deliveries[name]["attempts"] == len(RETRY) + 1
        assert said in deliveries[name]["last_error"] and deliveries[name]["sop_instance_uids"] == []
    failed = {e.detail["destination"]: e for e in audit(service, "delivery_failed", f"case:{case_id}")}
    assert set(failed) == {"wrong-ae", "nobody"}
    assert "Called AE title not recognised" in failed["wrong-ae"].detail["error"]
    assert failed["nobody"].detail["attempts"] == 3 and len(failed["nobody"].detail["sop_instance_uids"]) == 1
    assert orthanc.instances() == []
    browser = TestClient(service.client.app, base_url="http://127.0.0.1")
    page = browser.get("/login")
    browser.post(
        "/login", data={"name": "doctor", "password": PASSWORD, "csrf": CSRF.search(page.text).group(1)}
    )
    html = browser.get(f"/cases/{case_id}").text
    section = html[html.index('id="deliveries"') :]
    assert "wrong-ae" in section and "nobody" in section and section.count(">failed<") == 2
    assert "rejected the association" in section and "nothing answered" in section


def test_an_inactive_destination_is_not_sent_to(clean) -> None:
    service, orthanc = clean
    admin = service.auth("admin")
    dest_id = dicom_destination(service, orthanc, active=False)
    case_id = signed_case(service)
    assert service.client.get(f"/api/v1/cases/{case_id}", headers=admin).json()["deliveries"] == []
    service.client.patch(f"/api/v1/destinations/{dest_id}", headers=admin, json={"active": True})
    amend(service, case_id, "non_covid")  # active now: the amendment goes
    (delivery,) = settled(service, case_id, 1)
    assert delivery["state"] == "sent" and delivery["review_version"] == 2 and len(orthanc.instances()) == 1


def test_admin_page_adds_checks_deactivates_and_removes_destinations_with_csrf(clean) -> None:
    service, orthanc = clean
    browser = TestClient(service.client.app, base_url="http://127.0.0.1")
    page = browser.get("/login")
    browser.post(
        "/login", data={"name": "admin", "password": PASSWORD, "csrf": CSRF.search(page.text).group(1)}
    )
    admin_page = browser.get("/admin")
    assert admin_page.status_code == 200 and 'id="destinations"' in admin_page.text
    csrf = CSRF.search(admin_page.text).group(1)
    form = {
        "name": "pacs-form",
        "kind": "dicom",
        "host": "127.0.0.1",
        "port": str(orthanc.dicom_port),
        "called_ae": orthanc.ae_title,
    }
    assert browser.post("/admin/destinations", data=form).status_code == 403  # no CSRF token
    bad = browser.post("/admin/destinations", data=form | {"port": "eighty", "csrf": csrf})
    assert bad.status_code == 422 and "port" in bad.text
    added = browser.post("/admin/destinations", data=form | {"csrf": csrf})
    assert added.status_code == 200 and "added destination pacs-form" in added.text
    (dest,) = service.client.get("/api/v1/destinations", headers=service.auth("admin")).json()
    checked = browser.post(f"/admin/destinations/{dest['id']}/check", data={"csrf": csrf})
    assert checked.status_code == 200 and "pacs-form: OK: C-ECHO" in checked.text
    off = browser.post(f"/admin/destinations/{dest['id']}/deactivate", data={"csrf": csrf})
    assert off.status_code == 200 and ">inactive<" in off.text
    gone = browser.post(f"/admin/destinations/{dest['id']}/delete", data={"csrf": csrf})
    assert gone.status_code == 200 and "removed destination pacs-form" in gone.text
    assert service.client.get("/api/v1/destinations", headers=service.auth("admin")).json() == []


# --- the sender on its own, with a simulated clock and workers that die --------------------------------


@pytest.fixture
def quiet(empty_url: str, tmp_path: Path, orthanc) -> Iterator:
    """A fresh database with the test accounts and no worker running: the test drives senders itself."""
    from covidscan.service.settings import ServiceSettings, open_service

    add_accounts(tmp_path, empty_url)
    db, store = open_service(ServiceSettings(data_dir=tmp_path, database_url=empty_url))
    orthanc.clear()
    yield db, store, orthanc
    db.dispose()


def sign_case(db, store: BlobStore, destinations: list[dict]) -> int:
    """Add ``destinations`` and a case signed by a doctor (its deliveries are queued with the signature)."""
    from covidscan.service.cases import Upload, check_uploads, create_case, submit_review
    from covidscan.service.delivery import add_destination as add
    from covidscan.service.models import Destination, User

    with db.session() as s:
        users = {u.name: u for u in s.scalars(select(User))}
        for values in destinations:
            if s.scalar(select(Destination).where(Destination.name == values["name"])) is None:
                add(s, values, users["admin"])
        checked = check_uploads([Upload("a.png", png_bytes((64, 64), 80))], max_pixels=10**6)
        case = create_case(s, store, users["lab"], checked, "P-Q")
        case.status = "no_result"  # no worker predicts here: the doctor gives their own finding
        s.flush()
        submit_review(s, case, users["doctor"], agree=False, finding="covid", comment="", sign=True)
        return case.id


def deliveries_of(db, case_id: int) -> list[Delivery]:
    with db.session() as s:
        rows = list(s.scalars(select(Delivery).where(Delivery.case_id == case_id).order_by(Delivery.id)))
        s.expunge_all()
        return rows


def events(db, action: str, case_id: int) -> list[AuditEvent]:
    with db.session() as s:
        query = select(AuditEvent).where(AuditEvent.action == action, AuditEvent.target == f"case:{case_id}")
        rows = list(s.scalars(query))
        s.expunge_all()
        return rows


def test_failed_sends_wait_1_5_15_60_minutes_then_fail_once(quiet) -> None:
    from covidscan.service.delivery import Sender
    from covidscan.service.models import utcnow

    db, store, _ = quiet
    nobody = {"name": "nobody", "kind": "dicom", "host": "127.0.0.1", "port": free_port(), "called_ae": "X"}
    case_id = sign_case(db, store, [nobody])
    sender = Sender(db, owner="test:1:a", stale_owners=lambda owners: [], outputs=sc_outputs(store))
    now, waits = utcnow(), []
    for attempt in range(1, 6):
        assert sender.run_once(now), f"attempt {attempt} was not due"
        (delivery,) = deliveries_of(db, case_id)
        assert delivery.attempts == attempt and "nothing answered" in delivery.last_error
        if attempt == 5:
            break
        assert delivery.state == "queued"
        waits.append((delivery.next_attempt_at - now).total_seconds())
        assert not sender.run_once(delivery.next_attempt_at - timedelta(seconds=1))  # not due yet
        now = delivery.next_attempt_at
    assert waits == [60, 300, 900, 3600]
    assert delivery.state == "failed" and not sender.run_once(now + timedelta(days=1))
    (failed,) = events(db, "delivery_failed", case_id)
    assert failed.detail["attempts"] == 5 and failed.detail["destination"] == "nobody"


def test_a_worker_restarted_mid_send_never_sends_twice_and_a_live_lease_is_respected(quiet) -> None:
    from covidscan.service.delivery import LEASE, Sender
    from covidscan.service.models import utcnow
    from covidscan.service.worker import HOST, Worker

    db, store, orthanc = quiet
    pacs = {
        "name": "orthanc",
        "kind": "dicom",
        "host": "127.0.0.1",
        "port": orthanc.dicom_port,
        "called_ae": orthanc.ae_title,
    }
    case_id = sign_case(db, store, [pacs])
    built: list[int] = []

    def counted(s: Session, case: int) -> list[Dataset]:
        built.append(case)
        return sc_outputs(store)(s, case)

    gone = subprocess.Popen(["true"])
    gone.wait()  # a process id that no longer runs: the worker that claimed the delivery died
    crashed = Sender(db, owner=f"{HOST}:{gone.pid}:dead", stale_owners=lambda owners: [], outputs=counted)
    (delivery_id,) = [crashed.claim()]
    assert delivery_id is not None and deliveries_of(db, case_id)[0].state == "sending"

    restarted = Worker(db, store)  # the server started again: its sender takes the dead owner's delivery
    restarted.sender.outputs = counted
    assert restarted.sender.run_once()
    (delivery,) = deliveries_of(db, case_id)
    assert delivery.state == "sent" and delivery.attempts == 2 and built == [case_id]
    crashed.process(delivery_id)  # the old owner, had it come back: it no longer owns it, sends nothing
    assert built == [case_id] and not restarted.sender.run_once() and not Worker(db, store).sender.run_once()
    assert len(events(db, "delivery_sent", case_id)) == 1 and len(orthanc.instances()) == 1

    second = sign_case(db, store, [pacs])
    live = Worker(db, store).sender  # alive (this process), its lease running: nobody else takes it
    assert live.claim() is not None
    other = Worker(db, store).sender
    other.outputs = sc_outputs(store)
    assert not other.run_once()
    assert other.run_once(utcnow() + LEASE + timedelta(seconds=1))  # once its lease ran out, taken over
    assert deliveries_of(db, second)[0].state == "sent" and len(orthanc.instances()) == 2


def test_deliveries_wait_while_their_destination_is_inactive_and_fail_once_it_is_deleted(quiet) -> None:
    from covidscan.service.delivery import Sender, change_destination, delete_destination
    from covidscan.service.models import Destination, User

    db, store, orthanc = quiet
    pacs = {
        "name": "orthanc",
        "kind": "dicom",
        "host": "127.0.0.1",
        "port": orthanc.dicom_port,
        "called_ae": orthanc.ae_title,
    }
    case_id = sign_case(db, store, [pacs, pacs | {"name": "gone"}])
    sender = Sender(db, owner="test:2:a", stale_owners=lambda owners: [], outputs=sc_outputs(store))

    def admin_does(change) -> None:
        with db.session() as s:
            admin = s.scalar(select(User).where(User.name == "admin"))
            change(s, {d.name: d for d in s.scalars(select(Destination))}, admin)

    admin_does(lambda s, dests, admin: change_destination(s, dests["orthanc"], {"active": False}, admin))
    admin_does(lambda s, dests, admin: delete_destination(s, dests["gone"], admin))
    assert sender.run_once() and not sender.run_once()  # the deleted one ends; the inactive one waits
    states = {d.destination_name: (d.state, d.attempts, d.destination_id) for d in deliveries_of(db, case_id)}
    assert states["orthanc"][:2] == ("queued", 0) and states["gone"] == ("failed", 1, None)
    assert "deleted" in deliveries_of(db, case_id)[1].last_error
    assert [e.detail["destination"] for e in events(db, "delivery_failed", case_id)] == ["gone"]
    admin_does(lambda s, dests, admin: change_destination(s, dests["orthanc"], {"active": True}, admin))
    assert sender.run_once()
    assert deliveries_of(db, case_id)[0].state == "sent" and len(orthanc.instances()) == 1


def test_a_version_not_yet_sent_when_an_amendment_is_signed_is_superseded_by_it(quiet) -> None:
    from covidscan.service.cases import submit_review
    from covidscan.service.delivery import Sender
    from covidscan.service.models import User

    db, store, orthanc = quiet
    pacs = {
        "name": "orthanc",
        "kind": "dicom",
        "host": "127.0.0.1",
        "port": orthanc.dicom_port,
        "called_ae": orthanc.ae_title,
    }
    case_id = sign_case(db, store, [pacs])
    sender = Sender(db, owner="test:3:a", stale_owners=lambda owners: [], outputs=sc_outputs(store))

    def amend_now(finding: str) -> None:
        with db.session() as s:
            doctor = s.scalar(select(User).where(User.name == "doctor"))
            submit_review(
                s,
                s.get(Case, case_id),
                doctor,
                agree=False,
                finding=finding,
                comment="",
                sign=True,
                amendment_reason="second look",
            )

    amend_now("non_covid")  # v1 was still waiting: it goes no more, v2 goes instead
    assert sender.run_once() and not sender.run_once()
    states = [(d.review_version, d.state) for d in deliveries_of(db, case_id)]
    assert states == [(1, "superseded"), (2, "sent")]
    assert sender.claim() is None
    amend_now("indeterminate")
    claimed = sender.claim()  # v3 claimed, then v4 signed before it is sent: v3 is superseded at sending
    amend_now("covid")
    sender.process(claimed)
    assert sender.run_once()
    states = [(d.review_version, d.state) for d in deliveries_of(db, case_id)]
    assert states[2:] == [(3, "superseded"), (4, "sent")]
    descriptions = sorted(ds.SeriesDescription for ds in orthanc.datasets())
    assert descriptions == ["covidscan covid v4", "covidscan non_covid v2"]
    assert [e.detail["version"] for e in events(db, "delivery_sent", case_id)] == [2, 4]


def test_an_instance_the_pacs_refuses_is_named_with_its_status_over_c_store_and_stow_rs(orthanc) -> None:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from covidscan.service.delivery import DeliveryError, Target, send

    broken = Dataset()  # a Secondary Capture without its study and series: Orthanc refuses to store it
    broken.file_meta = FileMetaDataset()
    broken.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    broken.SOPClassUID = broken.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    broken.SOPInstanceUID = broken.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    broken.PatientID = "P-BROKEN"
    common = {"bearer_token": None, "basic_user": None, "basic_password": None}
    dicom = Target(
        "o", "dicom", "127.0.0.1", orthanc.dicom_port, orthanc.ae_title, "COVIDSCAN", None, **common
    )
    stow = Target("w", "stow", None, None, None, None, orthanc.dicomweb, **common)
    with pytest.raises(DeliveryError, match=r"stored 0 of 1; refused .*: status 0xA700"):
        send(dicom, [broken])
    with pytest.raises(DeliveryError, match=r"answered HTTP 400: .*failure reason 0xC000"):
        send(stow, [broken])


def test_migration_0005_adds_destinations_and_deliveries_and_goes_back_down(empty_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import inspect, text

    from covidscan.service.db import Database
    from covidscan.service.models import Base

    db = Database(empty_url)
    _alembic(db, "0004")
    at = "2026-01-01 10:00:00"
    with db.engine.begin() as conn:  # a service as 0004 left it: a signed case
        conn.execute(
            text(
                f"INSERT INTO users (id, name, role, active, created_at) VALUES "
                f"(1, 'lab', 'submitter', true, '{at}')"
            )
        )
        conn.execute(
            text(
                f"INSERT INTO sites (id, name, created_at, status, status_since) VALUES "
                f"(1, 'lab', '{at}', 'new', '{at}')"
            )
        )
        conn.execute(
            text(
                f"INSERT INTO cases (id, submitted_by, site_id, status, created_at) VALUES "
                f"(1, 1, 1, 'signed', '{at}')"
            )
        )
    _alembic(db, "head")
    with db.engine.begin() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        conn.execute(
            text(
                f"INSERT INTO destinations (id, name, kind, host, port, called_ae, active, "
                f"created_at) VALUES (1, 'pacs', 'dicom', 'h', 104, 'PACS', true, '{at}')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO deliveries (id, case_id, review_version, destination_id, destination_name, "
                "state, attempts, next_attempt_at, created_at, updated_at) VALUES "
                f"(1, 1, 1, 1, 'pacs', 'sent', 1, '{at}', '{at}', '{at}')"
            )
        )
    with db.engine.begin() as conn:  # a deleted destination leaves its deliveries, named
        conn.execute(text("DELETE FROM destinations WHERE id = 1"))
        row = conn.execute(text("SELECT destination_id, destination_name FROM deliveries")).one()
        assert tuple(row) == (None, "pacs")
    _alembic(db, "0004", down=True)
    with db.engine.connect() as conn:
        assert not inspect(conn).has_table("deliveries") and not inspect(conn).has_table("destinations")
        assert conn.execute(text("SELECT count(*) FROM cases")).scalar() == 1
    _alembic(db, "head")  # and up again
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0005"
    db.dispose()
