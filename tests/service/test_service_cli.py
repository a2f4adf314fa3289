"""The service's commands as a user runs them: `users`, `audit-log verify`, `send` and the demo's setup."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from service_helpers import uvicorn_server
from sqlalchemy import text

from conftest import add_accounts
from dicom_files import write_dicom


def covidscan(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "covidscan", *args], input=stdin, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_users_add_token_revoke_and_audit_verify(tmp_path: Path) -> None:
    from covidscan.service.auth import user_for_token
    from covidscan.service.settings import ServiceSettings, open_service

    d = ["--data-dir", str(tmp_path)]
    added = covidscan(
        "users", "add", "dr-who", "--role", "doctor", *d, "--password-stdin", stdin="a long enough password\n"
    )
    assert added.returncode == 0, added.stderr
    again = covidscan(
        "users", "add", "dr-who", "--role", "doctor", *d, "--password-stdin", stdin="x" * 12 + "\n"
    )
    assert again.returncode == 2 and "error:" in again.stderr and "already exists" in again.stderr
    short = covidscan("users", "add", "dr-short", "--role", "doctor", *d, "--password-stdin", stdin="short\n")
    assert short.returncode == 2 and "at least 12" in short.stderr
    bad_role = covidscan(
        "users", "add", "x", "--role", "nurse", *d, "--password-stdin", stdin="x" * 12 + "\n"
    )
    assert bad_role.returncode == 2 and "role must be one of" in bad_role.stderr
    token = covidscan("users", "token", "dr-who", *d)
    assert token.returncode == 0
    secret = token.stdout.strip()
    db, _ = open_service(ServiceSettings(data_dir=tmp_path))
    with db.session() as s:
        assert user_for_token(s, secret).name == "dr-who"
        stored = s.execute(text("SELECT token_hash FROM api_tokens")).scalars().all()
        password_hash = s.execute(text("SELECT password_hash FROM users")).scalar_one()
    assert secret not in stored  # only the hash is kept
    assert password_hash.startswith("$argon2id$")
    revoked = covidscan("users", "revoke", "dr-who", *d)
    assert revoked.returncode == 0 and "revoked 1 token" in revoked.stdout
    with db.session() as s:
        assert user_for_token(s, secret) is None
    db.dispose()
    verify = covidscan("audit-log", "verify", *d)
    assert verify.returncode == 0 and "intact" in verify.stdout


@pytest.mark.slow
def test_send_makes_one_case_per_dicom_series_and_one_for_the_other_images(
    tiny_run: Path, ct_slices, tmp_path: Path
) -> None:
    from covidscan.service.settings import ServiceSettings

    inbox = tmp_path / "inbox"
    (inbox / "series").mkdir(parents=True)
    for i, (name, data) in enumerate(ct_slices[:2]):
        (inbox / name).write_bytes(data)
        hu = np.full((64, 64), -800, np.int16)
        hu[16:48, 16:48] = 40
        write_dicom(
            inbox / "series" / f"slice{i}.dcm",
            hu,
            RescaleSlope=1,
            RescaleIntercept=0,
            SeriesInstanceUID="1.2.826.0.1.99",
            PatientID="PAT-DCM",
            InstanceNumber=i + 1,
        )
    data_dir = tmp_path / "service"
    db_url = f"sqlite:///{data_dir / 'service.sqlite3'}"
    tokens = add_accounts(data_dir, db_url)
    settings = ServiceSettings(data_dir=data_dir, database_url=db_url, run=tiny_run, poll_seconds=0.05)
    with uvicorn_server(settings) as url:
        sent = covidscan("send", str(inbox), "--to", url, "--token", tokens["lab"], "--wait", "60")
        assert sent.returncode == 0, sent.stderr
        lines = [line for line in sent.stdout.splitlines() if line.startswith("case ")]
        assert len(lines) == 2 and all("ready, p(covid)" in line for line in lines)
        import httpx

        cases = httpx.get(
            f"{url}/api/v1/worklist", headers={"Authorization": f"Bearer {tokens['doctor']}"}
        ).json()["items"]
        assert sorted(c["n_images"] for c in cases) == [2, 2]
        assert {c["patient_id"] for c in cases} == {"PAT-DCM", None}
        refused = covidscan("send", str(inbox), "--to", url, "--token", "wrong")
        assert refused.returncode == 2 and "401" in refused.stderr
    gone = covidscan("send", str(inbox), "--to", url, "--token", tokens["lab"])
    assert gone.returncode == 2 and "cannot reach the review service" in gone.stderr


def test_demo_seeds_accounts_and_phantom_cases_on_a_fresh_folder(tiny_run: Path, tmp_path: Path) -> None:
    from sqlalchemy import func, select

    from covidscan.errors import ConfigError
    from covidscan.service.auth import check_password
    from covidscan.service.cli import _prepare_demo
    from covidscan.service.models import Case, Job
    from covidscan.service.settings import ServiceSettings, open_service

    data_dir, run = _prepare_demo(tmp_path / "demo", tiny_run, "127.0.0.1", 8123)
    assert run == tiny_run
    db, _ = open_service(ServiceSettings(data_dir=data_dir))
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Case)) == 4
        assert s.scalar(select(func.count()).select_from(Job).where(Job.state == "queued")) == 4
        assert check_password(s, "doctor", "not the password") is None
    db.dispose()
    with pytest.raises(ConfigError, match="fresh data folder"):
        _prepare_demo(tmp_path / "demo", tiny_run, "127.0.0.1", 8123)


@pytest.mark.slow
def test_serve_refuses_to_start_without_a_run_in_one_line(tmp_path: Path) -> None:
    result = covidscan("serve", "--data-dir", str(tmp_path / "empty"), "--port", "1")
    assert result.returncode == 2 and "error: no run is active" in result.stderr
    assert "Traceback" not in result.stderr
    missing = covidscan("serve", "--run", str(tmp_path / "no-run"), "--data-dir", str(tmp_path / "d"))
    assert missing.returncode == 2 and "cannot switch to run" in missing.stderr
