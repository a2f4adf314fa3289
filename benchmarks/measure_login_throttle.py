"""Login throttling on a real Uvicorn (127.0.0.1): a guesser at 127.0.0.2 tries 40 wrong passwords while a
doctor logs in from 127.0.0.3. Prints the answers' codes with their median latency (a 429 skips Argon2),
the guesser's Retry-After values and the doctor's answers.

Usage::

    PYTHONPATH=src python benchmarks/measure_login_throttle.py [--database-url postgresql+psycopg://...]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "service"))
from service_helpers import uvicorn_server  # the tests' real-server helper

from covidscan.service.auth import add_user
from covidscan.service.models import Setting
from covidscan.service.settings import ServiceSettings, open_service

PASSWORD = "correct horse battery"
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def attempt(client: httpx.Client, password: str) -> tuple[httpx.Response, float]:
    """One login through the form; the answer and the POST's seconds."""
    csrf = CSRF.search(client.get("/login").text).group(1)
    start = time.perf_counter()
    answer = client.post("/login", data={"name": "dr", "password": password, "csrf": csrf})
    return answer, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default=None, help="Default: SQLite in a temporary folder")
    parser.add_argument("--guesses", type=int, default=40)
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp())
    settings = ServiceSettings(data_dir=data_dir, worker=False, database_url=args.database_url)
    db, _ = open_service(settings)
    with db.session() as s:
        add_user(s, "dr", "doctor", PASSWORD)
        s.add(Setting(key="active_run", value="none: no case is predicted here"))
    db.dispose()
    with uvicorn_server(settings) as url:
        with httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address="127.0.0.2")) as guesser:
            guesses = [attempt(guesser, f"guess {i}") for i in range(args.guesses)]
        with httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address="127.0.0.3")) as doctor:
            logins = [attempt(doctor, PASSWORD) for _ in range(5)]
    for code in sorted({r.status_code for r, _ in guesses}):
        times = [t * 1000 for r, t in guesses if r.status_code == code]
        print(f"guesser: {len(times)} x {code}, median {statistics.median(times):.1f} ms")
    waits = [r.headers["retry-after"] for r, _ in guesses if r.status_code == 429]
    print("guesser's Retry-After:", " ".join(waits))
    median = statistics.median(t * 1000 for _, t in logins)
    print(f"doctor from another address: {[r.status_code for r, _ in logins]}, median {median:.1f} ms")


if __name__ == "__main__":
    main()
