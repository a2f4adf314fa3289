"""Label and split names: the many spellings used by public COVID datasets, mapped to one vocabulary."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from covidscan.errors import ManifestError

EXCLUDED_LABEL = "excluded"
"""Label given to rows kept with ``include_excluded=True`` (e.g. HUST-19's NiCT, non-informative CT)."""

LABEL_ALIASES: dict[str, str] = {
    **dict.fromkeys(["covid", "covid-19", "covid19", "covid_19", "positive", "pct"], "covid"),
    **dict.fromkeys(
        ["non_covid", "non-covid", "noncovid", "non covid", "normal", "negative", "nct"], "non_covid"
    ),
}
"""Lower-case spelling -> canonical class. ``pCT``/``nCT`` are HUST-19's positive/negative CT."""

EXCLUDED_ALIASES: frozenset[str] = frozenset({"nict"})
"""Lower-case labels that are not a class at all: left out of manifests by default."""

SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}
SPLITS: tuple[str, str, str] = ("train", "val", "test")


def _accepted_labels() -> str:
    return ", ".join(sorted(LABEL_ALIASES)) + f" (and {', '.join(sorted(EXCLUDED_ALIASES))}: left out)"


def is_known_label(raw: object) -> bool:
    """Whether ``raw`` is a class or excluded-label spelling (used to recognise class folder names)."""
    key = str(raw).strip().lower()
    return key in LABEL_ALIASES or key in EXCLUDED_ALIASES


def normalize_label(raw: str) -> str | None:
    """Map a label spelling to ``"covid"``/``"non_covid"``; ``None`` for excluded labels (NiCT)."""
    if not is_known_label(raw):
        raise ManifestError(f"unknown label {raw!r}; accepted labels (any case): {_accepted_labels()}")
    return LABEL_ALIASES.get(str(raw).strip().lower())


def normalize_labels(values: Iterable[object], *, where: str) -> pd.Series:
    """Normalise a column of labels at once; unknown ones raise one error listing every bad value.

    Excluded labels become ``None``. ``where`` names the manifest or folder in the error message.
    """
    raw = pd.Series(list(values), dtype=object)
    keys = raw.map(lambda v: "" if pd.isna(v) else str(v).strip().lower())
    known = keys.map(is_known_label)
    if not known.all():
        bad = raw[~known].map(lambda v: "<empty>" if pd.isna(v) or not str(v).strip() else str(v))
        counts = ", ".join(f"{label!r} ({n} rows)" for label, n in bad.value_counts().items())
        found = ", ".join(repr(v) for v in sorted(raw.dropna().astype(str).unique()))
        raise ManifestError(
            f"{where}: unknown label(s) {counts}. Labels found: {found}. "
            f"Accepted labels (any case): {_accepted_labels()}. Fix the typo or rename the class."
        )
    return keys.map(lambda k: LABEL_ALIASES.get(k))


def normalize_splits(values: Iterable[object], *, where: str) -> pd.Series:
    """Normalise split names (train/val/valid/validation/test); empty cells become ``None`` (unassigned)."""
    raw = pd.Series(list(values), dtype=object)
    keys = raw.map(lambda v: "" if pd.isna(v) else str(v).strip().lower())
    bad = raw[(keys != "") & ~keys.isin(SPLIT_ALIASES.keys())]
    if len(bad):
        counts = ", ".join(f"{v!r} ({n} rows)" for v, n in bad.astype(str).value_counts().items())
        raise ManifestError(
            f"{where}: unknown split value(s) {counts}; accepted: {', '.join(SPLIT_ALIASES)} "
            "(or leave the cell empty to let `split` assign it)"
        )
    return keys.map(lambda k: SPLIT_ALIASES.get(k))

