"""Screenshot of a site page with real figures: a run (``covidscan-ct``) serves ucsd-ct's official test split
as one site through a real ``covidscan serve``-style Uvicorn server; each patient is one case (up to 2
slices), sent with ``site``, first-read and signed with its true label through the API; the worker trains a
challenger at 50 signed patients. Usage (from the repository root)::

    nice python benchmarks/site_page_screenshot.py --run /work/runs/covidscan-ct --shared ../shared \
        --out docs/site-page.png --patients 60
"""

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests/service"), str(ROOT / "tests")]
from service_helpers import uvicorn_server  # noqa: E402

from conftest import PASSWORD, add_accounts  # noqa: E402
from covidscan.service.settings import ServiceSettings  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--run", type=Path, required=True)
parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
parser.add_argument("--out", type=Path, default=ROOT / "docs/site-page.png")
parser.add_argument("--patients", type=int, default=60)
args = parser.parse_args()
OUT = args.out
N_PATIENTS = args.patients
data = args.shared / "data/ucsd-ct"
labels = pd.read_csv(data / "labels.csv")
test = labels[labels.official_split == "test"]
patients = test.groupby("patient_id").head(2).groupby("patient_id")
chosen = sorted(patients.groups)
random.Random(0).shuffle(chosen)  # arrival order: covid and non-covid patients mixed
chosen = chosen[:N_PATIENTS]
data_dir = Path(tempfile.mkdtemp(prefix="covidscan-site-page-"))
db_url = f"sqlite:///{data_dir / 'service.sqlite3'}"
tokens = add_accounts(data_dir, db_url)
settings = ServiceSettings(data_dir=data_dir, database_url=db_url, run=args.run, poll_seconds=0.05)
t0 = time.time()
with uvicorn_server(settings) as url:
    h = {k: {"Authorization": f"Bearer {v}"} for k, v in tokens.items()}
    cases = []
    for pid in chosen:
        rows = patients.get_group(pid)
        files = [("files", (Path(r).name, (data / r).read_bytes())) for r in rows.relpath]
        r = httpx.post(f"{url}/api/v1/cases", headers=h["lab"], files=files,
                       data={"site": "Hospital A (ucsd-ct test split)", "patient_id": pid}, timeout=60)
        r.raise_for_status()
        cases.append((r.json()["id"], rows.label.iloc[0]))
    for case_id, label in cases:
        while (c := httpx.get(f"{url}/api/v1/cases/{case_id}", headers=h["admin"],
                              timeout=120).json())["status"] in ("queued", "running"):
            time.sleep(0.2)
        if c["status"] != "ready":
            print("not ready", case_id, c["status"], c.get("error"))
            continue
        base = f"{url}/api/v1/cases/{case_id}"
        httpx.post(f"{base}/first-read", headers=h["doctor"], json={"finding": label},
                   timeout=120).raise_for_status()
        seen = httpx.get(base, headers=h["doctor"], timeout=120).json()
        agree = seen["group"]["label"] == label
        verdict = {"agree": agree, "finding": label, "sign": True}
        httpx.post(f"{base}/review", headers=h["doctor"], json=verdict, timeout=120).raise_for_status()
    site_id = c["site"]["id"]
    deadline = time.time() + 900  # the worker trains a challenger at 50 signed patients: wait for it
    while time.time() < deadline:
        site = httpx.get(f"{url}/api/v1/sites/{site_id}", headers=h["admin"], timeout=120).json()
        if site["runs"] and site["runs"][0]["state"] in ("candidate", "failed"):
            break
        time.sleep(5)
    print("runs", [(r["state"], r["error"]) for r in site["runs"]])
    print("site", site["status"], time.time() - t0)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                    args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_context(viewport={"width": 1200, "height": 900}).new_page()
        page.goto(f"{url}/login")
        page.fill("input[name=name]", "admin")
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.goto(f"{url}/sites/{site_id}")
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(OUT), full_page=True)
        browser.close()
print("done", time.time() - t0)
shutil.rmtree(data_dir, ignore_errors=True)
