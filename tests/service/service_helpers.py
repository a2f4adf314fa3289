"""Helpers of the review-service tests: tiny images and a real Uvicorn server on 127.0.0.1."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
from PIL import Image


def png_bytes(size: tuple[int, int] = (64, 64), value: int = 128) -> bytes:
    """A small gray PNG."""
    buf = io.BytesIO()
    Image.new("L", size, value).save(buf, format="PNG")
    return buf.getvalue()


def wait_predicted(url: str, headers: dict[str, str], case_id: int) -> None:
    """Until the model has read the case (an image it refuses still counts as read)."""
    deadline = time.monotonic() + 90
    while httpx.get(f"{url}/api/v1/cases/{case_id}", headers=headers, timeout=60).json()["status"] in (
        "queued",
        "running",
    ):
        assert time.monotonic() < deadline, "the case was not predicted in 90 s"
        time.sleep(0.1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def uvicorn_server(settings: object) -> Iterator[str]:
    """A real Uvicorn server for ``settings`` (ServiceSettings) on 127.0.0.1 in a thread; yields its URL."""
    import uvicorn

    from covidscan.service.app import create_app

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def start_server(
    run: Path,
    data_dir: Path,
    port: int,
    log: Path,
    *,
    database_url: str | None = None,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
) -> subprocess.Popen:
    """`covidscan serve` in its own process (``env`` added to this one's environment, ``args`` to its
    command line); returns once /healthz answers."""
    argv = [
        sys.executable,
        "-m",
        "covidscan",
        "serve",
        "--run",
        str(run),
        "--data-dir",
        str(data_dir),
        "--port",
        str(port),
    ]
    if database_url is not None:
        argv += ["--database-url", database_url]
    argv += args
    environment = {**os.environ, **(env or {})}
    proc = subprocess.Popen(argv, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=environment)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode}: {log.read_text()[-2000:]}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"server did not start in 180 s: {log.read_text()[-2000:]}")


def migrations_head() -> str:
    """The newest Alembic revision of the service's migrations (what a migrated database is stamped with)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from covidscan.service.db import MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return str(ScriptDirectory.from_config(cfg).get_current_head())
