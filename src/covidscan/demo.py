"""The README's main job: phantoms → audit → train → evaluate, offline, in a few minutes on 2 cores."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from covidscan.config import load_config
from covidscan.data import audit_manifest, format_audit, read_manifest, split_manifest, write_manifest
from covidscan.data.synthetic import write_phantom_dataset
from covidscan.errors import ConfigError
from covidscan.evaluation import format_metrics_table
from covidscan.outputs import write_text
from covidscan.training import train_experiment

log = logging.getLogger(__name__)

DEMO_PRESET = "demo-ct-phantom"
DEMO_ENTRIES = {".": {"data", "run", "audit.json"}, "data": {"images", "masks", "manifest.csv", "split.csv"}}
"""What a demo folder holds (names starting with a dot aside): ``--out`` may hold nothing else."""


def check_demo_folder(out: Path) -> None:
    """Refuse an ``out`` that holds anything but an earlier demo: the demo replaces what it finds there."""
    for sub, expected in DEMO_ENTRIES.items():
        folder = out / sub
        if not folder.is_dir():
            if folder.exists():
                raise ConfigError(f"--out {folder} is a file; give a new folder for the demo")
            continue
        other = sorted(e for e in os.listdir(folder) if not e.startswith(".") and e not in expected)
        if other:
            raise ConfigError(
                f"--out {out} holds files that are not an earlier demo's ({', '.join(other[:3])} in "
                f"{folder}); the demo writes and replaces its data and run there: give a new or empty folder"
            )


def run_demo(
    out: str | Path, *, n: int = 400, seed: int = 0, overwrite: bool = True, progress: bool = True
) -> Path:
    """Generate ``n`` CT phantoms, audit them, train the demo preset and return the report's path.

    ``seed`` sets the phantoms, the split and the training seed; ``overwrite`` replaces an earlier demo's
    run in ``out`` (the demo's own folder, so this is the default); a folder holding anything else is
    refused (:func:`check_demo_folder`).
    """
    out = Path(out)
    check_demo_folder(out)
    manifest = write_phantom_dataset(out / "data", n=n, modality="ct", seed=seed, overwrite=True)
    log.info("wrote %d phantom CT slices to %s", n, manifest.parent)
    # Split by patient first, so the audit checks the very splits the model is trained and tested on.
    split = split_manifest(read_manifest(manifest), by="patient", seed=seed)
    manifest = write_manifest(split, out / "data" / "split.csv")
    audit = audit_manifest(split, progress=progress)
    write_text(out / "audit.json", json.dumps(audit, indent=2))
    log.info("audit:\n%s", format_audit(audit))
    cfg = load_config(DEMO_PRESET, [f"train.seed={seed}", f"data.seed={seed}"])
    result = train_experiment(cfg, manifest, out / "run", overwrite=overwrite, progress=progress)
    log.info("test metrics:\n%s", format_metrics_table(result.metrics))
    return result.run_dir / "report.md"
