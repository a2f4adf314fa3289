"""The lung-masked input mode on real data: how often lungs are found, how much of the model input is
blanked, and the time per image, beside the plain lung crop.

Up to ``--n`` images per label are drawn (seed 0) from each manifest; each is prepared at 224 x 224 with
``mask_outside_lungs`` (CT: the contour finder; X-ray: the U-Net of ``--lung-model``) and without it.

Usage::

    python benchmarks/measure_masked_input.py --lung-model ~/.cache/covidscan/models/cxr_lungs.safetensors
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from covidscan.data import read_manifest
from covidscan.io import read_image
from covidscan.preprocess import PreprocessConfig, prepare_image

SETS = (("cxr-dev", "../shared/data/cxr-dev/metadata.csv", "cxr"),
        ("ucsd-ct", "../shared/data/ucsd-ct/labels.csv", "ct"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lung-model", default=None, help="X-ray lung U-Net weights (default location)")
    parser.add_argument("--n", type=int, default=100, help="images per label and set")
    args = parser.parse_args()
    for name, csv, modality in SETS:
        df = read_manifest(csv)
        df = pd.concat([g.sample(min(len(g), args.n), random_state=0) for _, g in df.groupby("label")])
        masked = PreprocessConfig(modality=modality, mask_outside_lungs=True, lung_model=args.lung_model)
        plain = PreprocessConfig(modality=modality)
        for label, group in df.groupby("label"):
            found, plain_found, blanked, seconds = [], [], [], 0.0
            for path in group["path"]:
                image = read_image(path)
                start = time.perf_counter()
                prepared = prepare_image(image, masked, (224, 224))
                seconds += time.perf_counter() - start
                found.append(bool(prepared.lungs_found))
                blanked.append(float((prepared.pixels == 0).mean()))
                plain_found.append(bool(prepare_image(image, plain, (224, 224)).lungs_found))
            print(f"{name} {label}: {len(group)} images; lungs found masked {np.mean(found):.2f}, plain crop "
                  f"{np.mean(plain_found):.2f}; model input blanked {np.mean(blanked):.3f}; "
                  f"{1000 * seconds / len(group):.0f} ms per image (masked)")


if __name__ == "__main__":
    main()
