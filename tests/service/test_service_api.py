"""The REST API against a real service (worker thread, database, file store) on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from PIL import Image
from service_helpers import png_bytes

from covidscan.service.errors import ErrorCode


def code(response) -> str:
    """The error code of a JSON error answer (every one has exactly a detail line and a code)."""
    body = response.json()
    assert set(body) == {"detail", "code"} and isinstance(body["detail"], str), body
    return body["code"]


def test_healthz_and_openapi_docs_work_offline(service) -> None:
    assert service.client.get("/healthz").json()["status"] == "ok"
    docs = service.client.get("/docs")
    assert docs.status_code == 200
    assert "/static/swagger/swagger-ui-bundle.js" in docs.text and "cdn" not in docs.text.lower()
    assert service.client.get("/static/swagger/swagger-ui-bundle.js").status_code == 200
    paths = service.client.get("/openapi.json").json()["paths"]
    assert {"/api/v1/cases", "/api/v1/cases/{case_id}", "/api/v1/worklist"} <= set(paths)


def test_upload_is_predicted_with_cams_group_and_model_identity(service, ct_slices) -> None:
    created = service.upload("lab", ct_slices[:2], patient_id="p-001")
    assert created.status_code == 201, created.text
    assert created.json()["status"] == "queued"
    case = service.wait(created.json()["id"])
    assert case["status"] == "ready"
    assert case["patient_id"] == "p-001"
    assert [im["name"] for im in case["images"]] == [n for n, _ in ct_slices[:2]]
    for im in case["images"]:
        assert 0.0 <= im["p_covid"] <= 1.0 and im["label"] in ("covid", "non_covid")
        assert isinstance(im["uncertain"], bool) and im["has_cam"]
    assert case["group"]["n_images"] == 2
    p = [im["p_covid"] for im in case["images"]]
    assert abs(case["group"]["p_covid"] - sum(p) / 2) < 1e-9
    model = case["model"]
    assert model["model_name"] == "timm:resnet18" and model["modality"] == "ct"
    assert "accuracy" in model["test_metrics"] and len(model["test_metrics"]["accuracy"]["ci95"]) == 2


def test_unauthenticated_and_bad_tokens_get_401(service) -> None:
    c = service.client
    r = c.get("/api/v1/worklist")
    assert r.status_code == 401 and code(r) == ErrorCode.AUTH_REQUIRED
    r = c.get("/api/v1/cases/1", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and code(r) == ErrorCode.AUTH_REQUIRED
    r = c.post("/api/v1/cases", files=[("files", ("a.png", png_bytes()))])
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_submitter_sees_only_its_own_cases_and_cannot_review(service, ct_slices) -> None:
    mine = service.upload("lab", ct_slices[:1]).json()["id"]
    theirs = service.upload("lab2", ct_slices[1:2]).json()["id"]
    service.wait(mine)
    hidden = service.client.get(f"/api/v1/cases/{theirs}", headers=service.auth("lab"))
    assert hidden.status_code == 404 and code(hidden) == ErrorCode.NOT_FOUND
    rows = service.client.get("/api/v1/worklist?filter=all", headers=service.auth("lab")).json()["items"]
    listed = {c["id"] for c in rows}
    assert mine in listed and theirs not in listed
    r = service.client.post(
        f"/api/v1/cases/{mine}/review",
        headers=service.auth("lab"),
        json={"agree": True, "finding": "covid", "sign": True},
    )
    assert r.status_code == 403 and code(r) == ErrorCode.FORBIDDEN_ROLE


def test_doctor_cannot_export_or_manage_users(service) -> None:
    r = service.client.get("/api/v1/export/verdicts.csv", headers=service.auth("doctor"))
    assert r.status_code == 403 and code(r) == ErrorCode.FORBIDDEN_ROLE
    assert service.client.get("/api/v1/export/verdicts.csv", headers=service.auth("admin")).status_code == 200


def test_signed_case_is_locked_and_amendment_keeps_the_old_version(service, ct_slices) -> None:
    case_id = service.upload("lab", ct_slices[2:3]).json()["id"]
    service.wait(case_id)
    url, doctor = f"/api/v1/cases/{case_id}/review", service.auth("doctor")
    draft = service.client.post(
        url, headers=doctor, json={"agree": False, "finding": "covid", "comment": "draft"}
    )
    assert draft.json()["status"] == "ready" and draft.json()["review"]["signed"] is False
    signed = service.client.post(
        url, headers=doctor, json={"agree": False, "finding": "non_covid", "sign": True}
    )
    assert signed.status_code == 200 and signed.json()["status"] == "signed"
    assert signed.json()["review"]["version"] == 1  # the draft became the signed version
    locked = service.client.post(url, headers=doctor, json={"agree": True, "finding": "covid", "sign": True})
    assert locked.status_code == 409 and code(locked) == ErrorCode.ALREADY_SIGNED
    unsigned = service.client.post(
        url, headers=doctor, json={"agree": True, "finding": "covid", "amendment_reason": "unsigned"}
    )
    assert unsigned.status_code == 409 and code(unsigned) == ErrorCode.AMENDMENT_UNSIGNED
    amended = service.client.post(
        url,
        headers=service.auth("doctor2"),
        json={"agree": False, "finding": "covid", "sign": True, "amendment_reason": "second reading"},
    )
    assert amended.status_code == 200 and amended.json()["review"]["version"] == 2
    case = service.client.get(f"/api/v1/cases/{case_id}", headers=doctor).json()
    assert case["versions"] == 2 and case["review"]["amendment_reason"] == "second reading"


def test_agreeing_gives_the_models_finding(service, ct_slices) -> None:
    # "agrees with the model; finding covid" on a case the model called non-covid counted as agreement
    name, data = ct_slices[5]
    mirrored = io.BytesIO()  # an image of its own: the export test below counts every signed copy of a slice
    Image.open(io.BytesIO(data)).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored, format="PNG")
    case_id = service.upload("lab", [(name, mirrored.getvalue())]).json()["id"]
    label = service.wait(case_id)["group"]["label"]
    other = "non_covid" if label == "covid" else "covid"
    url, doctor = f"/api/v1/cases/{case_id}/review", service.auth("doctor")
    for finding in (other, "indeterminate"):
        refused = service.client.post(url, headers=doctor, json={"agree": True, "finding": finding})
        assert refused.status_code == 409 and code(refused) == ErrorCode.CONTRADICTS_MODEL, refused.text
    # disagreeing with the model (its map, its reasons) while reaching its finding stays possible
    own = service.client.post(url, headers=doctor, json={"agree": False, "finding": label})
    assert own.status_code == 200
    signed = service.client.post(url, headers=doctor, json={"agree": True, "finding": label, "sign": True})
    assert signed.status_code == 200 and signed.json()["review"]["agree"] is True


def test_review_before_prediction_or_with_bad_finding_is_refused(service, ct_slices) -> None:
    case_id = service.upload("lab", ct_slices[:1]).json()["id"]
    bad = service.client.post(
        f"/api/v1/cases/{case_id}/review",
        headers=service.auth("doctor"),
        json={"agree": True, "finding": "maybe", "sign": True},
    )
    assert bad.status_code == 422 and code(bad) == ErrorCode.INVALID_REQUEST
    assert "finding" in bad.json()["detail"]  # the field at fault is named for a person
    service.wait(case_id)


def _blobs(data_dir: Path) -> int:
    return sum(1 for p in (data_dir / "blobs").rglob("*") if p.is_file())


def test_non_image_is_refused_naming_the_file_and_nothing_is_stored(service, ct_slices) -> None:
    before_blobs = _blobs(service.data_dir)
    before = service.client.get("/api/v1/worklist?filter=all", headers=service.auth("lab")).json()
    r = service.upload("lab", [ct_slices[0], ("notes.png", b"this is not an image at all")])
    assert r.status_code == 422 and code(r) == ErrorCode.NOT_AN_IMAGE
    assert "notes.png" in r.json()["detail"]  # the file at fault is named for a person
    assert service.client.get("/api/v1/worklist?filter=all", headers=service.auth("lab")).json() == before
    assert _blobs(service.data_dir) == before_blobs


def test_size_and_pixel_limits(service) -> None:
    too_big = service.upload("lab", [("big.png", b"\0" * 2_100_000)])
    assert too_big.status_code == 413 and code(too_big) == ErrorCode.UPLOAD_TOO_LARGE
    bomb = png_bytes((2500, 2500), 0)  # 6.25 Mpx in a few kB: over the 4 Mpx limit of the fixture
    assert len(bomb) < 100_000
    r = service.upload("lab", [("bomb.png", bomb)])
    assert r.status_code == 413 and code(r) == ErrorCode.TOO_MANY_PIXELS and "bomb.png" in r.json()["detail"]


def test_hostile_file_name_is_stored_by_content_and_escaped(service, ct_slices) -> None:
    name = "../../<img src=x onerror=alert(1)>é.png"
    case_id = service.upload("lab", [(name, ct_slices[0][1])]).json()["id"]
    case = service.wait(case_id)
    assert case["images"][0]["name"] == name
    stored = list((service.data_dir / "blobs").rglob(case["images"][0]["sha256"]))
    assert len(stored) == 1 and stored[0].read_bytes() == ct_slices[0][1]
    assert not list(service.data_dir.parent.glob("*.png"))  # nothing escaped the data folder
    original = service.client.get(f"/cases/{case_id}/files/0/original")  # no session: login redirect
    assert original.status_code in (303, 307) or "login" in original.url.path


def test_revoked_token_stops_working(service) -> None:
    from covidscan.service.auth import add_user, new_token, revoke_tokens
    from covidscan.service.settings import ServiceSettings, open_service

    db, _ = open_service(ServiceSettings(data_dir=service.data_dir, database_url=service.database_url))
    with db.session() as s:
        user = add_user(s, "script", "submitter", None)
        token = new_token(s, user)
    headers = {"Authorization": f"Bearer {token}"}
    assert service.client.get("/api/v1/worklist", headers=headers).status_code == 200
    with db.session() as s:
        from covidscan.service.auth import get_user

        assert revoke_tokens(s, get_user(s, "script")) == 1
    db.dispose()
    assert service.client.get("/api/v1/worklist", headers=headers).status_code == 401


def test_worklist_puts_uncertain_and_high_probability_pending_cases_first(service) -> None:
    rows = service.client.get("/api/v1/worklist?filter=all", headers=service.auth("doctor")).json()["items"]
    statuses = [r["status"] for r in rows]
    assert "signed" in statuses and statuses.index("signed") > max(
        i for i, s in enumerate(statuses) if s != "signed"
    )
    ready = [r for r in rows if r["status"] == "ready"]
    keys = [(r["uncertain"], r["p_covid"]) for r in ready]
    assert keys == sorted(keys, reverse=True)
    pending = service.client.get("/api/v1/worklist", headers=service.auth("doctor")).json()["items"]
    assert all(r["status"] != "signed" for r in pending)
    reviewed = service.client.get(
        "/api/v1/worklist?filter=reviewed", headers=service.auth("doctor")
    ).json()["items"]
    assert reviewed and all(r["status"] == "signed" for r in reviewed)


def test_export_lists_signed_covid_and_non_covid_originals_for_adapt(service, ct_slices) -> None:
    from covidscan.data import read_manifest

    signed = {
        "p-exp-1": ("covid", ct_slices[0:2]),
        "p-exp-2": ("non_covid", ct_slices[4:6]),
        "p-exp-3": ("indeterminate", ct_slices[3:4]),
        # slice 2 was signed covid (after an amendment) above: a non_covid reading now conflicts
        "p-exp-4": ("non_covid", ct_slices[2:3]),
    }
    for patient, (finding, files) in signed.items():
        case_id = service.upload("lab", files, patient_id=patient).json()["id"]
        service.wait(case_id)
        r = service.client.post(
            f"/api/v1/cases/{case_id}/review",
            headers=service.auth("doctor"),
            json={"agree": False, "finding": finding, "sign": True},  # the doctor's own reading
        )
        assert r.status_code == 200
    export = service.client.get("/api/v1/export/verdicts.csv", headers=service.auth("admin"))
    assert export.headers["content-type"].startswith("text/csv")
    lines = export.text.splitlines()
    assert lines[0] == "path,label,patient_id,site"
    rows = [line.split(",") for line in lines[1:]]
    assert [r for r in rows if r[2] == "p-exp-1"] and all(r[1] == "covid" for r in rows if r[2] == "p-exp-1")
    assert len([r for r in rows if r[2] == "p-exp-2"]) == 2
    assert not [r for r in rows if r[2] == "p-exp-3"]  # indeterminate verdicts are not training labels
    assert not [r for r in rows if r[2] == "p-exp-4"]
    conflicting = hashlib.sha256(ct_slices[2][1]).hexdigest()
    assert not [r for r in rows if conflicting in r[0]]
    assert all(Path(r[0]).is_file() for r in rows)
    manifest = service.data_dir / "verdicts.csv"
    manifest.write_text(export.text, encoding="utf-8")
    df = read_manifest(manifest)
    assert set(df["label"]) <= {"covid", "non_covid"} and len(df) == len(rows)


def test_every_action_is_in_the_audit_log(service) -> None:
    from sqlalchemy import select

    from covidscan.service.audit import verify_chain
    from covidscan.service.cases import agreement_by_month
    from covidscan.service.models import AuditEvent
    from covidscan.service.settings import ServiceSettings, open_service

    db, _ = open_service(ServiceSettings(data_dir=service.data_dir, database_url=service.database_url))
    with db.session() as s:
        actions = set(s.scalars(select(AuditEvent.action)))
        assert verify_chain(s).ok
        months = agreement_by_month(s)
    db.dispose()
    assert {"upload", "view", "verdict", "signature", "amendment", "export", "prediction"} <= actions
    assert months and all(0.0 <= m["agreement"] <= 1.0 and m["signed"] >= m["agreed"] for m in months)
