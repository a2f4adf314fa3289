"""Issue 13 §3: the perceptual-hash distance within which `evaluate`/`adapt` treat an image as a run's own.

    nice python benchmarks/measure_fingerprints.py                 # ../shared/data/ucsd-ct, every image
    nice python benchmarks/measure_fingerprints.py --set cxr-dev   # the X-rays, patients = patient_group

Two distributions of the 256-bit pHash distance (covidscan.data.fingerprints.perceptual_hash) on every
image of a set (the threshold is chosen on the 746 ucsd-ct slices, checked on the 823 cxr-dev X-rays):
(1) each image against its own near-identical copies, decoded as covidscan decodes them (8-bit pixels + 1
gray level, JPEG re-encode at quality 90 and 75, resize by 0.9, 1.1 and 0.75); (2) every pair of images of
*distinct patients*, apart from the pairs ../shared/data/known-duplicates.csv lists.
A threshold between the copies' largest distance and the distinct pairs' smallest catches every copy and
refuses no other patient's image. Last, the same for two synthetic phantom sets of the same style (seeds 1
and 3): the data of the demo and the tests, whose distinct patients must not match either.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from covidscan.data.fingerprints import HASH_SIZE, MATCH_DISTANCE, nearest, perceptual_hash
from covidscan.data.synthetic import write_phantom_dataset
from covidscan.io import read_image, to_uint8

SHARED = Path(__file__).resolve().parents[2] / "shared"
SETS = {"ucsd-ct": ("labels.csv", "patient_id"), "cxr-dev": ("metadata.csv", "patient_group")}
"""Each set's table and the column whose values are patients."""


def _encode(pixels: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def variants(gray: np.ndarray) -> dict[str, bytes]:
    """Near-identical copies of an 8-bit image, as files a user could hold."""
    h, w = gray.shape

    def resized(f: float) -> bytes:
        return _encode(cv2.resize(gray, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA), "PNG")

    return {
        "gray+1": _encode(np.clip(gray.astype(np.int16) + 1, 0, 255).astype(np.uint8), "PNG"),
        "jpeg q90": _encode(gray, "JPEG", quality=90),
        "jpeg q75": _encode(gray, "JPEG", quality=75),
        "resize 0.9": resized(0.9),
        "resize 1.1": resized(1.1),
        "resize 0.75": resized(0.75),
    }


def _known_pairs(shared: Path, names: pd.Series) -> set[frozenset[int]]:
    """Row pairs of a set's table listed in known-duplicates.csv (by set, folder and file stem)."""
    known = pd.read_csv(shared / "data" / "known-duplicates.csv")
    index = {name: i for i, name in enumerate(names)}
    pairs = set()
    for row in known.itertuples():
        a = index.get(f"{row.set_a}/{Path(row.file_a).stem}")
        b = index.get(f"{row.set_b}/{Path(row.file_b).stem}")
        if a is not None and b is not None:
            pairs.add(frozenset((a, b)))
    return pairs


def phantom_distance() -> int:
    """Smallest distance between two phantom sets of one style (different seeds, so distinct patients)."""
    with tempfile.TemporaryDirectory() as tmp:
        sets = []
        for seed, n in ((1, 64), (3, 100)):
            manifest = write_phantom_dataset(Path(tmp) / str(seed), n=n, modality="ct", seed=seed,
                                             slices_per_patient=2)
            paths = pd.read_csv(manifest)["path"]
            sets.append(np.array([perceptual_hash(read_image(manifest.parent / p).pixels) for p in paths]))
    return int(nearest(sets[1], sets[0])[1].min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--set", choices=sorted(SETS), default="ucsd-ct")
    args = parser.parse_args()
    folder = args.shared / "data" / args.set
    csv, patient_column = SETS[args.set]
    table = pd.read_csv(folder / csv)
    names = table["original_relpath"].map(lambda p: f"{args.set}/{Path(p).with_suffix('')}")
    decoded = [read_image(folder / p).pixels for p in table["relpath"]]
    bits = np.array([perceptual_hash(p) for p in decoded])

    copies: dict[str, list[int]] = {}
    for pixels, own in zip(decoded, bits, strict=True):
        for kind, data in variants(to_uint8(pixels)).items():
            distance = int(np.count_nonzero(perceptual_hash(read_image(data).pixels) != own))
            copies.setdefault(kind, []).append(distance)
    print(f"{len(decoded)} {args.set} images; pHash distance (bits of {HASH_SIZE**2}) of each to its copy:")
    for kind, d in copies.items():
        print(f"  {kind:<12} median {np.median(d):4.1f}  p99 {np.percentile(d, 99):4.1f}  max {max(d)}")

    patients = table[patient_column].to_numpy()
    known = _known_pairs(args.shared, names)
    packed = np.packbits(bits, axis=1)
    pairs = []
    for i in range(len(bits)):
        dist = np.unpackbits(packed[i] ^ packed[i + 1 :], axis=1).sum(axis=1)
        for j in np.flatnonzero(patients[i + 1 :] != patients[i]) + i + 1:
            pairs.append((int(dist[j - i - 1]), names[i], names[j], frozenset((i, int(j))) in known))
    pairs.sort()
    print(f"{len(pairs)} pairs of distinct patients' images; the closest (bits, a, b, known duplicate?):")
    for pair in pairs[:8]:
        print(f"  {pair[0]:3d}  {pair[1]}  {pair[2]}  {'known' if pair[3] else 'NEW'}")
    unknown = [d for d, *_, listed in pairs if not listed]
    print(f"smallest distance between distinct patients' images not listed as duplicates: {min(unknown)}")
    _, nearest_other = nearest(bits, bits)  # sanity: every image is its own nearest (distance 0)
    assert not nearest_other.any()
    every_copy = np.concatenate([np.array(d) for d in copies.values()])
    print(f"MATCH_DISTANCE = {MATCH_DISTANCE}: copies caught {(every_copy <= MATCH_DISTANCE).sum()}/"
          f"{every_copy.size} (largest copy distance {every_copy.max()}); distinct patients' pairs matched "
          f"outside known duplicates: {sum(d <= MATCH_DISTANCE for d in unknown)}")
    print(f"phantoms (seed 1, 64 images vs seed 3, 100 images): smallest distance {phantom_distance()}")

if __name__ == "__main__":
    main()
