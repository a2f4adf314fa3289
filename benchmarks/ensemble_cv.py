"""Cross-validated ROC AUC of logit-averaging ensembles, from the out-of-fold logits of ``covidscan tune``.

Each member is one setting of one tune run (``NAME=OUT/oof.csv:SETTING``; SETTING is the row number in that
run's tune.csv). The runs must share their folds: the same data, ``--folds`` and ``--seed``. For every
combination of two or more members the out-of-fold logits are averaged, and the fold ROC AUCs are reported
with a 95% Student-t interval over the folds, plus the difference from the best single member paired by
fold (as ``tune`` reports its "below best"). Choose an ensemble on these figures, never on the test split.

    python benchmarks/ensemble_cv.py astra=tune-astra/oof.csv:7 mnv2=tune-ct/oof.csv:0 \\
        lite2=tune-lite2/oof.csv:0
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from covidscan.training.tune import mean_ci


def read_member(spec: str) -> tuple[str, pd.DataFrame]:
    """``NAME=PATH:SETTING`` -> (NAME, that setting's out-of-fold rows indexed by path)."""
    try:
        name, rest = spec.split("=", 1)
        path, setting = rest.rsplit(":", 1)
        rows = pd.read_csv(path)
        rows = rows[rows["setting"] == int(setting)].set_index("path")
    except (ValueError, OSError, KeyError) as exc:
        raise SystemExit(f"{spec}: expected NAME=OUT/oof.csv:SETTING of a covidscan tune run ({exc})") \
            from None
    if rows.empty:
        raise SystemExit(f"{spec}: no out-of-fold rows for setting {setting} in {path}")
    return name, rows


def interval(values: np.ndarray) -> str:
    """Mean and 95% t interval over the folds, as ``tune`` reports them."""
    ci = mean_ci(values.tolist())
    return f"{ci['mean']:.3f} ({ci['low']:.3f}–{ci['high']:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("members", nargs="+", help="NAME=OUT/oof.csv:SETTING, two or more")
    args = parser.parse_args()
    members = dict(read_member(spec) for spec in args.members)
    paths = sorted(set.intersection(*(set(rows.index) for rows in members.values())))
    first = next(iter(members.values())).loc[paths]
    for name, rows in members.items():
        if not (rows.loc[paths, "fold"].to_numpy() == first["fold"].to_numpy()).all():
            raise SystemExit(f"{name}: its folds differ from the first member's; run tune with the same "
                             "data, --folds and --seed")
    y = (first["label"] == "covid").to_numpy()
    folds = first["fold"].to_numpy()
    logits = {name: rows.loc[paths, "logit"].to_numpy() for name, rows in members.items()}

    def fold_aucs(score: np.ndarray) -> np.ndarray:
        return np.array([roc_auc_score(y[folds == f], score[folds == f]) for f in np.unique(folds)])

    single = {name: fold_aucs(z) for name, z in logits.items()}
    best = max(single, key=lambda name: single[name].mean())
    print(f"{len(paths)} images in all members' folds; fold ROC AUC, 95% t interval over the folds")
    for name, aucs in single.items():
        print(f"{name}: {interval(aucs)}")
    for size in range(2, len(logits) + 1):
        for combo in itertools.combinations(logits, size):
            aucs = fold_aucs(sum(logits[name] for name in combo) / size)
            paired = interval(aucs - single[best])
            print(f"{'+'.join(combo)}: {interval(aucs)}; minus {best}, paired: {paired}")


if __name__ == "__main__":
    main()
