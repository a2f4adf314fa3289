"""Issue 15 §1: errors are pages for people and JSON for the API -- against a real Uvicorn on 127.0.0.1,
on SQLite and PostgreSQL.

The defect: a 403, a 404 or a CSRF failure met in the browser was a raw JSON page, and a verdict sent from
an expired session came back, after logging in again, as ``405 {"detail": ...}``. Now a page route asked
for by a browser (``Accept: text/html``) answers ``templates/error.html`` with the same status (what
happened, what to do, links back and to the login); ``/api/`` answers JSON with its ``code`` whatever the
client accepts.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from service_helpers import uvicorn_server

from conftest import PASSWORD, add_accounts
from covidscan.service.errors import ErrorCode

BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@pytest.fixture(scope="module")
def server(database_url: str, tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A real server with the test accounts; yields its URL, tokens and data folder."""
    from covidscan.service.settings import ServiceSettings

    data_dir = tmp_path_factory.mktemp("errors")
    tokens = add_accounts(data_dir, database_url)
    settings = ServiceSettings(data_dir=data_dir, database_url=database_url, run=tiny_run,
                               max_upload_bytes=200_000, poll_seconds=0.05)
    with uvicorn_server(settings) as url:
        yield {"url": url, "tokens": tokens, "data_dir": data_dir}


@contextmanager
def browser(server: dict, name: str | None = "doctor") -> Iterator[httpx.Client]:
    """A client that asks for HTML like a browser, logged in as ``name`` through the login form."""
    with httpx.Client(base_url=server["url"], headers=BROWSER, timeout=60) as client:
        if name is not None:
            form = client.get("/login")
            r = client.post("/login", data={"name": name, "password": PASSWORD, "next": "/worklist",
                                            "csrf": CSRF.search(form.text).group(1)})
            assert r.status_code == 303, r.text
        yield client


def api(server: dict, name: str) -> httpx.Client:
    return httpx.Client(base_url=server["url"], timeout=60,
                        headers={"Authorization": f"Bearer {server['tokens'][name]}"})


def send_case(server: dict, site: str, image: tuple[str, bytes]) -> dict:
    """A case of one image sent through the API, once predicted."""
    with api(server, "lab") as lab, api(server, "doctor") as doctor:
        r = lab.post("/api/v1/cases", data={"site": site}, files=[("files", (*image, "image/png"))])
        assert r.status_code == 201, r.text
        for _ in range(600):
            case = doctor.get(f"/api/v1/cases/{r.json()['id']}").json()
            if case["status"] not in ("queued", "running"):
                return case
            time.sleep(0.1)
    raise AssertionError("case not predicted")


def assert_page(r: httpx.Response, status: int, code: ErrorCode, *words: str) -> None:
    """An HTML error page with ``status``, its code, what to do and the way back to the worklist."""
    assert r.status_code == status, r.text[:500]
    assert r.headers["content-type"].startswith("text/html"), r.headers["content-type"]
    assert f'data-status="{status}"' in r.text and f'data-code="{code}"' in r.text
    assert "What to do:" in r.text and 'href="/worklist"' in r.text and 'href="/login?next=' in r.text
    for word in words:
        assert word in r.text, word


def assert_json(r: httpx.Response, status: int, code: ErrorCode) -> None:
    assert r.status_code == status and r.headers["content-type"] == "application/json", r.text[:500]
    assert r.json()["code"] == code


def test_not_found_pages_and_api(server) -> None:
    with browser(server) as doctor:
        assert_page(doctor.get("/cases/999999"), 404, ErrorCode.NOT_FOUND, "Not found", "no case 999999")
        assert_page(doctor.get("/no-such-page"), 404, ErrorCode.NOT_FOUND)
        # the API answers JSON even to a client that prefers HTML
        assert_json(doctor.get("/api/v1/cases/999999"), 404, ErrorCode.NOT_FOUND)
        assert_json(doctor.get("/api/v1/no-such-route"), 404, ErrorCode.NOT_FOUND)
    with httpx.Client(base_url=server["url"]) as script:  # no Accept: text/html, a program
        assert_json(script.get("/no-such-page"), 404, ErrorCode.NOT_FOUND)


def test_forbidden_role_and_csrf_are_pages(server) -> None:
    with browser(server) as doctor:
        assert_page(doctor.get("/admin"), 403, ErrorCode.FORBIDDEN_ROLE, "Not allowed")
        r = doctor.post("/cases/1/review", data={"agree": "yes", "finding": "covid", "csrf": "stale"})
        assert_page(r, 403, ErrorCode.CSRF, "This form has expired", "reload the page")
        assert_json(doctor.post("/api/v1/cases/1/review", json={"agree": True, "finding": "covid"}),
                    403, ErrorCode.CSRF)
    with browser(server, None) as anonymous:
        anonymous.get("/login")
        r = anonymous.post("/login", data={"name": "doctor", "password": PASSWORD, "csrf": "forged"})
        assert_page(r, 403, ErrorCode.CSRF, "This form has expired")
        r = anonymous.post("/login", data={"name": "doctor", "password": "wrong password!",
                                           "csrf": CSRF.search(anonymous.get("/login").text).group(1)})
        assert r.status_code == 401 and r.headers["content-type"].startswith("text/html")
        assert "Wrong name or password" in r.text
        assert_json(anonymous.get("/api/v1/worklist"), 401, ErrorCode.AUTH_REQUIRED)


def test_method_not_allowed_and_invalid_parameters_are_pages(server) -> None:
    with browser(server) as doctor:
        r = doctor.get("/cases/1/review", headers={"Referer": f"{server['url']}/cases/1"})
        assert_page(r, 405, ErrorCode.METHOD_NOT_ALLOWED, "send it from there")
        assert 'href="/cases/1">Back to the previous page' in r.text
        assert_page(doctor.get("/worklist?limit=0"), 422, ErrorCode.INVALID_REQUEST, "limit")
        assert_page(doctor.get("/cases/abc"), 422, ErrorCode.INVALID_REQUEST)
        assert_json(doctor.get("/api/v1/worklist?limit=0"), 422, ErrorCode.INVALID_REQUEST)
        r = doctor.get("/worklist", headers={"Referer": "https://elsewhere.example/phish"})
        assert r.status_code == 200  # (a foreign Referer is never offered as the way back)
        bad = doctor.get("/cases/abc", headers={"Referer": "https://elsewhere.example/phish"})
        assert "elsewhere.example" not in bad.text


def test_a_verdict_sent_after_the_session_ended_returns_to_its_case_page(server) -> None:
    with browser(server, None) as expired:
        r = expired.post("/cases/7/review", data={"agree": "yes", "finding": "covid"},
                         headers={"Referer": f"{server['url']}/cases/7"})
        assert r.status_code == 303 and r.headers["location"] == "/login?next=/cases/7"  # not the POST URL


def test_conflict_and_too_large_are_pages(server, ct_slices) -> None:
    case = send_case(server, "errors reader-first site", ct_slices[0])  # a new site: read reader-first
    with browser(server) as doctor:
        r = doctor.get(f"/cases/{case['id']}/files/0/cam")
        assert_page(r, 409, ErrorCode.HIDDEN_UNTIL_FIRST_READ, "This cannot be done now")
    with browser(server, "lab") as lab:
        big = {"files": ("big.png", b"\0" * 300_000, "image/png")}
        assert_page(lab.post("/upload", files=big), 413, ErrorCode.UPLOAD_TOO_LARGE, "Too large")


def test_a_server_fault_is_a_page_without_internals(server, ct_slices) -> None:
    case = send_case(server, "lab", ct_slices[1])
    digest = case["images"][0]["sha256"]
    (server["data_dir"] / "blobs" / digest[:2] / digest).unlink()  # a file lost from the store
    url = f"/cases/{case['id']}/files/0/original"
    with browser(server) as doctor:
        r = doctor.get(url)
        assert_page(r, 500, ErrorCode.INTERNAL, "Something went wrong on the server", "administrator")
        assert str(server["data_dir"]) not in r.text and digest not in r.text  # the log has those
        assert_json(doctor.get(url, headers={"Accept": "*/*"}), 500, ErrorCode.INTERNAL)
