"""Leakage and shortcut audit of a manifest: patients across splits, duplicates, per-class differences."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from covidscan.data.checks import label_problems, mixed_label_patients
from covidscan.data.fingerprints import POPCOUNT
from covidscan.errors import ImageReadError, ImageRefusedError, InputError, ManifestError
from covidscan.io import QualityLimits, assess, pixel_hash, read_image, to_uint8
from covidscan.outputs import check_output, write_text

HASH_SIZE = 16
"""dhash of 16x16 = 256 bits, the size of known-duplicates.csv's ``dhash_hamming_of_256``."""
NEAR_THRESHOLD = 14
"""Bits out of 256. The 256-px copies in ../shared put the known ucsd-ct label conflict at 11 and true
duplicates up to 14 with unrelated images from 20 up, hence 14 rather than the 10 used on the originals."""
SHORTCUT_TVD = 0.3
"""A per-class feature is flagged when its class distributions differ by more (total-variation distance)."""
ORIGINAL_PATH_COLUMNS = ("original_relpath", "original_path", "original_filename")
_EXT_ALIASES = {"jpeg": "jpg", "tif": "tiff", "dicom": "dcm"}
_FACTS = ["exact", "dhash", "format", "mode", "height", "width"]


def _fingerprint(path: str, modality: str | None, limits: QualityLimits | None) -> dict:
    """Decode one image: exact pixel hash, 256-bit dhash, the file facts a model could exploit, the gate."""
    image = read_image(path, limits=limits)
    pixels = to_uint8(image.pixels)
    height, width = image.meta.original_size
    quality = assess(image, modality, limits)
    return {
        "refusals": quality.refusals,
        "warnings": quality.warnings,
        "exact": pixel_hash(image.pixels),
        "dhash": imagehash.dhash(Image.fromarray(pixels), hash_size=HASH_SIZE).hash.ravel(),
        "format": image.meta.format,
        "mode": image.meta.mode,
        "height": int(height),
        "width": int(width),
    }


def _fingerprints(
    paths: list[str], progress: bool, modality: str | None, limits: QualityLimits | None
) -> Iterator[dict | InputError]:
    """Fingerprints in order; decoding runs in threads (OpenCV/PIL release the GIL)."""

    def safe(path: str) -> dict | InputError:
        try:
            return _fingerprint(path, modality, limits)
        except InputError as exc:  # unreadable, or refused from its header before decoding
            return exc

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = pool.map(safe, paths)
        yield from tqdm(results, total=len(paths), desc="audit", unit="img", disable=not progress)


def hamming_pairs(bits: np.ndarray, threshold: int) -> list[tuple[int, int, int]]:
    """All pairs ``(i, j, distance)`` with ``i < j`` of rows of a boolean bit matrix within ``threshold``.

    Bits are packed into bytes, XOR-ed block by block against all rows and counted with a popcount table,
    so thousands of 256-bit hashes take well under a second.
    """
    packed = np.packbits(np.asarray(bits, dtype=bool), axis=1)
    n, width = packed.shape
    block = max(1, (1 << 22) // max(1, n * width))  # keeps each XOR block around 4 MB
    pairs = []
    for start in range(0, n, block):
        xor = packed[start : start + block, None, :] ^ packed[None, :, :]
        dist = POPCOUNT[xor].sum(axis=2, dtype=np.int32)
        rows, cols = np.nonzero(dist <= threshold)
        upper = cols > rows + start
        rows, cols = rows[upper], cols[upper]
        pairs += zip((rows + start).tolist(), cols.tolist(), dist[rows, cols].tolist(), strict=True)
    return pairs


def _column(df: pd.DataFrame, name: str) -> list[str | None]:
    """A column as strings with ``None`` for empty cells (all ``None`` when it is absent)."""
    if name not in df.columns:
        return [None] * len(df)
    return [None if pd.isna(v) or str(v).strip() == "" else str(v) for v in df[name]]


def _pair(rows: pd.DataFrame, i: int, j: int, distance: int) -> dict:
    a, b = rows.iloc[i], rows.iloc[j]
    cross_label = a["label"] != b["label"]
    cross_split = a["split"] is not None and b["split"] is not None and a["split"] != b["split"]
    return {
        "a": a["path"],
        "b": b["path"],
        "distance": int(distance),
        "label_a": a["label"],
        "label_b": b["label"],
        "split_a": a["split"],
        "split_b": b["split"],
        "same_patient": a["patient_id"] is not None and a["patient_id"] == b["patient_id"],
        "kind": "cross_label" if cross_label else "cross_split" if cross_split else "within",
        "cross_label": bool(cross_label),
        "cross_split": bool(cross_split),
    }


def _pair_summary(pairs: list[dict]) -> dict:
    # label conflicts first, then leaks across splits, closest first within each
    order = {"cross_label": 0, "cross_split": 1, "within": 2}
    pairs = sorted(pairs, key=lambda p: (order[p["kind"]], p["distance"], p["a"], p["b"]))
    return {
        "n_pairs": len(pairs),
        "n_cross_split": sum(p["cross_split"] for p in pairs),
        "n_cross_label": sum(p["cross_label"] for p in pairs),
        "pairs": pairs,
    }


def _tvd(table: pd.DataFrame) -> float | None:
    """Largest total-variation distance between the per-label distributions (rows = labels)."""
    if len(table) < 2:
        return None
    dist = table.div(table.sum(axis=1), axis=0).to_numpy()
    return max(0.5 * float(np.abs(p - q).sum()) for p, q in itertools.combinations(dist, 2))


def _shortcuts(facts: pd.DataFrame, df: pd.DataFrame) -> dict:
    """Per-class distributions of file properties; flag those that differ strongly between classes."""
    features = {"format": facts["format"], "mode": facts["mode"]}
    original = next((c for c in ORIGINAL_PATH_COLUMNS if c in df.columns), None)
    if original:
        ext = df.loc[facts.index, original].astype(str).str.rsplit(".", n=1).str[-1].str.lower()
        features["original_format"] = ext.replace(_EXT_ALIASES)
    if "source" in df.columns:
        features["source"] = df.loc[facts.index, "source"].astype(str)
    # pixel counts binned at the pooled quartiles: continuous sizes become comparable categories
    pixels = (facts["height"] * facts["width"]).to_numpy()
    edges = np.unique(np.quantile(pixels, [0.25, 0.5, 0.75]))
    bins = [f"<= {e:.0f} px" for e in edges] + [f"> {edges[-1]:.0f} px"]
    features["pixel_count"] = pd.Series(np.take(bins, np.searchsorted(edges, pixels)), index=facts.index)
    aspect = facts["width"] / facts["height"]
    features["aspect"] = pd.Series(
        np.select([aspect < 0.95, aspect > 1.05], ["portrait", "landscape"], "square"), index=facts.index
    )
    out = {}
    for name, values in features.items():
        table = pd.crosstab(facts["label"], values.astype(str))
        tvd = _tvd(table)
        out[name] = {
            "tvd": None if tvd is None else round(tvd, 3),
            "flagged": tvd is not None and tvd > SHORTCUT_TVD,
            "by_label": {
                str(label): {str(v): round(float(f), 3) for v, f in row[row > 0].items()}
                for label, row in table.div(table.sum(axis=1), axis=0).iterrows()
            },
        }
    sizes = {
        str(label): {
            "height": _stats(group["height"]),
            "width": _stats(group["width"]),
            "distinct_sizes": int(group[["height", "width"]].drop_duplicates().shape[0]),
        }
        for label, group in facts.groupby("label")
    }
    return {
        "tvd_threshold": SHORTCUT_TVD,
        "features": out,
        "flagged": [n for n, f in out.items() if f["flagged"]],
        "size_by_label": sizes,
    }


def _stats(values: pd.Series) -> dict:
    return {"min": int(values.min()), "median": float(values.median()), "max": int(values.max())}


def _balance(rows: pd.DataFrame) -> dict:
    """Images (and patients, when known) per split and label; ``"all"`` for the whole set."""
    parts = [("all", rows)] + [(str(s), g) for s, g in rows.dropna(subset=["split"]).groupby("split")]
    if rows["split"].isna().any() and rows["split"].notna().any():
        parts.append(("unassigned", rows[rows["split"].isna()]))
    out = {}
    for name, group in parts:
        counts = group["label"].value_counts().sort_index()
        out[name] = {"images": {str(k): int(v) for k, v in counts.items()}}
        if group["patient_id"].notna().any():
            patients = group.dropna(subset=["patient_id"]).groupby("label")["patient_id"].nunique()
            out[name]["patients"] = {str(k): int(v) for k, v in patients.items()}
    return out


def _patients_across_splits(rows: pd.DataFrame) -> dict | None:
    known = rows.dropna(subset=["patient_id", "split"])
    if known.empty:
        return None
    per = known.groupby("patient_id")["split"].agg(lambda s: dict(sorted(s.value_counts().items())))
    leaks = [
        {"patient_id": str(p), "splits": {k: int(v) for k, v in d.items()}}
        for p, d in per.items()
        if len(d) > 1
    ]
    return {"n_patients": int(rows["patient_id"].nunique()), "n_across_splits": len(leaks), "patients": leaks}


def _quality(rows: pd.DataFrame, results: list[dict | InputError], modality: str | None) -> dict:
    """The gate's verdicts: every refused file (header or pixels) and every doubtful one, with reasons."""
    refused, doubtful = [], []
    for (path, label), result in zip(rows[["path", "label"]].itertuples(index=False), results, strict=True):
        if isinstance(result, ImageRefusedError):
            refused.append({"path": path, "label": label, "reasons": list(result.reasons)})
        elif isinstance(result, dict) and result["refusals"]:
            refused.append({"path": path, "label": label, "reasons": list(result["refusals"])})
        elif isinstance(result, dict) and result["warnings"]:
            doubtful.append({"path": path, "label": label, "reasons": list(result["warnings"])})
    return {"modality": modality, "n_refused": len(refused), "n_doubtful": len(doubtful),
            "refused": refused, "doubtful": doubtful}


def _labels(rows: pd.DataFrame) -> dict:
    return {
        "images": {str(k): int(v) for k, v in rows["label"].value_counts().sort_index().items()},
        "mixed_label_patients": [{"patient_id": p, "labels": labels}
                                 for p, labels in mixed_label_patients(rows).items()],
        "problems": label_problems(rows),
    }


def audit_manifest(
    df: pd.DataFrame,
    *,
    near_threshold: int = NEAR_THRESHOLD,
    progress: bool = False,
    modality: str | None = None,
    limits: QualityLimits | None = None,
) -> dict:
    """Audit a manifest for leakage, shortcuts and unfit images; returns a JSON-able report.

    Reports patients in more than one split; exact duplicates (same decoded pixels) and near duplicates
    (256-bit dhash within ``near_threshold`` bits), each pair marked ``cross_label``, ``cross_split`` or
    ``within``; class balance per split; a one-class set and patients carrying both labels (``labels``);
    per-class differences in file format, colour mode, original file type, source and image size that a
    model could learn instead of the disease; and under ``quality`` every file the quality gate
    (``covidscan.io.assess`` for ``modality``: ``"ct"``, ``"cxr"`` or ``None``, either) refuses or doubts.
    """
    missing = [c for c in ("path", "label") if c not in df.columns]
    if missing:
        raise ManifestError(f"cannot audit: the manifest has no {', '.join(missing)} column")
    if df.empty:
        raise ManifestError("cannot audit an empty manifest")
    if not 0 <= near_threshold < HASH_SIZE * HASH_SIZE:
        raise ManifestError(f"near_threshold={near_threshold} must be between 0 and {HASH_SIZE**2 - 1} bits")
    df = df.reset_index(drop=True)  # positions index everything below
    rows = pd.DataFrame(
        {
            "path": [str(p) for p in df["path"]],
            "label": [str(v) for v in df["label"]],
            "split": _column(df, "split"),
            "patient_id": _column(df, "patient_id"),
        },
        dtype=object,
    )
    results = list(_fingerprints(rows["path"].tolist(), progress, modality, limits))
    unreadable = [{"path": str(r.path), "reason": r.reason} for r in results if isinstance(r, ImageReadError)]
    ok = [i for i, r in enumerate(results) if not isinstance(r, InputError)]
    facts = pd.DataFrame([results[i] for i in ok], index=ok, columns=_FACTS)
    facts["label"] = rows.loc[ok, "label"]
    readable = rows.loc[ok].reset_index(drop=True)

    exact_groups = facts.reset_index(drop=True).groupby("exact").indices.values()
    exact = [_pair(readable, i, j, 0) for g in exact_groups for i, j in itertools.combinations(sorted(g), 2)]
    hashes = np.stack(facts["dhash"].to_list()) if len(facts) else np.zeros((0, HASH_SIZE**2), bool)
    codes = facts["exact"].to_numpy()
    near = [
        _pair(readable, i, j, d) for i, j, d in hamming_pairs(hashes, near_threshold) if codes[i] != codes[j]
    ]
    report = {
        "n_images": len(rows),
        "n_decoded": len(facts),
        "near_threshold": int(near_threshold),
        "hash": f"dhash {HASH_SIZE}x{HASH_SIZE} ({HASH_SIZE**2} bits) of the decoded 8-bit pixels",
        "unreadable": unreadable,
        "class_balance": _balance(rows),
        "labels": _labels(rows),
        "quality": _quality(rows, results, modality),
        "patients": _patients_across_splits(rows),
        "exact_duplicates": _pair_summary(exact),
        "near_duplicates": _pair_summary(near),
        "shortcuts": _shortcuts(facts, df) if len(facts) else None,
    }
    report["warnings"] = _warnings(report)
    return report


def write_audit(report: dict, out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]]) -> Path:
    """Write the audit ``report`` as JSON to ``out``, which may not replace the manifest or an image audited
    (``inputs``); all or nothing."""
    return write_text(check_output(out, inputs), json.dumps(report, indent=2), "the audit ")


def _warnings(report: dict) -> list[str]:
    """One line per problem found, most serious first."""
    out = list(report["labels"]["problems"])
    for key, what in (("exact_duplicates", "exact-duplicate"), ("near_duplicates", "near-duplicate")):
        dup = report[key]
        if dup["n_cross_label"]:
            out.append(f"{dup['n_cross_label']} {what} pairs have different labels (label conflict)")
        if dup["n_cross_split"]:
            out.append(f"{dup['n_cross_split']} {what} pairs cross splits (test images seen in training)")
    patients = report["patients"]
    if patients and patients["n_across_splits"]:
        out.append(f"{patients['n_across_splits']} patients have images in more than one split")
    balance = report["class_balance"]
    labels = set(balance["all"]["images"])
    for split, counts in balance.items():
        if split not in ("all", "unassigned") and labels - set(counts["images"]):
            out.append(f"split {split} has no {', '.join(sorted(labels - set(counts['images'])))} images")
    shortcuts = report["shortcuts"] or {"flagged": []}
    for name in shortcuts["flagged"]:
        tvd = shortcuts["features"][name]["tvd"]
        out.append(f"shortcut risk: {name} differs between classes (TVD {tvd:.2f} > {SHORTCUT_TVD})")
    if report["unreadable"]:
        out.append(f"{len(report['unreadable'])} images could not be read")
    quality = report["quality"]
    if quality["n_refused"]:
        first = quality["refused"][0]
        out.append(f"{quality['n_refused']} images are refused by the quality gate (first: {first['path']}: "
                   f"{first['reasons'][0]})")
    if quality["n_doubtful"]:
        out.append(f"{quality['n_doubtful']} images are doubtful (quality warnings)")
    return out


def _clip(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _probe_lines(probe: dict) -> list[str]:
    """The ``probe`` section (``covidscan.evaluation.probe.add_probe``) in plain text."""

    def auc(entry: dict) -> str:
        low, high = entry["ci95"]
        return f"{entry['value']:.3f}" + ("" if low is None else f" (95% CI {low:.3f} - {high:.3f})")

    left_out = ", ".join(f"{probe[f'n_{s}']} {s.replace('_', ' ')}" for s in ("unreadable", "refused"))
    return [
        f"Shortcut probe (linear probe on pooled {probe['backbone']} features, {probe['folds']}-fold "
        f"cross-validation grouped by {probe['unit']}, {probe['mask_method']} lung masks; "
        f"{probe['n_used']} of {probe['n_images']} images):",
        f"  outside the lungs only  ROC AUC {auc(probe['outside_lungs'])}",
        f"  lungs only              ROC AUC {auc(probe['lungs_only'])}",
        f"  lung mask only          ROC AUC {auc(probe['mask_only'])}  (the silhouette both views carry)",
        f"  left out: no lungs found in {probe['n_no_lungs']} ({probe['no_lungs_share']:.1%}), {left_out}",
    ]


def format_audit(report: dict, *, max_pairs: int = 10) -> str:
    """Short plain-text summary of an ``audit_manifest`` report."""
    pairs = report["exact_duplicates"]["pairs"] + report["near_duplicates"]["pairs"]
    quality = report["quality"]
    listed = quality["refused"] + quality["doubtful"]
    paths = [p[k] for p in pairs for k in "ab"] + [q["path"] for q in listed]
    root = os.path.commonpath(paths) if len(paths) > 1 else ""
    root = root if os.path.isdir(root) else os.path.dirname(root)

    def short(path: str) -> str:
        return os.path.relpath(path, root) if root else path

    lines = [
        f"Audit of {report['n_images']} images ({report['n_decoded']} decoded), "
        f"near-duplicate threshold {report['near_threshold']}/{HASH_SIZE**2} bits"
    ]
    lines.append("Class balance (images; patients in brackets):")
    for split, counts in report["class_balance"].items():
        patients = counts.get("patients", {})
        cells = [
            f"{label} {n}" + (f" [{patients[label]}]" if label in patients else "")
            for label, n in counts["images"].items()
        ]
        lines.append(f"  {split:<10} " + ", ".join(cells))
    patients = report["patients"]
    if patients is None:
        lines.append("Patients: no patient ids with splits; cannot check patient leakage")
    else:
        leaked = ", ".join(p["patient_id"] for p in patients["patients"][:max_pairs])
        lines.append(
            f"Patients: {patients['n_patients']}, in more than one split: {patients['n_across_splits']}"
            + (f" ({leaked})" if leaked else "")
        )
    for key, title in (("exact_duplicates", "Exact duplicates"), ("near_duplicates", "Near duplicates")):
        dup = report[key]
        lines.append(
            f"{title}: {dup['n_pairs']} pairs ({dup['n_cross_split']} across splits, "
            f"{dup['n_cross_label']} across labels)"
        )
        for p in dup["pairs"][:max_pairs]:
            lines.append(
                f"  {p['kind']:<11} d={p['distance']:<3} {short(p['a'])} [{p['split_a'] or '-'}] ~ "
                f"{short(p['b'])} [{p['split_b'] or '-'}]" + ("  (same patient)" if p["same_patient"] else "")
            )
        if dup["n_pairs"] > max_pairs:
            lines.append(f"  ... {dup['n_pairs'] - max_pairs} more in the JSON report")
    shortcuts = report["shortcuts"]
    if shortcuts:
        lines.append(f"Shortcut signals (per-class distributions, flagged when TVD > {SHORTCUT_TVD}):")
        for name, feature in shortcuts["features"].items():
            dists = "; ".join(
                f"{label}: "
                + ", ".join(f"{_clip(v)} {f:.0%}" for v, f in sorted(d.items(), key=lambda x: -x[1])[:4])
                for label, d in feature["by_label"].items()
            )
            flag = "FLAG" if feature["flagged"] else "ok  "
            tvd = "-" if feature["tvd"] is None else f"{feature['tvd']:.2f}"
            lines.append(f"  {flag} {name:<15} TVD {tvd}: {dists}")
        for label, size in shortcuts["size_by_label"].items():
            h, w = size["height"], size["width"]
            lines.append(
                f"  size {label}: height {h['min']}-{h['max']} (median {h['median']:g}), "
                f"width {w['min']}-{w['max']} (median {w['median']:g}), "
                f"{size['distinct_sizes']} distinct sizes"
            )
    if report["unreadable"]:
        lines.append(f"Unreadable: {len(report['unreadable'])} (first: {report['unreadable'][0]['path']})")
    lines.append(f"Quality gate (modality {quality['modality'] or 'ct or cxr'}): "
                 f"{quality['n_refused']} refused, {quality['n_doubtful']} doubtful")
    for status in ("refused", "doubtful"):
        for entry in quality[status][:max_pairs]:
            lines.append(f"  {status:<8} {short(entry['path'])}: {'; '.join(entry['reasons'])}")
        if len(quality[status]) > max_pairs:
            lines.append(f"  ... {len(quality[status]) - max_pairs} more {status} in the JSON report")
    if report.get("probe"):
        lines += _probe_lines(report["probe"])
    lines.append("Warnings:" if report["warnings"] else "No leakage or shortcut warnings.")
    lines += [f"  - {w}" for w in report["warnings"]]
    return "\n".join(lines)
