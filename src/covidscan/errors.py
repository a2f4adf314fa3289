"""Errors a user can act on. Each message names the file (or setting) at fault and what to do about it.

The classes form a small hierarchy a caller can dispatch on; ``http_status`` is the status a web service
answers with (the command line prints ``error: <message>`` and exits 2 for all of them):

* :class:`InputError` (422): an input image cannot be read (:class:`ImageReadError`) or is refused as unfit
  for the model (:class:`ImageRefusedError`);
* :class:`ConfigError` (400) and :class:`ManifestError` (400): bad settings, arguments or dataset tables;
* :class:`ResourceNotFoundError` (404): something the call needs is missing, such as a run directory
  (:class:`RunNotFoundError`) or pretrained weights (:class:`WeightsNotFoundError`);
* :class:`StorageError` (500): reading or writing a file failed for a reason outside the input itself
  (a full disk, a read-only folder, a damaged run directory).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class CovidscanError(Exception):
    """Base class: the command line prints these without a traceback."""

    http_status: int = 500


class InputError(CovidscanError):
    """An input image is unusable: unreadable, or refused by the quality gate."""

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
    """An image (or its header) was read but is unfit for the model: ``reasons`` are ``"code: details"``."""

    _verb = "refused image"

    def __init__(self, path: str | Path, reasons: Sequence[str], hint: str | None = None) -> None:
        self.reasons = tuple(reasons)
        self.codes = tuple(r.split(":", 1)[0] for r in self.reasons)
        super().__init__(path, "; ".join(self.reasons), hint)


class ConfigError(CovidscanError):
    """A preset, config file, argument or ``--set`` override is invalid."""

    http_status = 400


class ManifestError(CovidscanError):
    """A dataset manifest or folder is unusable (missing columns, unknown labels, missing files, ...)."""

    http_status = 400


class ResourceNotFoundError(CovidscanError):
    """Something the call needs does not exist (a run directory, a weights file, an ONNX file)."""

    http_status = 404


class RunNotFoundError(ResourceNotFoundError):
    """The path given as a run directory is not one."""


class WeightsNotFoundError(ResourceNotFoundError):
    """Pretrained weights were requested but no file is available offline."""


class StorageError(CovidscanError):
    """A file could not be read or written for a reason outside the input (disk, permissions, damage)."""

    http_status = 500
