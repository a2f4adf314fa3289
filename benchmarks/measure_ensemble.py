"""Do an ensemble or flip test-time augmentation pay? Measured on the runs' own validation and test splits.

    python benchmarks/measure_ensemble.py RUN [RUN ...]

For each run: ROC AUC of its logits, and of the mean of the logits of the image and its horizontal flip
(TTA). Then the ROC AUC of the mean temperature-scaled logit over all runs (an ensemble); the runs must
share their splits (the same manifest and split settings). Decide on the validation rows only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from covidscan.inference import Predictor
from covidscan.preprocess import prepare_manifest


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", type=Path, nargs="+")
    args = parser.parse_args()
    scaled: dict[str, list[np.ndarray]] = {"val": [], "test": []}
    labels: dict[str, np.ndarray] = {}
    print("| run | split | AUC | flip TTA AUC |\n|---|---|---|---|")
    for run in args.runs:
        predictor = Predictor.from_run(run, engine="torch")
        splits = pd.read_csv(run / "splits.csv")
        for split in ("val", "test"):
            rows = splits[splits["split"] == split].reset_index(drop=True)
            checkpoint = predictor.checkpoint
            prepared = prepare_manifest(rows, checkpoint.preprocess, checkpoint.input_size, progress=False)
            z = predictor.logits(prepared.images)
            flipped = predictor.logits(np.ascontiguousarray(prepared.images[:, :, ::-1]))
            if split in labels and not np.array_equal(labels[split], prepared.labels):
                raise SystemExit(f"{run} has other {split} images than {args.runs[0]}: no ensemble")
            labels[split] = prepared.labels
            scaled[split].append(z / predictor.calibration.temperature)
            auc, tta = roc_auc_score(prepared.labels, z), roc_auc_score(prepared.labels, (z + flipped) / 2)
            print(f"| {run.name} | {split} | {auc:.4f} | {tta:.4f} |")
    for split in ("val", "test"):
        mean = np.mean(scaled[split], axis=0)
        print(f"| ensemble of {len(args.runs)} | {split} | {roc_auc_score(labels[split], mean):.4f} | |")


if __name__ == "__main__":
    main()
