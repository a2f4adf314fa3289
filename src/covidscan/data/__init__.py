"""Datasets: manifests, patient-level splits and the leakage/shortcut audit."""

from __future__ import annotations

from covidscan.data.audit import audit_manifest, format_audit, hamming_pairs
from covidscan.data.labels import EXCLUDED_LABEL, normalize_label
from covidscan.data.manifest import read_manifest, scan_dataset, write_manifest
from covidscan.data.split import split_manifest

__all__ = [
    "EXCLUDED_LABEL",
    "audit_manifest",
    "format_audit",
    "hamming_pairs",
    "normalize_label",
    "read_manifest",
    "scan_dataset",
    "split_manifest",
    "write_manifest",
]
