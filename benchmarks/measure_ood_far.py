"""How far above a run's OOD threshold real inputs of the right and of the wrong modality score.

    nice python benchmarks/measure_ood_far.py [--shared ../shared] [--cache /tmp/covidscan-ood]

The same detector, features and sets as ``benchmarks/measure_ood.py`` (offline MobileNetV2 features,
fitted on the home set's train split, threshold = 95th percentile of its validation split). For each set
it prints the OOD score as a multiple of the threshold: its median, 99th percentile and maximum. A
refusal factor (``covidscan.inference.predictor.OOD_REFUSAL_FACTOR``) must lie above every real image of
the run's own modality (another hospital's scans must stay usable, only warned) and below the images of
the other modality.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from measure_ood import SHARED, WEIGHTS, Extractor, detector, extract, manifest_sets, part


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/covidscan-ood"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    sets = manifest_sets(args.shared, args.cache, 200)
    extractor = Extractor(args.shared / WEIGHTS)
    runs = [("ct", "ucsd-ct", ["ct-ext-luna16", "CT phantoms"], ["cxr-dev", "X-ray phantoms"]),
            ("cxr", "cxr-dev", ["cxr-ext-figure1", "X-ray phantoms"], ["ucsd-ct", "CT phantoms"])]
    print("| run | set | modality | median | 99th percentile | max | min |\n|---|---|---|---|---|---|---|")
    for pipeline, home, same, other in runs:
        feats = {s: extract(extractor, sets[s]["path"].tolist(), pipeline, args.cache / f"{s}-{pipeline}.npz")
                 for s in [home, *same, *other]}
        split = sets[home]["split"].to_numpy()
        fit, val, test = (part(feats[home], sets[home], split == s) for s in ("train", "val", "test"))
        scorer = detector(fit, val)
        threshold = float(np.quantile(scorer(val), 0.95))
        groups = {f"{home} val": (val, "own"), f"{home} test": (test, "own")}
        for s in [*same, *other]:
            groups[s] = (part(feats[s], sets[s], np.ones(len(sets[s]), bool)), "own" if s in same else "other")
        for name, (data, kind) in groups.items():
            ratio = scorer(data) / threshold
            print(f"| {home} | {name} | {kind} | {np.median(ratio):.2f} | {np.quantile(ratio, 0.99):.2f} | "
                  f"{ratio.max():.2f} | {ratio.min():.2f} |", flush=True)


if __name__ == "__main__":
    main()
