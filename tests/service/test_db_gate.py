"""SQLite transactions of one process take turns at the write lock in arrival order (``db._FairGate``).

Under a login flood on two loaded cores SQLite's own busy wait starved early waiters past its timeout
("database is locked", 500s) although no transaction held the lock for a second: late arrivals retry
after 1-5 ms, early ones have backed off to 100 ms. These tests pin the gate's order, that every way a
transaction ends gives the gate back, and the 503 a request gets when it waits too long.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from pydantic import BaseModel, model_validator
from sqlalchemy import text

from covidscan.service import db as dbmod
from covidscan.service.db import Database, _FairGate, default_database_url
from covidscan.service.deps import SessionDep, SessionRoute
from covidscan.service.errors import DatabaseBusy, ErrorCode


def test_the_gate_is_handed_over_in_arrival_order():
    gate = _FairGate()
    assert gate.acquire(1)
    order: list[int] = []
    lock = threading.Lock()

    def waiter(k: int) -> None:
        assert gate.acquire(10)
        with lock:
            order.append(k)
        gate.release()

    threads = []
    for k in range(8):
        threads.append(threading.Thread(target=waiter, args=(k,)))
        threads[-1].start()
        time.sleep(0.02)  # each one queued before the next arrives
    gate.release()
    for t in threads:
        t.join(10)
    assert order == list(range(8))


def test_a_waiter_that_gives_up_leaves_the_queue():
    gate = _FairGate()
    assert gate.acquire(1)
    assert not gate.acquire(0.05)  # timed out: not left in the queue to receive the gate later
    gate.release()
    assert gate.acquire(0.05)  # free again, although the timed-out waiter was queued


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Database:
    database = Database(default_database_url(tmp_path))
    with database.engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
    yield database
    database.dispose()


def _write_in_thread(database: Database, value: int) -> threading.Thread:
    def write() -> None:
        with database.session() as s:
            s.execute(text("INSERT INTO t VALUES (:x)"), {"x": value})

    thread = threading.Thread(target=write)
    thread.start()
    return thread


@pytest.mark.parametrize("end", ["commit", "rollback", "close"])
def test_every_end_of_a_transaction_gives_the_gate_back(sqlite_db: Database, end: str):
    s = sqlite_db.sessions()
    s.execute(text("SELECT 1"))  # BEGIN IMMEDIATE: the gate is held
    writer = _write_in_thread(sqlite_db, 1)
    writer.join(0.3)
    assert writer.is_alive()  # waiting for its turn
    getattr(s, end)()
    writer.join(10)
    assert not writer.is_alive()
    with sqlite_db.session() as check:
        assert check.scalar(text("SELECT count(*) FROM t")) == 1
    s.close()


def test_a_request_that_waits_too_long_is_told_the_database_is_busy(
    sqlite_db: Database, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(dbmod, "WRITE_WAIT_S", 0.2)
    with sqlite_db.session() as holder:
        holder.execute(text("SELECT 1"))
        with pytest.raises(DatabaseBusy) as err, sqlite_db.session() as s:
            s.execute(text("INSERT INTO t VALUES (2)"))
    assert err.value.code is ErrorCode.DATABASE_BUSY and err.value.http_status == 503
    assert "service.sqlite3" in str(err.value)
    with sqlite_db.session() as s:  # nothing of the refused write, and the gate works again
        assert s.scalar(text("SELECT count(*) FROM t")) == 0


def test_a_flood_of_short_transactions_starves_no_one(sqlite_db: Database):
    # 40 threads (Starlette's pool) x 10 short writes each: every one gets its turn well within the wait
    waits: list[float] = []
    lock = threading.Lock()

    def writer(k: int) -> None:
        for i in range(10):
            start = time.monotonic()
            with sqlite_db.session() as s:
                s.execute(text("INSERT INTO t VALUES (:x)"), {"x": k * 100 + i})
            with lock:
                waits.append(time.monotonic() - start)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    with sqlite_db.session() as s:
        assert s.scalar(text("SELECT count(*) FROM t")) == 400
    assert max(waits) < dbmod.WRITE_WAIT_S / 2, max(waits)


class Answer(BaseModel):
    """An answer that writes to ``database`` when FastAPI validates it."""

    database: ClassVar[Database]
    n: int

    @model_validator(mode="after")
    def _write(self) -> Answer:
        with self.database.session() as s:
            s.execute(text("INSERT INTO t VALUES (99)"))
        return self


def _app_writing_while_its_answer_is_validated(database: Database, route_class: type) -> FastAPI:
    """A route whose response model writes to the database when FastAPI validates it (in another thread
    of the pool, as for every sync route): it waits for the gate if the route's transaction is still open."""
    Answer.database = database
    router = APIRouter(route_class=route_class)

    @router.post("/write")
    def write(s: SessionDep) -> Answer:
        s.execute(text("INSERT INTO t VALUES (1)"))
        return {"n": 1}  # validated by FastAPI after the handler, not here

    app = FastAPI()
    app.state.db = database
    app.include_router(router)
    return app


def test_a_route_ends_its_transaction_before_its_answer_is_validated(
    sqlite_db: Database, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(dbmod, "WRITE_WAIT_S", 0.5)
    with TestClient(_app_writing_while_its_answer_is_validated(sqlite_db, SessionRoute)) as client:
        assert client.post("/write").json() == {"n": 1}
    with sqlite_db.session() as s:
        assert sorted(s.scalars(text("SELECT x FROM t"))) == [1, 99]
    # FastAPI's own route keeps the transaction (SQLite's write lock) open across that hand-over
    with (
        TestClient(_app_writing_while_its_answer_is_validated(sqlite_db, APIRoute)) as client,
        pytest.raises(DatabaseBusy),
    ):
        client.post("/write")
