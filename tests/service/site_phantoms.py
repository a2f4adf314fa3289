"""The phantom hospital of the site-loop tests: a parent run trained on phantoms of the training style, and
patients of another scanner (``site="scanner-b"``) arriving one case each."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

PARENT_PHANTOMS = 400  # images of the training style the parent learns from (2 slices per patient)


def train_phantom_parent(root: Path, *, n_bootstrap: int = 100) -> Path:
    """The demo preset trained on 400 CT phantoms of the training style (about 1.5 min on 2 CPU cores), as
    the site-loop benchmark's parent; returns the run directory ``root/run``."""
    from covidscan.config import load_config
    from covidscan.data.synthetic import write_phantom_dataset
    from covidscan.training import train_experiment

    data = write_phantom_dataset(root / "data", n=PARENT_PHANTOMS, seed=1, slices_per_patient=2)
    cfg = load_config("demo-ct-phantom", [f"evaluation.n_bootstrap={n_bootstrap}"])
    train_experiment(cfg, data, root / "run", progress=False)
    return root / "run"


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
