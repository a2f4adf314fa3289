"""The real PACS of the tests (tests/service/orthanc.py): Debian's Orthanc with DICOMweb on free loopback
ports, its helpers (upload, push to a DICOM peer with C-STORE), its clean stop; and the end-to-end flow
PACS → covidscan → doctor signs → SR and SC back in the PACS."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from orthanc import AE_TITLE, MISSING, Orthanc, available, orthanc_server
from service_helpers import free_port


@pytest.fixture
def storage_peer() -> Iterator[tuple[int, list]]:
    """A minimal C-STORE SCP (pynetdicom) on a free port that keeps what it receives: the peer Orthanc
    pushes to in these tests of the helper (covidscan's own listener is the ``dicomin`` branch's)."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    received: list = []

    def keep(event) -> int:
        received.append(event.dataset)
        return 0x0000

    ae = AE(ae_title="PEER")
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, keep)])
    try:
        yield port, received
    finally:
        server.shutdown()


def test_orthanc_runs_on_free_loopback_ports_with_its_dicomweb_plugin(orthanc: Orthanc) -> None:
    system = orthanc.get("/system").json()
    assert system["DicomAet"] == AE_TITLE and system["DicomPort"] == orthanc.dicom_port
    assert orthanc.dicom_port != 4242 and not orthanc.url.endswith(":8042")  # never the system service's
    assert "dicom-web" in orthanc.get("/plugins").json()
    assert "covidscan" in orthanc.get("/modalities").json()  # covidscan's listener, named in its config
    assert orthanc.get("/dicom-web/studies").status_code == 200


def test_upload_and_push_send_an_instance_to_a_dicom_peer_with_c_store(
    orthanc: Orthanc, storage_peer
) -> None:
    from test_service_viewer import ct_series

    port, received = storage_peer
    orthanc.clear()
    ids = [orthanc.upload(data) for _, data in ct_series(3, size=64)]
    assert sorted(ids) == sorted(orthanc.instances())
    orthanc.add_modality("peer", "PEER", port)
    answer = orthanc.push("peer", ids)
    assert answer["FailedInstancesCount"] == 0 and answer["InstancesCount"] == 3
    assert len(received) == 3 and {ds.Modality for ds in received} == {"CT"}
    orthanc.add_modality("nobody", "NOBODY", free_port())
    with pytest.raises(httpx.HTTPStatusError):  # a peer that does not answer: the push says so
        orthanc.push("nobody", ids[:1])


def test_orthanc_is_stopped_when_its_context_ends(tmp_path: Path) -> None:
    if not available():
        pytest.skip(MISSING)
    with orthanc_server(tmp_path / "pacs") as pacs:
        assert pacs.get("/system").status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{pacs.url}/system", timeout=2)
    with socket.socket() as s:  # the DICOM port is free again
        s.bind(("127.0.0.1", pacs.dicom_port))


SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@pytest.mark.slow
def test_end_to_end_orthanc_pushes_to_covidscan_a_doctor_signs_and_sr_and_sc_come_back(
    orthanc: Orthanc, tiny_run: Path, tmp_path: Path
) -> None:
    """The whole path in CI: Orthanc pushes a CT series (C-STORE) to covidscan's listener, it becomes a
    case, a doctor signs, and the verified SR and the Secondary Captures arrive back in Orthanc, filed in
    the images' study."""
    from service_helpers import uvicorn_server
    from test_service_viewer import ct_series

    from conftest import add_accounts
    from covidscan.service.settings import ServiceSettings

    tokens = add_accounts(tmp_path, f"sqlite:///{tmp_path / 'e2e.sqlite3'}")
    listener = orthanc.modalities["covidscan"][1]  # the port Orthanc's config names for covidscan
    settings = ServiceSettings(
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'e2e.sqlite3'}",
        run=tiny_run,
        poll_seconds=0.05,
        dicom_port=listener,
    )
    orthanc.clear()
    series = ct_series(4, size=128)
    shared = Path(os.environ.get("COVIDSCAN_SHARED", "../shared")) / "dicom" / "CT_small.dcm"
    files = [data for _, data in series] + ([shared.read_bytes()] if shared.is_file() else [])
    admin = {"Authorization": f"Bearer {tokens['admin']}"}
    doctor = {"Authorization": f"Bearer {tokens['doctor']}"}
    with uvicorn_server(settings) as url:
        dest = {
            "name": "orthanc",
            "kind": "dicom",
            "host": "127.0.0.1",
            "port": orthanc.dicom_port,
            "called_ae": orthanc.ae_title,
            "calling_ae": "COVIDSCAN",
        }
        assert httpx.post(f"{url}/api/v1/destinations", headers=admin, json=dest).status_code == 201
        sources = [orthanc.upload(data) for data in files]
        assert orthanc.push("covidscan", sources)["FailedInstancesCount"] == 0
        deadline, cases = time.monotonic() + 120, []
        while time.monotonic() < deadline and not cases:  # a series becomes a case after its quiet period
            listing = httpx.get(f"{url}/api/v1/worklist", headers=doctor, params={"filter": "all"}).json()
            cases = [c for c in listing["items"] if c["status"] not in ("queued", "running")]
            time.sleep(0.5)
        assert cases, "no case was made of the pushed series in 120 s"
        case_id = cases[0]["id"]
        review = {"agree": False, "finding": "covid", "comment": "e2e", "sign": True}
        assert (
            httpx.post(f"{url}/api/v1/cases/{case_id}/review", headers=doctor, json=review).status_code == 200
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            case = httpx.get(f"{url}/api/v1/cases/{case_id}", headers=doctor).json()
            if case["deliveries"] and case["deliveries"][-1]["state"] in ("sent", "failed"):
                break
            time.sleep(0.2)
        assert case["deliveries"][-1]["state"] == "sent", case["deliveries"]
    came_back = [
        ds for ds in orthanc.datasets() if ds.SOPInstanceUID in case["deliveries"][-1]["sop_instance_uids"]
    ]
    assert len(came_back) == len(case["deliveries"][-1]["sop_instance_uids"])
    (sr,) = [ds for ds in came_back if ds.Modality == "SR"]
    assert sr.VerificationFlag == "VERIFIED" and sr.CompletionFlag == "COMPLETE"
    assert "840539006" in str(sr.ContentSequence)  # the doctor's finding: Disease caused by SARS-CoV-2
    assert [ds for ds in came_back if ds.SOPClassUID == SECONDARY_CAPTURE]  # the Grad-CAM overlays
    source_study = {ds.StudyInstanceUID for ds in orthanc.datasets() if ds.Modality == "CT"}
    assert {ds.StudyInstanceUID for ds in came_back} <= source_study  # filed next to the images
