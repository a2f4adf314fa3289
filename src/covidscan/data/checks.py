"""Whether a manifest can train a classifier at all: two classes, one label per patient, both in every split.

``label_problems`` says what is wrong (``data split`` and ``data audit`` report it); ``check_trainable``
refuses, before any training starts, what would otherwise fail at calibration at the very end.
"""

from __future__ import annotations

import pandas as pd

from covidscan import CLASSES
from covidscan.errors import ManifestError

_SHOW = 5  # how many patient ids a message lists
PATIENT_OPTIONS = (
    "`covidscan data scan --patient-from dicom` (DICOM PatientID), `--patient-from folder` "
    "(class/patient/file folders), `--patient-from 'regex:(?P<patient>...)'` (from file names) "
    "or a patient_id column in the manifest"
)
"""How a user gives images their patient, named in every message that needs patient ids."""


def _ids(df: pd.DataFrame, column: str) -> pd.Series:
    if column not in df.columns:
        return pd.Series([None] * len(df), index=df.index, dtype=object)
    values = df[column].astype(object)
    return values.where(values.notna() & (values.astype(str).str.strip() != ""), None)


def mixed_label_patients(df: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Patients whose images carry more than one label: ``{patient_id: {label: n_images}}``."""
    patients = _ids(df, "patient_id")
    known = df.loc[patients.notna(), "label"].astype(str).groupby(patients.dropna().astype(str))
    return {
        str(patient): {str(k): int(v) for k, v in labels.value_counts().sort_index().items()}
        for patient, labels in known
        if labels.nunique() > 1
    }


def label_problems(df: pd.DataFrame) -> list[str]:
    """One line per reason a classifier cannot be trained honestly on this manifest (empty when fine)."""
    if "label" not in df.columns:
        raise ManifestError("cannot check labels: the manifest has no `label` column")
    problems = []
    counts = df["label"].astype(str).value_counts()
    missing = [c for c in CLASSES if c not in counts.index]
    if missing:
        found = ", ".join(f"{label} {n}" for label, n in counts.items()) or "no images"
        problems.append(
            f"one-class dataset ({found} images): no {', '.join(missing)} images to learn from. Add them "
            f"(a {'/'.join(missing)} subfolder or manifest rows)"
        )
    mixed = mixed_label_patients(df)
    if mixed:
        shown = ", ".join(f"{p} ({', '.join(f'{k} {v}' for k, v in labels.items())})"
                          for p, labels in list(mixed.items())[:_SHOW])
        problems.append(
            f"{len(mixed)} patients carry both labels: {shown}{', ...' if len(mixed) > _SHOW else ''}. Fix "
            f"the labels, or if these ids group different patients give them distinct ids ({PATIENT_OPTIONS})"
        )
    return problems


def _split_problems(df: pd.DataFrame) -> list[str]:
    if "split" not in df.columns:
        return []
    splits = _ids(df, "split")
    out = []
    for split, labels in df.loc[splits.notna(), "label"].astype(str).groupby(splits.dropna()):
        missing = [c for c in CLASSES if c not in set(labels)]
        if missing:
            out.append(
                f"split {split} has no {', '.join(missing)} images ({len(labels)} images): re-split "
                "(`data split --resplit`, or train with `--set data.resplit=true`) or add images"
            )
    return out


def check_trainable(df: pd.DataFrame) -> None:
    """Raise ``ManifestError`` unless the manifest holds both classes, no patient with both labels, and,
    where it has a ``split`` column, both classes in every split (each message says what to do)."""
    problems = label_problems(df) + _split_problems(df)
    if problems:
        raise ManifestError("cannot train on this dataset: " + " | ".join(problems))
