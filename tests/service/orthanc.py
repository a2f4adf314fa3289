"""A real Orthanc PACS for the tests: Debian's ``orthanc`` with its DICOMweb plugin (``orthanc-dicomweb``),
started by the test itself on free local ports with its storage in a temporary folder, and stopped after.

Never the system service: a config of our own, ``/usr/sbin/Orthanc CONFIG`` as a child process. Tests that
need it skip, naming the package, where Orthanc is not installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import io
import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
from pydicom.dataset import Dataset
from service_helpers import free_port

ORTHANC = Path("/usr/sbin/Orthanc")
# Where Debian's orthanc-dicomweb puts the plugin (`dpkg -L orthanc-dicomweb`).
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
AE_TITLE = "ORTHANC_TEST"
MISSING = (
    f"Orthanc NOT TESTED: {ORTHANC} or {DICOMWEB_PLUGIN} is missing (apt-get install orthanc "
    "orthanc-dicomweb; .ci/run installs them)"
)


def available() -> bool:
    """Whether Debian's Orthanc and its DICOMweb plugin are installed."""
    return ORTHANC.is_file() and DICOMWEB_PLUGIN.is_file()


@dataclass(frozen=True)
class Orthanc:
    """A running Orthanc: its REST API, DICOM port and AE title, and its DICOMweb root."""

    url: str  # REST API, e.g. http://127.0.0.1:PORT
    dicom_port: int
    ae_title: str
    log: Path
    modalities: dict[str, tuple[str, int]]  # the DICOM peers of its config: name -> (AE title, port)

    @property
    def dicomweb(self) -> str:
        """The DICOMweb root (STOW-RS: POST {dicomweb}/studies; QIDO-RS: GET {dicomweb}/studies)."""
        return f"{self.url}/dicom-web"

    def get(self, path: str) -> httpx.Response:
        """GET a path of the REST API (raises on an HTTP error)."""
        response = httpx.get(f"{self.url}{path}", timeout=30)
        response.raise_for_status()
        return response

    def instances(self) -> list[str]:
        """The Orthanc ids of every instance it holds."""
        return self.get("/instances").json()

    def datasets(self) -> list[Dataset]:
        """Every instance it holds, downloaded (``/instances/{id}/file``) and parsed with pydicom."""
        return [
            pydicom.dcmread(io.BytesIO(self.get(f"/instances/{i}/file").content)) for i in self.instances()
        ]

    def clear(self) -> None:
        """Delete every patient (and so every instance) it holds: each test starts from an empty PACS."""
        for patient in self.get("/patients").json():
            httpx.delete(f"{self.url}/patients/{patient}", timeout=30).raise_for_status()

    def upload(self, data: bytes) -> str:
        """Store one DICOM file through the REST API (``POST /instances``); returns its Orthanc id."""
        response = httpx.post(f"{self.url}/instances", content=data, timeout=60)
        response.raise_for_status()
        return response.json()["ID"]

    def add_modality(self, name: str, ae_title: str, port: int, host: str = "127.0.0.1") -> None:
        """Name a DICOM peer Orthanc may send to (``PUT /modalities/{name}``), e.g. covidscan's listener
        once its port is known."""
        peer = {"AET": ae_title, "Host": host, "Port": port}
        httpx.put(f"{self.url}/modalities/{name}", json=peer, timeout=30).raise_for_status()

    def push(self, modality: str, instance_ids: list[str]) -> dict:
        """Make Orthanc send instances to a DICOM modality of its config with C-STORE
        (``POST /modalities/{name}/store``, synchronously); returns Orthanc's answer (raises on failure)."""
        response = httpx.post(
            f"{self.url}/modalities/{modality}/store",
            json={"Resources": instance_ids, "Synchronous": True},
            timeout=120,
        )
        response.raise_for_status()
        return response.json()


def config(root: Path, http_port: int, dicom_port: int, modalities: dict[str, tuple[str, int]]) -> dict:
    """Orthanc's configuration: loopback only, no authentication (a throw-away server of one test run),
    storage under ``root``, the DICOMweb plugin, and ``modalities`` (name: (AE title, port on 127.0.0.1))
    that it may send to."""
    return {
        "Name": "covidscan-test",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "storage"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": AE_TITLE,
        "RemoteAccessAllowed": False,  # 127.0.0.1 only
        "AuthenticationEnabled": False,
        "HttpServerEnabled": True,
        "DicomServerEnabled": True,
        # A wrong called AE title is refused, as a real PACS does: the tests of refused sends need it.
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomCheckModalityHost": False,
        "DicomScuTimeout": 30,
        "DicomModalities": {name: [aet, "127.0.0.1", port] for name, (aet, port) in modalities.items()},
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        "SaveJobs": False,
        "StorageCompression": False,
    }


@contextmanager
def orthanc_server(root: Path, modalities: dict[str, tuple[str, int]] | None = None) -> Iterator[Orthanc]:
    """Start Orthanc with :func:`config` under ``root``; yields once ``/system`` answers, stops it after."""
    root.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    path = root / "orthanc.json"
    path.write_text(json.dumps(config(root, http_port, dicom_port, modalities or {}), indent=2))
    log = root / "orthanc.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([str(ORTHANC), str(path)], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {proc.returncode}: {log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/system", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not answer /system in 60 s: {log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield Orthanc(url, dicom_port, AE_TITLE, log, dict(modalities or {}))
    finally:
        proc.terminate()  # Orthanc stops cleanly on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
