"""Issue 17 §4: does unlabelled alignment (``covidscan adapt --unlabelled``) help, and where does it hurt?

    nice -n 10 python benchmarks/measure_align.py --real-run /work/runs/covidscan-ct \
        --phantom-run /work/runs/phantom-ct --shared /work/shared --out benchmarks/measure_align.json

For every parent run and site, each method (standardize, coral) is judged exactly as ``adapt --unlabelled``
judges it (:func:`covidscan.training.align.judge_alignment`: each half of the site, split by patient,
aligned by a map fitted on the other half; the default rule) and then measured with the labels the rule
never saw, on the same held-out aligned features: ROC AUC (patient-bootstrap 95% CI), sensitivity,
specificity and the share called covid at the parent's threshold, before and after.

Sites: ``luna16`` (ct-ext-luna16, 200 non-COVID slices of another hospital: specificity only);
``ucsd-test`` (ucsd-ct's official test split: the parent's own hospital mix, a mild shift); ``scanner-b-S``
(phantoms of another scanner, 120 patients of 2 slices, half COVID, seeds ``--seeds``); ``label-shift``
(scanner-b seed 0 thinned to about 90% COVID patients: covariate *and* label shift). Features are cached
under ``--cache`` (never in the repository).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidscan import CLASSES
from covidscan.data import read_manifest
from covidscan.data.synthetic import write_phantom_dataset
from covidscan.evaluation import evaluate_predictions
from covidscan.models.align import ALIGN_METHODS
from covidscan.preprocess import prepare_manifest
from covidscan.runs import LoadedRun, load_run, run_split
from covidscan.training.adapt import parent_features
from covidscan.training.align import head_probabilities, held_out_aligned, judge_alignment


def _features(parent: LoadedRun, df: pd.DataFrame, cache: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pooled features, labels and patient groups of a manifest's images, cached by name."""
    if cache.is_file():
        saved = np.load(cache, allow_pickle=False)
        return saved["x"], saved["y"], saved["g"]
    prepared = prepare_manifest(
        df, parent.checkpoint.preprocess, parent.checkpoint.input_size, progress=False
    )
    [x] = parent_features(parent, prepared.images)
    groups = np.array(
        [g if g is not None else p for g, p in zip(prepared.patient_ids, prepared.paths, strict=True)]
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, x=x, y=prepared.labels, g=groups)
    return x, prepared.labels, groups


def _split_features(parent: LoadedRun, split: str, cache: Path) -> np.ndarray:
    if cache.is_file():
        return np.load(cache)["x"]
    [x] = parent_features(parent, run_split(parent, split).images)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, x=x)
    return x


def _figures(parent: LoadedRun, x: np.ndarray, y: np.ndarray, g: np.ndarray) -> dict[str, Any]:
    p = head_probabilities(parent, x)
    cal = parent.calibration
    called = cal.label(p) == CLASSES[1]
    row: dict[str, Any] = {"called_covid": round(float(called.mean()), 3)}
    if len(set(y)) == 2:
        m = evaluate_predictions(y, p, threshold=cal.threshold, groups=g, n_boot=500, seed=0)["metrics"]
        for name in ("roc_auc", "recall", "specificity"):
            row[name] = [m[name]["value"], *m[name]["ci95"]]
    else:  # one class (LUNA16): the share called right is the specificity (or the sensitivity)
        row["specificity" if y[0] == 0 else "recall"] = [round(float((called == bool(y[0])).mean()), 3)]
    return row


def _site_rows(
    name: str,
    parent: LoadedRun,
    x: np.ndarray,
    y: np.ndarray,
    g: np.ndarray,
    source: np.ndarray,
    reference: np.ndarray,
) -> list[dict[str, Any]]:
    cal = parent.calibration

    def positive(f: np.ndarray) -> np.ndarray:
        return cal.label(head_probabilities(parent, f)) == CLASSES[1]

    counts = {c: int((y == i).sum()) for i, c in enumerate(CLASSES)}
    rows = []
    for method in ALIGN_METHODS:
        judged = judge_alignment(method, x, g, source, reference, positive)
        after = held_out_aligned(method, x, g, source)
        rows.append(
            {
                "site": name,
                "images": len(y),
                "patients": len(set(g)),
                "classes": counts,
                "method": method,
                "accepted": judged.accepted,
                "reason": judged.reason,
                "shift_auc": [judged.shift_auc_before, judged.shift_auc_after],
                "before": _figures(parent, x, y, g),
                "after": _figures(parent, after, y, g),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _cell(fig: dict[str, Any], name: str) -> str:
    if name not in fig:
        return "–"
    value = fig[name]
    return (
        f"{value[0]:.3f}"
        if len(value) == 1 or value[1] is None
        else f"{value[0]:.3f} ({value[1]:.2f}–{value[2]:.2f})"
    )


def table(results: dict[str, Any]) -> str:
    """The README's table: one line per parent, site and method."""
    lines = [
        "| parent | site | method | kept by the rule | shift AUC | called covid | ROC AUC | sensitivity | "
        "specificity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for tag, block in results.items():
        for r in block["rows"]:
            b, a = r["before"], r["after"]
            cells = [f"{_cell(b, n)} → {_cell(a, n)}" for n in ("roc_auc", "recall", "specificity")]
            lines.append(
                f"| {tag} | {r['site']} | {r['method']} | {'yes' if r['accepted'] else 'no'} | "
                f"{r['shift_auc'][0]:.2f} → {r['shift_auc'][1]:.2f} | {b['called_covid']:.2f} → "
                f"{a['called_covid']:.2f} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real-run", type=Path)
    ap.add_argument("--phantom-run", type=Path)
    ap.add_argument("--shared", type=Path, default=Path("../shared"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/align/cache"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/measure_align.json"))
    ap.add_argument("--table", type=Path, help="only print the markdown table of a results JSON")
    args = ap.parse_args()
    if args.table is not None:
        print(table(json.loads(args.table.read_text())))
        return

    sites: dict[str, pd.DataFrame] = {}
    for seed in args.seeds:
        manifest = write_phantom_dataset(
            args.cache / f"scanner-b-{seed}",
            n=240,
            modality="ct",
            seed=100 + seed,
            slices_per_patient=2,
            site="scanner-b",
        )
        sites[f"scanner-b-{seed}"] = read_manifest(manifest)
    first = sites[f"scanner-b-{args.seeds[0]}"]
    covid_patients = sorted(set(first.loc[first["label"] == "covid", "patient_id"]))
    other = sorted(set(first["patient_id"]) - set(covid_patients))
    keep = set(covid_patients) | set(other[: max(2, len(covid_patients) // 9)])
    sites["label-shift"] = first[first["patient_id"].isin(keep)].reset_index(drop=True)

    results: dict[str, Any] = {}
    parents = [("covidscan-ct", args.real_run), ("phantom-ct", args.phantom_run)]
    for tag, run in parents:
        if run is None:
            continue
        parent = load_run(run)
        source = _split_features(parent, "train", args.cache / tag / "train.npz")
        reference = _split_features(parent, "val", args.cache / tag / "val.npz")
        own = dict(sites)
        if tag == "covidscan-ct":
            data = args.shared / "data"
            own["luna16"] = read_manifest(data / "ct-ext-luna16" / "labels.csv")
            ucsd = read_manifest(data / "ucsd-ct" / "labels.csv", split_column="official_split")
            own["ucsd-test"] = ucsd[ucsd["split"] == "test"].reset_index(drop=True)
        rows = []
        for name, df in own.items():
            x, y, g = _features(parent, df, args.cache / tag / f"{name}.npz")
            rows += _site_rows(name, parent, x, y, g, source, reference)
        results[tag] = {"run": str(run), "threshold": parent.calibration.threshold, "rows": rows}
    args.out.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
