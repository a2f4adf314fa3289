"""Errors a user can act on. Each message names the file (or setting) at fault and what to do about it.

Every class carries ``http_status``, the status a web service answers it with.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class CovidscanError(Exception):
    """Base class: the command line prints these without a traceback."""

    http_status: int = 500


class InputError(CovidscanError):
    """An input image cannot be used: unreadable, or refused by the quality gate."""

    http_status = 422
    _verb = "unusable image"  # how the message starts; each subclass says what went wrong

    def __init__(self, path: str | Path, reason: str, hint: str | None = None) -> None:
        self.path = Path(path)
        self.reason = reason
        self.hint = hint
        message = f"{self._verb} {self.path}: {reason}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class ImageReadError(InputError):
    """An image or DICOM file could not be read (missing, empty, corrupt, truncated, unsupported)."""

    _verb = "cannot read image"


class ImageRefusedError(InputError):
    """An image was read (or its header was) but is unfit for the run: ``reasons`` are ``"code: details"``."""

    _verb = "refused image"

    def __init__(self, path: str | Path, reasons: Sequence[str], hint: str | None = None) -> None:
        self.reasons = tuple(reasons)
        self.codes = tuple(r.split(":", 1)[0] for r in self.reasons)
        super().__init__(path, "; ".join(self.reasons), hint)


class ManifestError(CovidscanError):
    """A dataset manifest or folder is unusable (missing columns, unknown labels, missing files, ...)."""

    http_status = 400


class ConfigError(CovidscanError):
    """A preset, config file or ``--set`` override is invalid."""

    http_status = 400


class WeightsNotFoundError(CovidscanError):
    """Pretrained weights were requested but no file is available offline."""

    http_status = 404
