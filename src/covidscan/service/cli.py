"""Commands of the review service: ``serve``, ``worker``, ``users``, ``send``, ``report`` and ``audit-log``.

They only parse arguments and call the service's library functions; ``register`` adds them to the main
``covidscan`` application. Every setting can also come from a ``COVIDSCAN_*`` environment variable
(:class:`covidscan.service.settings.ServiceSettings`); a flag that is given wins over the environment.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from covidscan.console import labelled, stdout as out
from covidscan.errors import ConfigError

if TYPE_CHECKING:  # the service's modules load only when a command runs: `covidscan --help` stays fast
    from covidscan.service.db import Database
    from covidscan.service.storage import BlobStore

users_app = typer.Typer(help="Accounts of the review service and their API tokens.", no_args_is_help=True)
audit_app = typer.Typer(help="The review service's audit trail.", no_args_is_help=True)

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir", help="The service's data folder: database, files (or env COVIDSCAN_DATA_DIR)."
    ),
]
DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="Default: SQLite in the data folder, or postgresql+psycopg://... (env COVIDSCAN_DATABASE_URL)",
    ),
]

PasswordStdin = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from the first line of stdin.")
]


def _read_password(password_stdin: bool) -> str | None:
    """The password from stdin's first line (--password-stdin), else asked twice on a terminal; None
    when neither is possible."""
    if password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if sys.stdin.isatty():
        return typer.prompt("password", hide_input=True, confirmation_prompt=True)
    return None


def _open(
    data_dir: Path | None, database_url: str | None, *, create: bool = False
) -> tuple[Database, BlobStore]:
    """The service's database and files; only first setup (``create``) may make a new data folder."""
    from covidscan.service.db import require_database
    from covidscan.service.settings import load_settings, open_service

    settings = load_settings(data_dir=data_dir, database_url=database_url)
    if not create:
        require_database(settings.url, settings.data_dir)
    return open_service(settings)


def serve(
    run: Annotated[
        Path | None,
        typer.Option("--run", help="Run directory whose model predicts new cases (or env COVIDSCAN_RUN)."),
    ] = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    demo: Annotated[
        bool,
        typer.Option("--demo", help="Fresh data folder, the demo run, phantom cases, printed passwords."),
    ] = False,
    worker: Annotated[
        bool | None,
        typer.Option(
            "--worker/--no-worker",
            help="Predict in this process, else run `covidscan worker` (or env COVIDSCAN_WORKER).",
        ),
    ] = None,
    dicom_port: Annotated[
        int | None,
        typer.Option(
            "--dicom-port",
            help="Also receive DICOM (C-STORE, C-ECHO) on this port at --host; each series becomes a case "
            "(or env COVIDSCAN_DICOM_PORT).",
        ),
    ] = None,
    dicom_ae_title: Annotated[
        str | None,
        typer.Option("--dicom-ae-title", help="The listener's AE title (default COVIDSCAN)."),
    ] = None,
) -> None:
    """Run the review service: doctors read, correct and sign the model's results.

    A new --data-dir is set up on first start (as `covidscan users add` does); the other service commands
    need an existing one.
    """
    from covidscan.service.settings import active_run, load_settings, open_service

    if not 1 <= port <= 65535:  # checked before the demo trains a model, not when uvicorn binds
        raise ConfigError(f"--port {port} is not a TCP port: give a number from 1 to 65535")
    flags = {
        "data_dir": data_dir, "database_url": database_url, "run": run, "worker": worker,
        "dicom_port": dicom_port, "dicom_ae_title": dicom_ae_title, "dicom_host": host,
    }
    if demo:
        flags["data_dir"], flags["run"] = _prepare_demo(data_dir or Path("covidscan-demo"), run, host, port)
    settings = load_settings(**flags)
    if settings.dicom_port:
        _check_bindable(host, settings.dicom_port)
    db, _ = open_service(settings)  # bad URLs, runs or folders end here with one clear line, not in uvicorn
    with db.session() as s:
        in_use = active_run(s)
    db.dispose()
    if in_use is None:
        raise ConfigError(
            f"no run is active in {settings.data_dir}; pass --run RUN (a `covidscan train` folder)"
        )
    # The app (and the model code under it: seconds of imports) only once the settings are known good, so a
    # refusal is said at once.
    import uvicorn

    from covidscan.service.app import create_app

    out.print(f"covidscan review service on http://{host}:{port}/  (data: {settings.data_dir})")
    if settings.dicom_port is not None:
        out.print(f"DICOM listener: AE title {settings.dicom_ae_title} on {host}:{settings.dicom_port}; "
                  f"STOW-RS: http://{host}:{port}/dicomweb/studies")
    # Idle connections stay open 65 s (Uvicorn's default is 5 s): longer than the idle timeout of the proxies
    # put in front of it (nginx 60 s, cloud load balancers 60 s) and than a loaded client's lag, so a
    # request never races the server closing the connection it was sent on (answered by nothing).
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_level="info",
        timeout_graceful_shutdown=10,
        timeout_keep_alive=65,
    )


def _check_bindable(host: str, port: int) -> None:
    """Refuse a DICOM port that is taken (one clear line here, not a failed start inside Uvicorn)."""
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise ConfigError(f"--dicom-port {port}: cannot listen on {host}:{port} ({exc.strerror})") from None


def _prepare_demo(data_dir: Path, run: Path | None, host: str, port: int) -> tuple[Path, Path]:
    """Train the demo run unless --run is given, seed accounts and phantom cases, print the logins."""
    from covidscan.data.synthetic import write_phantom_dataset
    from covidscan.service.demo import seed_demo
    from covidscan.service.settings import load_settings, open_service

    if data_dir.exists() and any(data_dir.iterdir()):
        raise ConfigError(
            f"--demo needs a fresh data folder, and {data_dir} is not empty; remove it or pass "
            "--data-dir NEW_FOLDER"
        )
    if run is None:
        from covidscan.demo import run_demo

        out.print("training the demo model on phantoms, as `covidscan demo` does (or pass --run RUN) ...")
        run_demo(data_dir / "demo", progress=False)
        run = data_dir / "demo" / "run"
    manifest = write_phantom_dataset(
        data_dir / "phantom-cases", n=8, modality="ct", seed=7, slices_per_patient=2, overwrite=True
    )
    images = sorted(manifest.parent.glob("images/**/*.png"))
    cases = [(f"demo-patient-{i // 2 + 1}", images[i : i + 2]) for i in range(0, len(images), 2)]
    settings = load_settings(data_dir=data_dir / "service", run=run)
    db, store = open_service(settings)
    accounts = seed_demo(db, store, cases, max_pixels=settings.max_pixels)
    db.dispose()
    out.print(labelled("\nDemo:", "bold", f"open http://{host}:{port}/ and log in as"))
    for name, password in accounts.passwords.items():
        out.print(f"  {name:<10} password {password}")
    out.print(
        f"Send a case from another terminal:\n  covidscan send {manifest.parent / 'images'} "
        f"--to http://{host}:{port} --token {accounts.submitter_token}\n"
    )
    return data_dir / "service", run


def worker(data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """Predict queued cases and send signed results to the PACS destinations in this process (next to
    `covidscan serve --no-worker`) until Ctrl-C."""
    import threading

    from covidscan.service.settings import load_settings

    # A bad setting or a missing database is named before the model libraries load (seconds)
    db, store = _open(data_dir, database_url)
    settings = load_settings(data_dir=data_dir, database_url=database_url)
    from covidscan.service.worker import Worker

    retry = settings.delivery_retry_seconds
    w = Worker(db, store, orphan_minutes=settings.orphan_minutes, delivery_retry_seconds=retry)
    w.scorer()
    out.print(f"worker {w.owner} waiting for cases in {store.root.parent}")
    threading.Thread(target=w.loop, args=(w.sender.run_once,), name="covidscan-delivery", daemon=True).start()
    try:
        w.loop()
    except KeyboardInterrupt:
        pass
    finally:
        db.dispose()


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="Account name.")],
    role: Annotated[str, typer.Option("--role", help="admin, doctor or submitter.")],
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    password_stdin: PasswordStdin = False,
) -> None:
    """Create an account (asks for the password on a terminal; none for a token-only submitter).

    Sets up a new --data-dir when there is none yet: the first admin is how a service begins.
    """
    from covidscan.service.audit import record
    from covidscan.service.auth import add_user

    password = _read_password(password_stdin)
    if password is None and role != "submitter":
        raise ConfigError(f"a {role} logs in with a password: pass --password-stdin or run on a terminal")
    db, _ = _open(data_dir, database_url, create=True)
    with db.session() as s:
        add_user(s, name, role, password)
        record(s, "user_add", actor="covidscan users add", target=f"user:{name}", role=role)
    out.print(f"added {role} {name}")


@users_app.command("token")
def users_token(
    name: Annotated[str, typer.Argument(help="Account name.")],
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Print a new API token for NAME (shown once; only its hash is stored)."""
    from covidscan.service.audit import record
    from covidscan.service.auth import get_user, new_token

    db, _ = _open(data_dir, database_url)
    with db.session() as s:
        token = new_token(s, get_user(s, name))
        record(s, "token_new", actor="covidscan users token", target=f"user:{name}")
    print(token)


def _account_action(command: str, name: str, data_dir: Path | None, database_url: str | None) -> None:
    """Run one of the account actions of :mod:`covidscan.service.accounts` and say what it ended."""
    from covidscan.service import accounts

    action = {"revoke": accounts.revoke, "deactivate": accounts.deactivate, "activate": accounts.reactivate}
    db, _ = _open(data_dir, database_url)
    with db.session() as s:
        _, revoked = action[command](s, name, actor=f"covidscan users {command}")
    db.dispose()
    done = {"revoke": "revoked", "deactivate": "deactivated", "activate": "reactivated"}[command]
    out.print(f"{done} {name}: revoked {revoked.tokens} token(s) and {revoked.sessions} session(s)")


@users_app.command("revoke")
def users_revoke(
    name: Annotated[str, typer.Argument(help="Account name.")],
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Revoke every API token and end every browser session of NAME (the account stays)."""
    _account_action("revoke", name, data_dir, database_url)


@users_app.command("deactivate")
def users_deactivate(
    name: Annotated[str, typer.Argument(help="Account name.")],
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Stop NAME logging in: its API tokens and browser sessions stop working at once."""
    _account_action("deactivate", name, data_dir, database_url)


@users_app.command("activate")
def users_activate(
    name: Annotated[str, typer.Argument(help="Account name.")],
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Let a deactivated NAME log in again (its old tokens and sessions stay revoked)."""
    _account_action("activate", name, data_dir, database_url)


@users_app.command("passwd")
def users_passwd(
    name: Annotated[str, typer.Argument(help="Account name.")],
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    password_stdin: PasswordStdin = False,
) -> None:
    """Set NAME's password (an admin's reset; asks on a terminal): at least 12 characters, not a common
    password. NAME's browser sessions end."""
    from covidscan.service import accounts

    password = _read_password(password_stdin)
    if password is None:
        raise ConfigError("give the new password: pass --password-stdin or run on a terminal")
    db, _ = _open(data_dir, database_url)
    with db.session() as s:
        _, revoked = accounts.reset_password(s, name, password, actor="covidscan users passwd")
    db.dispose()
    out.print(f"password of {name} set; {revoked.sessions} session(s) ended")


def send(
    inputs: Annotated[
        list[Path], typer.Argument(help="Image/DICOM files or folders (searched recursively).")
    ],
    to: Annotated[str, typer.Option("--to", help="The service's URL, e.g. http://127.0.0.1:8000")],
    token: Annotated[
        str, typer.Option("--token", help="API token of a submitter (`covidscan users token`).")
    ],
    patient_id: Annotated[
        str | None, typer.Option("--patient-id", help="Patient id for the case(s).")
    ] = None,
    site: Annotated[
        str | None,
        typer.Option("--site", help="The site (hospital, scanner) the images come from; default: the DICOM "
                     "InstitutionName/StationName, else your account."),
    ] = None,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the predictions (0: do not wait).")] = 0.0,
) -> None:
    """Send images to a review service: one case per DICOM series, one for the other images.

    Every case created is printed, even when another batch fails; then each failed batch with its files
    and reason, and the exit status is 1.
    """
    from covidscan.service.client import send_cases

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a log line per HTTP request is noise here
    report = send_cases(inputs, to, token, patient_id=patient_id, site=site, wait=wait)
    for case in report.created:
        group = case.get("group")
        extra = f", p(covid) {group['p_covid']:.3f} -> {group['label']}" if group else ""
        out.print(f"case {case['id']} ({case['files']} file(s)): {case['status']}{extra}  {case['url']}")
    if not report.failed:
        return
    for batch, reason in report.failed:
        names = ", ".join(str(f) for f in batch.files)
        out.print(labelled("not sent", "bold red", f"{names}: {reason}"))
    n_files = sum(len(batch.files) for batch, _ in report.failed)
    out.print(f"{len(report.created)} case(s) created; {len(report.failed)} not created ({n_files} file(s))")
    raise typer.Exit(1)


def report(
    case: Annotated[int, typer.Argument(help="The case's id.")],
    out_file: Annotated[Path, typer.Option("--out", help="The file to write.")],
    fmt: Annotated[str, typer.Option("--format", help="sr (DICOM SR), sc (Secondary Capture), pdf or fhir.")],
    image: Annotated[
        int | None, typer.Option("--image", help="sc: the image position (default: the first with a CAM).")
    ] = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Write a case's result record (its current verdict version; preliminary before signing)."""
    from covidscan.service.records import FORMATS, gather, render

    logging.getLogger("highdicom").setLevel(logging.WARNING)  # its INFO lines on copied modules are noise
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: give one of {', '.join(FORMATS)}")
    db, store = _open(data_dir, database_url)
    with db.session() as s:
        found = gather(s, case, store)
    db.dispose()
    rendered = render(found, fmt, image=image)
    try:
        out_file.write_bytes(rendered.data)
    except OSError as exc:
        raise ConfigError(f"cannot write {out_file}: {exc.strerror or exc}; give another --out") from None
    state = "signed" if found.signed else "preliminary"
    out.print(f"wrote {out_file}: case {case}, version {found.version} ({state}), {len(rendered.data)} bytes")


def _verified(data_dir: Path | None, database_url: str | None, head: str | None):  # -> ChainReport
    """The chain's report, failed when ``head`` (SEQ:HASH, or a file holding it) is no longer in it."""
    from dataclasses import replace

    from covidscan.service.audit import check_head, verify_chain

    if head is not None and Path(head).is_file():
        head = Path(head).read_text()
    db, _ = _open(data_dir, database_url)
    with db.session() as s:
        report = verify_chain(s)
        rewound = check_head(s, head) if head is not None else None
    if report.ok and rewound:
        report = replace(report, ok=False, bad_seq=int(head.strip().split(":")[0]), reason=rewound)
    return report


@audit_app.command("verify")
def audit_verify(
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    head: Annotated[
        str | None,
        typer.Option("--head", help="A head exported by `covidscan audit-log head` (SEQ:HASH or its file)."),
    ] = None,
) -> None:
    """Check the audit chain and the signed verdicts: exit 0 when intact, 1 when a row was edited,
    deleted or rewound. The chain's key is the data folder's audit.key (or env COVIDSCAN_AUDIT_KEY)."""
    report = _verified(data_dir, database_url, head)
    if report.ok:
        legacy = f" ({report.legacy} written before the chain was keyed)" if report.legacy else ""
        out.print(f"audit log intact: {report.n_events} events{legacy}")
        return
    where = f"at event {report.bad_seq}: " if report.bad_seq is not None else ""
    out.print(labelled("audit log broken", "bold red", f"{where}{report.reason}"))
    raise typer.Exit(1)


@audit_app.command("head")
def audit_head(data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """Print the verified chain's head as SEQ:HASH; keep it elsewhere and pass it to `verify --head`
    later, so a log cut back to an earlier point is caught."""
    from covidscan.service.audit import head_text

    report = _verified(data_dir, database_url, None)
    if not report.ok:
        out.print(labelled("audit log broken", "bold red", f"{report.reason}; no head to export"))
        raise typer.Exit(1)
    print(head_text(report))


def register(app: typer.Typer) -> None:
    """Add the service's commands to the ``covidscan`` application."""
    app.command("serve")(serve)
    app.command("worker")(worker)
    app.command("send")(send)
    app.command("report")(report)
    app.add_typer(users_app, name="users")
    app.add_typer(audit_app, name="audit-log")
