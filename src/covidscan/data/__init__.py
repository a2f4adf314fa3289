"""Datasets: manifests, patient-level splits, the leakage/shortcut audit and trainability checks."""

from __future__ import annotations

from covidscan.data.audit import audit_manifest, format_audit, hamming_pairs
from covidscan.data.checks import check_trainable, label_problems, mixed_label_patients
from covidscan.data.labels import EXCLUDED_LABEL, normalize_label
from covidscan.data.manifest import read_manifest, scan_dataset, write_manifest, write_quality
from covidscan.data.split import split_manifest

__all__ = [
    "EXCLUDED_LABEL",
    "audit_manifest",
    "check_trainable",
    "format_audit",
    "hamming_pairs",
    "label_problems",
    "mixed_label_patients",
    "normalize_label",
    "read_manifest",
    "scan_dataset",
    "split_manifest",
    "write_manifest",
    "write_quality",
]
