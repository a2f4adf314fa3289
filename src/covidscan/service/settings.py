"""What every service command needs first: its settings, a migrated database and the file store.

Settings come from ``COVIDSCAN_*`` environment variables (:class:`ServiceSettings`); a command's flags
override them (:func:`load_settings`). Kept free of the model code, so `covidscan users` and
`covidscan audit-log` start without loading torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.orm import Session

from covidscan.errors import ConfigError
from covidscan.io.quality import DEFAULT_MAX_PIXELS
from covidscan.service.audit import load_audit_key, mark_keyed
from covidscan.service.db import Database, default_database_url, migrate
from covidscan.service.models import Setting
from covidscan.service.storage import BlobStore

ENV_PREFIX = "COVIDSCAN_"
# The flag that sets each field, for error messages (fields without one are set by environment only).
FLAGS = {
    "data_dir": "--data-dir", "database_url": "--database-url", "run": "--run", "worker": "--worker",
    "dicom_port": "--dicom-port", "dicom_ae_title": "--dicom-ae-title",
}


def active_run(s: Session) -> str | None:
    """The run directory that predicts new cases (the ``active_run`` setting)."""
    row = s.get(Setting, "active_run")
    return row.value if row else None


def run_label(run_dir: str) -> str:
    """A run as shown outside the server: its folder name and the first 12 hex digits of its weights'
    SHA-256 (``NAME@0123456789ab``), never its path; a missing or damaged run raises its CovidscanError."""
    from covidscan.runs import load_checkpoint  # imports torch: only where a model is in use anyway

    return f"{Path(run_dir).name}@{load_checkpoint(run_dir).weights_sha256[:12]}"


class ServiceSettings(BaseSettings):
    """Where the service keeps its data and what it accepts: ``COVIDSCAN_<FIELD>`` in the environment
    (``COVIDSCAN_DATA_DIR``, ``COVIDSCAN_MAX_PIXELS``, ...), or keyword arguments, which win."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True)

    data_dir: Path = Field(description="The data folder: database (SQLite by default) and files")
    database_url: str | None = Field(None, description="Default: SQLite in data_dir")
    run: Path | None = Field(None, description="Made the active run at start (else the one already active)")
    max_upload_bytes: int = Field(200 * 1024 * 1024, gt=0, description="Per request")
    # The model's own limit (COVIDSCAN_MAX_PIXELS, else covidscan.io's default): what the upload accepts,
    # the worker can read; one setting for both, checked from the header before anything is decoded.
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0, description="Per image, checked from the header first")
    worker: bool = Field(True, description="Run a worker thread in the server process")
    poll_seconds: float = Field(0.5, gt=0, description="How often an idle worker looks for jobs")
    session_hours: float = Field(12, gt=0, description="A browser session's absolute lifetime")
    session_idle_minutes: float = Field(
        30, gt=0, description="A browser session ends after this long without a request"
    )
    min_free_bytes: int = Field(100 * 2**20, ge=0, description="/healthz is degraded below this free space")
    orphan_minutes: float = Field(
        15.0, ge=0, description="Stored files no case refers to are removed once this old"
    )
    delivery_retry_seconds: tuple[float, ...] = Field(
        (60, 300, 900, 3600),
        description="Waits after each failed send to a PACS (JSON list); failed after the last",
    )
    audit_key: SecretStr | None = Field(
        None, description="The audit chain's HMAC key (default: data_dir/audit.key, made with mode 0600)"
    )
    # DICOM in (issue 16): the C-STORE listener runs when a port is set (`covidscan serve --dicom-port`)
    dicom_port: int | None = Field(None, ge=0, le=65535, description="DICOM listener port (0: any free one)")
    dicom_host: str = Field("127.0.0.1", description="Address the DICOM listener binds (serve: its --host)")
    dicom_ae_title: str = Field(
        "COVIDSCAN", description="The listener's AE title: up to 16 printable ASCII characters, no backslash"
    )
    dicom_quiet_seconds: float = Field(
        10.0, gt=0, description="A series becomes a case once no instance of it arrived for this long"
    )

    @field_validator("dicom_ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        """DICOM's AE title (PS3.5 AE): 1-16 characters of printable ASCII without a backslash."""
        value = value.strip()
        if not 1 <= len(value) <= 16 or any(not " " <= c <= "~" or c == "\\" for c in value):
            raise ValueError("give 1 to 16 printable ASCII characters without a backslash, e.g. COVIDSCAN")
        return value

    @property
    def url(self) -> str:
        """The database URL in use."""
        return self.database_url or default_database_url(self.data_dir)


def load_settings(**flags: Any) -> ServiceSettings:
    """The settings from the environment, overridden by the ``flags`` that were given (not None).

    A bad or missing value is one :class:`ConfigError` naming the flag and the environment variable.
    """
    try:
        return ServiceSettings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            where = " or ".join(w for w in (FLAGS.get(field), ENV_PREFIX + field.upper()) if w)
            if err["type"] == "missing":
                problems.append(f"give {where}")
            else:
                problems.append(f"{where} {err['input']!r}: {err['msg'].lower()}")
        raise ConfigError("; ".join(problems)) from None


def open_service(settings: ServiceSettings) -> tuple[Database, BlobStore]:
    """Create the data folder, migrate the database and set the active run; what every command needs."""
    data_dir = Path(settings.data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create data folder {data_dir}: {exc.strerror}") from None
    env_key = settings.audit_key.get_secret_value() if settings.audit_key else None
    key, new_key = load_audit_key(data_dir, env_key)
    db = Database(settings.url, audit_key=key)
    migrate(db.engine)
    with db.session() as s:
        if new_key:
            mark_keyed(s)
        current = active_run(s)
    if settings.run is not None and current != str(Path(settings.run).resolve()):
        from covidscan.service.worker import set_active_run  # loads the model: only when switching

        set_active_run(db, settings.run, actor="covidscan serve")
    return db, BlobStore(data_dir / "blobs")
