"""Fit the content classifier (covidscan.io.content) and measure its refusals on every real image.

    PYTHONPATH=src python benchmarks/measure_content.py [--shared ../shared] [--fit]

``--fit`` refits the two-layer perceptron and writes ``src/covidscan/io/content_model.json`` (weights,
``min_p`` and the figures below); without it the shipped model is only measured. Training data: CT and
X-ray phantoms (covidscan.data.synthetic, both sites, augmented), generated pictures that are neither
(photos, screenshots, documents, charts, framed and patterned images), and the training part of the real
development sets (ucsd-ct ``official_split == train``, cxr-dev patient groups with an even hash). Every
real image in ``../shared/data`` is then read and judged through the quality gate (``assess``) for the
right modality (false refusals: must be 0) and for the other one (true refusals), as are fresh phantoms
and negatives drawn with other seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import string
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from sklearn.neural_network import MLPClassifier

from covidscan.data.synthetic import SITES, make_phantom
from covidscan.io import ImageMeta, LoadedImage, assess, read_image
from covidscan.io.base import rgb_to_gray
from covidscan.io.content import (
    CONTENT_KINDS,
    MODEL_FILE,
    ContentModel,
    colour_fraction,
    content_features,
    content_model,
)

REPO = Path(__file__).resolve().parents[1]
MIN_P = 0.02
"""Refuse below this probability of the run's own kind, unless a real image of that kind scores lower
(then half the lowest real score): the figures are measured at the value shipped."""
REAL_SETS = {"ucsd-ct": "ct", "ct-ext-luna16": "ct", "cxr-dev": "cxr", "cxr-ext-figure1": "cxr"}
RAW_KINDS = {"ucsd-ct-covid": "ct", "ucsd-ct-non_covid": "ct", "cxr-dev-covid": "cxr"}
DICOM_KINDS = {"CT_small.dcm": "ct", "RG1_J2KR.dcm": "cxr"}
OTHER = {"ct": "cxr", "cxr": "ct"}


# ------------------------------------------------------------------ generated pictures that are neither
def _noise_field(rng: np.random.Generator, h: int, w: int, exponent: float) -> np.ndarray:
    """1/f^exponent noise in [0, 1]: the spectrum of natural photos."""
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    white = rng.normal(size=(h, w)) + 1j * rng.normal(size=(h, w))
    spectrum = white / np.maximum(np.hypot(fx, fy), 1 / h) ** (exponent / 2)
    field = np.fft.ifft2(spectrum).real
    return ((field - field.min()) / (np.ptp(field) + 1e-9)).astype(np.float32)


def photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A photo-like colour picture: textured background, lit objects with edges, a light gradient."""
    base = np.stack([_noise_field(rng, h, w, rng.uniform(1.5, 3.2)) for _ in range(3)], axis=2)
    mix = rng.dirichlet(np.ones(3), size=3)
    img = base @ mix * rng.uniform(0.4, 1.0) + rng.uniform(0, 0.5, 3)
    for _ in range(rng.integers(1, 7)):
        mask = np.zeros((h, w), np.float32)
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(w // 12, w // 2)), int(rng.integers(h // 12, h // 2)))
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        texture = _noise_field(rng, h, w, rng.uniform(1.0, 2.5))[..., None]
        colour = rng.uniform(0, 1, 3) * (0.6 + 0.8 * texture)
        img = img * (1 - mask[..., None]) + colour * mask[..., None]
    light = np.linspace(rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.2), h)[:, None, None]
    img = cv2.GaussianBlur(img * light, (0, 0), rng.uniform(0.3, 2.0))
    return np.clip(img, 0, 1).astype(np.float32)


def _text(rng: np.random.Generator, n: int) -> str:
    return "".join(rng.choice(list(string.ascii_letters + string.digits + "     .,:"), n))


def _rgb(rng: np.random.Generator) -> list[int]:
    return [int(v) for v in rng.integers(0, 256, 3)]


def screenshot(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A desktop or web page: flat panels, bars, buttons and lines of text, light or dark theme."""
    dark = rng.random() < 0.4
    img = np.full((h, w, 3), rng.integers(10, 50) if dark else rng.integers(215, 256), np.uint8)
    for _ in range(rng.integers(2, 10)):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        x1, y1 = int(rng.integers(x0 + 8, w + 1)), int(rng.integers(y0 + 8, h + 1))
        cv2.rectangle(img, (x0, y0), (x1, y1), _rgb(rng), -1 if rng.random() < 0.6 else 1)
    ink = (230, 230, 230) if dark else (25, 25, 25)
    scale = rng.uniform(0.25, 0.7)
    for y in range(int(rng.integers(8, 20)), h, int(rng.integers(12, 30))):
        if rng.random() < 0.8:
            cv2.putText(img, _text(rng, 60), (int(rng.integers(0, w // 4)), y), int(rng.integers(0, 8)),
                        scale, ink, 1, cv2.LINE_AA)
    return img / np.float32(255)


def document(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A scanned or rendered page: paragraphs of text, maybe a table, on white."""
    img = np.full((h, w), rng.integers(215, 256), np.uint8)
    margin = int(rng.integers(4, w // 8))
    for y in range(margin + 10, h - margin, int(rng.integers(10, 22))):
        cv2.putText(img, _text(rng, 80), (margin, y), int(rng.integers(0, 8)), rng.uniform(0.25, 0.5),
                    int(rng.integers(0, 80)), 1, cv2.LINE_AA)
    if rng.random() < 0.3:
        for x in np.linspace(margin, w - margin, int(rng.integers(3, 7))):
            cv2.line(img, (int(x), margin), (int(x), h - margin), 0, 1)
    return img / np.float32(255)


def chart(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A plot: axes, curves or bars, labels."""
    img = np.full((h, w, 3), rng.integers(230, 256), np.uint8)
    cv2.line(img, (w // 10, h - h // 10), (w - 5, h - h // 10), (0, 0, 0), 1)
    cv2.line(img, (w // 10, 5), (w // 10, h - h // 10), (0, 0, 0), 1)
    for _ in range(rng.integers(1, 5)):
        if rng.random() < 0.5:
            xs = np.linspace(w // 10, w - 5, 30)
            ys = h // 2 + np.cumsum(rng.normal(0, h / 30, 30))
            cv2.polylines(img, [np.stack([xs, np.clip(ys, 0, h - 1)], 1).astype(np.int32)], False,
                          _rgb(rng), int(rng.integers(1, 3)))
        else:
            x = int(rng.integers(w // 10, w - 20))
            cv2.rectangle(img, (x, int(rng.integers(10, h - h // 10))), (x + 15, h - h // 10), _rgb(rng), -1)
    cv2.putText(img, _text(rng, 20), (w // 8, 15), 0, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return img / np.float32(255)


def framed(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A flat picture (black most often) inside a frame, sometimes with a caption or a second frame."""
    fill = 0 if rng.random() < 0.6 else int(rng.integers(0, 256))
    img = np.full((h, w), fill, np.uint8)
    for _ in range(rng.integers(1, 3)):
        inset, width = int(rng.integers(0, min(h, w) // 6)), int(rng.integers(1, min(h, w) // 8))
        level = 255 if rng.random() < 0.6 else int(rng.integers(0, 256))
        cv2.rectangle(img, (inset, inset), (w - 1 - inset, h - 1 - inset), level, width)
    if rng.random() < 0.3:
        cv2.putText(img, _text(rng, 12), (w // 4, h // 2), 0, 0.5, 255 - fill, 1, cv2.LINE_AA)
    return img / np.float32(255) + rng.normal(0, rng.uniform(0, 0.02), img.shape).astype(np.float32)


def pattern(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Gradients, stripes, checkerboards, noise and simple shapes."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = rng.integers(0, 6)
    if kind == 0:
        angle = rng.uniform(0, np.pi)
        img = np.cos(angle) * x / w + np.sin(angle) * y / h
    elif kind == 1:
        img = np.hypot(x - rng.uniform(0, w), y - rng.uniform(0, h)) / max(h, w)
    elif kind == 2:
        period = rng.uniform(4, 40)
        img = ((x // period + y // period) % 2).astype(np.float32)
    elif kind == 3:
        img = np.sin(x / rng.uniform(2, 30) + rng.uniform(0, 6)) * 0.5 + 0.5
    elif kind == 4:
        img = rng.random((h, w)).astype(np.float32) if rng.random() < 0.5 else rng.normal(0.5, 0.2, (h, w))
    else:
        img = np.full((h, w), rng.uniform(0, 1), np.float32)
        for _ in range(rng.integers(1, 6)):
            centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.circle(img, centre, int(rng.integers(5, min(h, w) // 2)), float(rng.uniform(0, 1)), -1)
    img = np.asarray(img, np.float32)
    return (img - img.min()) / (np.ptp(img) + 1e-9)


NEGATIVES: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "photo": photo, "screenshot": screenshot, "document": document, "chart": chart, "framed": framed,
    "pattern": pattern,
}


def _loaded(pixels: np.ndarray, name: str, colour: float = 0.0) -> LoadedImage:
    meta = ImageMeta(path=Path(name), format="PNG", mode="L", original_size=pixels.shape, modality=None,
                     patient_id=None, colour=colour)
    return LoadedImage(pixels=np.clip(pixels, 0, 1).astype(np.float32), meta=meta)


def negatives(seed: int, n: int) -> Iterator[tuple[str, LoadedImage]]:
    """``n`` generated pictures, as read_image would give them (colour ones as luminance plus colour)."""
    rng = np.random.default_rng(seed)
    names = list(NEGATIVES)
    for i in range(n):
        kind = names[i % len(names)]
        h, w = (int(v) for v in rng.integers(96, 400, 2))
        img = NEGATIVES[kind](rng, h, w)
        if img.ndim == 3:
            yield kind, _loaded(rgb_to_gray(img, 1.0), f"{kind}-{i}.png", colour_fraction(img, 1.0))
        else:
            yield kind, _loaded(img, f"{kind}-{i}.png")


# ------------------------------------------------------------------ chest images, augmented
def augment(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What users do to chest images: crop, zoom, flip, gamma, invert, downscale."""
    h, w = pixels.shape
    if rng.random() < 0.5:
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        pixels = pixels[y0 : y0 + ch, x0 : x0 + cw]
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    pixels = np.clip(pixels, 0, 1) ** rng.uniform(0.6, 1.6)
    if rng.random() < 0.2:
        pixels = 1 - pixels
    if rng.random() < 0.3:
        side = int(rng.integers(48, 160))
        pixels = cv2.resize(np.ascontiguousarray(pixels, np.float32), (side, side),
                            interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(pixels, np.float32)


def phantoms(kind: str, seed: int, n: int) -> Iterator[np.ndarray]:
    """``n`` phantoms of ``kind`` (both sites, COVID or not, 64..384 px)."""
    rng = np.random.default_rng(seed)
    sites = list(SITES)
    for i in range(n):
        size = int(rng.choice([64, 128, 256, 384]))
        yield make_phantom(seed * 100_000 + i, modality=kind, covid=bool(i % 2), size=size,
                           site=sites[i % len(sites)]).image


def real_images(data: Path) -> Iterator[tuple[str, str, Path, bool]]:
    """(set, kind, path, in the fitting split) for every real image in ../shared/data."""
    for name, kind in REAL_SETS.items():
        tables = [pd.read_csv(p) for p in sorted((data / name).glob("*.csv"))]
        rows = pd.concat([t for t in tables if "relpath" in t.columns]).set_index("relpath")
        for path in sorted((data / name).rglob("*.png")):
            row = rows.loc[path.relative_to(data / name).as_posix()]
            if name == "ucsd-ct":
                train = row["official_split"] == "train"
            elif name == "cxr-dev":
                train = zlib.crc32(str(row["patient_group"]).encode()) % 2 == 0
            else:
                train = False
            yield name, kind, path, bool(train)
    for folder, kind in RAW_KINDS.items():
        for path in sorted((data / "raw-formats" / folder).iterdir()):
            yield "raw-formats", kind, path, False
    for file, kind in DICOM_KINDS.items():
        yield "dicom", kind, data / "dicom" / file, False


# ------------------------------------------------------------------ fit and measure
def fit(data: Path) -> ContentModel:
    """Fit the perceptron on phantoms, generated negatives and the real fitting split."""
    rng = np.random.default_rng(0)
    rows: list[np.ndarray] = []
    labels: list[int] = []

    def add(pixels: np.ndarray, kind: str, copies: int = 1) -> None:
        for _ in range(copies):
            varied = copies > 1 or rng.random() < 0.7
            rows.append(content_features(augment(pixels, rng) if varied else pixels))
            labels.append(CONTENT_KINDS.index(kind))

    for kind in ("ct", "cxr"):
        for pixels in phantoms(kind, 1 if kind == "ct" else 2, 600):
            add(pixels, kind)
    for _, kind, path, train in real_images(data):
        if train:
            add(read_image(path).pixels, kind, copies=2)
    for _, loaded in negatives(10, 2400):
        rows.append(content_features(loaded.pixels))
        labels.append(CONTENT_KINDS.index("other"))
    x, y = np.stack(rows).astype(np.float64), np.asarray(labels)
    centre, scale = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
    mlp = MLPClassifier(hidden_layer_sizes=(24,), alpha=1e-2, max_iter=600, random_state=0)
    mlp.fit((x - centre) / scale, y)
    print(f"fitted on {len(y)} images: " + ", ".join(f"{k} {int((y == i).sum())}"
                                                     for i, k in enumerate(CONTENT_KINDS)))
    return ContentModel(centre, scale, tuple(mlp.coefs_), tuple(mlp.intercepts_), MIN_P)


def refused(loaded: LoadedImage, modality: str) -> bool:
    """Whether the quality gate refuses the image for ``modality`` as ``wrong_content``."""
    return "wrong_content" in assess(loaded, modality).codes


def write(model: ContentModel, **extra: object) -> None:
    """Ship ``model`` (the gate reads it from the package from now on)."""
    out = REPO / "src" / "covidscan" / "io" / MODEL_FILE
    out.write_text(json.dumps(model.to_dict(**extra), separators=(",", ":")) + "\n", encoding="utf-8")
    content_model.cache_clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(os.environ.get("COVIDSCAN_SHARED",
                                                                          REPO.parent / "shared")))
    parser.add_argument("--fit", action="store_true", help="refit and write the shipped model")
    args = parser.parse_args()
    data = args.shared / "data"
    if not data.is_dir():
        parser.error(f"no real data at {data}: pass --shared PATH (the folder holding data/)")
    real = [(name, kind, read_image(path), train) for name, kind, path, train in real_images(data)]
    model = fit(data) if args.fit else content_model()
    own = [float(model.proba(content_features(img.pixels))[0][CONTENT_KINDS.index(kind)])
           for _, kind, img, _ in real if img.meta.format != "DICOM"]
    if args.fit:
        model = ContentModel(model.centre, model.scale, model.weights, model.biases,
                             min(MIN_P, min(own) / 2))
        write(model)
    figures: dict[str, dict[str, str]] = {}
    for name in [*REAL_SETS, "raw-formats", "dicom"]:
        group = [(kind, img, train) for n, kind, img, train in real if n == name]
        false = sum(refused(img, kind) for kind, img, _ in group)
        true = sum(refused(img, OTHER[kind]) for kind, img, _ in group)
        figures[name] = {"false_refusals": f"{false}/{len(group)}",
                         "refused_for_the_other_modality": f"{true}/{len(group)}",
                         "not_fitted_on": str(sum(not train for _, _, train in group))}
    for kind in ("ct", "cxr"):
        rng = np.random.default_rng(7)
        fresh = [_loaded(augment(p, rng), f"{kind}-phantom.png")
                 for p in phantoms(kind, 50 if kind == "ct" else 60, 200)]
        false = sum(refused(img, kind) for img in fresh)
        true = sum(refused(img, OTHER[kind]) for img in fresh)
        figures[f"{kind}-phantoms"] = {"false_refusals": f"{false}/{len(fresh)}",
                                       "refused_for_the_other_modality": f"{true}/{len(fresh)}"}
    fresh_negatives = list(negatives(99, 600))
    for kind in NEGATIVES:
        group = [img for k, img in fresh_negatives if k == kind]
        figures[f"generated-{kind}"] = {
            f"refused_for_{m}": f"{sum(refused(img, m) for img in group)}/{len(group)}" for m in ("ct", "cxr")
        }
    print(f"min_p {model.min_p:.4g}; lowest probability of their own kind among real images {min(own):.4g}")
    for name, row in figures.items():
        print(f"{name:22s} " + "  ".join(f"{k} {v}" for k, v in row.items()))
    if args.fit:
        write(model, measured=figures, command="PYTHONPATH=src python benchmarks/measure_content.py --fit")


if __name__ == "__main__":
    main()
