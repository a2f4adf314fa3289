"""The README's main job: phantoms → audit → train → evaluate, offline, in a few minutes on 2 cores."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from covidscan.config import load_config
from covidscan.data import audit_manifest, format_audit, read_manifest, split_manifest, write_manifest
from covidscan.data.synthetic import write_phantom_dataset
from covidscan.evaluation import format_metrics_table
from covidscan.training import train_experiment

log = logging.getLogger(__name__)

DEMO_PRESET = "demo-ct-phantom"


def run_demo(
    out: str | Path, *, n: int = 400, seed: int = 0, overwrite: bool = True, progress: bool = True
) -> Path:
    """Generate ``n`` CT phantoms, audit them, train the demo preset and return the report's path.

    ``seed`` sets the phantoms, the split and the training seed; ``overwrite`` replaces an earlier demo's
    run in ``out`` (the demo's own folder, so this is the default).
    """
    out = Path(out)
    manifest = write_phantom_dataset(out / "data", n=n, modality="ct", seed=seed)
    log.info("wrote %d phantom CT slices to %s", n, manifest.parent)
    # Split by patient first, so the audit checks the very splits the model is trained and tested on.
    split = split_manifest(read_manifest(manifest), by="patient", seed=seed)
    manifest = write_manifest(split, out / "data" / "split.csv")
    audit = audit_manifest(split, progress=progress)
    (out / "audit.json").write_text(json.dumps(audit, indent=2), encoding="utf-8")
    log.info("audit:\n%s", format_audit(audit))
    cfg = load_config(DEMO_PRESET, [f"train.seed={seed}", f"data.seed={seed}"])
    result = train_experiment(cfg, manifest, out / "run", overwrite=overwrite, progress=progress)
    log.info("test metrics:\n%s", format_metrics_table(result.metrics))
    return result.run_dir / "report.md"
