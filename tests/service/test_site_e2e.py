"""Issue 14 §5, the site loop end to end through a real `covidscan serve` (Uvicorn on 127.0.0.1, worker in
the server process), on PostgreSQL where CI started one, else on SQLite: one database per run, as the test
takes a minute (the site loop's database work is tested on both in test_site_jobs.py and test_sites.py).

A hospital whose scanner renders like no image the model learnt from (phantoms of ``scanner-b``) sends its
patients one case each. The shift alarm must ring within 50 images; its cases are read reader-first (the
model's result is withheld until the doctor's own finding is recorded); 50 patients are signed, the worker
trains a challenger by itself and compares it with the champion on them; an admin promotes it; the site's
later cases are predicted by its own run while another site keeps the service's run, and the site becomes
``validated`` only once its own figures since the switch pass the rules -- never before. The parent refuses
some of the site's slices as unlike its training data (about one case in eight has no probability at all):
those cases are signed like the others, but local figures can only score the judged ones.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from service_helpers import free_port, start_server
from site_phantoms import Patient, site_patients
from sqlalchemy import select

from conftest import ONE_DATABASE, add_accounts

pytestmark = [
    pytest.mark.slow,
    pytest.mark.parametrize("database_url", [ONE_DATABASE], indirect=True),  # not the service tests' pair
]

SITE = "scanner-b"
ALARM_BY = 50  # images: "raises the alarm within 50 images" (issue 14, Done means)
SIGNED = 50  # patients signed before the worker trains a challenger: the default adapt_min_patients, kept
LATER = 60  # at most this many later patients to validate the promoted run on
# The later validation's rule: 30 signed patients instead of the default 50, only to keep the test short.
# An admin sets it (issue 14 §3: "rules an admin sets"); the targets on the lower CI bounds stay the
# defaults, so "validated" still needs the site's own figures to prove the run.
VALIDATE_MIN_PATIENTS = 30


@pytest.fixture(scope="module")
def patients(tmp_path_factory: pytest.TempPathFactory) -> list[Patient]:
    return site_patients(tmp_path_factory.mktemp(SITE), SIGNED + LATER, seed=5)


class Api:
    """The running service as its users call it: one bearer token per account."""

    def __init__(self, url: str, tokens: dict[str, str]) -> None:
        self.url, self.tokens = url, tokens
        self.http = httpx.Client(base_url=url, timeout=120)

    def call(self, method: str, path: str, who: str, expect: int = 200, **kwargs: Any) -> Any:
        r = self.http.request(method, path, headers={"Authorization": f"Bearer {self.tokens[who]}"}, **kwargs)
        assert r.status_code == expect, f"{method} {path} as {who}: {r.status_code} {r.text[:2000]}"
        return r.json()

    def case(self, case_id: int, who: str = "doctor") -> dict:
        return self.call("GET", f"/api/v1/cases/{case_id}", who)

    def site(self, site_id: int) -> dict:
        return self.call("GET", f"/api/v1/sites/{site_id}", "admin")

    def send(self, patient: Patient, who: str = "lab", site: str | None = SITE) -> int:
        """Upload one patient's slices as one case (client.send_cases, as `covidscan send` does)."""
        from covidscan.service.client import send_cases

        sent = send_cases(list(patient.files), self.url, self.tokens[who], patient_id=patient.patient_id,
                          site=site)
        assert len(sent.created) == 1 and not sent.failed, sent.failed
        return sent.created[0]["id"]

    def site_when(self, site_id: int, ok: Callable[[dict], bool], timeout: float, what: str) -> dict:
        """The site once ``ok`` holds of it (the worker and the signing requests update it)."""
        return until(lambda: self.site(site_id), ok, timeout, what)

    def ready(self, case_id: int, timeout: float = 120) -> dict:
        """The case once predicted: ``ready`` with a probability, or ``no_result`` (saying why) when the
        model refused every slice as unlike its training data."""
        case = until(lambda: self.case(case_id, "admin"), lambda c: c["status"] not in ("queued", "running"),
                     timeout, f"case {case_id} predicted")
        if case["status"] == "no_result":
            assert case["group"] is None and case["no_result"] and all(im["error"] for im in case["images"])
        else:
            assert case["status"] == "ready" and case["group"] is not None, case
        return case

    def read_first(self, case_id: int, finding: str) -> dict:
        """A doctor reads a reader-first case: nothing of the model's before the first read, all after."""
        hidden = self.case(case_id)
        assert hidden["hidden_until_first_read"] and hidden["site"]["reader_first"], hidden
        assert hidden["group"] is None
        assert all(im["p_covid"] is None and im["label"] is None and not im["has_cam"]
                   for im in hidden["images"])
        self.call("POST", f"/api/v1/cases/{case_id}/first-read", "doctor", 201, json={"finding": finding})
        shown = self.case(case_id)
        assert not shown["hidden_until_first_read"] and shown["first_read"] == finding
        # Shown now: each image's probability, or the reason it was refused (e.g. unlike the training data)
        assert all((im["p_covid"] is None) == bool(im["error"]) for im in shown["images"]), str(shown)
        return shown

    def sign(self, case: dict, finding: str) -> None:
        agree = case["group"] is not None and case["group"]["label"] == finding
        self.call("POST", f"/api/v1/cases/{case['id']}/review", "doctor",
                  json={"agree": agree, "finding": finding, "sign": True})


def until(get: Callable[[], Any], ok: Callable[[Any], bool], timeout: float, what: str) -> Any:
    """Poll ``get`` until ``ok`` holds of its answer; fail naming ``what`` and the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        value = get()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout} s: {str(value)[:3000]}")
        time.sleep(0.05)  # the worker polls every 0.1 s here: a longer nap would idle most of this test


def shift_on(n_images: int) -> Callable[[dict], bool]:
    """Whether a site's latest shift test is the one on ``n_images`` images."""
    return lambda site: (site["shift"] or {}).get("n_images") == n_images


def local_on(n_patients: int) -> Callable[[dict], bool]:
    """Whether a site's local figures are those on ``n_patients`` signed patients."""
    return lambda site: (site["local"] or {}).get("n_patients", 0) == n_patients


def passes(site: dict) -> bool:
    """The site's own figures pass its rules (what ``validated`` needs, as the API reports them)."""
    figures, rules = site["local"], site["rules"]
    return (figures is not None and figures["n_patients"] >= rules["min_patients"]
            and (figures["sensitivity"]["low"] or 0) > rules["sensitivity_target"]
            and (figures["specificity"]["low"] or 0) > rules["specificity_target"])


@pytest.fixture
def served(database_url: str, phantom_parent: Path, tmp_path: Path) -> Iterator[tuple[Api, Path]]:
    """A real `covidscan serve` on ``database_url`` over the phantom parent; yields its API and log."""
    data_dir, port, log = tmp_path / "service", free_port(), tmp_path / "server.log"
    tokens = add_accounts(data_dir, database_url)
    server = start_server(phantom_parent, data_dir, port, log, database_url=database_url,
                          env={"COVIDSCAN_POLL_SECONDS": "0.1"})
    api = Api(f"http://127.0.0.1:{port}", tokens)
    try:
        yield api, log
    finally:
        api.http.close()
        server.terminate()
        server.wait(timeout=60)


def test_phantom_site_alarm_reader_first_challenger_promotion_and_validation(
    served: tuple[Api, Path], patients: list[Patient], phantom_parent: Path, database_url: str
) -> None:
    api, log = served
    took: dict[str, float] = {}
    start = time.monotonic()

    # --- the alarm: one patient (two slices) at a time; the first through `covidscan send --site`
    first = patients[0]
    sent = subprocess.run(
        [sys.executable, "-m", "covidscan", "send", *map(str, first.files), "--to", api.url,
         "--token", api.tokens["lab"], "--site", SITE, "--patient-id", first.patient_id],
        capture_output=True, text=True, timeout=300,
    )
    assert sent.returncode == 0, sent.stderr
    case_ids = [int(re.search(r"case (\d+) ", sent.stdout).group(1))]
    case = api.ready(case_ids[0])
    site_id = case["site"]["id"]
    assert case["site"]["name"] == SITE and case["model"]["run"] == phantom_parent.name
    alarm_at = None
    for patient in patients[1:SIGNED]:
        case_ids.append(api.send(patient))
        api.ready(case_ids[-1])
        n_images = 2 * len(case_ids)
        if alarm_at is None:
            if n_images < 30:  # MIN_IMAGES: no test yet, nothing known
                assert api.site(site_id)["status"] == "new"
                continue
            site = api.site_when(site_id, shift_on(n_images), 120, f"a shift test on {n_images} images")
            if site["shift"]["alarm"]:
                alarm_at = n_images
                assert site["status"] == "shifted" and site["shift_test"]["p_value"] is not None
    assert alarm_at is not None and alarm_at <= ALARM_BY, f"no alarm within {ALARM_BY} images"
    took["alarm and 50 cases"] = time.monotonic() - start

    # --- reader-first reading and signing of the 50 patients; never validated on the parent's figures.
    # Local figures score the cases the model judged: a case whose every slice it refused (unlike its
    # training data) has no probability to score, yet it is signed and teaches the challenger.
    judged = 0
    for case_id, patient in zip(case_ids, patients[:SIGNED], strict=True):
        shown = api.read_first(case_id, patient.label)
        assert shown["site"]["status"] != "validated"
        api.sign(shown, patient.label)
        judged += shown["group"] is not None
    site = api.site_when(site_id, local_on(judged), 120, f"local figures on the {judged} judged patients")
    assert site["status"] == "validating" and not passes(site), site["local"]
    took["read and sign 50"] = time.monotonic() - start - sum(took.values())

    # --- the worker trains a challenger by itself (adapt_min_patients stays 50) and compares it
    assert site["rules"]["adapt_min_patients"] == SIGNED
    api.site_when(site_id, lambda s: bool(s["runs"]), 30,
                  f"a challenger asked for after {SIGNED} signed patients ({judged} of them judged)")
    site = api.site_when(site_id, lambda s: s["runs"][0]["state"] != "training", 900, "a challenger trained")
    (challenger,) = site["runs"]
    assert challenger["state"] == "candidate", challenger["error"]
    assert challenger["n_patients"] == SIGNED and challenger["parent_run"] == phantom_parent.name
    comparison = challenger["comparison"]
    assert comparison["better"] and comparison["mode"] != "parent"
    for side in ("champion", "challenger"):
        auc = comparison[side]["roc_auc"]
        assert auc["value"] is not None and len(auc["ci95"]) == 2
    took["challenger"] = time.monotonic() - start - sum(took.values())

    # --- the admin promotes it; local validation starts again from the switch
    site = api.call("POST", f"/api/v1/sites/{site_id}/runs/{challenger['id']}/promote", "admin")
    assert site["own_run"] and site["run"].startswith(challenger["run"] + "@")
    assert site["runs"][0]["state"] == "promoted" and site["status"] != "validated"
    rules = {**site["rules"], "min_patients": VALIDATE_MIN_PATIENTS}
    site = api.call("PATCH", f"/api/v1/sites/{site_id}", "admin", json={"rules": rules})
    assert site["rules"]["min_patients"] == VALIDATE_MIN_PATIENTS and site["status"] != "validated"

    # Another site keeps the service's run.
    other = api.ready(api.send(patients[0], site=None))
    assert other["site"]["name"] == "lab" and other["model"]["run"] == phantom_parent.name

    # --- later patients: predicted by the site's own run, read and signed until the site is validated
    validated_at, judged = None, 0
    for k, patient in enumerate(patients[SIGNED:], start=1):
        case_id = api.send(patient)
        case = api.ready(case_id)
        assert case["model"]["run"] == challenger["run"]
        shown = api.read_first(case_id, patient.label)
        api.sign(shown, patient.label)
        judged += shown["group"] is not None
        site = api.site_when(site_id, local_on(judged), 120, f"local figures on {judged} judged patients "
                             "since the switch")
        assert (site["status"] == "validated") == passes(site), (site["status"], site["local"], site["rules"])
        if site["status"] == "validated":
            validated_at = k
            assert judged >= VALIDATE_MIN_PATIENTS
            break
    took["validate"] = time.monotonic() - start - sum(took.values())
    print(f"\n{database_url.split(':')[0]}: alarm at {alarm_at} images; validated after {validated_at} later "
          f"patients; seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in took.items()))
    assert validated_at is not None, f"not validated after {LATER} later patients: {site['local']}"
    assert site["local"]["roc_auc"]["value"] >= 0.85  # issue 14's bar, on the site's later cases
    # Validated: reader-first ends, the next case shows the model's result at once.
    assert not api.case(api.ready(api.send(patients[0]))["id"])["hidden_until_first_read"]

    # --- promotion is in the audit log (and the chain holds)
    from covidscan.service.audit import load_audit_key, verify_chain
    from covidscan.service.db import Database
    from covidscan.service.models import AuditEvent

    db = Database(database_url, audit_key=load_audit_key(log.parent / "service")[0])  # the server's key
    with db.session() as s:
        events = s.scalars(select(AuditEvent).where(AuditEvent.target == f"site:{site_id}")).all()
        promoted = [(e.actor, e.detail.get("site_run")) for e in events if e.action == "challenger_promoted"]
        assert promoted == [("admin", challenger["id"])], sorted({e.action for e in events})
        assert verify_chain(s).ok
    db.dispose()
    assert "Traceback" not in log.read_text()
