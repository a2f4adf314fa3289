"""Errors a user can act on. Each message names the file (or setting) at fault and what to do about it."""

from __future__ import annotations

from pathlib import Path


class CovidscanError(Exception):
    """Base class: the command line prints these without a traceback."""


class ImageReadError(CovidscanError):
    """An image or DICOM file could not be read (missing, empty, corrupt, truncated, unsupported)."""

    def __init__(self, path: str | Path, reason: str, hint: str | None = None) -> None:
        self.path = Path(path)
        self.reason = reason
        self.hint = hint
        message = f"cannot read image {self.path}: {reason}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class ManifestError(CovidscanError):
    """A dataset manifest or folder is unusable (missing columns, unknown labels, missing files, ...)."""


class ConfigError(CovidscanError):
    """A preset, config file or ``--set`` override is invalid."""


class WeightsNotFoundError(CovidscanError):
    """Pretrained weights were requested but no file is available offline."""
