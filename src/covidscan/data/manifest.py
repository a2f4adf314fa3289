"""Dataset manifests: one CSV row per image (``path,label[,patient_id][,split][,source]``)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pandas as pd

from covidscan.data.labels import (
    EXCLUDED_LABEL,
    LABEL_ALIASES,
    is_known_label,
    normalize_label,
    normalize_labels,
    normalize_splits,
)
from covidscan.errors import ImageReadError, ManifestError
from covidscan.io import is_image_path, list_images, read_image

PATH_ALIASES = ("path", "relpath", "filename", "file")
LABEL_COLUMNS = ("label", "class")
PATIENT_ALIASES = ("patient_group", "patient_id", "patient_id(series_uid)", "patientid")
"""Tried in order: ``patient_group`` first because it merges patients that share duplicated images."""
SPLIT_ALIASES = ("split", "official_split")
CORE_COLUMNS = ("path", "label", "patient_id", "split", "source")
_SHOW = 5  # how many offending paths an error message lists


def _find_column(columns: list[str], aliases: tuple[str, ...]) -> str | None:
    """First column whose name matches an alias (case-insensitively, in alias order)."""
    by_lower = {c.strip().lower(): c for c in columns}
    return next((by_lower[a] for a in aliases if a in by_lower), None)


def _explicit_column(columns: list[str], name: str, what: str, where: str) -> str:
    found = _find_column(columns, (name.strip().lower(),))
    if found is None:
        raise ManifestError(f"{where}: {what} column {name!r} not found; columns are {', '.join(columns)}")
    return found


def _drop_excluded(df: pd.DataFrame, labels: pd.Series, include_excluded: bool) -> pd.DataFrame:
    """Apply normalised labels; excluded ones (``None``) are dropped, or kept as ``"excluded"``."""
    excluded = labels.isna().to_numpy()
    df = df.assign(label=labels.fillna(EXCLUDED_LABEL).to_numpy())
    if not include_excluded:
        df = df.loc[~excluded].reset_index(drop=True)
    df.attrs["excluded"] = int(excluded.sum())
    return df


def read_manifest(
    path_or_dir: str | os.PathLike[str],
    *,
    patient_column: str | None = None,
    split_column: str | None = None,
    include_excluded: bool = False,
) -> pd.DataFrame:
    """Read a manifest CSV (or scan a folder of class subfolders) into a validated manifest DataFrame.

    Paths become absolute (relative ones resolve against the CSV's folder), labels become
    ``covid``/``non_covid``, the patient column (``patient_group`` preferred) becomes ``patient_id`` and
    ``split``/``official_split`` becomes ``split``. Excluded labels (NiCT) are dropped and counted in
    ``df.attrs["excluded"]``; with ``include_excluded=True`` they stay, labelled ``"excluded"``.
    """
    source = Path(path_or_dir).expanduser()
    if source.is_dir():
        csvs = sorted(p.name for p in source.glob("*.csv"))
        if csvs:
            warnings.warn(
                f"{source} holds {', '.join(csvs)}: scanning its class folders ignores any patient ids and "
                "splits in them; pass the CSV instead to use those",
                stacklevel=2,
            )
        return scan_dataset(source, include_excluded=include_excluded)
    where = f"manifest {source}"
    if not source.is_file():
        raise ManifestError(f"{where} does not exist; give a manifest CSV or a folder of class subfolders")
    try:
        raw = pd.read_csv(source, dtype=str, keep_default_na=False, na_values=[""], skipinitialspace=True)
    except pd.errors.EmptyDataError as exc:
        raise ManifestError(
            f"{where} is empty; it needs a header line `path,label[,patient_id][,split]`"
        ) from exc
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise ManifestError(f"{where} is not a readable CSV file: {exc}") from exc
    columns = [str(c) for c in raw.columns]
    raw.columns = columns
    path_col = _find_column(columns, PATH_ALIASES)
    label_col = _find_column(columns, LABEL_COLUMNS)
    if path_col is None or label_col is None:
        missing = "a path column (path/relpath/filename/file)" if path_col is None else "a `label` column"
        raise ManifestError(f"{where} has no {missing}; columns are: {', '.join(columns)}")
    if raw.empty:
        raise ManifestError(f"{where} has a header but no rows")
    if raw[path_col].isna().any():
        rows = (raw.index[raw[path_col].isna()] + 2).tolist()[:_SHOW]  # +2: header line, 1-based lines
        raise ManifestError(f"{where}: {raw[path_col].isna().sum()} rows have an empty path (lines {rows})")

    # the folder the user sees the CSV in (no symlink resolution); a relpath column stays for provenance
    base = source.absolute().parent
    paths = [os.path.normpath(base / Path(p).expanduser()) for p in raw[path_col]]
    df = raw.drop(columns=[label_col]).assign(path=paths)

    pcol = (
        _explicit_column(columns, patient_column, "patient", where)
        if patient_column
        else _find_column(columns, PATIENT_ALIASES)
    )
    if pcol is not None and pcol != "patient_id":
        if "patient_id" in df.columns:
            df = df.rename(columns={"patient_id": "patient_id_original"})
        df["patient_id"] = raw[pcol].to_numpy()
    scol = (
        _explicit_column(columns, split_column, "split", where)
        if split_column
        else _find_column(columns, SPLIT_ALIASES)
    )
    if scol is not None:
        df["split"] = normalize_splits(raw[scol], where=where).to_numpy()

    df = _drop_excluded(df, normalize_labels(raw[label_col], where=where), include_excluded)
    _check_rows(df, where)
    df.attrs.update(manifest=str(source), patient_column=pcol, split_column=scol)
    return _ordered(df)


def _check_rows(df: pd.DataFrame, where: str) -> None:
    """Refuse empty manifests, repeated paths and files that are not there."""
    if df.empty:
        raise ManifestError(f"{where}: no images left after leaving out {df.attrs.get('excluded', 0)} rows")
    dup = df["path"][df["path"].duplicated(keep=False)].unique().tolist()
    if dup:
        raise ManifestError(
            f"{where}: {len(dup)} paths are listed more than once (e.g. {', '.join(dup[:_SHOW])}); "
            "keep one row per image"
        )
    missing = [p for p in df["path"] if not os.path.isfile(p)]
    if missing:
        raise ManifestError(
            f"{where}: {len(missing)} of {len(df)} listed files do not exist "
            f"(first: {', '.join(missing[:_SHOW])}); relative paths resolve against the manifest's folder"
        )


def _ordered(df: pd.DataFrame) -> pd.DataFrame:
    """Core columns first, in their usual order, then the extra ones as they came."""
    core = [c for c in CORE_COLUMNS if c in df.columns]
    return df[core + [c for c in df.columns if c not in core]]


def scan_dataset(root: str | os.PathLike[str], *, include_excluded: bool = False) -> pd.DataFrame:
    """Build a manifest from a folder with one subfolder per class (``covid/``, ``non_covid/``, ``pCT/``...).

    Every file is test-read: unreadable ones are left out, warned about and listed in
    ``df.attrs["unreadable"]`` (``[{"path", "reason"}]``); images directly in ``root`` or in subfolders
    whose name is not a class are left out with a warning (listed in ``df.attrs["ignored"]``).
    ``patient_id`` is left empty: folders carry no patient information.
    """
    root = Path(root).expanduser()
    where = f"dataset folder {root}"
    if not root.is_dir():
        raise ManifestError(f"{where} does not exist or is not a folder")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_dirs = [d for d in subdirs if is_known_label(d.name)]
    loose = [p for p in sorted(root.iterdir()) if p.is_file() and is_image_path(p)]
    if not class_dirs:
        raise ManifestError(
            f"{where} has no class subfolders ({len(loose)} images directly in it, subfolders: "
            f"{', '.join(d.name for d in subdirs) or 'none'}). Put images in covid/ and non_covid/ "
            "(or normal/, pCT/, nCT/, ...) subfolders, or write a manifest CSV with path,label columns"
        )
    unknown = [d for d in subdirs if d not in class_dirs]
    ignored = [str(p) for p in loose] + [str(p) for d in unknown for p in list_images(d)]
    if ignored:
        names = ", ".join([f"{d.name}/" for d in unknown] + [p.name for p in loose][:_SHOW])
        warnings.warn(
            f"{where}: {len(ignored)} images are not in a class subfolder and were left out ({names}); "
            f"class folder names are: {', '.join(sorted(LABEL_ALIASES))}",
            stacklevel=2,
        )

    rows, unreadable = [], []
    for folder in class_dirs:
        label = normalize_label(folder.name)
        for path in list_images(folder):
            try:
                read_image(path)
            except ImageReadError as exc:
                unreadable.append({"path": str(path), "reason": exc.reason})
                continue
            rows.append({"path": os.path.normpath(path.absolute()), "label": label, "patient_id": None})
    if unreadable:
        warnings.warn(
            f"{where}: {len(unreadable)} unreadable images left out "
            f"(first: {unreadable[0]['path']}: {unreadable[0]['reason']})",
            stacklevel=2,
        )
    if not rows:
        raise ManifestError(f"{where}: the class subfolders hold no readable images")
    df = pd.DataFrame(rows, columns=["path", "label", "patient_id"], dtype=object)
    df = _drop_excluded(df, df["label"], include_excluded)
    if df.empty:
        raise ManifestError(f"{where}: no images left after leaving out {df.attrs['excluded']} excluded ones")
    df.attrs.update(root=str(root), unreadable=unreadable, ignored=ignored)
    return df


def write_manifest(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write a manifest CSV; paths under its folder are stored relative to it so the folder can move."""
    missing = [c for c in ("path", "label") if c not in df.columns]
    if missing:
        raise ManifestError(f"cannot write manifest {path}: the DataFrame has no {', '.join(missing)} column")
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    base = out.resolve().parent

    def portable(p: str) -> str:
        absolute = Path(os.path.normpath(Path(p).absolute()))
        return absolute.relative_to(base).as_posix() if absolute.is_relative_to(base) else str(absolute)

    table = _ordered(df.copy()).assign(path=[portable(p) for p in df["path"]])
    try:
        table.to_csv(out, index=False)
    except OSError as exc:
        raise ManifestError(f"cannot write manifest {out}: {exc.strerror}") from exc
    return out
