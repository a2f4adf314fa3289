"""Issue 15 §1: the worklist never cuts anything off. ``GET /api/v1/worklist`` and the worklist page show
one page of every matching case with the total (offset paging), sorted, searched and filtered in the
database, on SQLite and PostgreSQL.

The defect: the worklist stopped at 200 cases; of 210 pending cases the 10 of lowest probability were in
neither the page nor the API. Here 210 predicted cases of one sender and site are written to the service's
own database as the worker writes them (no prediction needed to list them).
"""

from __future__ import annotations

import random
import re
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from service_helpers import png_bytes
from sqlalchemy import event, select
from test_service_pages import login

from conftest import PASSWORD
from covidscan.service.errors import ErrorCode
from covidscan.service.models import Case

N = 210
SITE = "bulk site"


def _seed_case(s, store, user, site, *, status: str, p: float | None, patient: str | None, at) -> Case:
    """A one-image case as the worker leaves it: with ``p``, predicted (certain, so its priority is ``p``)."""
    from covidscan.service.models import CaseImage

    label = None if p is None else ("covid" if p >= 0.5 else "non_covid")
    case = Case(patient_id=patient, submitted_by=user.id, site_id=site.id, status=status, created_at=at)
    if p is not None:
        case.group = {"n_images": 1, "p_covid": p, "label": label, "threshold": 0.5}
        case.priority, case.predicted_at = p, at
    s.add(case)
    s.flush()
    digest = store.put(png_bytes(value=case.id % 250))
    s.add(CaseImage(case_id=case.id, position=0, original_name="slice.png", sha256=digest, size=1,
                    suffix=".png", display_sha256=digest, width=64, height=64, p_covid=p, uncertain=False,
                    label=label))
    return case


@pytest.fixture(scope="module")
def bulk(service) -> dict:
    """210 ready cases of the submitter ``bulk`` at ``bulk site`` (distinct probabilities, shuffled against
    the case ids; every 7th without a patient id), and five of ``lab``'s cases in other states at
    ``mixed site``."""
    from covidscan.service.auth import add_user, new_token
    from covidscan.service.models import Site, User, utcnow
    from covidscan.service.settings import ServiceSettings, open_service

    db, store = open_service(ServiceSettings(data_dir=service.data_dir, database_url=service.database_url))
    rng = random.Random(15)
    ps = [round((i + 1) / (N + 1), 6) for i in range(N)]
    rng.shuffle(ps)
    start = utcnow() - timedelta(days=1)
    with db.session() as s:
        user = add_user(s, "bulk", "submitter", PASSWORD)
        token = new_token(s, user)
        site, mixed = Site(name=SITE, reader_first=False), Site(name="mixed site", reader_first=False)
        s.add_all([site, mixed])
        s.flush()
        rows = []
        for i, p in enumerate(ps):
            # received times run against the ids for the last 10, so "received" is not just "case id"
            at = start + timedelta(minutes=i if i < N - 10 else -i)
            patient = None if i % 7 == 3 else f"BULK-{i:03d}"
            case = _seed_case(s, store, user, site, status="ready", p=p, patient=patient, at=at)
            rows.append({"id": case.id, "p": p, "patient": patient, "at": at})
        lab = s.scalar(select(User).where(User.name == "lab"))
        mixed_ids = {
            status: _seed_case(s, store, lab, mixed, status=status, p=p, patient=f"MIX-{status}", at=start).id
            for status, p in (("ready", 0.4), ("no_result", None), ("failed", None), ("signed", 0.9),
                              ("queued", None))
        }
    db.dispose()
    return {"token": token, "rows": rows, "mixed": mixed_ids}


def get(service, token: str, **params) -> dict:
    r = service.client.get("/api/v1/worklist", headers={"Authorization": f"Bearer {token}"}, params=params)
    assert r.status_code == 200, r.text
    return r.json()


def ids(body: dict) -> list[int]:
    return [item["id"] for item in body["items"]]


def by_priority(rows: list[dict]) -> list[int]:
    """The review order of ready, certain cases: higher p first."""
    return [r["id"] for r in sorted(rows, key=lambda r: -r["p"])]


def test_no_case_is_cut_off_and_the_last_page_holds_the_ten_lowest(service, bulk) -> None:
    expected = by_priority(bulk["rows"])
    for who, params in ((bulk["token"], {}), (service.tokens["doctor"], {"site": SITE})):
        seen = []
        for offset in range(0, N, 50):
            body = get(service, who, offset=offset, **params)
            assert body["total"] == N and body["offset"] == offset and body["limit"] == 50
            seen += ids(body)
        assert seen == expected  # every case once, in review order
        last = get(service, who, offset=200, **params)
        lowest = sorted(bulk["rows"], key=lambda r: r["p"])[:10]
        assert len(last["items"]) == 10 and set(ids(last)) == {r["id"] for r in lowest}
        everything = get(service, who, limit=500, **params)["items"]
        assert everything[-1]["p_covid"] == min(r["p"] for r in bulk["rows"])
        past = get(service, who, offset=1000, **params)
        assert past == {"items": [], "total": N, "offset": 1000, "limit": 50}


def test_a_page_loads_only_its_own_cases(service, bulk) -> None:
    loaded: list[int] = []

    def count(target, _context) -> None:
        loaded.append(target.id)

    event.listen(Case, "load", count)
    try:
        body = get(service, bulk["token"], limit=20, offset=40)
    finally:
        event.remove(Case, "load", count)
    assert body["total"] == N and len(body["items"]) == 20
    assert sorted(set(loaded)) == sorted(ids(body))  # counted and paged in SQL: 20 of 210 cases loaded


@pytest.mark.parametrize(
    ("sort", "direction", "key"),
    [
        ("priority", "asc", lambda r: (r["p"], -r["id"])),
        ("probability", "desc", lambda r: (-r["p"], r["id"])),
        ("probability", "asc", lambda r: (r["p"], r["id"])),
        ("received", "asc", lambda r: (r["at"], r["id"])),
        ("received", "desc", lambda r: (-r["at"].timestamp(), -r["id"])),
        ("case", "desc", lambda r: -r["id"]),
        # cases without a patient id come last in either direction
        ("patient", "asc", lambda r: (r["patient"] is None, r["patient"] or "", r["id"])),
        ("patient", "desc", lambda r: (not r["patient"], [-ord(c) for c in r["patient"] or ""], -r["id"])),
    ],
)
def test_sorting(service, bulk, sort: str, direction: str, key) -> None:
    body = get(service, bulk["token"], sort=sort, dir=direction, limit=500)
    assert ids(body) == [r["id"] for r in sorted(bulk["rows"], key=key)]


def test_each_sort_has_its_own_default_direction(service, bulk) -> None:
    assert ids(get(service, bulk["token"], sort="case", limit=5)) == sorted(r["id"] for r in bulk["rows"])[:5]
    top = get(service, bulk["token"], sort="probability", limit=1)["items"][0]
    assert top["p_covid"] == max(r["p"] for r in bulk["rows"])


def test_search_by_case_id_and_patient_id(service, bulk) -> None:
    some = bulk["rows"][42]
    assert ids(get(service, bulk["token"], q=f"#{some['id']}")) == [some["id"]]
    by_patient = get(service, bulk["token"], q="bulk-04", sort="patient")  # any letter case, part of the id
    wanted = [f"BULK-{i:03d}" for i in range(40, 50) if i % 7 != 3]
    assert [i["patient_id"] for i in by_patient["items"]] == wanted
    assert by_patient["total"] == len(by_patient["items"])
    # a number: that case, and the patients whose ids hold its digits
    number = get(service, bulk["token"], q=str(some["id"]), limit=500)
    assert some["id"] in ids(number)
    assert all(i["id"] == some["id"] or str(some["id"]) in i["patient_id"] for i in number["items"])
    for wildcard in ("%", "_", "BULK%0"):  # LIKE wildcards are searched for as text
        assert get(service, bulk["token"], q=wildcard)["total"] == 0
    assert get(service, bulk["token"], q="   ")["total"] == N  # an empty search box is no search


def test_site_status_and_review_filters(service, bulk) -> None:
    mixed = bulk["mixed"]
    doctor = service.tokens["doctor"]
    pending = get(service, doctor, site="mixed site")
    assert set(ids(pending)) == set(mixed.values()) - {mixed["signed"]} and pending["total"] == 4
    assert ids(pending)[0] == mixed["ready"]  # a case with a result first
    assert ids(get(service, doctor, site="mixed site", filter="reviewed")) == [mixed["signed"]]
    one = get(service, doctor, site="mixed site", filter="all", status="no_result")
    assert ids(one) == [mixed["no_result"]] and one["items"][0]["status"] == "no_result"
    assert one["items"][0]["no_result"]  # says why there is no result
    two = service.client.get(
        "/api/v1/worklist?site=mixed site&filter=all&status=failed&status=queued&sort=case",
        headers=service.auth("doctor"),
    ).json()
    assert ids(two) == sorted([mixed["failed"], mixed["queued"]]) and two["total"] == 2
    assert get(service, doctor, site="mixed site", filter="reviewed", status="ready")["total"] == 0
    # another submitter sees none of them
    assert get(service, service.tokens["lab2"], site="mixed site", filter="all")["total"] == 0


def test_teaching_order_pages_through_every_case_of_the_site(service, bulk) -> None:
    seen = []
    for offset in range(0, N, 100):
        body = get(service, bulk["token"], site=SITE, order="teaching", offset=offset, limit=100)
        assert body["total"] == N
        seen += ids(body)
    assert sorted(seen) == sorted(r["id"] for r in bulk["rows"])


@pytest.mark.parametrize(
    "query",
    ["limit=0", "limit=501", "offset=-1", "offset=x", "sort=random", "dir=up", "status=done", "filter=mine",
     "order=random", "q=" + "x" * 129],
)
def test_invalid_parameters_are_422_naming_the_parameter(service, query: str) -> None:
    r = service.client.get(f"/api/v1/worklist?{query}", headers=service.auth("doctor"))
    assert r.status_code == 422 and r.json()["code"] == ErrorCode.INVALID_REQUEST
    assert query.split("=")[0] in r.json()["detail"]


@pytest.fixture
def doctor_browser(service):
    with TestClient(service.client.app, base_url="http://127.0.0.1") as client:
        assert login(client, "doctor").status_code == 303
        yield client


def test_the_page_shows_counts_paging_sorting_search_and_filters(service, bulk, doctor_browser) -> None:
    first = doctor_browser.get("/worklist", params={"site": SITE})
    assert first.status_code == 200
    assert "Showing 1–50 of 210 cases" in first.text
    expected = by_priority(bulk["rows"])
    assert [int(i) for i in re.findall(r'<a href="/cases/(\d+)">', first.text)] == expected[:50]
    nxt = re.search(r'<a href="([^"]+)"[^>]*rel="next"', first.text).group(1).replace("&amp;", "&")
    assert "offset=50" in nxt and "site=bulk+site" in nxt
    last_link = re.search(r'<a href="([^"]+)"[^>]*rel="last"', first.text).group(1).replace("&amp;", "&")
    last = doctor_browser.get(last_link)
    assert "Showing 201–210 of 210 cases" in last.text and "page 5 of 5" in last.text
    assert [int(i) for i in re.findall(r'<a href="/cases/(\d+)">', last.text)] == expected[200:]
    assert 'rel="next"' not in last.text and 'rel="prev"' in last.text

    some = bulk["rows"][7]
    found = doctor_browser.get("/worklist", params={"q": f"#{some['id']}", "filter": "all"})
    assert re.findall(r'<a href="/cases/(\d+)">', found.text) == [str(some["id"])]
    assert "Showing 1–1 of 1 case" in found.text and f'value="#{some["id"]}"' in found.text
    # the page's "any" status and an empty site field are no filter; sort headers and filters stay
    blank = {"q": "", "status": "", "dir": ""}
    params = {"filter": "all", "site": "mixed site", "sort": "case", **blank}
    form = doctor_browser.get("/worklist", params=params)
    assert form.status_code == 200 and "Showing 1–5 of 5 cases" in form.text
    mixed = [str(i) for i in sorted(bulk["mixed"].values())]
    assert re.findall(r'<a href="/cases/(\d+)">', form.text) == mixed
    assert 'aria-sort="ascending"' in form.text and "teaching order" in form.text and "all sites" in form.text
    assert '<span class="badge no_result">no result</span>' in form.text
    only = doctor_browser.get("/worklist", params={"filter": "all", "site": "mixed site",
                                                   "status": "no_result"})
    assert "Showing 1–1 of 1 case" in only.text
    assert doctor_browser.get("/worklist", params={"limit": "0"}).status_code == 422
