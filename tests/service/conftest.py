"""Fixtures of the review-service tests: a real service (SQLite, and PostgreSQL when CI started one).

PostgreSQL: ``.ci/run`` starts a server and exports ``COVIDSCAN_TEST_POSTGRES_URL``; every module then gets
its own fresh database on it. Without the variable the PostgreSQL variants skip with a loud reason.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PG_ENV = "COVIDSCAN_TEST_POSTGRES_URL"
PASSWORD = "correct horse battery"
# The database of the heaviest tests, whose work does not depend on it: CI's PostgreSQL where there is one
ONE_DATABASE = "postgresql" if os.environ.get(PG_ENV) else "sqlite"
PG_MISSING = (
    f"PostgreSQL NOT TESTED: {PG_ENV} is not set (.ci/run starts a server and sets it; "
    "run .ci/run or start one yourself)"
)


def fresh_postgres_database(base_url: str) -> str:
    """Create an empty database on the server of ``base_url`` and return its URL."""
    from sqlalchemy import create_engine, make_url, text

    name = f"covidscan_test_{secrets.token_hex(4)}"
    admin = create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(base_url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh database per test module: SQLite in a temporary folder, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'service.sqlite3'}"
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(PG_MISSING)
    return fresh_postgres_database(base)


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh(request: pytest.FixtureRequest, tmp_path: Path):
    """(Database, data folder, URL) of a new, migrated service per test, for tests that tamper with it."""
    from covidscan.service.settings import ServiceSettings, open_service

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'service.sqlite3'}"
    elif not os.environ.get(PG_ENV):
        pytest.skip(PG_MISSING)
    else:
        url = fresh_postgres_database(os.environ[PG_ENV])
    db, _ = open_service(ServiceSettings(data_dir=tmp_path, database_url=url))
    yield db, tmp_path, url
    db.dispose()


@pytest.fixture(scope="session")
def ct_slices(phantom_manifest: Path) -> list[tuple[str, bytes]]:
    """Six phantom CT slices as (file name, PNG bytes)."""
    files = sorted(phantom_manifest.parent.glob("images/**/*.png"))[:6]
    return [(f.name, f.read_bytes()) for f in files]


@dataclass
class Service:
    """A running service under test: its client, data folder, accounts' tokens and the app's state."""

    client: object
    data_dir: Path
    database_url: str
    tokens: dict[str, str] = field(default_factory=dict)

    def auth(self, name: str) -> dict[str, str]:
        """Authorization header of an account."""
        return {"Authorization": f"Bearer {self.tokens[name]}"}

    def upload(self, name: str, files: list[tuple[str, bytes]], patient_id: str | None = None):
        data = {"patient_id": patient_id} if patient_id else {}
        return self.client.post(
            "/api/v1/cases",
            headers=self.auth(name),
            data=data,
            files=[("files", (n, b, "application/octet-stream")) for n, b in files],
        )

    def wait(self, case_id: int, name: str = "doctor", timeout: float = 60.0) -> dict:
        """Poll a case until it is no longer queued or running."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            case = self.client.get(f"/api/v1/cases/{case_id}", headers=self.auth(name)).json()
            if case["status"] not in ("queued", "running"):
                return case
            time.sleep(0.1)
        raise AssertionError(f"case {case_id} still {case['status']} after {timeout} s")


ACCOUNTS = {
    "admin": "admin",
    "doctor": "doctor",
    "doctor2": "doctor",
    "lab": "submitter",
    "lab2": "submitter",
    "guess": "doctor",
}


def add_accounts(data_dir: Path, database_url: str) -> dict[str, str]:
    """The test accounts (password ``PASSWORD``) and one API token each."""
    from covidscan.service.auth import add_user, new_token
    from covidscan.service.models import Site
    from covidscan.service.settings import ServiceSettings, open_service

    db, _ = open_service(ServiceSettings(data_dir=data_dir, database_url=database_url))
    with db.session() as s:
        tokens = {name: new_token(s, add_user(s, name, role, PASSWORD)) for name, role in ACCOUNTS.items()}
        # The senders' own sites are not read reader-first, so that doctors see results at once in the
        # tests of reading and signing; test_site_api.py sends to other sites to test reader-first.
        s.add_all(Site(name=name, reader_first=False) for name, role in ACCOUNTS.items() if role != "doctor")
    db.dispose()
    return tokens


@pytest.fixture(scope="module")
def service(database_url: str, tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One service per module and database, with a worker thread, over ``tiny_run``."""
    from fastapi.testclient import TestClient

    from covidscan.service.app import create_app
    from covidscan.service.settings import ServiceSettings

    data_dir = tmp_path_factory.mktemp("service")
    tokens = add_accounts(data_dir, database_url)
    settings = ServiceSettings(
        data_dir=data_dir,
        database_url=database_url,
        run=tiny_run,
        max_upload_bytes=2_000_000,
        max_pixels=4_000_000,
        poll_seconds=0.05,
    )
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        yield Service(client, data_dir, database_url, tokens)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real Orthanc PACS (Debian's, with DICOMweb) per module on free local ports; skips when absent.
    Its modality ``covidscan`` (AE title COVIDSCAN) is a port kept for covidscan's DICOM listener."""
    from orthanc import MISSING, available, orthanc_server
    from service_helpers import free_port

    if not available():
        pytest.skip(MISSING)
    listener = {"covidscan": ("COVIDSCAN", free_port())}
    with orthanc_server(tmp_path_factory.mktemp("orthanc"), listener) as server:
        yield server
