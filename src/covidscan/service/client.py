"""``covidscan send``: upload images to a review service, one case per DICOM series or per image set."""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pydicom

from covidscan.errors import ConfigError, CovidscanError
from covidscan.io import is_dicom_path, list_images


@dataclass(frozen=True)
class Batch:
    """The files of one case and the patient id to send with them."""

    files: list[Path]
    patient_id: str | None


def _series(path: Path) -> tuple[str | None, str | None]:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "PatientID"])
    except Exception:  # a broken DICOM is sent as it is: the service names it in its 422
        return None, None
    return ds.get("SeriesInstanceUID"), ds.get("PatientID")


def plan_cases(inputs: Sequence[str | Path], patient_id: str | None = None) -> list[Batch]:
    """Group files and folders (searched recursively) into cases: one per DICOM series, and one for all
    other images; ``patient_id`` overrides the DICOM PatientID."""
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw).expanduser()
        if path.is_dir():
            files += list_images(path)
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"{path} does not exist; give image files, DICOM files or folders")
    if not files:
        raise ConfigError(f"no images found in {', '.join(map(str, inputs))}")
    series: dict[str, Batch] = {}
    plain: list[Path] = []
    for f in files:
        uid, dicom_patient = _series(f) if is_dicom_path(f) else (None, None)
        if uid is None:
            plain.append(f)
        else:
            series.setdefault(uid, Batch([], patient_id or dicom_patient)).files.append(f)
    batches = list(series.values())
    return [*batches, Batch(plain, patient_id)] if plain else batches


def _check(response: httpx.Response, what: str) -> dict[str, Any]:
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise CovidscanError(f"{what}: the service answered {response.status_code}: {detail}")
    return response.json()


@dataclass
class SendReport:
    """What ``send`` did: the cases it created (``id``, ``status``, ``url``, ``files`` and, once ready,
    ``group``) and the batches it could not send, each with the reason."""

    created: list[dict[str, Any]] = field(default_factory=list)
    failed: list[tuple[Batch, str]] = field(default_factory=list)


def send_cases(
    inputs: Sequence[str | Path],
    url: str,
    token: str,
    *,
    patient_id: str | None = None,
    site: str | None = None,
    wait: float = 0.0,
    timeout: float = 120.0,
) -> SendReport:
    """Upload every case of :func:`plan_cases`; with ``wait`` > 0 seconds, poll until each is predicted.

    ``site`` names the site every case comes from (else the service takes the DICOM InstitutionName or
    StationName, else the sending account's name). A batch the service refuses does not stop the others:
    the report keeps every case created and every batch that failed. Only when nothing could be created
    and every batch failed for one reason (a wrong token, no service there) is that reason raised.
    """
    base = url.rstrip("/")
    report = SendReport()
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=timeout) as http:
        for batch in plan_cases(inputs, patient_id):
            try:
                with ExitStack() as stack:
                    parts = [("files", (f.name, stack.enter_context(open(f, "rb")))) for f in batch.files]
                    data = {"patient_id": batch.patient_id} if batch.patient_id else {}
                    if site:
                        data["site"] = site
                    created = _check(
                        http.post("/api/v1/cases", files=parts, data=data),
                        f"sending {len(batch.files)} file(s)",
                    )
            except httpx.HTTPError as exc:
                report.failed.append((batch, _unreachable(base, exc)))
                continue
            except CovidscanError as exc:
                report.failed.append((batch, str(exc)))
                continue
            case_url = f"{base}/cases/{created['id']}"
            report.created.append({**created, "url": case_url, "files": len(batch.files)})
        reasons = {reason for _, reason in report.failed}
        if not report.created and len(reasons) == 1:
            raise CovidscanError(reasons.pop())
        deadline = time.monotonic() + wait
        for result in report.created if wait > 0 else []:
            try:
                while result["status"] in ("queued", "running") and time.monotonic() < deadline:
                    time.sleep(0.5)
                    case = _check(http.get(f"/api/v1/cases/{result['id']}"), f"case {result['id']}")
                    result.update(status=case["status"], group=case["group"])
            except httpx.HTTPError:
                break  # the cases exist; their status is what was last seen
    return report


def _unreachable(base: str, exc: httpx.HTTPError) -> str:
    return f"cannot reach the review service at {base}: {exc}; is `covidscan serve` running there?"
