"""A crude shortcut probe: how well a linear model on 32 x 32 model inputs separates the two classes, with
the plain lung crop, the lung-masked input, and the masked input's silhouette alone (which pixels are kept).

On cxr-dev the two classes come from two sources, so what a linear probe finds there is largely the source;
a lower AUC means less of it reaches the model (the disease is in it too, so 0.5 is not the goal). 150
images per label (seed 1), patient-grouped 5-fold cross-validation, logistic regression (C=0.1), ROC AUC.

Usage::

    python benchmarks/measure_masked_probe.py --lung-model ~/.cache/covidscan/models/cxr_lungs.safetensors
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, cross_val_score

from covidscan.data import read_manifest
from covidscan.io import read_image
from covidscan.preprocess import PreprocessConfig, prepare_image

SETS = (("cxr-dev", "../shared/data/cxr-dev/metadata.csv", "cxr"),
        ("ucsd-ct", "../shared/data/ucsd-ct/labels.csv", "ct"))


def _auc(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> str:
    scores = cross_val_score(LogisticRegression(C=0.1, max_iter=2000), x, y, groups=groups, cv=GroupKFold(5),
                             scoring="roc_auc")
    return f"{scores.mean():.3f} ± {scores.std():.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lung-model", default=None, help="X-ray lung U-Net weights (default location)")
    parser.add_argument("--n", type=int, default=150, help="images per label and set")
    args = parser.parse_args()
    for name, csv, modality in SETS:
        df = read_manifest(csv)
        df = pd.concat([g.sample(min(len(g), args.n), random_state=1) for _, g in df.groupby("label")])
        y = (df["label"] == "covid").to_numpy()
        groups = df["patient_id"].fillna(df["path"]).to_numpy()
        images = [read_image(p) for p in df["path"]]
        plain = PreprocessConfig(modality=modality)
        masked = PreprocessConfig(modality=modality, mask_outside_lungs=True, lung_model=args.lung_model)
        x_plain = np.stack([prepare_image(im, plain, (32, 32)).pixels.ravel() for im in images])
        x_masked = np.stack([prepare_image(im, masked, (32, 32)).pixels.ravel() for im in images])
        silhouette = (x_masked > 0).astype(np.float32)
        print(f"{name}: linear-probe ROC AUC plain crop {_auc(x_plain, y, groups)}, masked "
              f"{_auc(x_masked, y, groups)}, silhouette only {_auc(silhouette, y, groups)}", flush=True)


if __name__ == "__main__":
    main()
