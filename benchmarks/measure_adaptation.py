"""Issue 9 §2: how many local patients a frozen-feature head needs at a new site, measured.

    nice python benchmarks/measure_adaptation.py              # table on stdout, plot as PNG
    nice python benchmarks/measure_adaptation.py --ks 10 20 50 100 --draws 5 --out adaptation.png

The source model is paper A's setting with the offline MobileNetV2 ImageNet weights (CLAHE + lung crop,
frozen backbone, logistic head) fitted on ucsd-ct train. cxr-ext-figure1 has too few patients (38 images)
to adapt on, so the "new site" is synthetic: CT phantoms rendered as another scanner would
(``site="scanner-b"``: wider field of view, half the resolution, another window, more noise). A fixed set
of site patients is held out; for each k, ``--draws`` random sets of k other site patients are drawn and
the head is refitted (a) on those k patients only and (b) on ucsd-ct train plus them (each source given
equal total weight). Local AUC is measured on the held-out site patients, mean and std over the draws.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from measure_ood import SHARED, WEIGHTS, Extractor, extract
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from covidscan.data import read_manifest
from covidscan.data.synthetic import write_phantom_dataset


def head(x: np.ndarray, y: np.ndarray, weight: np.ndarray | None = None):
    """Standardise, then an L2-regularised logistic regression: the frozen-feature head."""
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000))
    return model.fit(x, y, logisticregression__sample_weight=weight)


def auc(model, x: np.ndarray, y: np.ndarray) -> float:
    return float(roc_auc_score(y, model.predict_proba(x)[:, 1]))


def draw_patients(rng: np.random.Generator, pool: np.ndarray, labels: dict[str, int], k: int) -> np.ndarray:
    """k patients from ``pool``, both classes among them (redrawn until so)."""
    while True:
        chosen = rng.choice(pool, k, replace=False)
        if len({labels[p] for p in chosen}) == 2:
            return chosen


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/covidscan-ood"),
                        help="feature cache, shared with measure_ood.py")
    parser.add_argument("--patients", type=int, default=200, help="site phantom patients (2 slices each)")
    parser.add_argument("--held-out", type=int, default=60, help="site patients kept for measuring")
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 20, 50, 100])
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("/tmp/covidscan-adaptation.png"))
    args = parser.parse_args()
    if max(args.ks) > args.patients - args.held_out:
        parser.error(f"k up to {max(args.ks)} needs --patients >= {max(args.ks) + args.held_out}")
    torch.set_num_threads(2)

    ucsd = read_manifest(args.shared / "data/ucsd-ct/labels.csv", split_column="official_split")
    site = read_manifest(write_phantom_dataset(args.cache / "phantoms-scanner-b", n=2 * args.patients,
                                               slices_per_patient=2, seed=1, site="scanner-b"))
    extractor = Extractor(args.shared / WEIGHTS)
    source = extract(extractor, ucsd["path"].tolist(), "ct", args.cache / "ucsd-ct-ct.npz")["pooled"]
    local = extract(extractor, site["path"].tolist(), "ct", args.cache / "scanner-b-ct.npz")["pooled"]
    y_source = (ucsd["label"] == "covid").to_numpy(int)
    y_local = (site["label"] == "covid").to_numpy(int)
    train = (ucsd["split"] == "train").to_numpy()

    rng = np.random.default_rng(0)
    patients = site["patient_id"].to_numpy()
    labels = dict(zip(patients, y_local, strict=True))
    held_out = rng.choice(np.unique(patients), args.held_out, replace=False)
    test = np.isin(patients, held_out)
    pool = np.setdiff1d(np.unique(patients), held_out)

    base = head(source[train], y_source[train])
    base_auc = auc(base, local[test], y_local[test])
    ucsd_test = (ucsd["split"] == "test").to_numpy()
    print(f"ucsd-ct head: AUC {auc(base, source[ucsd_test], y_source[ucsd_test]):.3f} on ucsd-ct test, "
          f"{base_auc:.3f} on {test.sum()} held-out site images ({args.held_out} patients), no adaptation\n")
    print("| site patients k | images | site only: AUC mean ± std | ucsd-ct + site: AUC mean ± std |")
    print("|---|---|---|---|")
    results: dict[str, list[tuple[float, float]]] = {"site only": [], "ucsd-ct + site": []}
    for k in args.ks:
        only, pooled, images = [], [], []
        for _ in range(args.draws):
            chosen = np.isin(patients, draw_patients(rng, pool, labels, k))
            images.append(chosen.sum())
            only.append(auc(head(local[chosen], y_local[chosen]), local[test], y_local[test]))
            x = np.concatenate([source[train], local[chosen]])
            weight = np.r_[np.full(train.sum(), 1.0), np.full(chosen.sum(), train.sum() / chosen.sum())]
            mixed = head(x, np.r_[y_source[train], y_local[chosen]], weight)
            pooled.append(auc(mixed, local[test], y_local[test]))
        results["site only"].append((np.mean(only), np.std(only)))
        results["ucsd-ct + site"].append((np.mean(pooled), np.std(pooled)))
        print(f"| {k} | {np.mean(images):.0f} | {np.mean(only):.3f} ± {np.std(only):.3f} | "
              f"{np.mean(pooled):.3f} ± {np.std(pooled):.3f} |", flush=True)

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, values in results.items():
        mean, std = np.array(values).T
        ax.errorbar(args.ks, mean, yerr=std, marker="o", capsize=3, label=f"head refit on {name}")
    ax.axhline(base_auc, color="gray", linestyle="--", label="ucsd-ct head, not adapted")
    ax.set(xscale="log", xticks=args.ks, xticklabels=[str(k) for k in args.ks], ylim=(0.4, 1.02),
           xlabel="site patients used for adaptation (k)", ylabel="local ROC AUC (held-out site patients)",
           title=f"New site (synthetic scanner-b): mean ± std of {args.draws} draws")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"\nplot: {args.out}")


if __name__ == "__main__":
    main()
