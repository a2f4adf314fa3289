"""Contact sheet of lung crops: a quick visual check that the lung finder works on a dataset."""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from covidscan.errors import ConfigError, CovidscanError, ManifestError, StorageError
from covidscan.io import IMAGE_SUFFIXES, read_image
from covidscan.outputs import check_output
from covidscan.preprocess.config import PreprocessConfig
from covidscan.preprocess.lungs import MODALITIES
from covidscan.preprocess.lungseg import lung_segmenter
from covidscan.preprocess.pipeline import preprocess

SHEET_COLUMNS = 8
TILE_INCHES = 2.0
TILE_DPI = 100


def _sample(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """Seeded sample of ``n`` rows, split as evenly as the data allow between the labels."""
    rng = np.random.default_rng(seed)
    groups = {label: rng.permutation(rows.index.to_numpy()) for label, rows in df.groupby("label", sort=True)}
    picked: list = []
    while len(picked) < min(n, len(df)):  # round robin over labels: both classes even when one is short
        for label in groups:
            if len(groups[label]) and len(picked) < n:
                picked.append(groups[label][0])
                groups[label] = groups[label][1:]
    return df.loc[picked]


def preview_sheet(
    manifest_df: pd.DataFrame,
    out_png: str | os.PathLike[str],
    *,
    n: int = 32,
    modality: str = "ct",
    seed: int = 0,
    cfg: PreprocessConfig | None = None,
) -> dict:
    """Draw ``n`` sampled images (both classes) with lung outline (green) and crop box (yellow) into a PNG.

    Images go through :func:`~covidscan.preprocess.preprocess` with ``cfg`` (default: CLAHE and the lung
    crop for ``modality``), exactly as training and prediction prepare them; in the masked mode what the
    mask sets to a constant is tinted red.
    Returns ``{"n", "found", "found_share", "unreadable", "reasons", "path"}``.
    """
    missing = {"path", "label"} - set(manifest_df.columns)
    if missing:
        columns = ", ".join(sorted(missing))
        raise ManifestError(f"manifest lacks column(s) {columns}; load it with covidscan.data.read_manifest")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"preview n must be a whole number >= 1, got {n!r}")
    if modality not in MODALITIES:
        raise ConfigError(f"preview modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    if manifest_df.empty:
        raise ManifestError("manifest has no rows to preview")
    check_output(out_png, manifest_df["path"])  # a sheet never replaces one of the images it shows
    if Path(out_png).suffix.lower() not in ("", ".png"):
        raise ConfigError(f"the preview sheet is a PNG image: name it .png, not {Path(out_png).name}")
    cfg = (cfg or PreprocessConfig()).model_copy(update={"modality": modality, "lung_crop": True})
    if cfg.mask_outside_lungs and modality == "cxr":
        lung_segmenter(cfg.lung_model)  # a missing lung model is one clear error, not one per tile
    rows = _sample(manifest_df, n, seed)
    cols = min(SHEET_COLUMNS, len(rows))
    nrows = math.ceil(len(rows) / cols)
    fig = Figure(figsize=(cols * TILE_INCHES, nrows * TILE_INCHES * 1.1), dpi=TILE_DPI)
    FigureCanvasAgg(fig)
    reasons: Counter[str] = Counter()
    found = unreadable = 0
    for k, (path, label) in enumerate(zip(rows["path"], rows["label"], strict=True)):
        ax = fig.add_subplot(nrows, cols, k + 1)
        ax.set_axis_off()
        try:
            result = preprocess(read_image(path).pixels, cfg)
        except CovidscanError as exc:
            unreadable += 1
            reasons["unreadable"] += 1
            ax.set_title(f"{label} · unreadable", fontsize=7, color="red")
            ax.text(0.5, 0.5, str(exc)[:60], fontsize=5, ha="center", va="center", wrap=True)
            continue
        crop, image = result.crop, result.enhanced  # lung_crop is on, so crop is set
        if result.unmasked is None:
            ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="antialiased")
        else:  # masked mode: the image before masking, what the mask took away tinted red
            ax.imshow(result.unmasked, cmap="gray", vmin=0, vmax=1, interpolation="antialiased")
            ax.imshow(np.ma.masked_where(image == result.unmasked, np.ones_like(image)), cmap="Reds",
                      vmin=0, vmax=1, alpha=0.35, interpolation="nearest")
        if crop is not None and crop.found:
            found += 1
            ax.contour(crop.mask, levels=[0.5], colors="lime", linewidths=0.8)
            y0, x0, y1, x1 = crop.bbox
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="yellow", lw=1))
        else:
            reasons[crop.reason if crop is not None else "no crop"] += 1
        status, color = ("found", "black") if crop is not None and crop.found else ("NOT found", "red")
        ax.set_title(f"{label} · {status}", fontsize=7, color=color)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.97, wspace=0.04, hspace=0.15)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out, dpi=TILE_DPI, format="png")  # format given: matplotlib never renames the file
    except OSError as exc:
        raise StorageError(f"cannot write the preview sheet {out}: {exc.strerror or exc}") from None
    return {
        "n": len(rows),
        "found": found,
        "found_share": found / len(rows),
        "unreadable": unreadable,
        "reasons": dict(reasons),
        "path": str(out),
    }


def format_preview(stats: dict) -> str:
    """One-paragraph human summary of :func:`preview_sheet`'s result."""
    lines = [f"lungs found in {stats['found']} of {stats['n']} images ({stats['found_share']:.0%}); "
             f"sheet: {stats['path']}"]
    lines += [f"  not found ({count}x): {reason}" for reason, count in sorted(stats["reasons"].items())]
    return "\n".join(lines)


def preview_lung_model(
    paths: list[str | os.PathLike[str]],
    out_png: str | os.PathLike[str],
    *,
    weights: str | os.PathLike[str] | None = None,
    n: int = 32,
    seed: int = 0,
) -> dict:
    """:func:`preview_sheet` of chest X-rays (files, or folders searched for image files) masked with the lung
    U-Net of ``weights`` (default: its default location): to check the segmentation by eye."""
    files: list[str] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(str(path))
    if not files:
        raise ManifestError(f"no images to preview in {', '.join(map(str, paths)) or 'the arguments'}")
    cfg = PreprocessConfig(modality="cxr", mask_outside_lungs=True,
                           lung_model=None if weights is None else str(weights))
    sheet = pd.DataFrame({"path": files, "label": "x-ray"})
    return preview_sheet(sheet, out_png, n=min(n, len(files)), modality="cxr", seed=seed, cfg=cfg)
