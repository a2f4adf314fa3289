"""How far above a run's OOD threshold real inputs of the right and of the wrong modality score.

    nice python benchmarks/measure_ood_far.py [--shared ../shared] [--cache /tmp/covidscan-ood]

The same detector, features and sets as ``benchmarks/measure_ood.py`` (offline MobileNetV2 features,
fitted on the home set's train split, threshold = 95th percentile of its validation split). For each set
it prints the content part of the OOD score (k-NN on backbone features) as a multiple of the threshold:
its median, 1st and 99th percentiles and maximum. The refusal factor (``covidscan.models.ood.REFUSAL_FACTOR``)
must lie above every real image of the run's own modality (another hospital's scans must stay usable, only
warned) and below most images of the other modality. The image-statistics part is left out on purpose: a
16-bit, DICOM or colour file given to a run trained on 8-bit gray PNGs scores very high there, yet is a
chest image the model can judge.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from measure_ood import SHARED, WEIGHTS, Extractor, extract, manifest_sets, part

from covidscan.models import OODDetector
from covidscan.models.ood import REFUSAL_FACTOR


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
    print(f"| run | set | modality | images | 1st percentile | median | 99th percentile | max | above "
          f"{REFUSAL_FACTOR:g} |\n|---|---|---|---|---|---|---|---|---|")
    for pipeline, home, same, other in runs:
        feats = {s: extract(extractor, sets[s]["path"].tolist(), pipeline, args.cache / f"{s}-{pipeline}.npz")
                 for s in [home, *same, *other]}
        split = sets[home]["split"].to_numpy()
        fit, val, test = (part(feats[home], sets[home], split == s) for s in ("train", "val", "test"))
        ood = OODDetector().fit(fit["pooled"], fit["labels"], fit["stats"], val["pooled"], val["stats"])
        groups = {f"{home} val": (val, "own"), f"{home} test": (test, "own")}
        for s in [*same, *other]:
            everything = np.ones(len(sets[s]), bool)
            groups[s] = (part(feats[s], sets[s], everything), "own" if s in same else "other")
        for name, (data, kind) in groups.items():
            ratio = ood.score_parts(data["pooled"], data["stats"])[:, 0] / ood.threshold_
            print(f"| {home} | {name} | {kind} | {len(ratio)} | {np.quantile(ratio, 0.01):.2f} | "
                  f"{np.median(ratio):.2f} | {np.quantile(ratio, 0.99):.2f} | {ratio.max():.2f} | "
                  f"{(ratio > REFUSAL_FACTOR).mean():.0%} |", flush=True)


if __name__ == "__main__":
    main()
