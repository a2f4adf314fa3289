"""The OOD score of a trained run, as `covidscan predict` gives it: AUROC of own test split vs other sets.

    python benchmarks/measure_ood_run.py RUN OTHER.csv [OTHER.csv ...]

For each other set: the AUROC of ``ood_score`` for telling the run's own test images (in distribution)
from that set's images, and the share of each flagged ``unlike_training_data``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from covidscan.data import read_manifest
from covidscan.inference import Predictor
from covidscan.inference.predictor import OOD_WARNING


def scores(predictor: Predictor, paths: list[str]) -> tuple[np.ndarray, float]:
    """OOD scores of the readable images and the share flagged."""
    preds = [p for p in predictor.predict(paths) if p.error is None and p.ood_score is not None]
    flagged = np.mean([any(w.startswith(OOD_WARNING) for w in p.warnings) for p in preds])
    return np.array([p.ood_score for p in preds]), float(flagged)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path)
    parser.add_argument("others", type=Path, nargs="+")
    args = parser.parse_args()
    predictor = Predictor.from_run(args.run)
    splits = read_manifest(args.run / "splits.csv")
    own, own_flagged = scores(predictor, splits.loc[splits["split"] == "test", "path"].tolist())
    print(f"| set | images | AUROC vs {args.run.name} test | flagged |\n|---|---|---|---|")
    print(f"| own test split | {len(own)} | — | {own_flagged:.0%} |")
    for other in args.others:
        theirs, flagged = scores(predictor, read_manifest(other)["path"].tolist())
        y = np.r_[np.zeros(len(own)), np.ones(len(theirs))]
        print(f"| {other} | {len(theirs)} | {roc_auc_score(y, np.r_[own, theirs]):.3f} | {flagged:.0%} |")


if __name__ == "__main__":
    main()
