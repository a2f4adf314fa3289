"""The job queue in the database: concurrent workers claim each job once; a dead worker's job is taken
over at once; a worker that lost its job cannot overwrite the result (SQLite and PostgreSQL)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
from service_helpers import png_bytes
from sqlalchemy import select, update

from covidscan.service.auth import add_user
from covidscan.service.cases import Upload, check_uploads, create_case
from covidscan.service.models import AuditEvent, Case, Job
from covidscan.service.settings import ServiceSettings, open_service
from covidscan.service.worker import HOST, Worker


@pytest.fixture(scope="module")
def queue(database_url: str, tiny_run: Path, tmp_path_factory: pytest.TempPathFactory):
    """(Database, BlobStore, submitter id) of a fresh service with ``tiny_run`` active."""
    data_dir = tmp_path_factory.mktemp("queue")
    db, store = open_service(ServiceSettings(data_dir=data_dir, database_url=database_url, run=tiny_run))
    with db.session() as s:
        user = add_user(s, "lab", "submitter", None)
    yield db, store, user
    db.dispose()


def _cases(queue, n: int) -> list[int]:
    db, store, user = queue
    with db.session() as s:
        s.add(user)
        return [
            create_case(
                s,
                store,
                user,
                check_uploads([Upload(f"{i}.png", png_bytes(value=i))], max_pixels=10**6),
                None,
            ).id
            for i in range(n)
        ]


def test_concurrent_workers_claim_every_job_exactly_once(queue) -> None:
    db, store, _ = queue
    ids = _cases(queue, 24)
    claimed: list[int] = []
    lock = threading.Lock()

    def drain(worker: Worker) -> None:
        while (case_id := worker.claim()) is not None:
            with lock:
                claimed.append(case_id)

    threads = [threading.Thread(target=drain, args=(Worker(db, store),)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)
    with db.session() as s:
        s.execute(update(Job).where(Job.case_id.in_(ids)).values(state="done"))


def test_a_dead_workers_job_is_taken_over_and_completed_once(queue) -> None:
    db, store, _ = queue
    [case_id] = _cases(queue, 1)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    alive_owner = Worker(db, store)
    alive_owner.claim()  # a live worker's job with a valid lease is left alone ...
    with db.session() as s:
        s.execute(
            update(Job).where(Job.case_id == case_id).values(owner=f"{HOST}:{dead.stdout.strip()}:dead")
        )
    worker = Worker(db, store)
    assert worker.claim() == case_id  # ... but one whose process is gone is taken over at once
    worker.process(case_id)
    with db.session() as s:
        job = s.scalar(select(Job).where(Job.case_id == case_id))
        assert job.state == "done" and job.attempts == 2
        assert s.get(Case, case_id).status == "no_result"  # done; the model refuses a blank image
        done = s.scalars(
            select(AuditEvent).where(
                AuditEvent.action == "prediction", AuditEvent.target == f"case:{case_id}"
            )
        ).all()
        assert len(done) == 1


def test_a_worker_that_lost_its_job_does_not_write(queue) -> None:
    db, store, _ = queue
    [case_id] = _cases(queue, 1)
    slow, fast = Worker(db, store), Worker(db, store)
    assert slow.claim() == case_id
    with db.session() as s:  # the lease ran out while ``slow`` was busy, and ``fast`` took the job over
        s.execute(update(Job).where(Job.case_id == case_id).values(owner=fast.owner))
    slow.process(case_id)
    with db.session() as s:
        assert s.get(Case, case_id).status == "running"
        assert s.scalar(select(Job.state).where(Job.case_id == case_id)) == "running"
    fast.process(case_id)
    with db.session() as s:
        assert s.get(Case, case_id).status == "no_result"  # done; the model refuses a blank image
