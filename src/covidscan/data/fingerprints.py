"""Fingerprints of the images a run has seen: exact pixel hash and perceptual hash of every decoded image.

A run stores those of its training and validation images (``fingerprints.csv``, see
:mod:`covidscan.runs`), so that ``evaluate`` and ``adapt`` recognise the run's own images wherever they
now lie and however they were re-saved: the pixel hash (:func:`covidscan.io.pixel_hash`) catches the same
picture in any file or container, the perceptual hash (a 256-bit pHash of the 8-bit pixels) near-identical
copies: a gray-level shift, a JPEG re-encode, a small resize. pHash rather than the leakage audit's dhash:
on ucsd-ct it puts copies at most 4 bits from their original against 11 to 15 for dhash, and keeps
distinct phantoms 36 bits apart where dhash puts some at 11 (benchmarks/measure_fingerprints.py).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import imagehash
import numpy as np
import pandas as pd
from PIL import Image

from covidscan.errors import InputError
from covidscan.io import pixel_hash, read_image, to_uint8
from covidscan.outputs import csv_text, read_csv

if TYPE_CHECKING:
    from covidscan.preprocess import PreparedSet

HASH_SIZE = 16
"""pHash of 16x16 DCT coefficients = 256 bits."""
MATCH_DISTANCE = 14
"""Bits out of 256 within which an image counts as a copy of one the run has seen, measured with
benchmarks/measure_fingerprints.py: copies shifted by one gray level, re-encoded as JPEG (quality 90, 75)
or resized (0.75 to 1.1) lie at most 6 bits from their original on the 746 ucsd-ct slices and 8 on the 823
cxr-dev X-rays; distinct patients' images lie 44 bits apart or more on ucsd-ct (apart from the label
conflict of known-duplicates.csv, at 10), 22 on cxr-dev (two ieee8023 cases of one 83-year-old man from
Italy, likely the same patient), and distinct phantoms 36."""
COLUMNS = ("path", "split", "pixel_hash", "phash")
POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
"""Set bits of every byte value: Hamming distances of packed hashes by table look-up."""


def perceptual_hash(pixels: np.ndarray) -> np.ndarray:
    """The 256-bit pHash (bool vector) of a decoded gray image's 8-bit pixels."""
    return imagehash.phash(Image.fromarray(to_uint8(pixels)), hash_size=HASH_SIZE).hash.ravel()


def nearest(queries: np.ndarray, references: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``queries`` (bool bit matrix), the index of and Hamming distance to its nearest row
    of ``references``; distances are ``HASH_SIZE**2 + 1`` when there is no reference."""
    q, r = np.packbits(queries, axis=1), np.packbits(references, axis=1)
    index = np.zeros(len(q), dtype=np.int64)
    distance = np.full(len(q), HASH_SIZE**2 + 1, dtype=np.int64)
    if len(r) == 0:
        return index, distance
    block = max(1, (1 << 22) // max(1, r.size))  # keeps each XOR block around 4 MB
    for start in range(0, len(q), block):
        dist = POPCOUNT[q[start : start + block, None, :] ^ r[None, :, :]].sum(axis=2, dtype=np.int32)
        index[start : start + block] = dist.argmin(axis=1)
        distance[start : start + block] = dist.min(axis=1)
    return index, distance


def _resolved(path: str) -> str:
    return str(Path(path).resolve())


@dataclass(frozen=True)
class Fingerprints:
    """Where each seen image was (resolved path), its split, pixel hash and perceptual hash (N, 256)."""

    paths: list[str]
    splits: list[str]
    pixel_hashes: list[str]
    phashes: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def __add__(self, other: Fingerprints) -> Fingerprints:
        return Fingerprints(self.paths + other.paths, self.splits + other.splits,
                            self.pixel_hashes + other.pixel_hashes,
                            np.concatenate([self.phashes, other.phashes]))

    @classmethod
    def of(cls, prepared: PreparedSet, split: str) -> Fingerprints:
        """The fingerprints of a set prepared with ``fingerprint=True``, every image in ``split``."""
        if prepared.pixel_hashes is None or prepared.perceptual_hashes is None:
            raise ValueError("prepare the set with fingerprint=True to fingerprint it")
        return cls([_resolved(p) for p in prepared.paths], [split] * len(prepared),
                   [str(h) for h in prepared.pixel_hashes], prepared.perceptual_hashes)

    @classmethod
    def of_files(cls, paths: Sequence[str], splits: Sequence[str], *, workers: int = 2) -> Fingerprints:
        """Decode ``paths`` and fingerprint them; files that cannot be read are left out (a training file
        since deleted or damaged cannot match anything)."""

        def decode(path: str) -> tuple[str, np.ndarray] | None:
            try:
                pixels = read_image(path).pixels
            except InputError:
                return None
            return pixel_hash(pixels), perceptual_hash(pixels)

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            found = list(pool.map(decode, paths))
        kept = [(_resolved(path), str(split), *hashes)
                for path, split, hashes in zip(paths, splits, found, strict=True) if hashes is not None]
        bits = np.array([k[3] for k in kept], dtype=bool).reshape(len(kept), HASH_SIZE**2)
        return cls([k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept], bits)

    def to_csv(self) -> str:
        """The CSV text of ``fingerprints.csv`` (phash as 64 hex digits, bits in row-major order)."""
        hexes = [row.tobytes().hex() for row in np.packbits(self.phashes, axis=1)]
        frame = pd.DataFrame({"path": self.paths, "split": self.splits, "pixel_hash": self.pixel_hashes,
                              "phash": hexes}, columns=list(COLUMNS))
        return csv_text(frame)  # the one CSV writer: escaped cells, file names that are not UTF-8 kept

    @classmethod
    def from_csv(cls, data: bytes) -> Fingerprints:
        """Parse the bytes of a :meth:`to_csv` file; ValueError (or KeyError) when it is not that."""
        frame = read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
        missing = [c for c in COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"missing columns {missing}")
        packed = [np.frombuffer(bytes.fromhex(h), dtype=np.uint8) for h in frame["phash"]]
        if any(p.size != HASH_SIZE**2 // 8 for p in packed):
            raise ValueError(f"a phash is not {HASH_SIZE**2} bits")
        bits = np.unpackbits(np.array(packed, dtype=np.uint8).reshape(len(packed), -1), axis=1).astype(bool)
        return cls(frame["path"].tolist(), frame["split"].tolist(), frame["pixel_hash"].tolist(), bits)

    def matches(self, prepared: PreparedSet, *, max_distance: int = MATCH_DISTANCE) -> list[dict[str, Any]]:
        """The images of ``prepared`` (prepared with ``fingerprint=True``) that are among these: same path,
        same decoded pixels, or a perceptual hash within ``max_distance`` bits. One dict per image found:
        ``path``, ``split``, ``match`` (path, pixels or near), ``run_path`` and ``distance`` (bits)."""
        if prepared.pixel_hashes is None or prepared.perceptual_hashes is None:
            raise ValueError("prepare the set with fingerprint=True to compare it")
        by_path = {p: i for i, p in enumerate(self.paths)}
        by_pixels = {h: i for i, h in enumerate(self.pixel_hashes)}
        near, distance = nearest(prepared.perceptual_hashes, self.phashes)
        found = []
        for k, (path, digest) in enumerate(zip(prepared.paths, prepared.pixel_hashes, strict=True)):
            if (i := by_path.get(_resolved(path))) is not None:
                match = "path"
            elif (i := by_pixels.get(str(digest))) is not None:
                match = "pixels"
            elif distance[k] <= max_distance:
                i, match = int(near[k]), "near"
            else:
                continue
            found.append({"path": path, "split": self.splits[i], "match": match, "run_path": self.paths[i],
                          "distance": int(distance[k])})
        return found


MATCH_WORDS = {"path": "same path", "pixels": "same pixels",
               "near": f"near-identical pixels, perceptual hash within {MATCH_DISTANCE}/{HASH_SIZE**2} bits"}


def describe_overlap(overlap: list[dict[str, Any]]) -> str:
    """``"3 in train (same pixels), 1 in val (near-identical ...); e.g. A = B [train]"`` for a message."""
    counts = pd.DataFrame(overlap).groupby(["split", "match"], sort=False).size()
    detail = ", ".join(f"{k} in {split} ({MATCH_WORDS[match]})" for (split, match), k in counts.items())
    first = overlap[0]
    same = "~" if first["match"] == "near" else "="
    return f"{detail}; e.g. {first['path']} {same} {first['run_path']} [{first['split']}]"


__all__ = ["HASH_SIZE", "MATCH_DISTANCE", "Fingerprints", "describe_overlap", "nearest", "perceptual_hash"]
