"""The DICOM listener against real DICOM senders: pynetdicom's SCU and dcmtk's echoscu/storescu, over TCP to
a real Uvicorn server (and `covidscan serve --dicom-port`), on SQLite and PostgreSQL.

A series pushed by C-STORE becomes exactly one case once quiet (patient from PatientID, site from the
calling AE title, submitter the ``dicom`` account); bad instances get their failure status and leave
nothing behind; pending instances survive a restart.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLosslessSV1, MRImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from service_helpers import free_port, start_server, uvicorn_server
from sqlalchemy import create_engine, text
from test_service_viewer import ct_series

from conftest import PG_ENV, add_accounts, fresh_postgres_database
from covidscan.service.settings import ServiceSettings

QUIET = 1.5  # seconds: the series' quiet period in these tests
CALLING = "ST-MARY-CT"


@dataclass
class Listener:
    """A running service with its DICOM listener."""

    url: str
    port: int
    tokens: dict[str, str]
    database_url: str
    data_dir: Path

    def headers(self, name: str = "doctor") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[name]}"}

    def cases(self, patient: str) -> list[dict]:
        """The cases of a patient (a doctor sees all)."""
        page = httpx.get(
            f"{self.url}/api/v1/worklist",
            params={"filter": "all", "q": patient, "limit": 500},
            headers=self.headers(),
            timeout=30,
        ).json()
        return [item for item in page["items"] if item["patient_id"] == patient]

    def sql(self, query: str) -> list[tuple]:
        engine = create_engine(self.database_url)
        try:
            with engine.connect() as conn:
                return [tuple(row) for row in conn.execute(text(query))]
        finally:
            engine.dispose()


def _settings(
    data_dir: Path, database_url: str, run: Path, port: int, quiet: float = QUIET
) -> ServiceSettings:
    return ServiceSettings(
        data_dir=data_dir,
        database_url=database_url,
        run=run,
        max_pixels=4_000_000,
        poll_seconds=0.05,
        dicom_port=port,
        dicom_quiet_seconds=quiet,
    )


@pytest.fixture(scope="module")
def listener(
    database_url: str, tiny_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Listener]:
    data_dir = tmp_path_factory.mktemp("dicom-listener")
    tokens = add_accounts(data_dir, database_url)
    port = free_port()
    with uvicorn_server(_settings(data_dir, database_url, tiny_run, port)) as url:
        yield Listener(url, port, tokens, database_url, data_dir)


def series(patient: str, n: int = 3, **attrs: object) -> list[pydicom.Dataset]:
    """A generated chest CT series (``ct_series``) of one patient, new UIDs, ``attrs`` set on each slice."""
    study, uid = generate_uid(), generate_uid()
    out = []
    for _, data in ct_series(n=n, size=64):
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = patient, study, uid
        for key, value in attrs.items():
            setattr(ds, key, value)
        out.append(ds)
    return out


def send(port: int, datasets: list[pydicom.Dataset], *, calling: str = CALLING, syntaxes=None) -> list[int]:
    """C-STORE each data set in one association; the statuses, in order."""
    ae = AE(ae_title=calling)
    for sop_class in {str(ds.SOPClassUID) for ds in datasets}:
        ae.add_requested_context(sop_class, syntaxes) if syntaxes else ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", port, ae_title="COVIDSCAN")
    assert assoc.is_established, "the listener refused the association"
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def wait_cases(svc: Listener, patient: str, n: int, timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = svc.cases(patient)
        if len(found) >= n:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{n} case(s) of {patient} expected, found {len(svc.cases(patient))}")


def test_c_echo_answers(listener: Listener) -> None:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="COVIDSCAN")
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0x0000
    assoc.release()


def test_association_to_another_ae_title_is_rejected(listener: Listener) -> None:
    ae = AE(ae_title="LOST")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="SOMEONE-ELSE")
    assert assoc.is_rejected


def test_a_series_becomes_one_case_once_quiet(listener: Listener) -> None:
    slices = series("dicom-one", n=4, InstitutionName="Elsewhere Hospital")
    assert send(listener.port, slices) == [0x0000] * 4
    assert listener.cases("dicom-one") == []  # still within the quiet period: the series may go on
    (case,) = wait_cases(listener, "dicom-one", 1)
    time.sleep(QUIET + 1)  # and no second case later
    assert len(listener.cases("dicom-one")) == 1
    assert case["n_images"] == 4
    assert case["site"]["name"] == CALLING  # the calling AE title wins over InstitutionName
    full = httpx.get(
        f"{listener.url}/api/v1/cases/{case['id']}", headers=listener.headers(), timeout=30
    ).json()
    assert [im["name"] for im in full["images"]] == [
        f"{ds.SOPInstanceUID}.dcm" for ds in slices
    ]  # slice order
    assert listener.sql(
        f"SELECT users.name, users.role FROM cases JOIN users ON users.id = cases.submitted_by "
        f"WHERE cases.id = {case['id']}"
    ) == [("dicom", "submitter")]
    uids = listener.sql(
        f"SELECT study_uid, series_uid, sop_uid, sop_class_uid FROM case_images "
        f"WHERE case_id = {case['id']} ORDER BY position"
    )
    assert uids == [
        (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, CTImageStorage) for ds in slices
    ]
    assert listener.sql("SELECT count(*) FROM dicom_pending") == [(0,)]
    # the stored original is the instance as sent (its data set, whatever the file meta pynetdicom wrote)
    sha = listener.sql(f"SELECT sha256 FROM case_images WHERE case_id = {case['id']} AND position = 0")[0][0]
    stored = pydicom.dcmread(listener.data_dir / "blobs" / sha[:2] / sha)
    assert stored.SOPInstanceUID == slices[0].SOPInstanceUID and stored.PixelData == slices[0].PixelData
    actions = listener.sql(
        f"SELECT actor FROM audit_events WHERE action = 'upload' AND target = 'case:{case['id']}'"
    )
    assert actions == [("dicom",)]


def test_two_series_become_two_cases(listener: Listener) -> None:
    first, second = series("dicom-two", n=2), series("dicom-two", n=3)
    for ds in second:  # the same study, another series
        ds.StudyInstanceUID = first[0].StudyInstanceUID
    assert send(listener.port, first + second) == [0x0000] * 5
    cases = wait_cases(listener, "dicom-two", 2)
    time.sleep(QUIET + 1)
    assert sorted(c["n_images"] for c in listener.cases("dicom-two")) == [2, 3]
    assert len(cases) == 2


def _jpeg_lossless(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` claiming JPEG Lossless SV1, a transfer syntax this installation has no decoder for."""
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + bytes(64) + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    return ds


def test_bad_instances_get_a_failure_status_and_leave_nothing(listener: Listener) -> None:
    no_pixels = series("dicom-bad-a", n=1)[0]
    del no_pixels.PixelData
    mr = series("dicom-bad-b", n=1, Modality="MR")[0]
    mr.SOPClassUID = mr.file_meta.MediaStorageSOPClassUID = MRImageStorage
    head = series("dicom-bad-c", n=1, BodyPartExamined="HEAD")[0]
    undecodable = _jpeg_lossless(series("dicom-bad-d", n=1)[0])
    assert send(listener.port, [no_pixels, mr, head]) == [0xA900, 0xC001, 0xC001]
    assert send(listener.port, [undecodable], syntaxes=[JPEGLosslessSV1]) == [0xC122]
    time.sleep(QUIET + 1.5)
    for patient in ("dicom-bad-a", "dicom-bad-b", "dicom-bad-c", "dicom-bad-d"):
        assert listener.cases(patient) == []
    sops = ", ".join(f"'{ds.SOPInstanceUID}'" for ds in (no_pixels, mr, head, undecodable))
    assert listener.sql(f"SELECT count(*) FROM case_images WHERE sop_uid IN ({sops})") == [(0,)]
    assert listener.sql("SELECT count(*) FROM dicom_pending") == [(0,)]


def test_a_bad_instance_does_not_hold_back_its_series(listener: Listener) -> None:
    slices = series("dicom-mixed", n=3)
    del slices[1].PixelData
    assert send(listener.port, slices) == [0x0000, 0xA900, 0x0000]
    (case,) = wait_cases(listener, "dicom-mixed", 1)
    assert case["n_images"] == 2


def test_pending_instances_survive_a_restart(database_url: str, tiny_run: Path, tmp_path: Path) -> None:
    """Instances acknowledged but not yet a case when the server stops become the case after it restarts
    (a database of its own: the module's service would otherwise take the series)."""
    own = (
        f"sqlite:///{tmp_path / 'restart.sqlite3'}"
        if database_url.startswith("sqlite")
        else fresh_postgres_database(os.environ[PG_ENV])
    )
    tokens = add_accounts(tmp_path, own)
    port = free_port()
    slices = series("dicom-restart", n=2)
    with uvicorn_server(_settings(tmp_path, own, tiny_run, port, quiet=3600)) as url:
        assert send(port, slices) == [0x0000, 0x0000]
        svc = Listener(url, port, tokens, own, tmp_path)
        assert svc.sql("SELECT count(*) FROM dicom_pending") == [(2,)]  # acknowledged: stored, waiting
    assert svc.sql("SELECT count(*) FROM cases") == [(0,)]
    with uvicorn_server(_settings(tmp_path, own, tiny_run, port)) as url:
        svc.url = url
        (case,) = wait_cases(svc, "dicom-restart", 1)
    assert case["n_images"] == 2
    assert svc.sql("SELECT count(*) FROM dicom_pending") == [(0,)]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk (storescu, echoscu) is not installed")
def test_covidscan_serve_dicom_port_with_dcmtk(tiny_run: Path, tmp_path: Path) -> None:
    """`covidscan serve --dicom-port --dicom-ae-title` from the command line, fed by dcmtk's tools."""
    tokens = add_accounts(tmp_path / "data", f"sqlite:///{(tmp_path / 'data').resolve() / 'service.sqlite3'}")
    http, dicom = free_port(), free_port()
    proc = start_server(
        tiny_run,
        tmp_path / "data",
        http,
        tmp_path / "serve.log",
        args=["--dicom-port", str(dicom), "--dicom-ae-title", "PACSIN"],
        env={"COVIDSCAN_DICOM_QUIET_SECONDS": "1"},
    )
    try:
        echo = subprocess.run(
            ["echoscu", "-aec", "PACSIN", "127.0.0.1", str(dicom)], capture_output=True, timeout=60
        )
        assert echo.returncode == 0, echo.stderr
        folder = tmp_path / "series"
        folder.mkdir()
        for k, ds in enumerate(series("dcmtk-patient", n=3)):
            ds.save_as(folder / f"{k}.dcm", enforce_file_format=True)
        store = subprocess.run(
            ["storescu", "-aet", "MODALITY1", "-aec", "PACSIN", "+sd", "127.0.0.1", str(dicom), str(folder)],
            capture_output=True,
            timeout=60,
        )
        assert store.returncode == 0, store.stderr
        svc = Listener(f"http://127.0.0.1:{http}", dicom, tokens, "", tmp_path)
        (case,) = wait_cases(svc, "dcmtk-patient", 1)
        assert case["n_images"] == 3 and case["site"]["name"] == "MODALITY1"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_deactivating_the_dicom_account_stops_intake(listener: Listener) -> None:
    """An admin turns DICOM intake off by deactivating the ``dicom`` account: instances get 0x0124."""
    slices = series("dicom-off", n=1)
    assert send(listener.port, slices) == [0x0000]  # the account exists from here on
    admin = listener.headers("admin")
    assert httpx.post(f"{listener.url}/api/v1/users/dicom/deactivate", headers=admin).status_code == 200
    try:
        assert send(listener.port, series("dicom-off-2", n=1)) == [0x0124]
    finally:
        assert httpx.post(f"{listener.url}/api/v1/users/dicom/activate", headers=admin).status_code == 200
    wait_cases(listener, "dicom-off", 1)
    assert listener.cases("dicom-off-2") == []


@pytest.mark.parametrize("title", ["", "BACK\\SLASH", "SEVENTEEN-LETTERS", "é"])
def test_a_bad_ae_title_is_refused_with_its_setting(title: str, tmp_path: Path) -> None:
    from covidscan.errors import ConfigError
    from covidscan.service.settings import load_settings

    with pytest.raises(ConfigError, match="--dicom-ae-title or COVIDSCAN_DICOM_AE_TITLE"):
        load_settings(data_dir=tmp_path, dicom_ae_title=title)


def test_the_orphan_sweep_keeps_the_files_of_pending_instances(tmp_path: Path) -> None:
    """A series still arriving is referenced by its pending rows only: the worker's sweep keeps its files."""
    from covidscan.service.db import Database, migrate
    from covidscan.service.models import DicomPending
    from covidscan.service.storage import BlobStore
    from covidscan.service.worker import Worker

    db = Database(f"sqlite:///{tmp_path / 'sweep.sqlite3'}")
    migrate(db.engine)
    store = BlobStore(tmp_path / "blobs")
    pending, orphan = store.put(b"an instance waiting for its series"), store.put(b"left by a killed upload")
    with db.session() as s:
        s.add(
            DicomPending(
                study_uid="1.2", series_uid="1.2.3", sop_uid="1.2.3.4", sha256=pending, calling_ae="A"
            )
        )
    time.sleep(0.05)
    assert Worker(db, store, orphan_minutes=0).sweep_orphans() == 1
    assert store.path(pending).exists() and not store.path(orphan).exists()
    db.dispose()


@pytest.mark.shared
def test_real_samples_from_shared(listener: Listener) -> None:
    """The public samples of ../shared, as a PACS would push them: the CT (pydicom's CT_small) becomes a
    case of the CT run; the chest CR in JPEG 2000 decodes but is an X-ray, which the CT run does not read."""
    from test_service_viewer import SHARED_DICOM

    if not SHARED_DICOM.is_dir():
        pytest.skip(f"{SHARED_DICOM} is absent")
    ct = pydicom.dcmread(SHARED_DICOM / "CT_small.dcm")
    cr = pydicom.dcmread(SHARED_DICOM / "RG1_J2KR.dcm")
    assert send(listener.port, [ct]) == [0x0000]
    assert send(listener.port, [cr], syntaxes=[cr.file_meta.TransferSyntaxUID]) == [0xC001]
    (case,) = wait_cases(listener, ct.PatientID, 1)
    assert (case["n_images"], case["site"]["name"]) == (1, CALLING)
    assert listener.cases(cr.PatientID) == []
