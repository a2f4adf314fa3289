"""The sites in the API (SQLite and PostgreSQL): the ``site`` field of uploads, reader-first (first reads,
the result and Grad-CAM withheld until then), the site summary in cases and worklist rows, the worklist's
site filter and teaching order, and /api/v1/sites (roles, error codes, rename/merge/rules, course plot)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient
from test_service_pages import login

from covidscan.evaluation.site import LocalFigures, local_figures
from covidscan.service.errors import ErrorCode
from covidscan.service.models import Site
from covidscan.service.settings import ServiceSettings, open_service


@contextmanager
def site_row(service, site_id: int):
    """The site's row in the service's database, committed on exit (as the worker's writes would be)."""
    db, _ = open_service(ServiceSettings(data_dir=service.data_dir, database_url=service.database_url))
    try:
        with db.session() as s:
            yield s.get(Site, site_id)
    finally:
        db.dispose()


def cache_site_results(service, site_id: int, status: str, *, details: dict | None) -> LocalFigures:
    """Write the worker's caches (``Site.local``, ``Site.shift``) as the data contract describes them:
    figures of 6 patients (sensitivity 2/3) and a shift alarm (AUC 0.93, p 0.001, 40 images)."""
    figures = local_figures([1, 1, 0, 0, 1, 0], [0.9, 0.8, 0.2, 0.3, 0.4, 0.1], list("abcdef"), 0.5,
                            n_boot=50)
    stamp = "2026-01-01T00:00:00+00:00"
    with site_row(service, site_id) as site:
        site.local = {"run": "/srv/runs/x", "since": None, "computed_at": stamp, "figures": figures.to_dict(),
                      "recent": None, "rules": {}}
        site.shift = {"run": "/srv/runs/x", "computed_at": stamp, "n_images": 40, "auc": 0.93,
                      "p_value": 0.001, "alarm": True, "details": details}
        site.status = status
    return figures


def send(service, site: str, files, patient_id: str | None = None, name: str = "lab") -> dict:
    """Upload to ``site`` and wait for the prediction; the case as an admin sees it."""
    data = {"site": site, **({"patient_id": patient_id} if patient_id else {})}
    r = service.client.post(
        "/api/v1/cases",
        headers=service.auth(name),
        data=data,
        files=[("files", (n, b, "application/octet-stream")) for n, b in files],
    )
    assert r.status_code == 201, r.text
    return service.wait(r.json()["id"], name="admin")


def error_code(r) -> str:
    return r.json()["code"]


def test_site_field_names_the_site_and_bad_names_are_refused(service, ct_slices) -> None:
    case = send(service, "  Scanner   A ", ct_slices[:1])
    assert case["status"] == "ready"
    assert case["site"]["name"] == "Scanner A"  # whitespace normalised
    assert case["site"] | {"id": 0} == {
        "id": 0,
        "name": "Scanner A",
        "status": "new",
        "reader_first": True,
        "local": None,
        "shift": None,
    }
    again = send(service, "scanner a", ct_slices[1:2])  # any letter case is the same site
    assert again["site"]["id"] == case["site"]["id"]
    r = service.client.post(
        "/api/v1/cases",
        headers=service.auth("lab"),
        data={"site": "bad\x01name"},
        files=[("files", ct_slices[0])],
    )
    assert (
        r.status_code == 400
        and error_code(r) == ErrorCode.BAD_REQUEST
        and "control characters" in r.json()["detail"]
    )


def test_reader_first_hides_the_result_and_cam_until_the_first_read(service, ct_slices) -> None:
    case = send(service, "reader-first site", ct_slices[:2], patient_id="rf-1")
    assert case["group"] is not None and case["images"][0]["has_cam"]  # the admin sees it
    url = f"/api/v1/cases/{case['id']}"
    hidden = service.client.get(url, headers=service.auth("doctor")).json()
    assert hidden["hidden_until_first_read"] is True and hidden["first_read"] is None
    assert hidden["group"] is None
    assert all(im["p_covid"] is None and im["label"] is None and not im["has_cam"] for im in hidden["images"])
    row = next(
        r
        for r in service.client.get("/api/v1/worklist", headers=service.auth("doctor")).json()["items"]
        if r["id"] == case["id"]
    )
    assert row["hidden_until_first_read"] is True and row["p_covid"] is None and row["uncertain"] is None

    with TestClient(service.client.app, base_url="http://127.0.0.1") as browser:
        login(browser, "doctor")
        cam = browser.get(f"/cases/{case['id']}/files/0/cam")
        assert cam.status_code == 409 and error_code(cam) == ErrorCode.HIDDEN_UNTIL_FIRST_READ
        assert (
            browser.get(f"/cases/{case['id']}/files/0/display").status_code == 200
        )  # the image itself shows

        r = service.client.post(
            f"{url}/first-read", headers=service.auth("doctor"), json={"finding": "covid"}
        )
        assert r.status_code == 201, r.text
        assert r.json()["finding"] == "covid" and r.json()["reader"] == "doctor"
        shown = service.client.get(url, headers=service.auth("doctor")).json()
        assert shown["hidden_until_first_read"] is False and shown["first_read"] == "covid"
        assert shown["group"] == case["group"] and shown["images"][0]["p_covid"] is not None
        assert browser.get(f"/cases/{case['id']}/files/0/cam").status_code == 200

    again = service.client.post(
        f"{url}/first-read", headers=service.auth("doctor"), json={"finding": "non_covid"}
    )
    assert again.status_code == 409 and error_code(again) == ErrorCode.FIRST_READ_REFUSED
    # doctor2 gives a verdict straight away: the result is no longer hidden from them, and a first read
    # after it is refused (they may have seen the model by then)
    verdict = {"agree": False, "finding": "covid", "sign": False}
    assert (
        service.client.post(f"{url}/review", headers=service.auth("doctor2"), json=verdict).status_code == 200
    )
    assert service.client.get(url, headers=service.auth("doctor2")).json()["hidden_until_first_read"] is False
    late = service.client.post(
        f"{url}/first-read", headers=service.auth("doctor2"), json={"finding": "covid"}
    )
    assert late.status_code == 409 and error_code(late) == ErrorCode.FIRST_READ_REFUSED
    # only doctors read; a bad finding is a 422
    r = service.client.post(f"{url}/first-read", headers=service.auth("lab"), json={"finding": "covid"})
    assert r.status_code == 403 and error_code(r) == ErrorCode.FORBIDDEN_ROLE
    r = service.client.post(f"{url}/first-read", headers=service.auth("guess"), json={"finding": "maybe"})
    assert r.status_code == 422 and error_code(r) == ErrorCode.INVALID_REQUEST


def test_an_admin_turning_reader_first_off_shows_results(service, ct_slices) -> None:
    case = send(service, "open site", ct_slices[:1])
    site_id, url = case["site"]["id"], f"/api/v1/cases/{case['id']}"
    assert service.client.get(url, headers=service.auth("guess")).json()["hidden_until_first_read"] is True
    r = service.client.patch(
        f"/api/v1/sites/{site_id}", headers=service.auth("admin"), json={"reader_first": False}
    )
    assert (
        r.status_code == 200
        and r.json()["reader_first"] is False
        and r.json()["reader_first_setting"] is False
    )
    seen = service.client.get(url, headers=service.auth("guess")).json()
    assert seen["hidden_until_first_read"] is False and seen["group"] is not None
    assert seen["site"]["reader_first"] is False
    back = service.client.patch(
        f"/api/v1/sites/{site_id}", headers=service.auth("admin"), json={"reader_first": None}
    )
    assert back.json()["reader_first"] is True and back.json()["reader_first_setting"] is None


def test_sites_list_detail_and_local_figures_summary(service, ct_slices) -> None:
    case = send(service, "figures site", ct_slices[:1])
    site_id = case["site"]["id"]
    listed = service.client.get("/api/v1/sites", headers=service.auth("doctor")).json()
    row = next(s for s in listed if s["id"] == site_id)
    assert row["n_cases"] == 1 and row["n_signed"] == 0 and row["status"] == "new" and row["local"] is None

    # the worker's caches (Site.local, Site.shift) as the data contract describes them
    figures = cache_site_results(service, site_id, "validating", details={"verdict": "shifted"})
    seen = service.client.get(f"/api/v1/cases/{case['id']}", headers=service.auth("admin")).json()["site"]
    assert seen["status"] == "validating"
    assert seen["local"]["n_patients"] == 6
    sens = seen["local"]["sensitivity"]
    assert sens["value"] == pytest.approx(2 / 3) and sens["low"] < sens["value"] < sens["high"]
    assert seen["shift"] == {"alarm": True, "auc": 0.93, "p_value": 0.001, "n_images": 40}
    worklist = service.client.get("/api/v1/worklist?filter=all", headers=service.auth("admin")).json()
    worklist = worklist["items"]
    assert next(r for r in worklist if r["id"] == case["id"])["site"]["local"]["n_patients"] == 6

    detail = service.client.get(f"/api/v1/sites/{site_id}", headers=service.auth("lab"))
    assert detail.status_code == 200, detail.text
    body = detail.json()
    assert body["local_figures"]["figures"]["metrics"]["roc_auc"]["value"] == pytest.approx(
        figures.value("roc_auc")
    )
    assert body["shift_test"]["details"] == {"verdict": "shifted"}
    assert body["rules"]["min_patients"] == 50 and body["runs"] == [] and body["own_run"] is False
    assert "@" in body["run"] and "/" not in body["run"]  # NAME@SHA, never a server path
    assert "/srv/runs" not in detail.text


def test_site_admin_changes_and_their_error_codes(service, ct_slices) -> None:
    a = send(service, "site one", ct_slices[:1])["site"]["id"]
    b = send(service, "site two", ct_slices[1:2])["site"]["id"]
    patch = service.client.patch
    r = patch(f"/api/v1/sites/{a}", headers=service.auth("doctor"), json={"name": "x"})
    assert r.status_code == 403 and error_code(r) == ErrorCode.FORBIDDEN_ROLE
    r = patch(f"/api/v1/sites/{a}", headers=service.auth("admin"), json={"name": "SITE TWO"})
    assert r.status_code == 409 and error_code(r) == ErrorCode.SITE_NAME_TAKEN
    r = patch(f"/api/v1/sites/{a}", headers=service.auth("admin"), json={"rules": {"min_patients": 0}})
    assert (
        r.status_code == 400
        and error_code(r) == ErrorCode.BAD_REQUEST
        and "min_patients" in r.json()["detail"]
    )
    r = patch(f"/api/v1/sites/{a}", headers=service.auth("admin"), json={"colour": "red"})
    assert r.status_code == 422 and error_code(r) == ErrorCode.INVALID_REQUEST
    r = patch(
        f"/api/v1/sites/{a}",
        headers=service.auth("admin"),
        json={"name": "Site One (ward 3)", "rules": {"min_patients": 20, "sensitivity_target": 0.8}},
    )
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "Site One (ward 3)"
    assert r.json()["rules"] | {} == {**r.json()["rules"], "min_patients": 20, "sensitivity_target": 0.8}
    assert service.client.get("/api/v1/sites/999999", headers=service.auth("admin")).status_code == 404

    r = service.client.post(f"/api/v1/sites/{a}/merge", headers=service.auth("admin"), json={"into": b})
    assert r.status_code == 200, r.text
    assert r.json()["moved"] == 1 and r.json()["site"]["id"] == b and r.json()["site"]["n_cases"] == 2
    assert all(
        s["id"] != a for s in service.client.get("/api/v1/sites", headers=service.auth("admin")).json()
    )
    assert service.client.get(f"/api/v1/sites/{a}", headers=service.auth("admin")).json()["merged_into"] == b
    r = patch(f"/api/v1/sites/{a}", headers=service.auth("admin"), json={"name": "again"})
    assert r.status_code == 409 and error_code(r) == ErrorCode.SITE_MERGED
    r = service.client.post(f"/api/v1/sites/{b}/merge", headers=service.auth("admin"), json={"into": b})
    assert r.status_code == 409 and error_code(r) == ErrorCode.SITE_MERGED
    # the merged name still lands in the site it was merged into
    assert send(service, "site one (WARD 3)", ct_slices[2:3])["site"]["id"] == b


def test_worklist_site_filter_and_teaching_order(service, ct_slices) -> None:
    mine = send(service, "filtered site", ct_slices[:1])["id"]
    send(service, "another site", ct_slices[1:2])
    rows = service.client.get("/api/v1/worklist?filter=all&site=FILTERED site", headers=service.auth("admin"))
    assert rows.status_code == 200 and [r["id"] for r in rows.json()["items"]] == [mine]
    for files in (ct_slices[2:3], ct_slices[3:5]):
        send(service, "filtered site", files)
    review = service.client.get(
        "/api/v1/worklist?site=filtered site", headers=service.auth("admin")
    ).json()["items"]
    teaching = service.client.get(
        "/api/v1/worklist?site=filtered site&order=teaching", headers=service.auth("admin")
    ).json()["items"]
    from covidscan.service.monitoring import teaching_queue

    db, store = open_service(ServiceSettings(data_dir=service.data_dir, database_url=service.database_url))
    with db.session() as s:
        expected = teaching_queue(s, store, s.get(Site, review[0]["site"]["id"]))
    db.dispose()
    assert sorted(r["id"] for r in teaching) == sorted(r["id"] for r in review) and len(teaching) == 3
    assert [r["id"] for r in teaching] == expected
    r = service.client.get("/api/v1/worklist?site=nowhere", headers=service.auth("admin"))
    assert r.status_code == 404 and error_code(r) == ErrorCode.NOT_FOUND
    r = service.client.get("/api/v1/worklist?order=teaching", headers=service.auth("admin"))
    assert r.status_code == 400 and error_code(r) == ErrorCode.BAD_REQUEST and "site" in r.json()["detail"]
    r = service.client.get("/api/v1/worklist?order=random", headers=service.auth("admin"))
    assert r.status_code == 422 and error_code(r) == ErrorCode.INVALID_REQUEST


def test_course_png_and_challenger_endpoints_need_their_roles(service, ct_slices) -> None:
    case = send(service, "course site", ct_slices[:1], patient_id="c-1")
    site_id = case["site"]["id"]
    r = service.client.get(f"/api/v1/sites/{site_id}/course.png", headers=service.auth("doctor"))
    assert r.status_code == 404 and error_code(r) == ErrorCode.NOT_FOUND  # no signed case: nothing to plot
    for path in ("challengers", "rollback", "runs/1/promote", "runs/1/reject"):
        r = service.client.post(f"/api/v1/sites/{site_id}/{path}", headers=service.auth("doctor"))
        assert r.status_code == 403 and error_code(r) == ErrorCode.FORBIDDEN_ROLE, path
    r = service.client.post(f"/api/v1/sites/{site_id}/runs/999999/promote", headers=service.auth("admin"))
    assert r.status_code == 404 and error_code(r) == ErrorCode.NOT_FOUND
    url = f"/api/v1/cases/{case['id']}"
    assert (
        service.client.post(
            f"{url}/first-read", headers=service.auth("doctor"), json={"finding": "covid"}
        ).status_code
        == 201
    )
    verdict = {"agree": case["group"]["label"] == "covid", "finding": "covid", "sign": True}
    assert (
        service.client.post(f"{url}/review", headers=service.auth("doctor"), json=verdict).status_code == 200
    )
    png = service.client.get(f"/api/v1/sites/{site_id}/course.png", headers=service.auth("doctor"))
    assert png.status_code == 200, png.text
    assert png.headers["content-type"] == "image/png" and png.content.startswith(b"\x89PNG\r\n\x1a\n")


def test_openapi_documents_the_site_endpoints(service) -> None:
    paths = service.client.get("/openapi.json").json()["paths"]
    for path in (
        "/api/v1/sites",
        "/api/v1/sites/{site_id}",
        "/api/v1/sites/{site_id}/course.png",
        "/api/v1/sites/{site_id}/merge",
        "/api/v1/sites/{site_id}/challengers",
        "/api/v1/sites/{site_id}/runs/{run_id}/promote",
        "/api/v1/sites/{site_id}/rollback",
        "/api/v1/cases/{case_id}/first-read",
    ):
        assert path in paths, path
    detail = paths["/api/v1/sites/{site_id}"]["get"]["responses"]["200"]["content"]["application/json"]
    assert detail["schema"]["$ref"].endswith("/SiteOut")


@pytest.mark.slow
def test_covidscan_send_site_names_the_site(tiny_run, ct_slices, tmp_path) -> None:
    import httpx
    from service_helpers import uvicorn_server
    from test_service_cli import covidscan

    from conftest import add_accounts

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / ct_slices[0][0]).write_bytes(ct_slices[0][1])
    data_dir = tmp_path / "service"
    db_url = f"sqlite:///{data_dir / 'service.sqlite3'}"
    tokens = add_accounts(data_dir, db_url)
    settings = ServiceSettings(data_dir=data_dir, database_url=db_url, run=tiny_run, poll_seconds=0.05)
    with uvicorn_server(settings) as url:
        sent = covidscan("send", str(inbox), "--to", url, "--token", tokens["lab"], "--site", "Scanner B")
        assert sent.returncode == 0, sent.stderr
        case_id = int(sent.stdout.split("case ", 1)[1].split()[0])
        case = httpx.get(
            f"{url}/api/v1/cases/{case_id}", headers={"Authorization": f"Bearer {tokens['admin']}"}
        )
        assert case.json()["site"]["name"] == "Scanner B"
        bad = covidscan("send", str(inbox), "--to", url, "--token", tokens["lab"], "--site", "   ")
        assert bad.returncode == 0  # blank: the default site (the account's)
        refused = covidscan("send", str(inbox), "--to", url, "--token", tokens["lab"], "--site", "x" * 200)
        assert refused.returncode == 2 and "error:" in refused.stderr and "at most 128" in refused.stderr


def test_challenger_against_champion_promote_reject_and_roll_back(service, ct_slices, tiny_run) -> None:
    from sqlalchemy.orm import object_session

    from covidscan.service.models import SiteRun

    site_id = send(service, "challenged site", ct_slices[:1])["site"]["id"]
    entry = {
        "value": 0.9,
        "ci95": [0.8, 0.95],
        "ci_method": "patient bootstrap",
        "ci_n": 50,
        "ci_unit": "patients",
    }
    comparison = {
        "run_dir": "/secret/site-runs/x",
        "mode": "head",
        "better": True,
        "auc_tie": 0.01,
        "n_images": 100,
        "n_patients": 50,
        "champion": {"roc_auc": {**entry, "value": 0.55}},
        "challenger": {"roc_auc": entry},
    }
    with site_row(service, site_id) as site:
        for state in ("rejected", "candidate"):  # as the worker leaves them after training
            site_run = SiteRun(
                site_id=site.id,
                run=str(tiny_run),
                parent_run=str(tiny_run),
                state=state,
                comparison=comparison,
                n_patients=50,
            )
            object_session(site).add(site_run)
    admin, url = service.auth("admin"), f"/api/v1/sites/{site_id}"
    detail = service.client.get(url, headers=admin)
    runs = detail.json()["runs"]
    assert [r["state"] for r in runs] == ["candidate", "rejected"] and "/secret" not in detail.text
    candidate = runs[0]
    assert (
        candidate["run"] == tiny_run.name and candidate["comparison"]["challenger"]["roc_auc"]["value"] == 0.9
    )
    r = service.client.post(f"{url}/challengers", headers=admin)
    assert r.status_code == 409 and error_code(r) == ErrorCode.CHALLENGER_OPEN
    r = service.client.post(f"{url}/runs/{runs[1]['id']}/promote", headers=admin)
    assert r.status_code == 409 and error_code(r) == ErrorCode.CHALLENGER_NOT_CANDIDATE

    with TestClient(service.client.app, base_url="http://127.0.0.1") as browser:
        login(browser, "admin")
        page = browser.get(f"/sites/{site_id}").text
        assert f'action="/sites/{site_id}/runs/{candidate["id"]}/promote"' in page
        assert "0.550" in page and "0.900 (95% CI 0.800–0.950" in page and "/secret" not in page

    promoted = service.client.post(f"{url}/runs/{candidate['id']}/promote", headers=admin)
    assert promoted.status_code == 200, promoted.text
    body = promoted.json()
    assert (
        body["own_run"]
        and body["run"].startswith(f"{tiny_run.name}@")
        and body["runs"][0]["state"] == "promoted"
    )
    assert body["run_since"] is not None
    back = service.client.post(f"{url}/rollback", headers=admin)
    assert back.status_code == 200 and not back.json()["own_run"]
    assert back.json()["runs"][0]["state"] == "rolled_back"
    r = service.client.post(f"{url}/rollback", headers=admin)
    assert r.status_code == 409 and error_code(r) == ErrorCode.NOTHING_TO_ROLL_BACK
    # nothing open now: an admin's "train now" queues one for the worker
    queued = service.client.post(f"{url}/challengers", headers=admin)
    assert queued.status_code == 202 and queued.json()["state"] == "training" and queued.json()["run"] is None
