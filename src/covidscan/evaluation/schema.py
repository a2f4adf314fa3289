"""metrics.json: the stable, strict-JSON schema other tools read, its validator, writer and reader.

::

    {"n_images": int, "n_patients": int | null, "threshold": float,
     "metrics": {NAME: {"value": float | null, "ci95": [float | null, float | null],  # METRIC_NAMES
                        # optional (covidscan >= 0.3): how the interval was made and on how many units
                        "ci_method": CI_METHODS, "ci_n": int, "ci_unit": "patients" | "images"}},
     "confusion_matrix": [[tn, fp], [fn, tp]],
     "patient_level": {same keys except patient_level} | null,
     ...extra top-level keys (temperature, n_bootstrap, ...) are allowed}

Undefined values are ``null``; NaN and infinity never appear (the file is written with ``allow_nan=False``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from covidscan.errors import CovidscanError
from covidscan.evaluation.metrics import CI_METHODS, METRIC_NAMES

_BLOCK_KEYS = ("n_images", "n_patients", "threshold", "metrics", "confusion_matrix")
_ENTRY_KEYS = {"value", "ci95"}
_INTERVAL_KEYS = {"ci_method", "ci_n", "ci_unit"}  # together or not at all; older files lack them
CI_UNITS = ("patients", "images")


class MetricsSchemaError(CovidscanError):
    """A metrics dict or metrics.json file does not follow the schema (the message lists every problem)."""


def to_jsonable(obj: Any) -> Any:
    """Plain-Python copy of ``obj`` (numpy scalars/arrays, tuples, Paths converted; NaN/inf become None)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _block_problems(block: Any, where: str) -> list[str]:
    if not isinstance(block, Mapping):
        return [f"{where} must be an object, got {type(block).__name__}"]
    problems = [f"{where} lacks key {k!r}" for k in _BLOCK_KEYS if k not in block]
    if problems:
        return problems
    if not _is_count(block["n_images"]) or block["n_images"] == 0:
        problems.append(f"{where}.n_images must be a positive integer")
    if block["n_patients"] is not None and not _is_count(block["n_patients"]):
        problems.append(f"{where}.n_patients must be a non-negative integer or null")
    if not _is_number(block["threshold"]) or not 0 <= block["threshold"] <= 1:
        problems.append(f"{where}.threshold must be a number in [0, 1]")
    metrics = block["metrics"]
    if not isinstance(metrics, Mapping):
        problems.append(f"{where}.metrics must be an object")
    else:
        problems += [f"{where}.metrics lacks {n!r}" for n in METRIC_NAMES if n not in metrics]
        problems += [f"{where}.metrics has unknown metric {n!r}" for n in metrics if n not in METRIC_NAMES]
        for name in METRIC_NAMES:
            entry = metrics.get(name)
            if name not in metrics:
                continue
            keys = set(entry) if isinstance(entry, Mapping) else set()
            if keys not in (_ENTRY_KEYS, _ENTRY_KEYS | _INTERVAL_KEYS):
                problems.append(f"{where}.metrics.{name} must be exactly {{'value', 'ci95'}}, optionally "
                                "with 'ci_method', 'ci_n' and 'ci_unit'")
                continue
            if keys >= _INTERVAL_KEYS and not (entry["ci_method"] in CI_METHODS and _is_count(entry["ci_n"])
                                               and entry["ci_unit"] in CI_UNITS):
                problems.append(f"{where}.metrics.{name}: ci_method must be one of {list(CI_METHODS)}, "
                                f"ci_n a non-negative integer, ci_unit one of {list(CI_UNITS)}")
            ci = entry["ci95"]
            values = [entry["value"], *(ci if isinstance(ci, list) else [])]
            if not isinstance(ci, list) or len(ci) != 2:
                problems.append(f"{where}.metrics.{name}.ci95 must be a list [low, high]")
            elif any(v is not None and not _is_number(v) for v in values):
                problems.append(f"{where}.metrics.{name} values must be finite numbers or null")
    cm = block["confusion_matrix"]
    if not (isinstance(cm, list) and len(cm) == 2
            and all(isinstance(r, list) and len(r) == 2 and all(_is_count(c) for c in r) for r in cm)):
        problems.append(f"{where}.confusion_matrix must be [[tn, fp], [fn, tp]] of non-negative integers")
    else:
        expected = block["n_patients"] if where.endswith("patient_level") else block["n_images"]
        if expected is not None and sum(map(sum, cm)) != expected:
            total = sum(map(sum, cm))
            problems.append(f"{where}.confusion_matrix counts sum to {total}, expected {expected}")
    return problems


def validate_metrics_schema(d: Any) -> None:
    """Raise MetricsSchemaError listing every way ``d`` departs from the metrics.json schema."""
    problems = _block_problems(d, "metrics")
    if isinstance(d, Mapping):
        if "patient_level" not in d:
            problems.append("metrics lacks key 'patient_level' (use null when there are no patient ids)")
        elif d["patient_level"] is not None:
            problems += _block_problems(d["patient_level"], "metrics.patient_level")
        try:
            json.dumps(d, allow_nan=False)
        except (TypeError, ValueError) as exc:
            problems.append(f"not strict JSON ({exc}); pass it through to_jsonable first")
    if problems:
        raise MetricsSchemaError("invalid metrics: " + "; ".join(problems))


def write_metrics(metrics: Mapping[str, Any], path: str | Path) -> Path:
    """Validate ``metrics`` and write it as strict, indented JSON to ``path`` (parents created)."""
    data = to_jsonable(metrics)
    validate_metrics_schema(data)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def read_metrics(path: str | Path) -> dict[str, Any]:
    """Load and validate a metrics.json file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MetricsSchemaError(f"{path} not found; run the evaluation first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MetricsSchemaError(f"{path} is not readable JSON ({exc})") from None
    try:
        validate_metrics_schema(data)
    except MetricsSchemaError as exc:
        raise MetricsSchemaError(f"{path}: {exc}") from None
    return data
