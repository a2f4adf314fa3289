"""Issue 13, section 4, for the service's commands: damaged databases, mistyped data folders, empty
passwords and impossible ports are one clear ``error:`` line (exit 2) and leave nothing behind."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from covidscan.cli import app
from test_cli import Outcome
from test_cli_robust import one_error

PASSWORD = "a long enough password"


def covidscan(*args: str, stdin: str | None = None) -> Outcome:
    """`covidscan ARGS` in this process, with ``stdin`` as its standard input."""
    result = CliRunner().invoke(app, list(args), input=stdin, prog_name="covidscan")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback the user would have seen
    return Outcome(result.exit_code, result.stdout, result.stderr)


def set_up(data_dir: Path) -> Path:
    """A real service database with an admin and a few audit events; returns its file."""
    added = covidscan("users", "add", "boss", "--role", "admin", "--data-dir", str(data_dir),
                      "--password-stdin", stdin=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    assert covidscan("users", "token", "boss", "--data-dir", str(data_dir)).returncode == 0
    database = data_dir / "service.sqlite3"
    with sqlite3.connect(database) as conn:  # everything into the file itself, as after a clean stop
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return database


# Every command that opens the database, with what it needs besides --data-dir.
COMMANDS = {
    "audit-log verify": ["audit-log", "verify"],
    "users token": ["users", "token", "boss"],
    "users revoke": ["users", "revoke", "boss"],
    "users add": ["users", "add", "dr-new", "--role", "doctor", "--password-stdin"],
    "worker": ["worker"],
    "serve": ["serve", "--port", "8123"],
}


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_damaged_database_is_named_for_every_command(tmp_path: Path, command: str, damage: str) -> None:
    data_dir = tmp_path / "service"
    if damage == "garbage":
        data_dir.mkdir()
        (data_dir / "service.sqlite3").write_bytes(b"not a database, " * 512)
    else:
        database = set_up(data_dir)
        whole = database.read_bytes()
        assert len(whole) > 8192
        database.write_bytes(whole[:8192])  # the header and the schema, not the tables' pages
    result = covidscan(*COMMANDS[command], "--data-dir", str(data_dir), stdin=PASSWORD + "\n")
    one_error(result, f"the database {data_dir / 'service.sqlite3'} is damaged", "backup")


@pytest.mark.parametrize("command", ["audit-log verify", "users token", "users revoke", "worker"])
def test_commands_that_manage_a_service_never_create_one(tmp_path: Path, command: str) -> None:
    typo = tmp_path / "servcie"
    one_error(covidscan(*COMMANDS[command], "--data-dir", str(typo)), f"--data-dir {typo} does not exist")
    assert not typo.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    one_error(covidscan(*COMMANDS[command], "--data-dir", str(empty)), "holds no service database")
    assert not any(empty.iterdir())
    url = f"sqlite:///{tmp_path / 'other.sqlite3'}"
    result = covidscan(*COMMANDS[command], "--data-dir", str(empty), "--database-url", url)
    one_error(result, f"--database-url {tmp_path / 'other.sqlite3'} does not exist")
    assert not (tmp_path / "other.sqlite3").exists()


def test_audit_verify_of_an_intact_log_still_passes_and_a_lost_head_row_does_not(tmp_path: Path) -> None:
    from covidscan.service.settings import ServiceSettings, open_service

    set_up(tmp_path)
    verify = covidscan("audit-log", "verify", "--data-dir", str(tmp_path))
    assert verify.returncode == 0 and "intact: 2 events" in verify.stdout
    db, _ = open_service(ServiceSettings(data_dir=tmp_path))
    with db.session() as s:  # the newest event and the head row that would tell it was there
        s.execute(text("DELETE FROM audit_events WHERE seq = 2"))
        s.execute(text("DELETE FROM audit_head"))
    db.dispose()
    verify = covidscan("audit-log", "verify", "--data-dir", str(tmp_path))
    assert verify.returncode == 1 and "audit log broken" in verify.stdout and "head row" in verify.stdout


@pytest.mark.parametrize("password", ["", " " * 12, "short"])
@pytest.mark.parametrize("role", ["doctor", "admin", "submitter"])
def test_users_add_refuses_an_empty_or_short_password(tmp_path: Path, password: str, role: str) -> None:
    set_up(tmp_path)
    result = covidscan("users", "add", "dr-empty", "--role", role, "--data-dir", str(tmp_path),
                       "--password-stdin", stdin=password + "\n")
    one_error(result, "password too short", "at least 12 characters")
    assert "no user 'dr-empty'" in covidscan("users", "token", "dr-empty", "--data-dir", str(tmp_path)).stderr


def test_a_doctor_always_gets_a_password_but_a_submitter_may_have_none(tmp_path: Path) -> None:
    from covidscan.errors import ConfigError
    from covidscan.service.auth import add_user
    from covidscan.service.settings import ServiceSettings, open_service

    db, _ = open_service(ServiceSettings(data_dir=tmp_path))
    with db.session() as s:
        assert add_user(s, "lab", "submitter", None).password_hash is None
        with pytest.raises(ConfigError, match="a doctor logs in with a password"):
            add_user(s, "dr-none", "doctor", None)  # the admin page's empty password field
    db.dispose()


@pytest.mark.parametrize("port", ["70000", "0", "-1"])
def test_serve_refuses_a_port_that_does_not_exist_before_setting_up(tmp_path: Path, port: str) -> None:
    data_dir = tmp_path / "new"
    one_error(covidscan("serve", "--data-dir", str(data_dir), "--port", port), f"--port {port}", "1 to 65535")
    assert not data_dir.exists()
