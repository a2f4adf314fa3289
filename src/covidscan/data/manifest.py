"""Dataset manifests: one CSV row per image (``path,label[,patient_id][,split][,source]``)."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
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
from covidscan.errors import ConfigError, ImageRefusedError, InputError, ManifestError
from covidscan.io import LoadedImage, QualityLimits, is_image_path, list_images, read_checked
from covidscan.outputs import check_output, read_csv, write_csv

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
    for_prediction: bool = False,
) -> pd.DataFrame:
    """Read a manifest CSV (or scan a folder of class subfolders) into a validated manifest DataFrame.

    ``for_prediction``: a list of images to predict, where the label column is optional (``label`` is then
    empty) and a listed file that does not exist is kept (prediction reports it in that file's row).

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
        raw = read_csv(source, dtype=str, keep_default_na=False, na_values=[""], skipinitialspace=True)
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
    if path_col is None or (label_col is None and not for_prediction):
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
    df = (raw.drop(columns=[label_col]) if label_col else raw).assign(path=paths)

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

    if label_col is not None:
        df = _drop_excluded(df, normalize_labels(raw[label_col], where=where), include_excluded)
    else:
        df = df.assign(label=None)
    _check_rows(df, where, files_must_exist=not for_prediction)
    df.attrs.update(manifest=str(source), patient_column=pcol, split_column=scol)
    return _ordered(df)


def _check_rows(df: pd.DataFrame, where: str, *, files_must_exist: bool = True) -> None:
    """Refuse empty manifests, repeated paths and (unless told otherwise) files that are not there."""
    if df.empty:
        raise ManifestError(f"{where}: no images left after leaving out {df.attrs.get('excluded', 0)} rows")
    dup = df["path"][df["path"].duplicated(keep=False)].unique().tolist()
    if dup:
        raise ManifestError(
            f"{where}: {len(dup)} paths are listed more than once (e.g. {', '.join(dup[:_SHOW])}); "
            "keep one row per image"
        )
    missing = [p for p in df["path"] if not os.path.isfile(p)] if files_must_exist else []
    if missing:
        raise ManifestError(
            f"{where}: {len(missing)} of {len(df)} listed files do not exist "
            f"(first: {', '.join(missing[:_SHOW])}); relative paths resolve against the manifest's folder"
        )


def _ordered(df: pd.DataFrame) -> pd.DataFrame:
    """Core columns first, in their usual order, then the extra ones as they came."""
    core = [c for c in CORE_COLUMNS if c in df.columns]
    return df[core + [c for c in df.columns if c not in core]]


PatientRule = Callable[[Path, Path, LoadedImage], str | None]
"""(file, its class folder, the decoded image) -> patient id, or None when the file does not say."""


def patient_rule(patient_from: str) -> tuple[PatientRule, str]:
    """Parse ``dicom``, ``folder`` or ``regex:PATTERN`` into (rule, what a file lacking an id misses)."""
    if patient_from == "dicom":
        return (lambda path, folder, image: image.meta.patient_id), "no DICOM PatientID"
    if patient_from == "folder":
        def folder_name(path: Path, folder: Path, image: LoadedImage) -> str | None:
            parts = path.relative_to(folder).parts
            return parts[0] if len(parts) > 1 else None

        return folder_name, "lies directly in its class folder, not in a class/patient/ folder"
    if patient_from.startswith("regex:"):
        text = patient_from.removeprefix("regex:")
        try:
            pattern = re.compile(text)
        except re.error as exc:
            raise ConfigError(f"--patient-from regex {text!r} is not a valid regular expression: {exc}") \
                from None
        if "patient" not in pattern.groupindex:
            raise ConfigError(f"--patient-from regex {text!r} needs a named group (?P<patient>...), e.g. "
                              "'regex:^(?P<patient>[^_]+)_'")

        def from_name(path: Path, folder: Path, image: LoadedImage) -> str | None:
            match = pattern.search(path.name)
            return match.group("patient") if match and match.group("patient") else None

        return from_name, f"a file name that regex {text!r} does not match"
    raise ConfigError(f"--patient-from {patient_from!r}: use dicom (DICOM PatientID), folder "
                      "(class/patient/file folders) or regex:PATTERN with a (?P<patient>...) group")


def _gate(path: Path, modality: str | None, limits: QualityLimits | None) -> tuple[LoadedImage | None, dict]:
    """Read and judge one file: (the image unless unreadable or refused, its quality entry)."""
    entry = {"path": os.path.normpath(path.absolute()), "status": "ok", "reasons": ""}
    try:
        image, report = read_checked(path, modality, limits=limits)
    except ImageRefusedError as exc:
        return None, {**entry, "status": "refused", "reasons": exc.reason}
    except InputError as exc:
        return None, {**entry, "status": "unreadable", "reasons": exc.reason}
    if report.warnings:
        entry.update(status="doubtful", reasons="; ".join(report.warnings))
    return image, entry


def scan_dataset(
    root: str | os.PathLike[str],
    *,
    include_excluded: bool = False,
    patient_from: str | None = None,
    modality: str | None = None,
    limits: QualityLimits | None = None,
) -> pd.DataFrame:
    """Build a manifest from a folder with one subfolder per class (``covid/``, ``non_covid/``, ``pCT/``...).

    Every file is read and passed through the quality gate (``covidscan.io.assess`` for ``modality``
    ``"ct"``, ``"cxr"`` or ``None``: either). Unreadable and refused files are left out of the manifest,
    warned about and listed with their reasons in ``df.attrs["quality"]`` (``[{"path", "label", "status",
    "reasons"}]``, status ``unreadable``, ``refused`` or ``doubtful``; doubtful files stay in), so nothing is
    dropped unseen; ``df.attrs["unreadable"]`` keeps the unreadable ones as ``[{"path", "reason"}]``.
    Images directly in ``root`` or in subfolders whose name is not a class are left out with a warning
    (``df.attrs["ignored"]``). ``patient_id`` is filled by ``patient_from``: ``"dicom"`` (the DICOM
    PatientID), ``"folder"`` (``class/patient/file``: the first folder below the class folder) or
    ``"regex:PATTERN"`` (the group ``(?P<patient>...)`` searched in the file name); ``None`` leaves it
    empty. A file the chosen rule gives no id is an error naming it.
    """
    rule, lacking = patient_rule(patient_from) if patient_from else (None, "")
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

    rows, quality, no_id = [], [], []
    for folder in class_dirs:
        label = normalize_label(folder.name)
        for path in list_images(folder):
            image, entry = _gate(path, modality, limits)
            if entry["status"] != "ok":
                quality.append({**entry, "label": label if label else EXCLUDED_LABEL})
            if image is None:
                continue
            patient = rule(path, folder, image) if rule else None
            if rule and patient is None:
                no_id.append(str(path))
            rows.append({"path": os.path.normpath(path.absolute()), "label": label, "patient_id": patient})
    if no_id:
        raise ManifestError(
            f"{where}: --patient-from {patient_from} gives no patient id for {len(no_id)} of "
            f"{len(rows)} images, each {lacking} (first: {', '.join(no_id[:_SHOW])}); use another "
            "--patient-from (dicom, folder, regex:PATTERN) or write a manifest with a patient_id column"
        )
    for status in ("unreadable", "refused"):
        bad = [q for q in quality if q["status"] == status]
        if bad:
            warnings.warn(f"{where}: {len(bad)} {status} images left out "
                          f"(first: {bad[0]['path']}: {bad[0]['reasons']})", stacklevel=2)
    if not rows:
        raise ManifestError(f"{where}: the class subfolders hold no readable images that pass the quality "
                            "gate (see the warnings above)")
    df = pd.DataFrame(rows, columns=["path", "label", "patient_id"], dtype=object)
    df = _drop_excluded(df, df["label"], include_excluded)
    if df.empty:
        raise ManifestError(f"{where}: no images left after leaving out {df.attrs['excluded']} excluded ones")
    unreadable = [{"path": q["path"], "reason": q["reasons"]} for q in quality if q["status"] == "unreadable"]
    df.attrs.update(root=str(root), unreadable=unreadable, ignored=ignored, quality=quality,
                    patient_from=patient_from)
    return df


QUALITY_COLUMNS = ("path", "label", "status", "reasons")


def write_quality(entries: list[dict], path: str | os.PathLike[str]) -> Path:
    """Write the quality gate's list (``scan_dataset``'s ``attrs["quality"]``) as a CSV, worst first.

    Paths are stored like ``write_manifest`` stores them: relative to the CSV's folder when under it.
    The list may not replace one of the files it lists.
    """
    order = {"unreadable": 0, "refused": 1, "doubtful": 2}
    out = check_output(Path(path).expanduser(), [e["path"] for e in entries])
    table = pd.DataFrame(entries, columns=list(QUALITY_COLUMNS))
    table["path"] = [_portable(p, out.resolve().parent) for p in table["path"]]
    table = table.sort_values(["status", "path"], key=lambda c: c.map(order) if c.name == "status" else c)
    return write_csv(table, out, "quality list ")


def _portable(path: str, base: Path) -> str:
    """``path`` relative to ``base`` when it lies under it (so the folder can move), else absolute."""
    absolute = Path(os.path.normpath(Path(path).absolute()))
    return absolute.relative_to(base).as_posix() if absolute.is_relative_to(base) else str(absolute)


def write_manifest(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write a manifest CSV; paths under its folder are stored relative to it so the folder can move.

    The manifest may not replace the manifest or folder it was read from, nor an image it lists; it is
    written whole or not at all, with cells escaped against formula injection (``read_manifest`` reads
    them back as they were).
    """
    missing = [c for c in ("path", "label") if c not in df.columns]
    if missing:
        raise ManifestError(f"cannot write manifest {path}: the DataFrame has no {', '.join(missing)} column")
    sources = [df.attrs[key] for key in ("manifest", "root") if key in df.attrs]
    out = check_output(Path(path).expanduser(), [*sources, *df["path"]])
    base = out.resolve().parent
    table = _ordered(df.copy()).assign(path=[_portable(p, base) for p in df["path"]])
    return write_csv(table, out, "manifest ")
