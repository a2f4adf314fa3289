"""``covidscan serve --demo``: accounts with printed passwords and a few phantom cases to click through."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from covidscan.errors import ConfigError
from covidscan.service.auth import add_user, new_token
from covidscan.service.cases import Upload, check_uploads, create_case
from covidscan.service.db import Database
from covidscan.service.models import User
from covidscan.service.storage import BlobStore


@dataclass(frozen=True)
class DemoAccounts:
    """Demo credentials: name -> password, and an API token of the submitter for ``covidscan send``."""

    passwords: dict[str, str]
    submitter_token: str


def seed_demo(
    db: Database, store: BlobStore, cases: list[tuple[str, list[Path]]], *, max_pixels: int
) -> DemoAccounts:
    """Create admin, doctor and submitter accounts and one case per ``(patient_id, images)``.

    Refuses a database that already has accounts: a demo must never hand out passwords to real data.
    """
    with db.session() as s:
        if s.scalar(select(User.id).limit(1)) is not None:
            raise ConfigError("the demo needs a fresh data folder; this one already has accounts")
        passwords = {name: secrets.token_urlsafe(9) for name in ("admin", "doctor", "submitter")}
        users = {name: add_user(s, name, name, pw) for name, pw in passwords.items()}
        token = new_token(s, users["submitter"])
        for patient_id, images in cases:
            uploads = [Upload(p.name, p.read_bytes()) for p in images]
            create_case(
                s, store, users["submitter"], check_uploads(uploads, max_pixels=max_pixels), patient_id
            )
    return DemoAccounts(passwords, token)
