"""The audit hash chain, `covidscan audit-log verify` and the Alembic schema, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from service_helpers import migrations_head
from sqlalchemy import text
from typer.testing import CliRunner

from covidscan.cli import app
from covidscan.service.audit import record, verify_chain


def _verify_cli(data_dir: Path, url: str):
    return CliRunner().invoke(
        app, ["audit-log", "verify", "--data-dir", str(data_dir), "--database-url", url]
    )


def _fill(db, n: int = 5) -> None:
    for i in range(n):
        with db.session() as s:
            record(s, "view", actor="doctor", target=f"case:{i}", via="api", note="ünïcode <ok>")


def test_intact_chain_verifies(fresh) -> None:
    db, data_dir, url = fresh
    _fill(db)
    with db.session() as s:
        report = verify_chain(s)
    assert report.ok and report.n_events == 5
    result = _verify_cli(data_dir, url)
    assert result.exit_code == 0 and "intact: 5 events" in result.output


def test_edited_row_is_detected(fresh) -> None:
    db, data_dir, url = fresh
    _fill(db)
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE audit_events SET actor = 'mallory' WHERE seq = 3"))
    with db.session() as s:
        report = verify_chain(s)
    assert not report.ok and report.bad_seq == 3 and "changed" in report.reason
    result = _verify_cli(data_dir, url)
    assert result.exit_code == 1 and "event 3" in result.output


@pytest.mark.parametrize("seq", [2, 5])
def test_deleted_row_is_detected_in_the_middle_and_at_the_end(fresh, seq: int) -> None:
    db, data_dir, url = fresh
    _fill(db)
    with db.engine.begin() as conn:
        conn.execute(text(f"DELETE FROM audit_events WHERE seq = {seq}"))
    with db.session() as s:
        report = verify_chain(s)
    assert not report.ok and report.bad_seq == seq
    assert _verify_cli(data_dir, url).exit_code == 1


def test_concurrent_appends_keep_one_unbroken_chain(fresh) -> None:
    db, _, _ = fresh

    def append() -> None:
        for _ in range(5):
            with db.session() as s:
                record(s, "view", actor="t", target="x")

    threads = [threading.Thread(target=append) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with db.session() as s:
        report = verify_chain(s)
    assert report.ok and report.n_events == 40


def test_migrations_create_exactly_the_models_schema_and_rerun_cleanly(fresh) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from covidscan.service.db import migrate
    from covidscan.service.models import Base

    db, _, _ = fresh
    migrate(db.engine)  # a second start changes nothing
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == migrations_head()
