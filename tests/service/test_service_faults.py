"""Load and faults against a real `covidscan serve` process on 127.0.0.1: 50 concurrent uploads, then
kill -9 with jobs still queued, restart on the same data folder: every case is predicted exactly once; and
`covidscan send` on a folder the service only partly accepts."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_helpers import free_port, png_bytes, start_server, uvicorn_server
from sqlalchemy import select

from conftest import add_accounts
from dicom_files import write_dicom


def test_send_on_a_mixed_folder_reports_the_cases_it_made_and_names_the_files_it_could_not_send(
    tiny_run: Path, tmp_path: Path
) -> None:
    from covidscan.service.settings import ServiceSettings

    inbox = tmp_path / "inbox"
    (inbox / "series").mkdir(parents=True)
    for i in range(2):  # a DICOM series: sent first, accepted
        hu = np.full((64, 64), -800, np.int16)
        hu[16:48, 16:48] = 40
        write_dicom(inbox / "series" / f"slice{i}.dcm", hu, RescaleSlope=1, RescaleIntercept=0,
                    SeriesInstanceUID="1.2.826.0.1.77", PatientID="PAT-MIX", InstanceNumber=i + 1)
    (inbox / "good.png").write_bytes(png_bytes())
    (inbox / "notes.png").write_bytes(b"not an image at all")  # makes the second batch a 422
    data_dir = tmp_path / "service"
    tokens = add_accounts(data_dir, f"sqlite:///{data_dir / 'service.sqlite3'}")
    with uvicorn_server(ServiceSettings(data_dir=data_dir, run=tiny_run, worker=False)) as url:
        sent = subprocess.run(
            [sys.executable, "-m", "covidscan", "send", str(inbox), "--to", url, "--token", tokens["lab"]],
            capture_output=True, text=True, timeout=300,
        )
        listed = httpx.get(f"{url}/api/v1/worklist?filter=all",
                           headers={"Authorization": f"Bearer {tokens['admin']}"}).json()["items"]
    assert sent.returncode == 1, (sent.stdout, sent.stderr)
    made = [line for line in sent.stdout.splitlines() if line.startswith("case ")]
    assert len(made) == 1 and "(2 file(s))" in made[0]  # the series' case is reported, not swallowed
    assert len(listed) == 1 and f"case {listed[0]['id']} " in made[0]
    out = " ".join(sent.stdout.split())
    assert "not sent" in out and "notes.png" in out and "good.png" in out and "422" in out
    assert "1 case(s) created; 1 not created (2 file(s))" in out


@pytest.mark.slow
def test_fifty_concurrent_uploads_then_kill_9_and_restart_complete_every_case_once(
    tiny_run: Path, ct_slices, tmp_path: Path
) -> None:
    from covidscan.service.audit import verify_chain
    from covidscan.service.db import default_database_url
    from covidscan.service.models import AuditEvent, Case, Job
    from covidscan.service.settings import ServiceSettings, open_service

    data_dir, port, log = tmp_path / "service", free_port(), tmp_path / "server.log"
    tokens = add_accounts(data_dir, default_database_url(data_dir))
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {tokens['lab']}"}
    server = start_server(tiny_run, data_dir, port, log)
    try:

        def upload(i: int) -> int:
            name, data = ct_slices[i % len(ct_slices)]
            r = httpx.post(
                f"{url}/api/v1/cases",
                headers=headers,
                files=[("files", (name, data))],
                data={"patient_id": f"load-{i}"},
                timeout=120,
            )
            assert r.status_code == 201, r.text
            return r.json()["id"]

        with ThreadPoolExecutor(max_workers=50) as pool:
            ids = list(pool.map(upload, range(50)))
        assert len(set(ids)) == 50
        queued = httpx.get(f"{url}/healthz").json()["queued"]
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
    assert queued > 0, "every case was predicted before the kill: nothing left to recover"

    db, _ = open_service(ServiceSettings(data_dir=data_dir))
    with db.session() as s:
        unfinished = s.scalars(select(Job).where(Job.state != "done")).all()
        assert unfinished, "the kill should have left jobs queued or running"

    server = start_server(tiny_run, data_dir, port, log)
    try:
        deadline = time.monotonic() + 300
        while httpx.get(f"{url}/healthz").json()["queued"] and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    with db.session() as s:
        cases = s.scalars(select(Case)).all()
        assert sorted(c.id for c in cases) == sorted(ids)  # none lost, none duplicated
        assert {c.status for c in cases} == {"ready"}
        assert sorted(c.patient_id for c in cases) == sorted(f"load-{i}" for i in range(50))
        predictions = Counter(s.scalars(select(AuditEvent.target).where(AuditEvent.action == "prediction")))
        assert set(predictions.values()) == {1} and len(predictions) == 50  # each completed exactly once
        assert {j.state for j in s.scalars(select(Job))} == {"done"}
        assert verify_chain(s).ok
    db.dispose()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it: exit status -15 after a clean shutdown
    assert server.returncode in (0, -signal.SIGTERM) and "Finished server process" in log.read_text()


@pytest.fixture
def small_disk(tmpfs) -> Path:
    """A real 8 MiB file system (tmpfs) for the service's files."""
    return tmpfs("8m")


def _fill(folder: Path) -> Path:
    """Write zeros into ``folder`` until its file system has no space left; returns the filler file."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == 28  # ENOSPC
    return filler


def test_a_full_disk_gives_507_and_degraded_health_and_leaves_no_job_running(
    small_disk: Path, tiny_run: Path, ct_slices, tmp_path: Path
) -> None:
    from covidscan.service.models import Case, Job
    from covidscan.service.settings import ServiceSettings, open_service
    from covidscan.service.worker import MAX_ATTEMPTS, Worker

    db_url = f"sqlite:///{tmp_path / 'service.sqlite3'}"  # the database's disk has room; the files' is full
    tokens = add_accounts(small_disk, db_url)
    settings = ServiceSettings(data_dir=small_disk, database_url=db_url, run=tiny_run, worker=False,
                               min_free_bytes=1 << 20)
    lab = {"Authorization": f"Bearer {tokens['lab']}"}
    with uvicorn_server(settings) as url, httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("/healthz").json()["status"] == "ok"
        queued = http.post("/api/v1/cases", headers=lab, files=[("files", ct_slices[0])])  # gets a heat map
        assert queued.status_code == 201
        filler = _fill(small_disk)
        full = http.post("/api/v1/cases", headers=lab, files=[("files", ("b.png", png_bytes(value=10)))])
        assert full.status_code == 507 and full.json()["code"] == "storage_full", full.text
        health = http.get("/healthz").json()
        assert health["status"] == "degraded" and health["problem"], health
        # The worker cannot store the queued case's heat map: the job is queued again with the reason,
        # then failed, never left `running`.
        db, store = open_service(settings)
        worker = Worker(db, store)
        for _ in range(MAX_ATTEMPTS):
            assert worker.run_once()
            with db.session() as s:
                assert s.scalars(select(Job.state)).one() != "running"
        with db.session() as s:
            case = s.get(Case, queued.json()["id"])
            assert case.status == "failed" and "full" in case.error
            assert s.scalars(select(Job.state)).one() == "failed"
        db.dispose()
        filler.unlink()  # space again: the next upload is stored and health recovers
        again = http.post("/api/v1/cases", headers=lab, files=[("files", ("c.png", png_bytes()))])
        assert again.status_code == 201
        assert http.get("/healthz").json()["status"] == "ok"


@pytest.mark.slow
def test_orphan_files_of_uploads_cut_by_kill_9_are_removed_at_the_next_start(
    tiny_run: Path, ct_slices, tmp_path: Path
) -> None:
    import os

    from covidscan.service.models import CaseImage
    from covidscan.service.settings import ServiceSettings, open_service

    data_dir, port, log = tmp_path / "service", free_port(), tmp_path / "server.log"
    tokens = add_accounts(data_dir, f"sqlite:///{data_dir / 'service.sqlite3'}")
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {tokens['lab']}"}
    server = start_server(tiny_run, data_dir, port, log, env={"COVIDSCAN_ORPHAN_MINUTES": "60"})

    def upload(i: int) -> int:
        name, data = ct_slices[i % len(ct_slices)]
        try:
            return httpx.post(f"{url}/api/v1/cases", headers=headers, timeout=60,
                              files=[("files", (name, data + bytes([i % 256]) * (i + 1)))]).status_code
        except httpx.HTTPError:
            return 0

    with ThreadPoolExecutor(max_workers=20) as pool:
        futures = [pool.submit(upload, i) for i in range(40)]
        time.sleep(1.0)
        server.send_signal(signal.SIGKILL)  # mid-upload
        server.wait(timeout=30)
        [f.result() for f in futures]
    # What an upload cut between storing its files and committing its case leaves: a blob no row refers
    # to and a temporary file (planted too, so the test does not hang on the kill's timing), made old.
    settings = ServiceSettings(data_dir=data_dir)
    db, store = open_service(settings)
    orphan = store.path(store.put(b"an upload whose case was never committed"))
    partial = orphan.parent / ".tmp-cut"
    partial.write_bytes(b"half a file")
    for path in (orphan, partial):
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    server = start_server(tiny_run, data_dir, port, log, env={"COVIDSCAN_ORPHAN_MINUTES": "60"})
    try:
        deadline = time.monotonic() + 60
        while (orphan.exists() or partial.exists()) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    with db.session() as s:
        columns = (CaseImage.sha256, CaseImage.display_sha256, CaseImage.cam_sha256,
                   CaseImage.features_sha256)
        referenced = {d for col in columns for d in s.scalars(select(col).where(col.is_not(None)))}
    db.dispose()
    stored = {p.name for p in store.root.glob("??/*")}
    assert not orphan.exists() and not partial.exists()
    assert referenced <= stored  # nothing a case refers to was removed
