"""Screenshot of the case page's image viewer: a run (``covidscan-ct``) reads real ucsd-ct test slices of one
COVID patient, and, as the same patient's other case, the synthetic DICOM CT series that
tests/service/test_service_viewer.py builds (rescale slope/intercept and a VOI), through a real Uvicorn
server; headless Chromium (Debian's chromium) logs in as the doctor, scrolls to a slice, zooms and sets the
Grad-CAM's opacity. Usage (from the repository root)::

    nice python benchmarks/viewer_screenshot.py --run /work/runs/covidscan-ct --shared ../shared \
        --out docs/viewer.png

``--dicom`` photographs the DICOM case in the lung window instead; ``--serve`` keeps the server running
after the screenshot (Ctrl+C stops it), to look around by hand.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests/service"), str(ROOT / "tests")]
from service_helpers import uvicorn_server  # noqa: E402
from test_service_browser import ARGS, CHROMIUM  # noqa: E402
from test_service_viewer import ct_series  # noqa: E402

from conftest import PASSWORD, add_accounts  # noqa: E402
from covidscan.service.settings import ServiceSettings  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--run", type=Path, required=True)
parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
parser.add_argument("--out", type=Path, default=ROOT / "docs/viewer.png")
parser.add_argument("--dicom", action="store_true")
parser.add_argument("--serve", action="store_true")
args = parser.parse_args()

data_dir = Path(tempfile.mkdtemp(prefix="covidscan-viewer-"))
db_url = f"sqlite:///{data_dir / 'service.sqlite3'}"
tokens = add_accounts(data_dir, db_url)
settings = ServiceSettings(data_dir=data_dir, database_url=db_url, run=args.run, poll_seconds=0.05)
labels = pd.read_csv(args.shared / "data/ucsd-ct/labels.csv")
prior = labels[(labels.official_split == "test") & (labels.label == "covid")].groupby("patient_id").head(3)
prior = prior[prior.patient_id == prior.patient_id.value_counts().index[0]]
with uvicorn_server(settings) as url:
    lab = {"Authorization": f"Bearer {tokens['lab']}"}
    sent = []
    for files in (
        [(Path(r).name, (args.shared / "data/ucsd-ct" / r).read_bytes()) for r in prior.relpath],
        ct_series(n=8, size=256),
    ):
        r = httpx.post(f"{url}/api/v1/cases", headers=lab, data={"patient_id": "viewer-patient"},
                       files=[("files", f) for f in files], timeout=60)
        r.raise_for_status()
        sent.append(r.json()["id"])
    for case_id in sent:
        while (c := httpx.get(f"{url}/api/v1/cases/{case_id}", headers=lab).json())["status"] != "ready":
            assert c["status"] in ("queued", "running"), c
            time.sleep(0.2)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_context(viewport={"width": 1440, "height": 1000}).new_page()
        page.on("console", lambda m: print("console:", m.type, m.text))
        page.on("pageerror", lambda e: print("pageerror:", e))
        shown = sent[1] if args.dicom else sent[0]
        page.goto(f"{url}/cases/{shown}")
        page.fill("input[name=name]", "doctor")
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_selector("#viewer[data-ready]", timeout=60_000)
        assert page.get_attribute("#viewer", "data-ready") == "1", page.inner_text("#viewer")
        for _ in range(2):  # time to a drawn first image: with the bundle cached (revalidated, 304)
            t0 = time.monotonic()
            page.reload()
            page.wait_for_selector("#viewer[data-ready='1']", state="attached", timeout=60_000)
            print(f"case page to first image drawn: {time.monotonic() - t0:.2f} s (bundle cached)")
        for _ in range(3 if args.dicom else 1):
            page.keyboard.press("ArrowDown")
        if args.dicom:
            page.keyboard.press("1")  # the lung window
        page.keyboard.press("+")
        page.locator("#cam-opacity").fill("45")
        page.check("input[name=agree][value=yes]")
        page.select_option("select[name=finding]", "covid")
        page.wait_for_timeout(500)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out))
        print(page.inner_text("#viewer-status"), "->", args.out)
        browser.close()
    if args.serve:
        print(f"serving {url}/cases/{shown} (doctor / {PASSWORD}); Ctrl+C stops")
        while True:
            time.sleep(1)
