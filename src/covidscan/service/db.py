"""Database engine, sessions and migrations: SQLite in the data folder by default, or PostgreSQL."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from covidscan.errors import ConfigError

MIGRATIONS = Path(__file__).with_name("migrations")


def default_database_url(data_dir: Path) -> str:
    """SQLite file ``service.sqlite3`` inside the data folder."""
    return f"sqlite:///{Path(data_dir).resolve() / 'service.sqlite3'}"


def _sqlite_serialised(engine: Engine) -> None:
    """WAL, a busy timeout and ``BEGIN IMMEDIATE``: SQLite's deferred transactions that read, then write,
    fail at once with 'database is locked' under concurrent writers instead of waiting their turn."""

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
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    """An engine for ``url`` (``sqlite:///...`` or ``postgresql+psycopg://...``); bad URLs: ConfigError."""
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
            _sqlite_serialised(engine)
        else:
            engine = create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)
    except (ArgumentError, ImportError) as exc:
        raise ConfigError(
            f"--database-url {url!r} is not usable ({exc}); give sqlite:///PATH or "
            "postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB"
        ) from None
    return engine


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (idempotent; runs at every start)."""
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
    except OperationalError as exc:
        raise ConfigError(
            f"cannot reach the database {engine.url.render_as_string(hide_password=True)}: {exc.orig}; "
            "check --database-url and that the server is running"
        ) from None


class Database:
    """An engine plus its session factory; ``session()`` is a transaction that commits on success."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed when the block ends, rolled back on an exception."""
        with self.sessions.begin() as s:
            yield s

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()
