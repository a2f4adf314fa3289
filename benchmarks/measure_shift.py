"""Measure the shift alarm (``covidscan shift``): power, false alarms and speed of both test statistics.

For each run, images are embedded once through the run's Predictor (its shift features), then:

* false alarms: random draws of n images from the run's own validation + test images pooled, tested
  against the validation images not drawn (the drawn ones leave the reference, so no image is on both
  sides); for the phantom run, fresh training-style phantoms against its validation split;
* power: random draws of n images of another hospital (ct-ext-luna16 for the CT run, cxr-ext-figure1 for
  the X-ray run: 38 images, so n = 30 only) or of scanner-b phantoms, against the full validation split;
* ucsd-ct's official test split against its validation split (the issue's premise: that split is shifted);
* a precision check: the validation images in fp32 against themselves in bf16 (a stored reference is fp32,
  a serving predictor may run bf16) must not separate.

Both p-values (``classifier``: permuted cross-validated AUC; ``mmd``: permuted Gaussian-kernel MMD) come
from the same folds and components, so the comparison is like for like. Usage::

    python benchmarks/measure_shift.py --ct-run /work/runs/covidscan-ct --cxr-run /work/runs/covidscan-cxr \\
        --phantom-run /work/runs/phantom-ct --data ../shared/data --out benchmarks/measure_shift.json

A missing ``--phantom-run`` is trained first (the demo-ct-phantom preset on 400 phantoms, seed 0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from covidscan.config import load_config
from covidscan.data.synthetic import write_phantom_dataset
from covidscan.evaluation.shift import MIN_IMAGES, ShiftTest
from covidscan.inference import Predictor
from covidscan.inference.predict import collect_inputs
from covidscan.outputs import read_csv
from covidscan.training import train_experiment

SIZES = (30, 50, 100)
METHODS = ("classifier", "mmd")
LEVELS = (0.003, 0.005, 0.01, 0.05)
"""Alarm levels the alarm rates are reported at (the p-values of 500 permutations step by 0.002)."""


def embed(predictor: Predictor, paths: list[str]) -> np.ndarray:
    """Shift features of every readable image (unreadable ones are left out)."""
    rows = [p.features for p in predictor.predict(paths) if p.features is not None]
    return np.stack(rows)


def split_paths(run: Path, split: str, column: str = "split") -> list[str]:
    table = read_csv(run / "splits.csv", dtype=str, keep_default_na=False)
    return table.loc[table[column] == split, "path"].tolist()


def draws(reference: np.ndarray, sample: np.ndarray, sizes: tuple[int, ...], n_draws: int, seed: int,
          null: str | None = None) -> dict[str, dict]:
    """Alarm rate, median AUC and test time per size and method over ``n_draws`` random draws.

    ``null="pooled"``: ``sample`` is reference rows followed by other own images; a draw's reference rows
    leave the reference (what a site of the training hospital would bring: new images, not these ones).
    ``null="exchangeable"``: ``sample`` is the pool; each draw takes a reference of ``len(reference)``
    images and a group of n other images from it at random, so the two are exchangeable (no shift at all,
    even where the splits themselves differ, as ucsd-ct's validation and official test splits do).
    """
    rng = np.random.default_rng(seed)
    out: dict[str, dict] = {}
    for n in sizes:
        if n > len(sample) - (len(reference) if null == "exchangeable" else 0):
            continue
        found: dict[str, list] = {m: [] for m in METHODS}
        for d in range(n_draws):
            pick = rng.choice(len(sample), n, replace=False)
            ref = reference
            if null == "pooled":
                ref = np.delete(reference, pick[pick < len(reference)], axis=0)
            elif null == "exchangeable":
                order = rng.permutation(len(sample))
                ref, pick = sample[order[:len(reference)]], order[len(reference):len(reference) + n]
            for method in METHODS:
                start = time.perf_counter()
                result = ShiftTest(method=method, seed=d).fit(ref).test(sample[pick])
                found[method].append((result.alarm, result.auc, result.p_value, time.perf_counter() - start))
        out[str(n)] = {m: {"median_auc": float(np.median([r[1] for r in rows])),
                           "median_p": float(np.median([r[2] for r in rows])),
                           "median_seconds": float(np.median([r[3] for r in rows])),
                           "n_draws": len(rows),
                           # per draw, so the alarm rate at any other level can be read off afterwards
                           "p_values": [r[2] for r in rows], "aucs": [r[1] for r in rows]}
               for m, rows in found.items()}
        print(n, {m: (float(np.mean([r[0] for r in rows])), round(float(np.median([r[1] for r in rows])), 3))
                  for m, rows in found.items()}, flush=True)
    return out


def add_alarm_rates(node: object) -> None:
    """Beside every draw's p-values, the share of draws below each of :data:`LEVELS`."""
    if isinstance(node, dict):
        if "p_values" in node:
            p = np.asarray(node["p_values"])
            node["alarm_rate_at"] = {str(level): float(np.mean(p < level)) for level in LEVELS}
            node.pop("alarm_rate", None)
        for value in node.values():
            add_alarm_rates(value)


def whole(reference: np.ndarray, sample: np.ndarray) -> dict:
    result = ShiftTest().fit(reference).test(sample)
    return result.to_dict()


def measure_real(run: Path, external: Path, sizes: tuple[int, ...], n_draws: int, official: bool) -> dict:
    predictor = Predictor.from_run(run, engine="torch")
    val, test = split_paths(run, "val"), split_paths(run, "test")
    f_val, f_test = embed(predictor, val), embed(predictor, test)
    f_ext = embed(predictor, [item.path for item in collect_inputs(external)])
    print(run.name, "val", len(f_val), "test", len(f_test), "external", len(f_ext), flush=True)
    result = {
        "run": str(run), "precision": predictor.precision, "n_val": len(f_val), "n_test": len(f_test),
        "external": str(external), "n_external": len(f_ext),
        "false_alarms_pooled_val_test": draws(f_val, np.concatenate([f_val, f_test]), sizes, n_draws, 1,
                                              null="pooled"),
        "false_alarms_exchangeable": draws(f_val, np.concatenate([f_val, f_test]), sizes, n_draws, 6,
                                           null="exchangeable"),
        "power_external": draws(f_val, f_ext, sizes, n_draws, 2),
        "external_all": whole(f_val, f_ext),
    }
    if official:
        # covidscan-ct trains on the official splits: its test split is the official test split.
        result["official_test_vs_val"] = draws(f_val, f_test, sizes, n_draws, 3)
        result["official_test_all"] = whole(f_val, f_test)
    if predictor.precision == "bf16":
        fp32 = Predictor.from_run(run, engine="torch", precision="fp32")
        result["bf16_vs_fp32_same_images"] = whole(embed(fp32, val), f_val)
    return result


def phantom_run(path: Path, work: Path) -> Path:
    if not (path / "checkpoint.json").is_file():
        data = write_phantom_dataset(work / "train", n=400, modality="ct", seed=0, slices_per_patient=4)
        train_experiment(load_config("demo-ct-phantom"), data, path, progress=False)
    return path


def measure_phantoms(run: Path, work: Path, sizes: tuple[int, ...], n_draws: int) -> dict:
    predictor = Predictor.from_run(run, engine="torch")
    f_val = embed(predictor, split_paths(run, "val"))
    same = write_phantom_dataset(work / "same", n=200, modality="ct", seed=11, slices_per_patient=4)
    other = write_phantom_dataset(work / "b", n=200, modality="ct", seed=12, slices_per_patient=4,
                                  site="scanner-b")
    f_same = embed(predictor, [item.path for item in collect_inputs(same)])
    f_b = embed(predictor, [item.path for item in collect_inputs(other)])
    print("phantoms val", len(f_val), flush=True)
    return {"run": str(run), "n_val": len(f_val),
            "false_alarms_training_style": draws(f_val, f_same, sizes, n_draws, 4),
            "power_scanner_b": draws(f_val, f_b, sizes, n_draws, 5),
            "scanner_b_all": whole(f_val, f_b)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct-run", type=Path)
    parser.add_argument("--cxr-run", type=Path)
    parser.add_argument("--phantom-run", type=Path)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/measure_shift.json"))
    args = parser.parse_args()
    # A second invocation (say --cxr-run once that run is trained) adds its parts to the existing results.
    results: dict = json.loads(args.out.read_text(encoding="utf-8")) if args.out.is_file() else {}
    results.update({"sizes": list(SIZES), "draws": args.draws, "min_images": MIN_IMAGES})
    results.setdefault("commands", []).append(
        {"argv": sys.argv, "date": time.strftime("%Y-%m-%d"), "cpu_threads": os.cpu_count()})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.phantom_run:
            results["phantoms"] = measure_phantoms(phantom_run(args.phantom_run, work), work, SIZES,
                                                   args.draws)
        if args.ct_run:
            results["ct"] = measure_real(args.ct_run, args.data / "ct-ext-luna16", SIZES, args.draws, True)
        if args.cxr_run:
            results["cxr"] = measure_real(args.cxr_run, args.data / "cxr-ext-figure1", (30,), args.draws,
                                          False)
    add_alarm_rates(results)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
