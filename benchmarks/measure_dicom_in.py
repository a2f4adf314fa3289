"""DICOM in, timed: a real `covidscan serve --dicom-port` process on 127.0.0.1 receives one generated CT
series of ``--slices`` slices (``--size`` pixels square, 16-bit) by C-STORE (pynetdicom, one association),
and the same number of slices again by STOW-RS (one request).

Reported: C-STORE instances per second (each checked, stored and acknowledged), the time from the last
acknowledgement until the case exists (the quiet period, ``--quiet`` seconds, included), and the STOW-RS
request's time until its answer (the case exists then).

Usage::

    python benchmarks/measure_dicom_in.py --run runs/demo/run --slices 100 --size 512
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from covidscan.service.auth import add_user, new_token
from covidscan.service.settings import ServiceSettings, open_service


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ct_series(patient: str, n: int, size: int) -> list[FileDataset]:
    """A chest-like CT series: a body ellipse with two dark lungs, in HU stored with intercept -1024."""
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    study, series = generate_uid(), generate_uid()
    out = []
    for k in range(n):
        hu = np.full((size, size), -1000.0)
        hu[(xx / 0.45) ** 2 + (yy / 0.35) ** 2 < 1] = 40.0
        for cx in (-0.18, 0.18):
            hu[((xx - cx) / 0.14) ** 2 + (yy / 0.22) ** 2 < 1] = -850.0
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(f"{k}.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "CT"
        ds.PatientID, ds.InstanceNumber = patient, k + 1
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (hu + 1024).astype(np.uint16).tobytes()
        out.append(ds)
    return out


def _cases(url: str, token: str, patient: str) -> list[dict]:
    page = httpx.get(
        f"{url}/api/v1/worklist",
        params={"filter": "all", "q": patient},
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    ).json()
    return [c for c in page["items"] if c["patient_id"] == patient]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--quiet", type=float, default=2.0)
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="covidscan-dicom-in-"))
    db, _ = open_service(ServiceSettings(data_dir=data_dir))
    with db.session() as s:
        lab = new_token(s, add_user(s, "lab", "submitter", None))
        admin = new_token(s, add_user(s, "boss", "admin", "correct horse battery"))
    db.dispose()
    http, dicom = _port(), _port()
    env = {**os.environ, "COVIDSCAN_DICOM_QUIET_SECONDS": str(args.quiet)}
    argv = [sys.executable, "-m", "covidscan", "serve", "--run", str(args.run), "--data-dir", str(data_dir)]
    argv += ["--port", str(http), "--dicom-port", str(dicom)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{http}"
    try:
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        scu = AE(ae_title="BENCH")
        scu.add_requested_context(CTImageStorage)
        pushed = ct_series("bench-cstore", args.slices, args.size)
        assoc = scu.associate("127.0.0.1", dicom, ae_title="COVIDSCAN")
        start = time.perf_counter()
        statuses = [int(assoc.send_c_store(ds).Status) for ds in pushed]
        stored = time.perf_counter()
        assoc.release()
        assert statuses == [0] * args.slices, statuses
        while not _cases(url, admin, "bench-cstore"):
            time.sleep(0.05)
        cased = time.perf_counter()
        posted = ct_series("bench-stow", args.slices, args.size)
        boundary = "bench-boundary"
        body = bytearray()
        for ds in posted:
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            body += (
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + buf.getvalue() + b"\r\n"
            )
        body += f"--{boundary}--\r\n".encode()
        kind = f'multipart/related; type="application/dicom"; boundary={boundary}'
        t0 = time.perf_counter()
        answer = httpx.post(
            f"{url}/dicomweb/studies",
            content=bytes(body),
            headers={"Authorization": f"Bearer {lab}", "Content-Type": kind},
            timeout=600,
        )
        stow = time.perf_counter() - t0
        assert answer.status_code == 200, answer.text[:500]
        assert len(_cases(url, admin, "bench-stow")) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    result = {
        "slices": args.slices,
        "size": args.size,
        "c_store_instances_per_s": round(args.slices / (stored - start), 1),
        "c_store_seconds": round(stored - start, 2),
        "last_ack_to_case_seconds": round(cased - stored, 2),
        "quiet_seconds": args.quiet,
        "stow_seconds": round(stow, 2),
        "stow_instances_per_s": round(args.slices / stow, 1),
        "mb_sent_per_series": round(len(body) / 2**20, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
