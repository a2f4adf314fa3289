"""The service's only door to the model: upload checks, prediction, Grad-CAM and the model's identity.

Every call into covidscan's prediction code is in this module, so the rest of the service depends on
four things only: :func:`inspect_upload`, :class:`Scorer`, :class:`ScoredImage` and :class:`ScoredCase`.
"""

from __future__ import annotations

import io
import json
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image

from covidscan.errors import CovidscanError
from covidscan.inference import predict
from covidscan.io import read_image, to_uint8
from covidscan.runs import load_run

DISPLAY_MAX_SIDE = 1024  # the PNG shown in the browser; the original is kept untouched
UNCERTAIN_BAND = 0.1  # width of the "uncertain" zone around the threshold (predict's default)
_METRICS_SHOWN = ("accuracy", "recall", "specificity", "roc_auc", "f1")


class UploadRejected(CovidscanError):
    """An uploaded file cannot become part of a case; ``status`` is the HTTP status to answer with."""

    def __init__(self, name: str, reason: str, status: int = 422) -> None:
        self.name, self.reason, self.status = name, reason, status
        super().__init__(f"{name}: {reason}")


@dataclass(frozen=True)
class UploadInfo:
    """What a decoded upload is: the suffix its decoder needs, its size, and a PNG to show."""

    suffix: str
    width: int
    height: int
    display_png: bytes


def _header_pixels(data: bytes) -> int | None:
    """Pixel count from the header alone (before decoding, so a decompression bomb is never expanded)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.width * im.height * getattr(im, "n_frames", 1)
    except Image.DecompressionBombError:
        return None  # PIL refuses it outright: far over any sane size
    except (OSError, ValueError, SyntaxError):
        pass
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
        return rows * cols * int(ds.get("NumberOfFrames", 1) or 1) if rows and cols else 0
    except Exception:  # pydicom raises many types for non-DICOM bytes; the decoder below decides
        return 0


def _suffix(name: str, data: bytes) -> str:
    """The extension the decoder should see: DICOM by its marker or name, else the name's own (if known)."""
    suffix = Path(name).suffix.lower()
    if data[128:132] == b"DICM" or suffix in (".dcm", ".dicom"):
        return ".dcm"
    return suffix if suffix in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff") else ".img"


def inspect_upload(data: bytes, name: str, *, max_pixels: int) -> UploadInfo:
    """Decode an upload fully (as prediction will) and render a PNG of it; raises :class:`UploadRejected`."""
    if not data:
        raise UploadRejected(name, "file is empty (0 bytes)")
    pixels = _header_pixels(data)
    if pixels is None or pixels > max_pixels:
        raise UploadRejected(name, f"image has more than {max_pixels} pixels; send a smaller image", 413)
    suffix = _suffix(name, data)
    with tempfile.TemporaryDirectory(prefix="covidscan-upload-") as tmp:
        path = Path(tmp, "upload" + suffix)
        path.write_bytes(data)
        try:
            loaded = read_image(path)
        except CovidscanError as exc:
            reason = getattr(exc, "reason", str(exc))
            raise UploadRejected(
                name, f"not a readable image ({reason}); send PNG, JPEG, BMP, TIFF or DICOM files"
            ) from None
    height, width = loaded.pixels.shape
    shown = Image.fromarray(to_uint8(loaded.pixels))
    shown.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE))
    buf = io.BytesIO()
    shown.save(buf, format="PNG")
    return UploadInfo(suffix, width, height, buf.getvalue())


@dataclass(frozen=True)
class ScoredImage:
    """The model's answer for one image (``error`` set when it could not be predicted)."""

    p_covid: float | None
    label: str | None
    uncertain: bool | None
    lungs_found: bool | None
    warnings: list[str]
    error: str | None
    group_id: str | None
    cam_png: bytes | None


@dataclass(frozen=True)
class ScoredCase:
    """Per-image answers in input order and the case-level (patient or series) prediction."""

    images: list[ScoredImage]
    group: dict[str, Any] | None = field(default=None)


def _optional(value: Any) -> Any:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else value


class Scorer:
    """A run loaded once; ``score`` is serialised because one worker thread owns one model."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir).resolve()
        self._run = load_run(self.run_dir)
        self._lock = threading.Lock()
        self.identity = self._identity()

    def _identity(self) -> dict[str, Any]:
        run = self._run
        metrics_file = self.run_dir / "metrics.json"
        try:
            metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.is_file() else None
        except (OSError, json.JSONDecodeError) as exc:
            raise CovidscanError(f"cannot read {metrics_file}: {exc}; re-run `covidscan evaluate`") from None
        shown = {}
        if metrics:
            shown = {k: metrics["metrics"][k] for k in _METRICS_SHOWN if k in metrics.get("metrics", {})}
        patient_threshold = run.meta.get("patient_threshold")
        return {
            "run": self.run_dir.name,
            "run_path": str(self.run_dir),
            "model_name": run.config.model.backbone,
            "modality": run.meta["modality"],
            "covidscan_version": run.meta.get("covidscan_version"),
            "threshold": run.threshold,
            "patient_threshold": run.threshold if patient_threshold is None else float(patient_threshold),
            "temperature": run.temperature,
            "band": UNCERTAIN_BAND,
            "test_metrics": shown,
            "test_n_images": metrics.get("n_images") if metrics else None,
        }

    def score(self, files: list[tuple[Path, str]]) -> ScoredCase:
        """Predict ``(stored path, suffix)`` pairs of one case, with one Grad-CAM overlay PNG per image."""
        with self._lock, tempfile.TemporaryDirectory(prefix="covidscan-score-") as tmp:
            links = []
            for i, (path, suffix) in enumerate(files):
                link = Path(tmp, f"{i:04d}{suffix}")  # the decoder picks the format by suffix and content
                link.symlink_to(path)
                links.append(link)
            df = predict(
                self._run, links, band=UNCERTAIN_BAND, cam_dir=Path(tmp, "cam"), workers=1, progress=False
            )
            images = [
                ScoredImage(
                    p_covid=_optional(row["p_covid"]),
                    label=_optional(row["label"]),
                    uncertain=None if row["error"] else bool(row["uncertain"]),
                    lungs_found=None
                    if row["error"] or _optional(row["lungs_found"]) is None
                    else bool(row["lungs_found"]),
                    warnings=[w for w in str(row["warnings"] or "").split("; ") if w],
                    error=row["error"] or None,
                    group_id=_optional(row["group_id"]),
                    cam_png=Path(row["cam_png"]).read_bytes() if _optional(row.get("cam_png")) else None,
                )
                for row in df.to_dict(orient="records")
            ]
        return ScoredCase(images, self._group(images))

    def _group(self, images: list[ScoredImage]) -> dict[str, Any] | None:
        """Mean probability of the readable images at the run's patient threshold (one case = one patient)."""
        ps = [im.p_covid for im in images if im.p_covid is not None]
        if not ps:
            return None
        p = float(np.mean(ps))
        threshold = self.identity["patient_threshold"]
        return {
            "n_images": len(ps),
            "p_covid": p,
            "label": "covid" if p >= threshold else "non_covid",
            "threshold": threshold,
        }
