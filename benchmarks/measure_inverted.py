"""How often the CT ``inverted`` warning fires: the previous corner rule against the gate's lung-zone rule.

Run on the real CT sets in ../shared, as given (correct gray scale: every firing is a false alarm) and with
every image inverted (every firing is a hit): ``python benchmarks/measure_inverted.py [--shared DIR]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from covidscan.io import QualityLimits, list_images, read_image
from covidscan.io.quality import inverted_contrast

OLD_MARGIN = 0.35  # the previous rule: median of the corner patches (1/8 of each side) vs mean of the middle


def old_rule(pixels: np.ndarray) -> bool:
    """The corner rule the gate replaced: corners much brighter than the central half."""
    h, w = pixels.shape
    by, bx = max(1, h // 8), max(1, w // 8)
    corners = np.concatenate(
        [pixels[:by, :bx], pixels[:by, -bx:], pixels[-by:, :bx], pixels[-by:, -bx:]], axis=None
    )
    middle = pixels[h // 4 : h - h // 4, w // 4 : w - w // 4].mean()
    return float(np.median(corners)) - float(middle) > OLD_MARGIN


def new_rule(pixels: np.ndarray, margin: float) -> bool:
    """The gate's rule (see ``covidscan.io.quality.inverted_contrast``)."""
    lungs, middle = inverted_contrast(pixels)
    return lungs - middle > margin


def main() -> None:
    """Print, per set, how often each rule fires on the images as given and on their inverted copies."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    args = parser.parse_args()
    margin = QualityLimits().inverted_margin
    print("| set | images | old rule, as given | new rule, as given | old, inverted | new, inverted |")
    print("|---|---|---|---|---|---|")
    for name in ("ucsd-ct", "ct-ext-luna16"):
        counts = np.zeros(4, dtype=int)
        files = list_images(args.shared / "data" / name)
        for path in files:
            pixels = read_image(path).pixels
            flipped = 1 - pixels
            counts += [old_rule(pixels), new_rule(pixels, margin),
                       old_rule(flipped), new_rule(flipped, margin)]
        cells = " | ".join(f"{c} ({c / len(files):.1%})" for c in counts)
        print(f"| {name} | {len(files)} | {cells} |")


if __name__ == "__main__":
    main()
