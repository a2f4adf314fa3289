"""Shared fixtures. Tests that need the real data in ../shared skip with a reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COVIDSCAN_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ``../shared`` folder (or ``$COVIDSCAN_SHARED``); skips the test when it is not there."""
    if not (SHARED / "data").is_dir():
        pytest.skip(f"real data folder not found at {SHARED} (set COVIDSCAN_SHARED to use another place)")
    return SHARED
