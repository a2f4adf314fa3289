"""The case page's image viewer in headless Chromium on a real Uvicorn server: a DICOM CT series shown from
its pixel data (rescale to HU and its own VOI) as a stack, windowing, zoom, keys, signing by key, and a
verdict draft that survives an expired session."""

from __future__ import annotations

import io
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from service_helpers import uvicorn_server, wait_predicted
from test_service_browser import chromium_page

from conftest import PASSWORD, add_accounts

N_SLICES = 5
SLOPE, INTERCEPT = 2.0, -1024.0  # stored = (HU + 1024) / 2: a viewer that ignores the rescale is wrong
VOI_CENTER, VOI_WIDTH = 40.0, 400.0  # the file's own window: soft tissue


def ct_series(n: int = N_SLICES, size: int = 128) -> list[tuple[str, bytes]]:
    """A small synthetic chest CT series as DICOM files: air, a body, two dark lungs with a brighter lesion,
    stored as uint16 with a real rescale slope/intercept and a Window Center/Width."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    yy, xx = np.mgrid[:size, :size] / size - 0.5
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    files = []
    for k in range(n):
        hu = np.full((size, size), -1000.0)
        hu[(xx / 0.45) ** 2 + (yy / 0.35) ** 2 < 1] = 40.0  # body
        for cx in (-0.18, 0.18):
            hu[((xx - cx) / 0.14) ** 2 + (yy / (0.22 + 0.01 * k)) ** 2 < 1] = -850.0  # lungs
        hu[(xx - 0.2) ** 2 + (yy - 0.05 * k) ** 2 < 0.003] = -300.0  # a ground-glass patch that moves
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(f"slice{k}.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "viewer-patient", k + 1
        ds.Rows = ds.Columns = size
        ds.PixelSpacing, ds.SliceThickness = [2.5, 2.5], 5.0
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, 5.0 * k], [1, 0, 0, 0, 1, 0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = SLOPE, INTERCEPT, "HU"
        ds.WindowCenter, ds.WindowWidth = VOI_CENTER, VOI_WIDTH
        ds.PixelData = np.round((hu - INTERCEPT) / SLOPE).astype(np.uint16).tobytes()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        files.append((f"slice{k}.dcm", buf.getvalue()))
    return files


# ../shared or $COVIDSCAN_SHARED, as tests/conftest.py finds it
SHARED_DICOM = Path(os.environ.get("COVIDSCAN_SHARED", Path(__file__).resolve().parents[2].parent / "shared"))
SHARED_DICOM = SHARED_DICOM / "data/dicom"
RAW_OOD = (
    "unlike_training_data: the image's content lies 29528.22 above 1.21, "
    "so its probability may be meaningless"
)


def flag_unlike_training_data(url_db: str, case_id: int) -> None:
    """Give every image of the case the out-of-distribution warning (with its raw score), as a run with an
    OOD detector would on images unlike its training images (the tiny test run has too few for one)."""
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import Session

    from covidscan.service.models import CaseImage

    engine = create_engine(url_db)
    with Session(engine) as s, s.begin():
        for image in s.scalars(select(CaseImage).where(CaseImage.case_id == case_id)):
            image.warnings = [*(image.warnings or []), RAW_OOD]
    engine.dispose()


@pytest.fixture(scope="module")
def server(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory, ct_slices):
    """A real server on SQLite with a DICOM CT case, an older case of the same patient (a prior) and a
    PNG case; yields (url, database url, {name: case id})."""
    from covidscan.service.settings import ServiceSettings

    data_dir = tmp_path_factory.mktemp("viewer-service")
    url_db = f"sqlite:///{data_dir / 'service.sqlite3'}"
    tokens = add_accounts(data_dir, url_db)
    settings = ServiceSettings(data_dir=data_dir, database_url=url_db, run=tiny_run, poll_seconds=0.05)
    with uvicorn_server(settings) as url:
        headers = {"Authorization": f"Bearer {tokens['lab']}"}

        def send(files: list[tuple[str, bytes]], patient: str) -> int:
            sent = [("files", (name, data)) for name, data in files]
            data = {"patient_id": patient}
            response = httpx.post(f"{url}/api/v1/cases", headers=headers, files=sent, data=data, timeout=120)
            assert response.status_code == 201, response.text
            return response.json()["id"]

        cases = {
            "prior": send(ct_slices[2:3], "viewer-patient"),
            "ct": send(ct_series(), "viewer-patient"),
            "png": send(ct_slices[:2], "other-patient"),
        }
        # The same patient id from another hospital is another person: never a prior.
        elsewhere = [("files", (n, d)) for n, d in ct_slices[:1]]
        data = {"patient_id": "viewer-patient", "site": "another hospital"}
        r = httpx.post(f"{url}/api/v1/cases", headers=headers, files=elsewhere, data=data, timeout=120)
        cases["elsewhere"] = r.json()["id"]
        wait_predicted(url, headers, cases["elsewhere"])
        if SHARED_DICOM.is_dir():  # real files from ../shared, for the test that skips without them
            for name in ("CT_small.dcm", "RG1_J2KR.dcm"):
                cases[name] = send([(name, (SHARED_DICOM / name).read_bytes())], f"real-{name}")
        for case_id in cases.values():
            wait_predicted(url, headers, case_id)
        flag_unlike_training_data(url_db, cases["ct"])
        yield url, url_db, cases


@pytest.fixture()
def page():
    with chromium_page(1440, 900) as page:
        page.problems = []
        page.on("console", lambda m: page.problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: page.problems.append(str(e)))
        yield page


def expect(locator):
    """Playwright's retrying assertions (the page's CSP forbids the eval that wait_for_function needs)."""
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def login(page, url: str, target: str) -> None:
    page.goto(f"{url}{target}")
    assert "/login" in page.url
    page.fill("input[name=name]", "doctor")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}{target}")


def viewer_state(page) -> dict[str, str]:
    """What the viewer reports: image index, window width/level (HU for CT), zoom, overlay on/off."""
    page.wait_for_selector("#viewer[data-ready]", state="attached", timeout=30_000)
    state = page.eval_on_selector("#viewer", "e => ({...e.dataset})")
    assert state["ready"] == "1", (page.inner_text("#viewer-message"), page.problems)
    return state


def shots_dir(tmp_path: Path) -> Path:
    shots = Path(os.environ.get("COVIDSCAN_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    return shots


def center_value(page) -> float:
    """The rendered gray level at the canvas centre (the middle of the body)."""
    return page.evaluate(
        """() => { const c = document.querySelector('#viewport canvas');
        const g = document.createElement('canvas'); g.width = c.width; g.height = c.height;
        const x = g.getContext('2d'); x.drawImage(c, 0, 0);
        return x.getImageData(c.width >> 1, c.height >> 1, 1, 1).data[0]; }"""
    )


def test_dicom_ct_is_a_stack_with_its_own_voi_windows_zoom_and_keys(server, page, tmp_path) -> None:
    url, _, cases = server
    login(page, url, f"/cases/{cases['ct']}")
    state = viewer_state(page)
    # The file's own VOI (W400/L40 in HU), so the loader applied the rescale: raw stored values would not
    # be windowed at L40.
    assert (state["count"], state["index"]) == (str(N_SLICES), "0")
    assert (float(state["windowWidth"]), float(state["windowLevel"])) == (VOI_WIDTH, VOI_CENTER)
    assert "W 400 / L 40 HU" in page.inner_text("#viewer-status")
    shots = shots_dir(tmp_path)
    page.screenshot(path=str(shots / "viewer-dicom-own-voi.png"))

    page.click("[data-preset=lung]")
    state = viewer_state(page)
    assert (float(state["windowWidth"]), float(state["windowLevel"])) == (1500.0, -600.0)
    page.keyboard.press("2")
    state = viewer_state(page)
    assert (float(state["windowWidth"]), float(state["windowLevel"])) == (350.0, 50.0)
    # Soft tissue (40 HU) in the mediastinal window is mid-gray, not the min-max extreme of a PNG.
    assert 100 < center_value(page) < 200

    page.hover("#viewport")
    page.mouse.wheel(0, 120)
    expect(page.locator("#viewer")).to_have_attribute("data-index", "1")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("j")
    expect(page.locator("#viewer")).to_have_attribute("data-index", "3")
    page.keyboard.press("k")
    expect(page.locator("#viewer")).to_have_attribute("data-index", "2")
    assert page.locator(".image-item.current").get_attribute("data-position") == "2"
    state = viewer_state(page)
    assert float(state["windowWidth"]) == 350.0, "scrolling kept the window the doctor chose"

    zoom = float(state["zoom"])
    page.keyboard.press("+")
    assert float(viewer_state(page)["zoom"]) == pytest.approx(zoom * 1.25, rel=1e-3)
    page.click("[data-action=zoom-in]")
    assert float(viewer_state(page)["zoom"]) == pytest.approx(zoom * 1.25**2, rel=1e-3)

    box = page.locator("#viewport").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2 + 80, box["y"] + box["height"] / 2 + 40, steps=8)
    page.mouse.up()
    dragged = viewer_state(page)
    assert (dragged["windowWidth"], dragged["windowLevel"]) != ("350.0", "50.0"), "a drag windows"

    overlay = page.locator("#cam-overlay")
    assert overlay.is_visible() and dragged["overlay"] == "on"
    assert overlay.evaluate("e => e.complete && e.naturalWidth > 0")
    page.locator("#cam-opacity").fill("30")
    assert overlay.evaluate("e => e.style.opacity") == "0.3"
    page.keyboard.press("o")
    assert overlay.is_hidden() and viewer_state(page)["overlay"] == "off"
    page.keyboard.press("o")
    page.screenshot(path=str(shots / "viewer-dicom-zoomed.png"))

    page.keyboard.press("r")
    state = viewer_state(page)
    assert float(state["zoom"]) == pytest.approx(zoom, rel=1e-3)
    assert (float(state["windowWidth"]), float(state["windowLevel"])) == (VOI_WIDTH, VOI_CENTER)

    # One out-of-distribution message for the case, in words, not one per image with its raw score.
    assert page.locator(".alert.ood").count() == 1
    assert f"{N_SLICES} of {N_SLICES} images flagged" in page.inner_text(".alert.ood")
    assert "29528" not in page.inner_text("#case")

    # The prior of this patient is one click away; the verdict form is in view without scrolling.
    form = page.locator("#verdict-form").bounding_box()
    assert form["y"] + 40 < page.viewport_size["height"]
    assert page.locator("#priors a").count() == 1  # not the other hospital's patient of the same id
    page.click(f"#priors a[href='/cases/{cases['prior']}']")
    page.wait_for_url(f"{url}/cases/{cases['prior']}")
    assert page.problems == []


def test_the_dicom_route_serves_the_original_bytes_under_the_case_rules(server) -> None:
    url, _, cases = server
    with httpx.Client(base_url=url) as client:
        assert client.get(f"/cases/{cases['ct']}/files/0/dicom").status_code == 303  # login first
        token = client.get("/login").text.split('name="csrf" value="')[1].split('"')[0]
        client.post("/login", data={"name": "doctor", "password": PASSWORD, "csrf": token, "next": "/"})
        dicom = client.get(f"/cases/{cases['ct']}/files/0/dicom")
        assert dicom.status_code == 200 and dicom.headers["content-type"] == "application/dicom"
        assert dicom.content[128:132] == b"DICM"
        assert "attachment" not in dicom.headers.get("content-disposition", "")
        import pydicom

        sent = pydicom.dcmread(io.BytesIO(dicom.content))  # the file as sent, rescale and VOI included
        assert (sent.RescaleSlope, sent.RescaleIntercept, sent.WindowWidth) == (SLOPE, INTERCEPT, VOI_WIDTH)
        png = client.get(f"/cases/{cases['png']}/files/0/dicom")
        assert png.status_code == 404 and png.json()["code"] == "not_found"
        # The Grad-CAM is a transparent heat layer with no text burnt in (it was the image blended with the
        # map and "p(covid) 0.97: covid" written on it): clear where the map is zero.
        cam = Image.open(io.BytesIO(client.get(f"/cases/{cases['ct']}/files/0/cam").content))
        assert cam.mode == "RGBA"
        alpha = np.asarray(cam)[..., 3]
        assert alpha.min() == 0 and alpha[:8, :].max() == 0, "the top rows, where a title went, are clear"


def test_the_viewer_bundle_is_revalidated_not_sent_again(server) -> None:
    url, _, _ = server
    bundle = f"{url}/static/vendor/cornerstone/cornerstone.js"
    first = httpx.get(bundle)
    assert first.status_code == 200 and first.headers["cache-control"] == "no-cache"  # was no-store
    again = httpx.get(bundle, headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


def test_png_case_signed_by_keyboard_and_next_case_by_key(server, page, tmp_path) -> None:
    url, _, cases = server
    login(page, url, f"/cases/{cases['png']}")
    state = viewer_state(page)
    assert state["count"] == "2"
    assert (float(state["windowWidth"]), float(state["windowLevel"])) == (256.0, 128.0)
    assert page.locator("[data-preset=lung]").is_disabled(), "HU windows mean nothing on a PNG"
    page.keyboard.press("d")
    assert page.locator("input[name=agree][value=no]").is_checked()
    page.keyboard.press("a")
    assert page.locator("input[name=agree][value=yes]").is_checked()
    # agreeing selects the model's finding (an agreeing verdict with another one is refused)
    model_label = page.locator("#verdict-form").get_attribute("data-model-label")
    assert model_label in ("covid", "non_covid")
    assert page.locator("select[name=finding]").input_value() == model_label
    page.keyboard.press("Shift+S")
    page.wait_for_selector("#locked")
    expect(page).to_have_url(f"{url}/cases/{cases['png']}")  # ?saved=1 told the page; then it goes
    assert page.locator(".verdict.signed").count() == 1
    # Signed, the case left the pending list: n goes on to the next case to read.
    page.keyboard.press("n")
    page.wait_for_url(lambda u: u.rstrip("/").split("/")[-1] != str(cases["png"]))
    assert page.problems == []


def test_a_form_posted_without_a_session_returns_to_its_page_after_login(server) -> None:
    url, _, cases = server
    action, page = f"/cases/{cases['png']}/review", f"/cases/{cases['png']}"
    form = {"agree": "yes", "finding": "covid", "csrf": "x"}
    for headers in ({"Referer": f"{url}{page}"}, {}, {"Referer": f"http://elsewhere.example{page}/x"}):
        r = httpx.post(f"{url}{action}", data=form, headers=headers)
        # Never next=/cases/N/review: after the login a GET of that POST-only action was a 405 JSON page.
        assert r.status_code == 303 and r.headers["location"] == f"/login?next={page}", headers


def test_a_draft_typed_into_an_expired_session_comes_back_after_login(server, page, tmp_path) -> None:
    from sqlalchemy import create_engine, update

    from covidscan.service.models import WebSession

    url, url_db, cases = server
    target = f"/cases/{cases['prior']}"
    login(page, url, target)
    page.check("input[name=agree][value=no]")
    page.select_option("select[name=finding]", "indeterminate")
    page.fill("textarea[name=comment]", "motion artefact; repeat the scan")
    engine = create_engine(url_db)
    with engine.begin() as conn:  # the session expires while the doctor types
        conn.execute(update(WebSession).values(expires_at=datetime.now(UTC) - timedelta(minutes=1)))
    engine.dispose()
    page.click("#verdict-form button[type=submit]")
    page.wait_for_url(lambda u: "/login" in u)
    # Back to the case page after the login, not to the POST-only action (a 405 before).
    assert page.url == f"{url}/login?next={target}"
    page.fill("input[name=name]", "doctor")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}{target}")
    assert page.locator("#draft-restored").is_visible()
    assert page.locator("input[name=agree][value=no]").is_checked()
    assert page.locator("select[name=finding]").input_value() == "indeterminate"
    assert page.locator("textarea[name=comment]").input_value() == "motion artefact; repeat the scan"
    page.click("#verdict-form button[type=submit]")
    page.wait_for_selector(".verdict.draft")
    expect(page).to_have_url(f"{url}{target}")
    drafts = page.evaluate("() => Object.keys(localStorage).filter(k => k.startsWith('covidscan-draft'))")
    assert drafts == [], "saved: the draft is dropped"
    assert "repeat the scan" in page.inner_text(".verdict.draft")
    assert page.problems == []


@pytest.mark.shared
@pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason=f"no real DICOM samples at {SHARED_DICOM} (../shared)")
@pytest.mark.parametrize(
    ("name", "window"),
    [("CT_small.dcm", None), ("RG1_J2KR.dcm", (30000.0, 15000.0))],  # (width, level) of the file's VOI
)
def test_real_dicom_files_are_decoded_in_the_browser(server, page, tmp_path, name, window) -> None:
    """pydicom's CT_small (rescale, no VOI) and a JPEG 2000 chest CR (MONOCHROME1, its own VOI, pixel spacing
    "0.000\\0.000", which left the camera at NaN and the canvas black): decoded by the DICOM loader's worker
    (with its WebAssembly codec for JPEG 2000) under the page's CSP."""
    url, _, cases = server
    login(page, url, f"/cases/{cases[name]}")
    state = viewer_state(page)
    assert state["count"] == "1"
    if window:
        assert (float(state["windowWidth"]), float(state["windowLevel"])) == window
    lit = page.evaluate(
        """() => { const c = document.querySelector('#viewport canvas');
        const g = document.createElement('canvas'); g.width = c.width; g.height = c.height;
        const x = g.getContext('2d'); x.drawImage(c, 0, 0);
        const d = x.getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] > 16) n++; return n; }"""
    )
    page.screenshot(path=str(shots_dir(tmp_path) / f"viewer-real-{name}.png"))
    assert lit > 1000, ("the image was drawn, not a black canvas", state)
    assert page.problems == []
