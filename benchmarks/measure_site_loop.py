"""Issue 14 §3-§5: the site loop measured -- local figures before, challenger after 50 signed patients,
and whether asking for the cases that teach most needs fewer signed cases than arrival order.

    nice python benchmarks/measure_site_loop.py                  # all three parts, results JSON beside it
    nice python benchmarks/measure_site_loop.py --parts phantom teaching --seeds 0 1 2

(a) ``phantom``: per seed a phantom site of another scanner (``site="scanner-b"``, 120 patients, 2 slices
    each) whose patients arrive in the order written. The parent's local figures on the patients after the
    first 50; ``covidscan adapt`` (auto) on the first 50 signed patients; the kept run's figures on the
    same later patients. Two parents (``--parents``): ``phantom``, the demo preset trained on 400 CT
    phantoms of the training style, and ``real``, the ``covidscan-ct`` run of ``--real-run``.
(b) ``teaching``: on sites of 140 patients, patients are signed ``--batch`` at a time, either in arrival
    order or in :func:`covidscan.evaluation.teaching_order` (uncertainty of the current head + novelty in
    the parent's pooled features); after each batch a head is refitted on the signed patients' frozen
    features (the standardised L2 logistic head of ``measure_adaptation.py``, a fast stand-in for adapt's
    head) and scored on 40 held-out patients. Reported: signed patients needed to reach each ``--targets``
    local ROC AUC.
(c) ``real``: a ``covidscan-ct`` run (``--real-run``) on ucsd-ct's official test split treated as a new
    site: its 95 patients arrive in a seeded random order (the manifest lists them by class); figures on
    the patients after the first 50 before and after adapting on those 50.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from measure_ood import SHARED
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from covidscan.config import load_config
from covidscan.data import read_manifest
from covidscan.data.synthetic import write_phantom_dataset
from covidscan.evaluation import local_figures, teaching_order
from covidscan.inference import Predictor
from covidscan.training import train_experiment
from covidscan.training.site import challenge

HERE = Path(__file__).resolve().parent
SIGNED = 50
FIGURES = ("roc_auc", "sensitivity", "specificity", "ppv", "npv", "ece")


def phantom_parent(cache: Path) -> Path:
    """The demo preset on 400 training-style phantoms (trained once, then reused from ``cache``)."""
    run = cache / "parent"
    if not (run / "checkpoint.json").is_file():
        data = write_phantom_dataset(cache / "train", n=400, seed=1, slices_per_patient=2, overwrite=True)
        train_experiment(load_config("demo-ct-phantom"), data, run, overwrite=True, progress=False)
    return run


def scores(run: Path, paths: list[str]) -> tuple[np.ndarray, np.ndarray, float]:
    """Calibrated p(covid), pooled features and the image threshold of ``run`` on ``paths`` (no OOD
    refusal: local validation needs the probability the run would have given)."""
    predictor = Predictor.from_run(run)
    z, features = predictor.logits_and_features([predictor.prepare(predictor.load(p)) for p in paths])
    return predictor.calibration.proba(z), features, predictor.calibration.threshold


def summary(figures) -> dict[str, Any]:
    return {"n_patients": figures.n_patients, "n_images": figures.n_images,
            **{name: {"value": figures.value(name), "ci95": [figures.low(name), figures.high(name)]}
               for name in FIGURES}}


def before_after(run: Path, rows: pd.DataFrame, signed: np.ndarray, out: Path) -> dict[str, Any]:
    """Figures on the later patients before and after adapting on the signed ones."""
    y = (rows["label"] == "covid").to_numpy(np.int64)
    later = ~signed
    ids = rows["patient_id"].to_numpy()
    p, _, threshold = scores(run, rows["path"].tolist())
    before = local_figures(y[later], p[later], ids[later], threshold)
    rows[signed][["path", "label", "patient_id"]].to_csv(out / "signed.csv", index=False)
    result = challenge(run, out / "signed.csv", out / "challenger", overwrite=True)
    p_new, _, threshold_new = scores(result.run_dir, rows["path"].tolist())
    after = local_figures(y[later], p_new[later], ids[later], threshold_new)
    return {"before": summary(before), "after": summary(after), "challenge": result.to_dict()}


def phantom_site(cache: Path, seed: int, n_patients: int) -> pd.DataFrame:
    manifest = write_phantom_dataset(cache / f"site-{seed}", n=2 * n_patients, seed=100 + seed,
                                     slices_per_patient=2, site="scanner-b", overwrite=True)
    df = pd.read_csv(manifest)
    return df.assign(path=[str(manifest.parent / p) for p in df["path"]])


def first_patients(rows: pd.DataFrame, order: list[str], k: int) -> np.ndarray:
    return rows["patient_id"].isin(order[:k]).to_numpy()


def part_phantom(parent: Path, cache: Path, seeds: list[int]) -> list[dict[str, Any]]:
    results = []
    for seed in seeds:
        rows = phantom_site(cache, seed, 120)
        signed = first_patients(rows, rows["patient_id"].drop_duplicates().tolist(), SIGNED)
        out = cache / f"adapt-{parent.name}-{seed}"
        out.mkdir(exist_ok=True)
        result = {"seed": seed} | before_after(parent, rows, signed, out)
        results.append(result)
        print(f"{parent.name} on phantom site {seed}: ROC AUC {result['before']['roc_auc']['value']:.3f} -> "
              f"{result['after']['roc_auc']['value']:.3f} ({result['challenge']['mode']})", flush=True)
    return results


def head_auc(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> tuple[float, np.ndarray]:
    """The frozen-feature head refitted on ``train``: its AUC on ``test`` and its p of every row."""
    if len(set(y[train])) < 2:
        return float("nan"), np.full(len(y), 0.5)
    head = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000)).fit(x[train], y[train])
    p = head.predict_proba(x)[:, 1]
    return float(roc_auc_score(y[test], p[test])), p


def part_teaching(parent: Path, cache: Path, seeds: list[int], targets: list[float],
                  batch: int) -> list[dict[str, Any]]:
    results = []
    for seed in seeds:
        rows = phantom_site(cache, seed, 140)
        y_img = (rows["label"] == "covid").to_numpy(np.int64)
        p_img, f_img, threshold = scores(parent, rows["path"].tolist())
        # One unit per patient (a signed case): its slices' mean features and probability.
        patients = rows["patient_id"].drop_duplicates().tolist()
        codes = pd.Categorical(rows["patient_id"], categories=patients).codes
        x = np.stack([f_img[codes == i].mean(axis=0) for i in range(len(patients))])
        y = np.array([y_img[codes == i][0] for i in range(len(patients))])
        p_parent = np.array([p_img[codes == i].mean() for i in range(len(patients))])
        held_out = np.arange(len(patients) - 40, len(patients))
        pool = np.arange(len(patients) - 40)
        curves: dict[str, list[tuple[int, float]]] = {}
        for strategy in ("arrival", "teaching"):
            signed: list[int] = []
            p_now, cut = p_parent, threshold
            curve = []
            while len(signed) < len(pool):
                left = np.setdiff1d(pool, signed)
                if strategy == "arrival":
                    pick = left[:batch]
                else:
                    known = x[signed] if signed else None
                    order = teaching_order(p_now[left], x[left], known, cut, batch=batch)
                    pick = left[order[:batch]]
                signed += pick.tolist()
                train = np.zeros(len(y), bool)
                train[signed] = True
                test = np.zeros(len(y), bool)
                test[held_out] = True
                auc, p_head = head_auc(x, y, train, test)
                if not np.isnan(auc):
                    p_now, cut = p_head, 0.5
                curve.append((len(signed), auc))
            curves[strategy] = curve
        needed = {str(t): {s: next((k for k, auc in c if auc >= t), None) for s, c in curves.items()}
                  for t in targets}
        tables = {s: [[k, None if np.isnan(a) else a] for k, a in c] for s, c in curves.items()}
        results.append({"seed": seed, "patients_needed": needed, "curves": tables})
        print(f"{parent.name}, phantom site {seed}: patients needed per local AUC: {needed}", flush=True)
    return results


def part_real(run: Path, shared: Path, cache: Path, seed: int) -> dict[str, Any]:
    df = read_manifest(shared / "data/ucsd-ct/labels.csv", split_column="official_split")
    rows = df[df["split"] == "test"].reset_index(drop=True)[["path", "label", "patient_id"]]
    rows = rows.assign(path=rows["path"].astype(str), patient_id=rows["patient_id"].astype(str))
    order = list(np.random.default_rng(seed).permutation(rows["patient_id"].unique()))
    rows = rows.iloc[np.argsort([order.index(p) for p in rows["patient_id"]], kind="stable")]
    rows = rows.reset_index(drop=True)
    signed = first_patients(rows, order, SIGNED)
    out = cache / "real"
    out.mkdir(parents=True, exist_ok=True)
    result = {"run": str(run), "seed": seed} | before_after(run, rows, signed, out)
    print(f"ucsd-ct test as a new site: ROC AUC {result['before']['roc_auc']['value']:.3f} -> "
          f"{result['after']['roc_auc']['value']:.3f} ({result['challenge']['mode']})", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["phantom", "teaching", "real"],
                        choices=["phantom", "teaching", "real"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.85, 0.9, 0.95])
    parser.add_argument("--batch", type=int, default=5, help="patients signed between two refits")
    parser.add_argument("--parents", nargs="+", default=["phantom", "real"], choices=["phantom", "real"],
                        help="parents of parts a and b: the demo preset on phantoms, or --real-run")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/covidscan-site-loop"))
    parser.add_argument("--real-run", type=Path, default=Path("/work/runs/covidscan-ct-sitelib"))
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--out", type=Path, default=HERE / "site_loop_results.json")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}

    def save() -> None:  # after every part, so that a failing part loses nothing measured before it
        args.out.write_text(json.dumps(results, indent=1) + "\n")

    parents = {"phantom": lambda: phantom_parent(args.cache), "real": lambda: args.real_run}
    for name in args.parents:
        parent = parents[name]()
        if "phantom" in args.parts:
            results.setdefault("phantom", {})[name] = part_phantom(parent, args.cache, args.seeds)
            save()
        if "teaching" in args.parts:
            results.setdefault("teaching", {})[name] = part_teaching(
                parent, args.cache, args.seeds, args.targets, args.batch)
            save()
    if "real" in args.parts:
        results["real"] = part_real(args.real_run, args.shared, args.cache, args.seeds[0])
        save()
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
