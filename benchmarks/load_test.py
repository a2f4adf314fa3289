"""Load test of the review service: concurrent uploads, a login flood and doctors signing, at once.

Starts a real ``covidscan serve`` (Uvicorn on 127.0.0.1, in its own process, SQLite in a fresh data folder
unless ``--database-url`` names another database), or drives one already running (``--url``, with the
``--data-dir`` and ``--database-url`` it uses), and then, concurrently over HTTP (httpx, asyncio):

* ``--uploads`` submitters' uploads, all in flight together: one unique phantom CT slice (PNG) each,
  with its own patient id;
* a login flood: ``--attacker-logins`` wrong-password logins through the login form from one
  "attacker", half aimed at the doctors' and the admin's names (a lock-out), half sprayed over fresh
  unknown names (which a per-name throttle never stops), in two waves (one with the uploads, one once
  signing has begun), ``--attack-concurrency`` at a time;
* ``--doctors`` doctors who log in through the form (once before the flood, then when each wave starts
  and after the flood, from the same browser with its cookies, at the attacker's address: a hospital NAT)
  and sign every case once it is ready (the JSON API with their tokens), glancing at the worklist now and
  then.

Afterwards it checks through the API and directly in the database that every accepted upload is exactly one
case (0 lost, 0 duplicated), that every case was predicted and signed, counts every status code per kind of
request (no 5xx, no request left unanswered), and measures signing latency (the sign request), upload
latency and throughput. The server log's 5xx lines and exceptions are summarised as evidence. A throttled
attacker (429) is a correct answer; a doctor refused at login is reported (``doctor_logins``).

Goals (exit 1 when one fails): 0 lost, 0 duplicated, no 5xx and no unanswered request, every case
predicted, signing p95 under ``--sign-p95-goal`` seconds (2 s).

Usage::

    python benchmarks/load_test.py --json benchmarks/load_sqlite.json
    createdb -h 127.0.0.1 -p 55432 -U postgres covidscan_load
    python benchmarks/load_test.py \\
        --database-url postgresql+psycopg://postgres@127.0.0.1:55432/covidscan_load \\
        --json benchmarks/load_postgresql.json
    python benchmarks/load_test.py --run RUN --uploads 60 --attacker-logins 60   # a smaller run
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests/service"))
from service_helpers import free_port, start_server  # noqa: E402

SIGN_P95_GOAL_S = 2.0


@dataclass(frozen=True)
class LoadPlan:
    """What the load test sends."""

    uploads: int = 200
    attacker_logins: int = 160
    attack_concurrency: int = 80  # each wave (half the attempts) all in flight at once by default
    doctors: int = 4
    submitters: int = 2
    sign_p95_goal_s: float = SIGN_P95_GOAL_S
    request_timeout_s: float = 300.0  # longer than any answer should take: a timeout is reported, not hidden
    deadline_s: float = 1200.0  # for every case to be predicted and signed


@dataclass
class Accounts:
    """The accounts of one load test; names and patient ids start with ``tag``, so runs never collide."""

    tag: str
    tokens: dict[str, str]
    passwords: dict[str, str]
    doctors: list[str]
    submitters: list[str]
    admin: str


@dataclass
class Tally:
    """Every request's outcome: status codes (or the exception's name) per kind of request, and latencies."""

    t0: float = field(default_factory=time.perf_counter)
    codes: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    seconds: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    failures: list[str] = field(default_factory=list)  # a few 5xx bodies and exceptions, as evidence

    def now(self) -> float:
        """Seconds since the test began."""
        return time.perf_counter() - self.t0

    async def call(
        self, kind: str, request: Callable[[], Awaitable[httpx.Response]]
    ) -> httpx.Response | None:
        """Send one request, count its status code (or exception) under ``kind``; None when unanswered."""
        start = time.perf_counter()
        try:
            response = await request()
        except httpx.HTTPError as exc:
            self.codes[kind][type(exc).__name__] += 1
            if len(self.failures) < 20:
                self.failures.append(
                    f"{kind}: {type(exc).__name__} after {time.perf_counter() - start:.1f} s"
                )
            return None
        self.seconds[kind].append(time.perf_counter() - start)
        self.codes[kind][str(response.status_code)] += 1
        if response.status_code >= 500 and len(self.failures) < 20:
            self.failures.append(f"{kind}: {response.status_code} {response.text[:200]}")
        return response


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    """n, p50, p95 and max of ``values`` (seconds); None where there are none."""
    if not values:
        return {"n": 0, "p50": None, "p95": None, "max": None}
    a = np.asarray(values)
    return {
        "n": len(values),
        "p50": float(np.percentile(a, 50)),
        "p95": float(np.percentile(a, 95)),
        "max": float(a.max()),
    }


def create_accounts(data_dir: Path, database_url: str | None, plan: LoadPlan) -> Accounts:
    """Doctors with passwords and tokens, submitters whose sites are not read reader-first (so doctors can
    sign at once) and an admin, written through the service's own functions."""
    from covidscan.service.auth import add_user, new_token
    from covidscan.service.models import Site
    from covidscan.service.settings import ServiceSettings, open_service

    tag = f"load{secrets.token_hex(3)}"
    doctors = [f"{tag}-doctor{i + 1}" for i in range(plan.doctors)]
    submitters = [f"{tag}-lab{i + 1}" for i in range(plan.submitters)]
    admin = f"{tag}-admin"
    roles = {**dict.fromkeys(doctors, "doctor"), **dict.fromkeys(submitters, "submitter"), admin: "admin"}
    passwords = {name: secrets.token_urlsafe(15) for name in roles}
    db, _ = open_service(ServiceSettings(data_dir=data_dir, database_url=database_url))
    with db.session() as s:
        tokens = {
            name: new_token(s, add_user(s, name, role, passwords[name])) for name, role in roles.items()
        }
        s.add_all(Site(name=name, reader_first=False) for name in submitters)
    db.dispose()
    return Accounts(tag, tokens, passwords, doctors, submitters, admin)


def unique_slices(n: int, work: Path) -> list[bytes]:
    """``n`` phantom CT slices as PNG, each made unique by a few corner pixels (the store dedups bytes)."""
    from covidscan.data.synthetic import write_phantom_dataset

    manifest = write_phantom_dataset(work / "phantoms", n=8, modality="ct", seed=11, slices_per_patient=1)
    bases = [np.array(Image.open(p).convert("L")) for p in sorted(manifest.parent.glob("images/**/*.png"))]
    out = []
    for i in range(n):
        pixels = bases[i % len(bases)].copy()
        pixels[0, :16] = [255 * ((i >> bit) & 1) for bit in range(16)]
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def train_tiny_run(work: Path) -> Path:
    """A tiny frozen-base run, as the tests' ``tiny_run`` fixture trains it (used when no --run is given)."""
    from covidscan.config import load_config
    from covidscan.data.synthetic import write_phantom_dataset
    from covidscan.training import train_experiment

    data = write_phantom_dataset(work / "train-phantoms", n=64, modality="ct", seed=1, slices_per_patient=2)
    cfg = load_config(
        "paper-a-resnet50",
        [
            "model.backbone=timm:resnet18",
            "model.weights=none",
            "model.input_size=64",
            "train.epochs=2",
            "train.views=1",
            "evaluation.n_bootstrap=50",
        ],
    )
    train_experiment(cfg, data, work / "run", progress=False)
    return work / "run"


@contextmanager
def covidscan_serve(
    run: Path, data_dir: Path, database_url: str | None, log: Path
) -> Iterator[tuple[str, int]]:
    """`covidscan serve` of this source tree in its own process on a free port; yields its URL and pid."""
    import covidscan

    source = str(Path(covidscan.__file__).resolve().parents[1])  # the server runs the code measured here
    path = os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))
    port = free_port()
    proc = start_server(run, data_dir, port, log, database_url=database_url, env={"PYTHONPATH": path})
    try:
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def http_client(url: str, timeout_s: float, **options: object) -> httpx.AsyncClient:
    """A client without a connection limit whose idle connections close after 1 s: before Uvicorn's 5 s
    keep-alive ends, so a request never races the server closing its connection (a browser would retry
    that one; httpx does not)."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=1.0)
    return httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits, **options)


LOGIN_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


async def login(client: httpx.AsyncClient, tally: Tally, kind: str, name: str, password: str) -> str:
    """The login form as a browser sends it (GET the form for its CSRF token, POST it); the outcome:
    ``ok`` (303 to a page), ``refused`` (401), ``throttled`` (429), ``error`` (5xx, unanswered, other)."""
    page = await tally.call(f"{kind}_form", lambda: client.get("/login"))
    match = LOGIN_CSRF.search(page.text) if page is not None and page.status_code == 200 else None
    if match is None:
        return "error"
    form = {"name": name, "password": password, "csrf": match.group(1), "next": "/worklist"}
    r = await tally.call(kind, lambda: client.post("/login", data=form))
    if r is None:
        return "error"
    if r.status_code == 303 and not r.headers.get("location", "").startswith("/login"):
        return "ok"
    return {401: "refused", 429: "throttled"}.get(r.status_code, "error")


@dataclass
class Run:
    """What happened during the load, for the figures."""

    accepted: dict[str, int] = field(default_factory=dict)  # patient id -> case id of each 201 upload
    rejected: dict[str, str] = field(default_factory=dict)  # patient id -> status code or exception
    signed: dict[int, float] = field(default_factory=dict)  # case id -> seconds of the sign request
    sign_started: dict[int, float] = field(default_factory=dict)  # case id -> when its sign request began
    not_signed: dict[int, str] = field(default_factory=dict)  # case id -> why
    attack: dict[str, Counter] = field(default_factory=lambda: {"wave1": Counter(), "wave2": Counter()})
    flood_windows: dict[str, list[float]] = field(default_factory=dict)  # wave -> [start, end] seconds
    doctor_logins: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    uploads_window: list[float] = field(default_factory=list)
    end: float = 0.0


async def drive(url: str, accounts: Accounts, slices: list[bytes], plan: LoadPlan, tally: Tally) -> Run:
    """The load itself: uploads, the two flood waves, doctors' logins and signatures, all concurrently."""
    run = Run()

    def client(**options: object) -> httpx.AsyncClient:
        return http_client(url, plan.request_timeout_s, **options)

    ready_cases: asyncio.Queue[int | None] = asyncio.Queue()
    signing_began, wave2_began, flood_over = asyncio.Event(), asyncio.Event(), asyncio.Event()
    wave1_began, doctors_known = asyncio.Event(), asyncio.Semaphore(0)
    deadline = time.perf_counter() + plan.deadline_s

    def bearer(name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {accounts.tokens[name]}"}

    async def upload(http: httpx.AsyncClient, i: int) -> None:
        patient = f"{accounts.tag}-{i:04d}"
        submitter = accounts.submitters[i % len(accounts.submitters)]
        r = await tally.call(
            "upload",
            lambda: http.post(
                "/api/v1/cases",
                headers=bearer(submitter),
                data={"patient_id": patient},
                files=[("files", (f"slice-{i:04d}.png", slices[i], "image/png"))],
            ),
        )
        if r is not None and r.status_code == 201:
            run.accepted[patient] = r.json()["id"]
            await ready_cases.put(r.json()["id"])
        else:
            run.rejected[patient] = "no answer" if r is None else str(r.status_code)

    async def uploads() -> None:
        async with client() as http:
            start = tally.now()
            await asyncio.gather(*(upload(http, i) for i in range(plan.uploads)))
            run.uploads_window = [start, tally.now()]
        for _ in accounts.doctors:
            await ready_cases.put(None)  # one "no more cases" per doctor

    async def flood(wave: str, attempts: int) -> None:
        accounts_known = [*accounts.doctors, accounts.admin]
        counter = iter(range(attempts))

        def target(k: int) -> str:
            # every other guess at a real account (a lock-out attempt), the rest sprayed over fresh names,
            # which a per-name throttle never stops: each costs the server a full password check
            if k % 2 == 0:
                return accounts_known[(k // 2) % len(accounts_known)]
            return f"{accounts.tag}-{wave}-user{k}"

        async def attacker() -> None:
            async with client() as http:
                for k in counter:
                    guess = f"guess-{secrets.token_hex(6)}"
                    run.attack[wave][await login(http, tally, "attacker_login", target(k), guess)] += 1

        start = tally.now()
        await asyncio.gather(*(attacker() for _ in range(min(plan.attack_concurrency, attempts))))
        run.flood_windows[wave] = [start, tally.now()]

    async def attack() -> None:
        for _ in accounts.doctors:  # the doctors have used their browsers here before the attacker comes
            await doctors_known.acquire()
        wave1_began.set()
        first = plan.attacker_logins // 2
        await flood("wave1", first)
        with suppress(TimeoutError):
            await asyncio.wait_for(signing_began.wait(), timeout=max(1.0, deadline - time.perf_counter()))
        wave2_began.set()
        await flood("wave2", plan.attacker_logins - first)
        flood_over.set()

    async def doctor(name: str) -> None:
        async with (
            client() as browser,
            client(headers=bearer(name)) as api,
        ):

            async def log_in(when: str) -> None:
                run.doctor_logins[when][
                    await login(browser, tally, "doctor_login", name, accounts.passwords[name])
                ] += 1

            async def later_logins() -> None:
                # the same browser, so the earlier session's cookie goes along (a "known" client)
                await wave2_began.wait()
                await log_in("wave2")
                await flood_over.wait()
                await log_in("after_flood")

            await log_in("before")
            doctors_known.release()
            await wave1_began.wait()
            await log_in("wave1")
            again = asyncio.create_task(later_logins())
            last_worklist = 0.0
            while (case_id := await ready_cases.get()) is not None:
                if time.perf_counter() - last_worklist > 5:
                    await tally.call("worklist", lambda: api.get("/api/v1/worklist"))
                    last_worklist = time.perf_counter()
                case = await wait_ready(api, case_id)
                if isinstance(case, str):
                    run.not_signed[case_id] = case
                    continue
                signing_began.set()
                await sign(api, case)
            await again

    async def wait_ready(api: httpx.AsyncClient, case_id: int) -> dict | str:
        """The case once predicted, or why not."""
        while time.perf_counter() < deadline:
            r = await tally.call("case_get", lambda: api.get(f"/api/v1/cases/{case_id}"))
            if r is not None and r.status_code == 200 and r.json()["status"] not in ("queued", "running"):
                case = r.json()
                if case["status"] != "ready":
                    return case["status"]
                return case if case["group"] else "ready without a result"
            await asyncio.sleep(0.5)
        return "not predicted before the deadline"

    async def sign(api: httpx.AsyncClient, case: dict) -> None:
        verdict = {"agree": True, "finding": case["group"]["label"], "sign": True, "comment": "load test"}
        run.sign_started[case["id"]] = tally.now()
        start = time.perf_counter()
        r = await tally.call("sign", lambda: api.post(f"/api/v1/cases/{case['id']}/review", json=verdict))
        if r is not None and r.status_code == 200:
            run.signed[case["id"]] = time.perf_counter() - start
        else:
            run.not_signed[case["id"]] = "no answer" if r is None else f"sign answered {r.status_code}"

    await asyncio.gather(uploads(), attack(), *(doctor(name) for name in accounts.doctors))
    run.end = tally.now()
    return run


async def api_check(url: str, accounts: Accounts, run: Run, tally: Tally) -> dict:
    """Every accepted case as the admin sees it through the API: there, with its patient id, predicted."""
    found: dict[str, str] = {}
    headers = {"Authorization": f"Bearer {accounts.tokens[accounts.admin]}"}
    async with http_client(url, 120, headers=headers) as http:
        gate = asyncio.Semaphore(8)

        async def one(patient: str, case_id: int) -> None:
            async with gate:
                r = await tally.call("check_get", lambda: http.get(f"/api/v1/cases/{case_id}"))
            if r is None or r.status_code != 200:
                found[patient] = "missing"
            elif r.json()["patient_id"] != patient:
                found[patient] = "another patient's case"
            else:
                found[patient] = r.json()["status"] if r.json()["group"] else "not predicted"

        await asyncio.gather(*(one(p, c) for p, c in run.accepted.items()))
    return {
        "statuses": dict(Counter(found.values())),
        "lost": sum(v in ("missing", "another patient's case") for v in found.values()),
        "duplicate_ids": len(run.accepted) - len(set(run.accepted.values())),
    }


def database_check(database_url: str, accounts: Accounts, run: Run) -> dict:
    """The database's own account of the test's cases: one per accepted upload, predicted, signed once."""
    from sqlalchemy import func, select

    from covidscan.service.db import Database
    from covidscan.service.models import Case, CaseImage, Job, Review

    db = Database(database_url)
    try:
        with db.session() as s:
            cases = s.execute(
                select(
                    Case.id,
                    Case.patient_id,
                    Case.status,
                    Case.group,
                    Case.error,
                    Case.created_at,
                    Case.predicted_at,
                ).where(Case.patient_id.like(f"{accounts.tag}-%"))
            ).all()
            ids = [c.id for c in cases]
            unscored = s.scalar(
                select(func.count())
                .select_from(CaseImage)
                .where(CaseImage.case_id.in_(ids), CaseImage.p_covid.is_(None))
            )
            signed = Counter(
                s.scalars(
                    select(Review.case_id).where(Review.case_id.in_(ids), Review.signed_at.is_not(None))
                )
            )
            jobs = Counter(s.scalars(select(Job.state).where(Job.case_id.in_(ids))))
    finally:
        db.dispose()
    per_patient = Counter(c.patient_id for c in cases)
    predicted = [c for c in cases if c.group is not None and c.error is None]
    spans = [(c.predicted_at - c.created_at).total_seconds() for c in predicted if c.predicted_at]
    first, last = (
        (min(c.created_at for c in cases), max(c.predicted_at or c.created_at for c in cases))
        if cases
        else (None, None)
    )
    return {
        "cases": len(cases),
        "statuses": dict(Counter(c.status for c in cases)),
        "lost": sum(p not in per_patient for p in run.accepted),
        "duplicated": sum(n - 1 for n in per_patient.values() if n > 1),
        "case_id_mismatch": sum(1 for c in cases if run.accepted.get(c.patient_id, c.id) != c.id),
        "created_without_201": sum(1 for p in per_patient if p not in run.accepted),
        "not_predicted": len(cases) - len(predicted),
        "images_without_p_covid": unscored,
        "signed_once": sum(1 for i in ids if signed[i] == 1),
        "signed_more_than_once": sum(1 for i in ids if signed[i] > 1),
        "jobs": dict(jobs),
        "upload_to_prediction_s": percentiles(spans),
        "predicted_per_minute": (60 * len(predicted) / (last - first).total_seconds())
        if cases and last > first
        else None,
    }


ACCESS = re.compile(r'"(GET|POST|PUT|PATCH|DELETE) (\S+) HTTP/[\d.]+" (\d{3})')
ERROR_LINE = re.compile(r"^ERROR:?\s+(.*)$")
EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Violation|Locked)\b.*)$")


def server_log_findings(log: Path) -> dict:
    """The server log's evidence: 5xx answers per route, ERROR lines and the exceptions it printed, counted
    (process ids and worker nonces replaced by N, so that repeats count as one)."""
    fivexx: Counter = Counter()
    errors: Counter = Counter()
    exceptions: Counter = Counter()
    tracebacks = 0
    for raw in log.read_text(errors="replace").splitlines():
        line = raw.strip()
        if (m := ACCESS.search(line)) and m.group(3).startswith("5"):
            route = re.sub(r"/\d+", "/{id}", m.group(2).split("?")[0])
            fivexx[f"{m.group(1)} {route} {m.group(3)}"] += 1
        elif line.startswith("Traceback (most recent call last)"):
            tracebacks += 1
        elif m := ERROR_LINE.match(line):
            errors[re.sub(r"\b(?:\d+|[0-9a-f]{8})\b", "N", " ".join(m.group(1).split()))[:240]] += 1
        elif m := EXCEPTION.match(line):
            exceptions[m.group(1)[:240]] += 1
    return {
        "5xx_by_route": dict(fivexx),
        "error_lines": dict(errors.most_common(12)),
        "tracebacks": tracebacks,
        "exceptions": dict(exceptions.most_common(12)),
        "log": str(log),
    }


def peak_rss_mib(pid: int) -> float | None:
    """A process's peak resident memory (Linux VmHWM) in MiB; None where /proc does not say."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(m.group(1)) / 1024 if m else None


def machine() -> dict:
    """Where the figures were measured: CPU model and count, load average, Python, commit, time."""
    model = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "python": platform.python_version(),
        "commit": commit,
        "at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }


def figures_of(run: Run, tally: Tally, api: dict, database: dict, plan: LoadPlan) -> dict:
    """Every figure of one load test, and which goals it met."""
    fivexx = {
        kind: sum(n for code, n in codes.items() if code.startswith("5"))
        for kind, codes in tally.codes.items()
    }
    unanswered = {
        kind: sum(n for code, n in codes.items() if not code.isdigit()) for kind, codes in tally.codes.items()
    }
    signing = percentiles(list(run.signed.values()))
    windows = list(run.flood_windows.values())
    in_flood = [
        s for case_id, s in run.signed.items() if any(a <= run.sign_started[case_id] <= b for a, b in windows)
    ]
    uploads = percentiles(tally.seconds.get("upload", []))
    up_window = run.uploads_window[1] - run.uploads_window[0] if run.uploads_window else None
    goals = {
        "lost": api["lost"] + database["lost"],
        "duplicated": api["duplicate_ids"] + database["duplicated"] + database["case_id_mismatch"],
        "http_5xx": sum(fivexx.values()),
        "unanswered": sum(unanswered.values()),
        "not_predicted": database["not_predicted"] + database["images_without_p_covid"],
        "uploads_refused": len(run.rejected),
        "not_signed": len(run.not_signed),
        "sign_p95_s": signing["p95"],
    }
    met = {
        "0 lost": goals["lost"] == 0,
        "0 duplicated": goals["duplicated"] == 0,
        "no 5xx": goals["http_5xx"] == 0,
        "every request answered": goals["unanswered"] == 0,
        "every upload accepted": goals["uploads_refused"] == 0,
        "every case predicted": goals["not_predicted"] == 0 and database["cases"] == len(run.accepted),
        "every case signed": goals["not_signed"] == 0 and database["signed_once"] == len(run.accepted),
        f"signing p95 < {plan.sign_p95_goal_s} s": signing["p95"] is not None
        and signing["p95"] < plan.sign_p95_goal_s,
    }
    return {
        "ok": all(met.values()),
        "goals_met": met,
        "goals": goals,
        "signing_s": {**signing, "during_flood": percentiles(in_flood)},
        "upload_s": uploads,
        "throughput": {
            "uploads_accepted": len(run.accepted),
            "upload_phase_s": up_window,
            "uploads_per_s": len(run.accepted) / up_window if up_window else None,
            "cases_signed": len(run.signed),
            "wall_s": run.end,
            "signed_per_minute": 60 * len(run.signed) / run.end if run.end else None,
            "predicted_per_minute": database["predicted_per_minute"],
            "upload_to_prediction_s": database["upload_to_prediction_s"],
        },
        "logins": {
            "attacker": {wave: dict(c) for wave, c in run.attack.items()},
            "doctor_logins": {when: dict(c) for when, c in run.doctor_logins.items()},
            "attacker_login_s": percentiles(tally.seconds.get("attacker_login", [])),
            "doctor_login_s": percentiles(tally.seconds.get("doctor_login", [])),
            "flood_windows_s": run.flood_windows,
            "signatures_during_flood": len(in_flood),
        },
        "status_codes": {kind: dict(codes) for kind, codes in sorted(tally.codes.items())},
        "latency_s": {kind: percentiles(v) for kind, v in sorted(tally.seconds.items())},
        "api_check": api,
        "database": database,
        "uploads_refused": dict(Counter(run.rejected.values())),
        "not_signed": dict(Counter(run.not_signed.values())),
        "client_failures": tally.failures,
    }


def run_load(
    run_dir: Path | None,
    work: Path,
    *,
    database_url: str | None = None,
    url: str | None = None,
    data_dir: Path | None = None,
    plan: LoadPlan = LoadPlan(),
) -> dict:
    """One load test; returns its figures (``ok``: every goal met).

    Without ``url`` a `covidscan serve` of ``run_dir`` (trained tiny when None) is started on ``data_dir``
    (default ``work/service``) and ``database_url`` (default SQLite there) and stopped afterwards; with
    ``url`` the server there is driven, and ``data_dir``/``database_url`` must be the ones it uses.
    """
    from covidscan.service.db import default_database_url

    work.mkdir(parents=True, exist_ok=True)
    data_dir = data_dir or work / "service"
    db_url = database_url or default_database_url(data_dir)
    before = machine()
    accounts = create_accounts(data_dir, database_url, plan)
    slices = unique_slices(plan.uploads, work)
    log = work / "server.log"
    tally = Tally()

    def measure(target: str) -> tuple[Run, dict]:
        tally.t0 = time.perf_counter()
        run = asyncio.run(drive(target, accounts, slices, plan, tally))
        return run, asyncio.run(api_check(target, accounts, run, tally))

    if url is None:
        with covidscan_serve(run_dir or train_tiny_run(work), data_dir, database_url, log) as (served, pid):
            run, api = measure(served)
            peak_memory = peak_rss_mib(pid)
    else:
        run, api = measure(url)
        peak_memory = None
    database = database_check(db_url, accounts, run)
    figures = figures_of(run, tally, api, database, plan)
    figures["server_log"] = server_log_findings(log) if log.exists() else None
    figures["machine"] = {
        **before,
        "load_average_after": list(os.getloadavg()),
        "server_peak_rss_mib": peak_memory,
    }
    from sqlalchemy import make_url

    figures["settings"] = {
        **asdict(plan),
        "database": make_url(db_url).get_backend_name(),
        "server": url or "covidscan serve (started by the test)",
        "run": str(run_dir) if run_dir else "tiny run trained by the test",
        "tag": accounts.tag,
    }
    return figures


def summary(figures: dict) -> str:
    """The figures a reader wants first, as a few lines of text."""
    s, u, g = figures["signing_s"], figures["upload_s"], figures["goals"]

    def sec(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = [
        f"{figures['settings']['database']}: {figures['throughput']['uploads_accepted']} uploads accepted, "
        f"lost {g['lost']}, duplicated {g['duplicated']}, 5xx {g['http_5xx']}, unanswered {g['unanswered']}, "
        f"not predicted {g['not_predicted']}, not signed {g['not_signed']}",
        f"signing s: p50 {sec(s['p50'])} p95 {sec(s['p95'])} max {sec(s['max'])} (n {s['n']}; during the "
        f"flood p95 {sec(s['during_flood']['p95'])}, n {s['during_flood']['n']})",
        f"upload s: p50 {sec(u['p50'])} p95 {sec(u['p95'])} max {sec(u['max'])}; "
        f"wall {figures['throughput']['wall_s']:.0f} s",
        f"attacker: {figures['logins']['attacker']}; doctors' logins: {figures['logins']['doctor_logins']}",
        f"status codes: {figures['status_codes']}",
    ]
    if figures.get("server_log"):
        lines.append(f"server 5xx by route: {figures['server_log']['5xx_by_route']}")
        lines += [f"  {n} x ERROR {e}" for e, n in figures["server_log"]["error_lines"].items()]
        lines += [f"  {n} x {e}" for e, n in figures["server_log"]["exceptions"].items()]
    lines.append(
        "goals: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in figures["goals_met"].items())
    )
    lines.append(
        f"load average {figures['machine']['load_average']} -> {figures['machine']['load_average_after']}"
        f" on {figures['machine']['cpus']} x {figures['machine']['cpu_model']}; server peak memory "
        f"{figures['machine']['server_peak_rss_mib']} MiB"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, help="run directory to serve (default: train a tiny one)")
    parser.add_argument("--database-url", help="database of the server (default: SQLite in its data folder)")
    parser.add_argument("--url", help="drive this running server instead of starting one (needs --data-dir)")
    parser.add_argument("--data-dir", type=Path, help="the server's data folder (default: a fresh one)")
    parser.add_argument(
        "--work", type=Path, help="folder for images, run, data and server log (default: temp)"
    )
    parser.add_argument("--uploads", type=int, default=LoadPlan.uploads)
    parser.add_argument("--attacker-logins", type=int, default=LoadPlan.attacker_logins)
    parser.add_argument("--attack-concurrency", type=int, default=LoadPlan.attack_concurrency)
    parser.add_argument("--doctors", type=int, default=LoadPlan.doctors)
    parser.add_argument("--sign-p95-goal", type=float, default=SIGN_P95_GOAL_S, help="seconds")
    parser.add_argument(
        "--deadline",
        type=float,
        default=LoadPlan.deadline_s,
        help="seconds for every case to be predicted and signed",
    )
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    args = parser.parse_args(argv)
    if args.url and not args.data_dir:
        parser.error("--url needs --data-dir (and --database-url unless SQLite): accounts are created there")
    plan = LoadPlan(
        uploads=args.uploads,
        attacker_logins=args.attacker_logins,
        attack_concurrency=args.attack_concurrency,
        doctors=args.doctors,
        sign_p95_goal_s=args.sign_p95_goal,
        deadline_s=args.deadline,
    )
    with tempfile.TemporaryDirectory(prefix="covidscan-load-") as tmp:
        work = args.work or Path(tmp)
        figures = run_load(
            args.run, work, database_url=args.database_url, url=args.url, data_dir=args.data_dir, plan=plan
        )
    figures["settings"]["command"] = " ".join(["python", "benchmarks/load_test.py", *(argv or sys.argv[1:])])
    if figures["server_log"] and not args.work:
        figures["server_log"]["log"] = "(temporary; pass --work to keep it)"
    print(summary(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
