"""Database engine, sessions and migrations: SQLite in the data folder by default, or PostgreSQL."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect, make_url
from sqlalchemy.exc import ArgumentError, DatabaseError
from sqlalchemy.orm import Session, sessionmaker

from covidscan.errors import ConfigError, CovidscanError, StorageError
from covidscan.service.errors import DatabaseBusy, StorageFull

MIGRATIONS = Path(__file__).with_name("migrations")


SQLITE_FILE = "service.sqlite3"


def default_database_url(data_dir: Path) -> str:
    """SQLite file ``service.sqlite3`` inside the data folder."""
    return f"sqlite:///{Path(data_dir).resolve() / SQLITE_FILE}"


WRITE_WAIT_S = 60.0
"""How long a transaction waits for its turn at SQLite's write lock before the request is answered 503."""


class _FairGate:
    """A lock handed to its waiters in arrival order (FIFO): SQLite's own busy wait polls, and under a
    flood of short transactions late arrivals, retrying after 1-5 ms, keep winning over early ones, which
    back off to 100 ms; those starved past the busy timeout ("database is locked") although no transaction
    held the lock for a second (measured under a login flood on 2 loaded cores)."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held = False
        self._waiters: deque[threading.Event] = deque()

    def acquire(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the gate; False when the time ran out."""
        with self._mutex:
            if not self._held:
                self._held = True
                return True
            turn = threading.Event()
            self._waiters.append(turn)
        if turn.wait(timeout):
            return True
        with self._mutex:
            if turn.is_set():  # handed over just as the wait ended
                return True
            self._waiters.remove(turn)
            return False

    def release(self) -> None:
        """Hand the gate to the longest waiter (it stays held), or open it."""
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().set()
            else:
                self._held = False


def _sqlite_serialised(engine: Engine, url: str) -> None:
    """WAL, ``BEGIN IMMEDIATE`` behind a FIFO gate, and a busy timeout for other processes.

    SQLite's deferred transactions that read, then write, fail at once with "database is locked" under
    concurrent writers instead of waiting their turn, so every transaction takes the write lock at BEGIN.
    The threads of this process take turns at it through :class:`_FairGate` (held from BEGIN to the
    transaction's end); other processes (a `covidscan` command beside the server) wait in SQLite's busy
    handler.
    """
    gate = _FairGate()

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # let the "begin" hook below issue BEGIN itself
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        if not gate.acquire(WRITE_WAIT_S):
            raise DatabaseBusy(
                f"the database {_shown(url)} is busy: this request waited {WRITE_WAIT_S:g} s for its turn; "
                "try again in a minute"
            )
        conn.info["gate"] = True
        try:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            _leave(conn.info)
            raise

    def _leave(info: dict[str, Any]) -> None:
        if info.pop("gate", False):
            gate.release()

    # A transaction ends by commit or rollback; a connection returned to the pool (or dropped) mid-way must
    # not keep the gate either.
    event.listen(engine, "commit", lambda conn: _leave(conn.info))
    event.listen(engine, "rollback", lambda conn: _leave(conn.info))
    event.listen(engine, "checkin", lambda _dbapi, record: _leave(record.info))
    event.listen(engine, "invalidate", lambda _dbapi, record, _exc: _leave(record.info))


def make_engine(url: str) -> Engine:
    """An engine for ``url`` (``sqlite:///...`` or ``postgresql+psycopg://...``); bad URLs: ConfigError."""
    try:
        # Room for every request thread (Starlette runs sync routes on 40) plus the worker's and the
        # middleware's sessions: a smaller pool turns a burst of requests into pool timeouts (500s).
        pool = {"pool_size": 10, "max_overflow": 40, "pool_timeout": 60}
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **pool)
            _sqlite_serialised(engine, url)
        else:
            engine = create_engine(url, pool_pre_ping=True, **pool)
    except (ArgumentError, ImportError) as exc:
        raise ConfigError(
            f"--database-url {url!r} is not usable ({exc}); give sqlite:///PATH or "
            "postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB"
        ) from None
    return engine


def _shown(url: str) -> str:
    """The database as a user knows it: SQLite's file path, a server URL without its password."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        return parsed.database
    return parsed.render_as_string(hide_password=True)


def _damaged(exc: BaseException) -> bool:
    """SQLite's "file is not a database" and "database disk image is malformed" (plain DatabaseError)."""
    return type(exc) is DatabaseError


def _full(exc: DatabaseError) -> bool:
    """SQLite's "database or disk is full" and PostgreSQL's disk_full (SQLSTATE 53100)."""
    return "disk is full" in str(exc.orig) or getattr(exc.orig, "sqlstate", None) == "53100"


def database_fault(url: str, exc: DatabaseError) -> CovidscanError:
    """What a failed connection means to the user: a damaged file, or a database that cannot be reached."""
    if _damaged(exc):
        return StorageError(
            f"the database {_shown(url)} is damaged or is not a covidscan database ({exc.orig}); restore it "
            "from a backup, or move it away and set the service up again"
        )
    if url.startswith("sqlite"):
        return ConfigError(
            f"cannot open the database {_shown(url)}: {exc.orig}; check that its folder exists and is "
            "writable"
        )
    return ConfigError(
        f"cannot reach the database {_shown(url)}: {exc.orig}; check --database-url and that the server is "
        "running"
    )


def require_database(url: str, data_dir: Path) -> None:
    """Refuse a database that covidscan never set up, without creating one (SQLite makes a file on connect).

    Only first setup (`covidscan serve`, `covidscan users add`) creates the data folder and the database;
    the commands that read or manage an existing service call this first, so a mistyped ``--data-dir`` is
    an error rather than a new, empty service ("audit log intact: 0 events").
    """
    setup = "(`covidscan users add` or `covidscan serve --run RUN` sets a service up)"
    if url == default_database_url(data_dir):
        if not Path(data_dir).is_dir():
            raise ConfigError(f"--data-dir {data_dir} does not exist; check the path {setup}")
        if not (Path(data_dir) / SQLITE_FILE).is_file():
            raise ConfigError(
                f"--data-dir {data_dir} holds no service database ({SQLITE_FILE}); check the path {setup}"
            )
    elif url.startswith("sqlite") and not Path(make_url(url).database or "").is_file():
        raise ConfigError(
            f"the database file of --database-url {_shown(url)} does not exist; check it {setup}"
        )
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            set_up = inspect(conn).has_table("alembic_version")
    except DatabaseError as exc:
        raise database_fault(url, exc) from None
    finally:
        engine.dispose()
    if not set_up:
        raise ConfigError(
            f"the database {_shown(url)} holds no covidscan tables; check --data-dir and "
            f"--database-url {setup}"
        )


_migrated: set[str] = set()  # the databases this process has brought to the newest revision
_migrating = threading.Lock()


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision, once per process and database.

    Migrations run once per process start: :func:`covidscan.service.settings.open_service` calls this,
    and every command (`covidscan serve`, `worker`, `users`, `audit-log`) and the server's start-up (the
    app's lifespan) get their database from it; requests, sessions and later calls in the same process
    (`serve` opens the database to check it, then again when Uvicorn starts the app) find it done.
    """
    key = engine.url.render_as_string(hide_password=False)
    with _migrating:
        if key not in _migrated:
            _upgrade(engine)
            _migrated.add(key)


def _upgrade(engine: Engine) -> None:
    # Alembic logs every plugin (at import) and revision at INFO; at each start that is noise, not news.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    except DatabaseError as exc:
        raise database_fault(engine.url.render_as_string(hide_password=False), exc) from None


class Database:
    """An engine plus its session factory; ``session()`` commits on success.

    ``audit_key`` (:func:`covidscan.service.audit.load_audit_key`) rides in every session's ``info``: the
    audit chain's appends and checks need it, and it never enters the database.
    """

    def __init__(self, url: str, audit_key: bytes | None = None) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False, info={"audit_key": audit_key})

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session: committed when the block ends, rolled back on an exception, then closed.

        The block may ``commit()`` midway to end a transaction early (the next statement begins a new one).
        A damaged database file becomes a :class:`StorageError` that names it; other errors pass unchanged.
        """
        try:
            with self.sessions() as s:
                yield s
                s.commit()
        except DatabaseError as exc:
            if _damaged(exc):
                raise database_fault(self.url, exc) from None
            if _full(exc):
                raise StorageFull(
                    f"the disk of the database {_shown(self.url)} is full: free space there, then try again"
                ) from None
            if "database is locked" in str(exc.orig):  # another process held SQLite's lock past the timeout
                raise DatabaseBusy(
                    f"the database {_shown(self.url)} is busy (another program is writing to it); try again"
                ) from None
            raise

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()
