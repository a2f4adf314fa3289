"""The phantom hospital of the site-loop tests: patients of another scanner (``site="scanner-b"``) arriving
one case each (their parent run is the ``phantom_parent`` fixture of tests/conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd


@dataclass(frozen=True)
class Patient:
    """One phantom patient of a site: its id, its true finding and its slices (PNG files)."""

    patient_id: str
    label: str  # covid or non_covid: what the doctor finds and signs
    files: tuple[Path, ...]


def site_patients(folder: Path, n_patients: int, *, seed: int, site: str = "scanner-b") -> list[Patient]:
    """``n_patients`` phantom patients (2 slices each, classes alternating) as ``site``'s scanner renders
    them, in arrival order."""
    from covidscan.data.synthetic import write_phantom_dataset

    manifest = write_phantom_dataset(folder, n=2 * n_patients, seed=seed, slices_per_patient=2, site=site)
    rows = pd.read_csv(manifest)
    return [
        Patient(str(pid), str(group["label"].iloc[0]), tuple(manifest.parent / p for p in group["path"]))
        for pid, group in rows.groupby("patient_id", sort=False)
    ]
