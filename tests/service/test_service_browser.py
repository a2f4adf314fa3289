"""A doctor's session in headless Chromium (Debian's package, via Playwright) on a real Uvicorn server."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from service_helpers import uvicorn_server

from conftest import PASSWORD, add_accounts

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# No network but 127.0.0.1 here: Chromium's background services would only hammer a closed network.
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]


@pytest.fixture(scope="module")
def server(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory, ct_slices):
    """A real server on SQLite with one predicted two-slice case; yields (url, case id)."""
    from covidscan.service.settings import ServiceSettings

    data_dir = tmp_path_factory.mktemp("browser-service")
    url_db = f"sqlite:///{data_dir / 'service.sqlite3'}"
    tokens = add_accounts(data_dir, url_db)
    settings = ServiceSettings(data_dir=data_dir, database_url=url_db, run=tiny_run, poll_seconds=0.05)
    with uvicorn_server(settings) as url:
        headers = {"Authorization": f"Bearer {tokens['lab']}"}
        files = [("files", (name, data)) for name, data in ct_slices[:2]]
        case_id = httpx.post(
            f"{url}/api/v1/cases", headers=headers, files=files, data={"patient_id": "p-browser"}
        ).json()["id"]
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/api/v1/cases/{case_id}", headers=headers).json()["status"] != "ready":
            assert time.monotonic() < deadline, "the case was not predicted in 60 s"
            time.sleep(0.1)
        yield url, case_id


@contextmanager
def chromium_page(width: int, height: int) -> Iterator:
    """A Playwright page in Debian's headless Chromium (skips the test, saying why, when there is none)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"BROWSER NOT TESTED: no Chromium at {CHROMIUM} (.ci/run installs Debian's chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser.new_context(viewport={"width": width, "height": height}).new_page()
        browser.close()


@pytest.fixture(scope="module")
def page():
    with chromium_page(1280, 1000) as page:
        yield page


def test_doctor_logs_in_reads_toggles_the_overlay_signs_and_sees_the_case_locked(
    server, page, tmp_path
) -> None:
    url, case_id = server
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))

    page.goto(f"{url}/worklist")
    assert "/login" in page.url
    page.fill("input[name=name]", "doctor")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/worklist")
    row = page.locator(f"a[href='/cases/{case_id}']")
    assert row.is_visible()

    page.click("a[hx-get='/worklist?filter=reviewed']")  # htmx swaps the table in place
    page.wait_for_url("**/worklist?filter=reviewed")
    assert page.locator("#worklist").get_attribute("data-filter") == "reviewed"
    assert page.locator(f"a[href='/cases/{case_id}']").count() == 0
    page.click("a[hx-get='/worklist?filter=pending']")
    page.wait_for_selector(f"#worklist[data-filter=pending] a[href='/cases/{case_id}']")

    page.click(f"a[href='/cases/{case_id}']")
    page.wait_for_url(f"{url}/cases/{case_id}")
    page.wait_for_selector("#viewer[data-ready='1']")
    cam = page.locator("#cam-overlay")
    assert cam.is_visible()
    assert page.evaluate("() => [...document.images].every(i => i.complete && i.naturalWidth > 0)")
    page.uncheck("#cam-toggle")
    assert cam.is_hidden()
    page.check("#cam-toggle")
    page.locator("#cam-opacity").fill("40")
    assert cam.evaluate("e => e.style.opacity") == "0.4"
    page.locator("#cam-opacity").fill("70")
    shots = Path(os.environ.get("COVIDSCAN_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / "review-case-page.png"), full_page=True)

    page.check("input[name=agree][value=no]")
    page.select_option("select[name=finding]", "non_covid")
    page.fill("textarea[name=comment]", "<script>alert('x')</script> no ground glass")
    page.check("#sign")
    page.click(".verdict-form button[type=submit]")
    page.wait_for_selector("#locked")
    assert page.locator(".comment").inner_text().startswith("<script>alert('x')</script>")
    assert page.locator("#sign").count() == 0 and page.locator("input[name=amendment_reason]").is_visible()
    page.screenshot(path=str(shots / "review-case-signed.png"), full_page=True)
    assert problems == []
