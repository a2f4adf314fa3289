"""The service's structure (issue 15, section 3): response models in OpenAPI for every JSON route, error
bodies with shared codes, settings from the environment, migrations once per process, `/healthz` without
server paths."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import text
from test_service_cli_robust import covidscan, set_up

from covidscan.service.errors import ErrorCode
from test_cli_robust import one_error, run_process

JSON_ROUTES = {
    ("/healthz", "get"): "Health",
    ("/api/v1/cases", "post"): "CaseCreated",
    ("/api/v1/cases/{case_id}", "get"): "CaseOut",
    ("/api/v1/cases/{case_id}/review", "post"): "ReviewResult",
    ("/api/v1/worklist", "get"): "WorklistOut",
    ("/api/v1/cases/{case_id}/first-read", "post"): "FirstReadOut",
    ("/api/v1/sites", "get"): "SiteListItem",
    ("/api/v1/sites/{site_id}", "get"): "SiteOut",
    ("/api/v1/sites/{site_id}", "patch"): "SiteOut",
    ("/api/v1/sites/{site_id}/merge", "post"): "SiteMerged",
    ("/api/v1/sites/{site_id}/challengers", "post"): "SiteRunOut",
    ("/api/v1/sites/{site_id}/runs/{run_id}/promote", "post"): "SiteOut",
    ("/api/v1/sites/{site_id}/runs/{run_id}/reject", "post"): "SiteRunOut",
    ("/api/v1/sites/{site_id}/rollback", "post"): "SiteOut",
    ("/api/v1/me", "get"): "UserOut",
    ("/api/v1/me/password", "post"): "AccessChanged",
    ("/api/v1/users", "get"): "UserOut",
    ("/api/v1/users/{name}/deactivate", "post"): "AccessChanged",
    ("/api/v1/users/{name}/activate", "post"): "AccessChanged",
    ("/api/v1/users/{name}/revoke", "post"): "AccessChanged",
    ("/api/v1/users/{name}/password", "post"): "AccessChanged",
    # issue 16 §3: PACS destinations (DELETE answers 204 without a body)
    ("/api/v1/destinations", "get"): "DestinationOut",
    ("/api/v1/destinations", "post"): "DestinationOut",
    ("/api/v1/destinations/{destination_id}", "patch"): "DestinationOut",
    ("/api/v1/destinations/{destination_id}/check", "post"): "DestinationCheckOut",
    ("/dicomweb/studies", "post"): "DicomJsonObject",
    ("/dicomweb/studies", "get"): "DicomJsonObject",
    ("/dicomweb/studies/{study}/series", "get"): "DicomJsonObject",
    ("/dicomweb/studies/{study}/series/{series}/instances", "get"): "DicomJsonObject",
    ("/dicomweb/studies/{study}/metadata", "get"): "DicomJsonObject",
    ("/dicomweb/studies/{study}/series/{series}/metadata", "get"): "DicomJsonObject",
}
JSON_TYPES = ("application/json", "application/dicom+json")  # DICOMweb answers in the DICOM JSON model


def _ref(schema: dict) -> str:
    """The model a response schema names (itself, or the items of a list)."""
    return (schema.get("$ref") or schema.get("items", {}).get("$ref", "")).rsplit("/", 1)[-1]


def test_every_json_route_documents_its_answer_and_its_error_body(service) -> None:
    spec = service.client.get("/openapi.json").json()
    operations = {(path, method): op for path, ops in spec["paths"].items() for method, op in ops.items()}
    assert set(JSON_ROUTES) <= set(operations)
    for (path, method), op in operations.items():
        ok = next(body for status, body in op["responses"].items() if status.startswith("2"))
        content = set(ok.get("content", {}))
        if not content:  # 204 No Content (a destination removed): no body to describe
            assert (path, method) == ("/api/v1/destinations/{destination_id}", "delete")
            continue
        if not set(JSON_TYPES) & content:  # the verdict export, plots, WADO-RS, the result records
            continue
        model = _ref(next(ok["content"][kind] for kind in JSON_TYPES if kind in ok["content"])["schema"])
        assert model == JSON_ROUTES[path, method], (path, method, model)
        for status in ("401", "403", "404", "422"):
            error = op["responses"][status]["content"]["application/json"]["schema"]
            assert _ref(error) == "ErrorBody", (path, method, status)
    schemas = spec["components"]["schemas"]
    case = schemas["CaseOut"]["properties"]
    assert _ref(case["images"]) == "ImageOut" and {"group", "model", "review"} <= set(case)
    assert set(schemas["ErrorBody"]["required"]) == {"detail", "code"}
    assert set(schemas["ErrorCode"]["enum"]) == {c.value for c in ErrorCode}


def test_healthz_names_the_run_by_name_and_weights_digest_never_by_path(service, tiny_run: Path) -> None:
    from covidscan.runs import load_checkpoint

    r = service.client.get("/healthz")
    body = r.json()
    assert r.status_code == 200 and set(body) == {"status", "run", "queued", "problem"}
    assert body["status"] == "ok" and body["problem"] is None and isinstance(body["queued"], int)
    assert body["run"] == f"{tiny_run.name}@{load_checkpoint(tiny_run).weights_sha256[:12]}"
    for path in (tiny_run.resolve(), service.data_dir.resolve(), Path(tiny_run.resolve().anchor) / "tmp"):
        assert str(path) not in r.text
    assert "/" not in r.text


def test_framework_errors_have_the_same_body_and_a_code(service) -> None:
    missing = service.client.get("/api/v1/no-such-route")
    assert missing.status_code == 404 and missing.json()["code"] == ErrorCode.NOT_FOUND
    wrong = service.client.delete("/api/v1/worklist", headers=service.auth("doctor"))
    assert wrong.status_code == 405 and wrong.json()["code"] == ErrorCode.METHOD_NOT_ALLOWED
    bad_filter = service.client.get("/api/v1/worklist?filter=mine", headers=service.auth("doctor"))
    assert bad_filter.status_code == 422 and bad_filter.json()["code"] == ErrorCode.INVALID_REQUEST
    assert "filter" in bad_filter.json()["detail"]


def test_settings_come_from_the_environment_and_given_flags_win(monkeypatch, tmp_path: Path) -> None:
    from covidscan.service.settings import load_settings

    monkeypatch.setenv("COVIDSCAN_DATA_DIR", str(tmp_path / "from-env"))
    monkeypatch.setenv("COVIDSCAN_DATABASE_URL", "sqlite:///elsewhere.sqlite3")
    monkeypatch.setenv("COVIDSCAN_MAX_PIXELS", "1234")
    monkeypatch.setenv("COVIDSCAN_MAX_UPLOAD_BYTES", "5678")
    monkeypatch.setenv("COVIDSCAN_WORKER", "false")
    monkeypatch.setenv("COVIDSCAN_RUN", str(tmp_path / "run"))
    env = load_settings()
    assert (env.data_dir, env.max_pixels, env.max_upload_bytes) == (tmp_path / "from-env", 1234, 5678)
    assert env.worker is False and env.run == tmp_path / "run" and env.url == "sqlite:///elsewhere.sqlite3"
    flags = load_settings(data_dir=tmp_path / "flag", database_url=None, worker=True)
    assert flags.data_dir == tmp_path / "flag" and flags.worker is True  # given flags win
    assert flags.url == "sqlite:///elsewhere.sqlite3"  # a flag not given (None) leaves the environment's


def test_a_command_reads_its_data_folder_from_the_environment(monkeypatch, tmp_path: Path) -> None:
    set_up(tmp_path)
    monkeypatch.setenv("COVIDSCAN_DATA_DIR", str(tmp_path))
    verify = covidscan("audit-log", "verify")
    assert verify.returncode == 0 and "intact: 2 events" in verify.stdout
    monkeypatch.delenv("COVIDSCAN_DATA_DIR")
    one_error(covidscan("audit-log", "verify"), "give --data-dir or COVIDSCAN_DATA_DIR")


@pytest.mark.parametrize(
    ("variable", "value"),
    [("COVIDSCAN_MAX_PIXELS", "lots"), ("COVIDSCAN_MAX_UPLOAD_BYTES", "-5"), ("COVIDSCAN_WORKER", "perhaps")],
)
def test_a_bad_environment_value_is_one_error_line(
    monkeypatch, tmp_path: Path, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    one_error(covidscan("users", "token", "boss", "--data-dir", str(tmp_path / "new")), variable, repr(value))
    assert not (tmp_path / "new").exists()


def test_a_bad_environment_value_stops_a_real_process_with_one_line(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COVIDSCAN_POLL_SECONDS", "0")
    line = one_error(run_process("worker", "--data-dir", str(tmp_path)), "COVIDSCAN_POLL_SECONDS", "'0'")
    assert "greater than 0" in line


def test_migrations_run_once_per_process_and_database(monkeypatch, tmp_path: Path) -> None:
    from covidscan.service import db as dbmod
    from covidscan.service.settings import ServiceSettings, open_service

    runs: list[str] = []
    upgrade = dbmod._upgrade
    monkeypatch.setattr(dbmod, "_upgrade", lambda engine: (runs.append(str(engine.url)), upgrade(engine)))
    for data_dir in (tmp_path / "a", tmp_path / "a", tmp_path / "b"):
        db, _ = open_service(ServiceSettings(data_dir=data_dir))
        with db.session() as s:  # the tables are there each time
            assert s.execute(text("SELECT count(*) FROM users")).scalar_one() == 0
        db.dispose()
    assert [Path(url).parent.name for url in runs] == ["a", "b"]


def test_error_codes_are_distinct_snake_case_words() -> None:
    values = [c.value for c in ErrorCode]
    assert len(set(values)) == len(values) and all(re.fullmatch(r"[a-z_]+", v) for v in values)
    assert str(ErrorCode.CSRF) == "csrf" and f"{ErrorCode.NOT_FOUND}" == "not_found"


def test_a_bug_is_a_json_500_with_the_internal_code_and_no_traceback(service) -> None:
    from fastapi.testclient import TestClient

    def boom() -> None:
        raise RuntimeError("secret internals at /srv/covidscan")

    service.client.app.add_api_route("/test-boom", boom, include_in_schema=False)
    client = TestClient(service.client.app, base_url="http://127.0.0.1", raise_server_exceptions=False)
    r = client.get("/test-boom")
    assert r.status_code == 500 and r.json()["code"] == ErrorCode.INTERNAL
    assert "secret" not in r.text and "Traceback" not in r.text


def test_every_route_ends_its_transaction_before_the_answer_is_validated(service) -> None:
    # (tests/service/test_db_gate.py shows the stall a route without it has)
    from fastapi.routing import APIRoute

    from covidscan.service.deps import SessionRoute, get_session

    def uses_session(dependant) -> bool:  # a FastAPI Dependant
        return dependant.call is get_session or any(uses_session(d) for d in dependant.dependencies)

    def routes(table: list) -> list[APIRoute]:  # FastAPI keeps an included router's routes in its own table
        found = []
        for route in table:
            included = getattr(route, "original_router", None)
            found += routes(included.routes) if included is not None else [route]
        return [r for r in found if isinstance(r, APIRoute)]

    with_session = [r for r in routes(service.client.app.routes) if uses_session(r.dependant)]
    assert len(with_session) > 50
    assert [r.path for r in with_session if not isinstance(r, SessionRoute)] == []
