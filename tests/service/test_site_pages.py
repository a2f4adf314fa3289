"""The sites' pages (SQLite and PostgreSQL): the list and a site's page (status banner, local figures with
their CIs, admin forms with CSRF), the case page's site banner and its reader-first form, escaping."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from test_service_pages import _csrf, login
from test_site_api import cache_site_results, send

EVIL = "<img src=x onerror=alert(1)>"


@pytest.fixture
def admin(service):
    with TestClient(service.client.app, base_url="http://127.0.0.1") as client:
        login(client, "admin")
        yield client


@pytest.fixture
def doctor(service):
    with TestClient(service.client.app, base_url="http://127.0.0.1") as client:
        login(client, "doctor")
        yield client


def test_sites_list_and_site_page_escape_names_and_show_local_figures(service, ct_slices, admin) -> None:
    case = send(service, EVIL, ct_slices[:1])
    site_id = case["site"]["id"]
    figures = cache_site_results(service, site_id, "shifted", details=None)
    listing = admin.get("/sites")
    assert listing.status_code == 200 and "Sites" in listing.text
    assert EVIL not in listing.text and "&lt;img src=x onerror=alert(1)&gt;" in listing.text
    assert 'href="/sites"' in listing.text  # the nav link
    page = admin.get(f"/sites/{site_id}")
    assert page.status_code == 200
    assert EVIL not in page.text and "&lt;img src=x" in page.text
    assert "not yet validated here" in page.text.lower() and "wrong" not in page.text
    assert "Images differ" in page.text and "40 images" in page.text
    table = page.text[page.text.index('id="local"') :]
    sens = figures.metrics["sensitivity"]
    assert f"{sens['ci95'][0]:.3f}–{sens['ci95'][1]:.3f}" in table and "6 patient(s)" in table
    assert f"/api/v1/sites/{site_id}/course.png" in table
    assert "Train a challenger now" in page.text and "Save rules" in page.text  # admin forms

    case_page = admin.get(f"/cases/{case['id']}")
    banner = case_page.text[case_page.text.index('id="site-banner"') :]
    assert "&lt;img src=x" in banner and "shifted" in banner and "sensitivity" in banner


def test_admin_site_forms_need_csrf_and_the_admin_role(service, ct_slices, admin, doctor) -> None:
    site_id = send(service, "form site", ct_slices[:1])["site"]["id"]
    csrf = _csrf(admin.get(f"/sites/{site_id}").text)
    r = admin.post(f"/sites/{site_id}/rules", data={"min_patients": "20"}, follow_redirects=False)
    assert r.status_code == 403 and r.json()["code"] == "csrf"
    r = doctor.post(f"/sites/{site_id}/rename", data={"name": "x", "csrf": _csrf(doctor.get("/sites").text)})
    assert r.status_code == 403 and r.json()["code"] == "forbidden_role"
    assert "Save rules" not in doctor.get(f"/sites/{site_id}").text  # doctors see no admin forms

    r = admin.post(
        f"/sites/{site_id}/rules",
        data={"csrf": csrf, "min_patients": "20", "specificity_target": "0.8", "recent_window": ""},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == f"/sites/{site_id}"
    rules = service.client.get(f"/api/v1/sites/{site_id}", headers=service.auth("admin")).json()["rules"]
    assert rules["min_patients"] == 20 and rules["specificity_target"] == 0.8 and rules["recent_window"] == 50
    bad = admin.post(f"/sites/{site_id}/rules", data={"csrf": csrf, "min_patients": "many"})
    assert bad.status_code == 400 and "min_patients" in bad.text and 'class="error"' in bad.text
    r = admin.post(f"/sites/{site_id}/reader-first", data={"csrf": csrf, "reader_first": "off"})
    assert r.status_code == 200 and "result at once" in r.text
    r = admin.post(f"/sites/{site_id}/rename", data={"csrf": csrf, "name": "lab"})
    assert r.status_code == 409 and "merge the sites instead" in r.text
    r = admin.post(f"/sites/{site_id}/rename", data={"csrf": csrf, "name": "Form Site 2"})
    assert r.status_code == 200 and "<h1>Site Form Site 2" in r.text


def test_case_page_asks_for_the_first_read_before_the_result(service, ct_slices, doctor) -> None:
    case = send(service, "reader-first page site", ct_slices[:1])
    worklist = doctor.get("/worklist")
    row = re.search(rf'<a href="/cases/{case["id"]}">.*?</tr>', worklist.text, re.S).group(0)
    assert "read first" in row and f"{case['group']['p_covid']:.2f}" not in row
    page = doctor.get(f"/cases/{case['id']}")
    assert 'id="first-read"' in page.text and "Record my reading" in page.text
    assert (
        "p(covid) =" not in page.text and "/files/0/cam" not in page.text and "verdict-form" not in page.text
    )
    assert f'data-src="/cases/{case["id"]}/files/0/original"' in page.text  # the images are there to read
    r = doctor.post(f"/cases/{case['id']}/first-read", data={"finding": "covid"})
    assert r.status_code == 403 and r.json()["code"] == "csrf"
    r = doctor.post(
        f"/cases/{case['id']}/first-read",
        data={"finding": "covid", "csrf": _csrf(page.text)},
        follow_redirects=False,
    )
    assert r.status_code == 303
    shown = doctor.get(f"/cases/{case['id']}").text
    assert "p(covid) =" in shown and "verdict-form" in shown and "Your first read" in shown
    assert "Record my reading" not in shown
    again = doctor.post(
        f"/cases/{case['id']}/first-read", data={"finding": "non_covid", "csrf": _csrf(shown)}
    )
    assert again.status_code == 409 and "cannot change" in again.text


def test_worklist_page_filters_by_site_and_escapes_its_name(service, ct_slices, admin) -> None:
    mine = send(service, "ward <b>7</b>", ct_slices[:1])["id"]
    other = send(service, "ward 8", ct_slices[1:2])["id"]
    page = admin.get("/worklist", params={"filter": "all", "site": "ward <b>7</b>"})
    assert page.status_code == 200
    assert f'href="/cases/{mine}"' in page.text and f'href="/cases/{other}"' not in page.text
    assert "<b>7</b>" not in page.text and "ward &lt;b&gt;7&lt;/b&gt;" in page.text
    assert "teaching order" in page.text and "all sites" in page.text
    everything = admin.get("/worklist", params={"filter": "all"}).text
    assert f'href="/cases/{mine}"' in everything and f'href="/cases/{other}"' in everything
    assert "teaching order" not in everything  # teaching order is per site
