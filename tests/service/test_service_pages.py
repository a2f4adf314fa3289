"""Pages over HTTP: login (Argon2, server sessions, CSRF, throttle), roles, verdict forms, escaping."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from service_helpers import png_bytes as service_png

from conftest import PASSWORD
from covidscan.service.errors import ErrorCode

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def _csrf(html: str) -> str:
    return CSRF.search(html).group(1)


def login(client: TestClient, name: str, password: str = PASSWORD):
    """Log in through the form, as a browser would (login CSRF cookie + field)."""
    page = client.get("/login")
    return client.post(
        "/login",
        data={"name": name, "password": password, "csrf": _csrf(page.text), "next": "/worklist"},
        follow_redirects=False,
    )


@pytest.fixture
def browser(service) -> TestClient:
    """A fresh cookie jar on the module's service."""
    with TestClient(service.client.app, base_url="http://127.0.0.1") as client:
        yield client


def test_pages_redirect_to_login_without_a_session(browser) -> None:
    r = browser.get("/cases/1", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?next=/cases/1"
    assert browser.get("/worklist", follow_redirects=False).headers["location"].startswith("/login")


def test_login_sets_a_fresh_httponly_samesite_session_and_logout_revokes_it(browser) -> None:
    browser.cookies.set("covidscan_session", "planted-by-an-attacker", domain="127.0.0.1")
    r = login(browser, "doctor")
    assert r.status_code == 303 and r.headers["location"] == "/worklist"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie
    sid = browser.cookies.get("covidscan_session")
    assert sid and sid != "planted-by-an-attacker"
    worklist = browser.get("/worklist")
    assert worklist.status_code == 200 and "Worklist" in worklist.text
    assert (
        browser.post("/logout", data={"csrf": _csrf(worklist.text)}, follow_redirects=False).status_code
        == 303
    )
    browser.cookies.set("covidscan_session", sid, domain="127.0.0.1")  # replaying the old cookie after logout
    assert browser.get("/worklist", follow_redirects=False).status_code == 303


def test_login_needs_its_csrf_token(browser) -> None:
    browser.get("/login")
    r = browser.post("/login", data={"name": "doctor", "password": PASSWORD, "csrf": "forged"})
    assert r.status_code == 403 and r.json()["code"] == ErrorCode.CSRF


def test_repeated_failures_are_throttled_with_429(service) -> None:
    # A client address of its own: the throttle is per address, and the other tests log in from theirs.
    with TestClient(service.client.app, base_url="http://127.0.0.1", client=("192.0.2.7", 50000)) as guesser:
        codes = [login(guesser, "guess", "wrong password!").status_code for _ in range(5)]
        assert codes == [401] * 5
        throttled = login(guesser, "guess", "wrong password!")
        assert throttled.status_code == 429 and int(throttled.headers["retry-after"]) >= 1
        assert login(guesser, "guess").status_code == 429  # this address waits, even with the right password


def test_state_changing_forms_need_the_session_csrf_token(service, browser, ct_slices) -> None:
    case_id = service.upload("lab", ct_slices[:1]).json()["id"]
    service.wait(case_id)
    login(browser, "doctor")
    r = browser.post(f"/cases/{case_id}/review", data={"agree": "yes", "finding": "covid", "sign": "on"})
    assert r.status_code == 403 and r.json()["code"] == ErrorCode.CSRF
    r = browser.post("/logout")
    assert r.status_code == 403 and r.json()["code"] == ErrorCode.CSRF
    # the API with the session cookie needs the token in a header, too
    verdict = {"agree": True, "finding": "covid", "sign": True}
    r = browser.post(f"/api/v1/cases/{case_id}/review", json=verdict)
    assert r.status_code == 403 and r.json()["code"] == ErrorCode.CSRF


def test_doctor_signs_in_the_form_then_the_case_is_locked(service, browser, ct_slices) -> None:
    case_id = service.upload("lab", ct_slices[3:5], patient_id="p-form").json()["id"]
    service.wait(case_id)
    login(browser, "doctor")
    page = browser.get(f"/cases/{case_id}")
    assert page.status_code == 200
    assert 'id="cam-toggle"' in page.text and 'id="cam-opacity"' in page.text
    assert "Model result" in page.text and "Test metrics" in page.text
    comment = "<script>alert('x')</script> looks clear"
    r = browser.post(
        f"/cases/{case_id}/review",
        data={
            "agree": "no",
            "finding": "non_covid",
            "comment": comment,
            "sign": "on",
            "csrf": _csrf(page.text),
        },
    )
    assert r.status_code == 200  # followed the redirect back to the case page
    assert "signed · locked" in r.text and "Reason for the amendment" in r.text
    assert "<script>alert" not in r.text and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in r.text
    amended = browser.post(
        f"/cases/{case_id}/review",
        data={
            "agree": "no",
            "finding": "covid",
            "sign": "on",
            "amendment_reason": "CT re-read",
            "csrf": _csrf(r.text),
        },
    )
    assert "v2" in amended.text and "v1" in amended.text and "Amendment: CT re-read" in amended.text
    assert browser.get(f"/cases/{case_id}/files/0/cam").headers["content-type"] == "image/png"
    original = browser.get(f"/cases/{case_id}/files/0/original")
    assert original.content == ct_slices[3][1]
    assert original.headers["content-disposition"] == f'attachment; filename="case{case_id}-image0.png"'


def test_hostile_file_name_is_escaped_on_the_page(service, browser, ct_slices) -> None:
    case_id = service.upload("lab", [("<b onclick=x>bold</b>.png", ct_slices[0][1])]).json()["id"]
    login(browser, "doctor")
    page = browser.get(f"/cases/{case_id}").text
    assert "<b onclick" not in page and "&lt;b onclick=x&gt;bold&lt;/b&gt;.png" in page
    service.wait(case_id)


def test_pages_send_a_strict_content_security_policy(browser) -> None:
    csp = browser.get("/login").headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp


def test_roles_on_pages(service, browser) -> None:
    login(browser, "doctor")
    for page in ("/admin", "/upload"):
        r = browser.get(page)
        assert r.status_code == 403 and r.json()["code"] == ErrorCode.FORBIDDEN_ROLE
    login(browser, "lab")
    assert browser.get("/upload").status_code == 200
    login(browser, "admin")
    admin = browser.get("/admin")
    assert admin.status_code == 200 and "chain intact" in admin.text and "Agreement" in admin.text


def test_admin_adds_accounts_and_switches_the_model_with_an_audit_record(
    service, browser, tiny_run, tmp_path
) -> None:
    import shutil

    login(browser, "admin")
    page = browser.get("/admin")
    added = browser.post(
        "/admin/users",
        data={"name": "newdoc", "role": "doctor", "password": "a long password", "csrf": _csrf(page.text)},
    )
    assert added.status_code == 200 and "added doctor newdoc" in added.text
    bad = browser.post("/admin/model", data={"run": "/no/such/run", "csrf": _csrf(page.text)})
    assert bad.status_code == 400 and "cannot switch to run /no/such/run" in bad.text
    adapted = shutil.copytree(tiny_run, tmp_path / "adapted-run")  # stands in for `covidscan adapt`'s run
    switched = browser.post("/admin/model", data={"run": str(adapted), "csrf": _csrf(page.text)})
    assert switched.status_code == 200 and f"new cases are now predicted by {adapted}" in switched.text
    assert "<td>model_switch</td>" in switched.text and "<td>user_add</td>" in switched.text
    assert "<td>login</td>" in switched.text
    case_id = service.upload("lab", [("after-switch.png", service_png())]).json()["id"]
    assert service.wait(case_id)["model"]["run"] == "adapted-run"
    back = browser.post("/admin/model", data={"run": str(tiny_run), "csrf": _csrf(page.text)})
    assert back.status_code == 200


def test_upload_form_shows_a_refused_file_by_name(service, browser) -> None:
    login(browser, "lab")
    page = browser.get("/upload")
    r = browser.post(
        "/upload",
        data={"csrf": _csrf(page.text)},
        files=[("files", ("<i>scan</i>.png", b"GIF89a not really", "image/png"))],
    )
    assert r.status_code == 422 and "&lt;i&gt;scan&lt;/i&gt;.png" in r.text
