"""What every service command needs first: its configuration, a migrated database and the file store.

Kept free of the model code, so `covidscan users` and `covidscan audit-log` start without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from covidscan.errors import ConfigError
from covidscan.service.db import Database, default_database_url, migrate
from covidscan.service.models import Setting
from covidscan.service.storage import BlobStore


def active_run(s: Session) -> str | None:
    """The run directory that predicts new cases (the ``active_run`` setting)."""
    row = s.get(Setting, "active_run")
    return row.value if row else None


@dataclass(frozen=True)
class ServiceConfig:
    """Where the service keeps its data and what it accepts."""

    data_dir: Path
    database_url: str | None = None  # default: SQLite in data_dir
    run_dir: Path | None = None  # made the active run at start (else the one already active)
    max_upload_bytes: int = 200 * 1024 * 1024  # per request
    max_pixels: int = 60_000_000  # per image, checked from the header before decoding
    worker: bool = True  # run a worker thread in the server process
    poll_seconds: float = 0.5

    @property
    def url(self) -> str:
        """The database URL in use."""
        return self.database_url or default_database_url(self.data_dir)


def open_service(config: ServiceConfig) -> tuple[Database, BlobStore]:
    """Create the data folder, migrate the database and set the active run; what every command needs."""
    data_dir = Path(config.data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create data folder {data_dir}: {exc.strerror}") from None
    db = Database(config.url)
    migrate(db.engine)
    with db.session() as s:
        current = active_run(s)
    if config.run_dir is not None and current != str(Path(config.run_dir).resolve()):
        from covidscan.service.worker import set_active_run  # loads the model: only when switching

        set_active_run(db, config.run_dir, actor="covidscan serve")
    return db, BlobStore(data_dir / "blobs")
