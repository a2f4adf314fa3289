"""Lung-crop quality: IoU against the phantoms' known lung masks, and the found-lungs share on real sets.

    python benchmarks/measure_lungs.py                       # phantoms, plus ../shared sets when present
    python benchmarks/measure_lungs.py --phantoms 400

Real images have no lung masks, so for them only the share where plausible lungs were found is measured;
look at ``covidscan preprocess preview`` sheets to judge the masks themselves.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from covidscan.data import read_manifest
from covidscan.data.synthetic import make_phantom
from covidscan.errors import CovidscanError
from covidscan.io import read_image
from covidscan.preprocess import apply_clahe, find_lungs

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_SETS = {"ucsd-ct": ("ucsd-ct/labels.csv", "ct"), "cxr-dev": ("cxr-dev/metadata.csv", "cxr")}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def phantom_ious(modality: str, n: int) -> tuple[np.ndarray, int]:
    """IoU of each phantom's found mask with its true one (0 when nothing was found), and how many found."""
    scores, found = [], 0
    for seed in range(n):
        phantom = make_phantom(seed, modality=modality, covid=bool(seed % 2))
        crop = find_lungs(apply_clahe(phantom.image), modality=modality)
        found += crop.found
        scores.append(iou(crop.mask, phantom.lung_mask) if crop.found else 0.0)
    return np.asarray(scores), found


def found_share(manifest: Path, modality: str) -> tuple[int, int, list[str], float]:
    """(found, readable, paths where no lungs were found, images/s of decode + CLAHE + find_lungs)."""
    paths = read_manifest(manifest)["path"].tolist()
    found, readable, missed = 0, 0, []
    start = time.perf_counter()
    for path in paths:
        try:
            pixels = read_image(path).pixels
        except CovidscanError:
            continue
        readable += 1
        if find_lungs(apply_clahe(pixels), modality=modality).found:
            found += 1
        else:
            missed.append(path)
    return found, readable, missed, readable / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phantoms", type=int, default=200, help="phantoms per modality")
    args = parser.parse_args()
    for modality in ("ct", "cxr"):
        scores, found = phantom_ious(modality, args.phantoms)
        print(f"{modality} phantoms: lungs found {found}/{args.phantoms}, mean IoU {scores.mean():.3f} "
              f"(median {np.median(scores):.3f}, min {scores.min():.3f})")
    for name, (relpath, modality) in REAL_SETS.items():
        manifest = SHARED / relpath
        if not manifest.is_file():
            print(f"{name}: skipped, {manifest} not found")
            continue
        found, readable, missed, speed = found_share(manifest, modality)
        print(f"{name} ({modality}): plausible lungs found in {found}/{readable} ({found / readable:.1%}), "
              f"{speed:.0f} images/s on one thread; not found: {', '.join(Path(m).name for m in missed[:5])}")


if __name__ == "__main__":
    main()
