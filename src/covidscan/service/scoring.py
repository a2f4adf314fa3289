"""The service's only door to the model: upload checks, prediction, Grad-CAM and the model's identity.

Every call into covidscan's prediction code (:class:`covidscan.inference.Predictor`) is in this module, so
the rest of the service depends on four things only: :func:`inspect_upload`, :class:`Scorer` (whose
``reference()`` is the run's shift reference), :class:`ScoredImage` and :class:`ScoredCase`.
"""

from __future__ import annotations

import io
import logging
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pydicom
from PIL import Image

from covidscan.errors import CovidscanError, ImageRefusedError, InputError
from covidscan.evaluation.shift import ShiftTest
from covidscan.inference import Predictor
from covidscan.inference.shift import run_reference
from covidscan.io import QualityLimits, assess, read_image, to_uint8
from covidscan.service.errors import ErrorCode, UploadRejected

DISPLAY_MAX_SIDE = 1024  # the PNG shown in the browser; the original is kept untouched
_METRICS_SHOWN = ("accuracy", "recall", "specificity", "roc_auc", "f1")
_DECODER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")
SITE_TAGS = ("InstitutionName", "StationName")  # where a DICOM file says which site it comes from
# What a DICOM file says it is: stored with its case image (DICOMweb lists it) and read by DICOM intake.
ID_TAGS = (
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "PatientID", "InstanceNumber"
)
# The quality gate's refusals that a DICOM file's own attributes cause: not the run's kind of chest image.
ATTRIBUTE_REFUSALS = ("missing_modality", "wrong_modality", "body_part")


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UploadInfo:
    """What a decoded upload is: the suffix its decoder needs, its size, a PNG to show and, for DICOM, the
    :data:`SITE_TAGS` and :data:`ID_TAGS` it carries (only those present and non-empty)."""

    suffix: str
    width: int
    height: int
    display_png: bytes
    dicom: dict[str, str] | None = None


def _dicom_tags(data: bytes) -> dict[str, str]:
    """The :data:`SITE_TAGS` and :data:`ID_TAGS` of a DICOM file that decoded (so its header reads)."""
    tags = [*SITE_TAGS, *ID_TAGS]
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=tags)
    return {tag: value for tag in tags if (value := str(ds.get(tag, "") or "").strip(" \x00"))}


def _suffix(name: str, data: bytes) -> str:
    """The extension the stored file is read back with: DICOM by its marker, else the name's own if known."""
    if data[128:132] == b"DICM":
        return ".dcm"
    suffix = Path(name).suffix.lower()
    return suffix if suffix in _DECODER_SUFFIXES else ""


def inspect_upload(data: bytes, name: str, *, max_pixels: int, modality: str | None = None) -> UploadInfo:
    """Decode an upload fully (as prediction will) and render a PNG of it; raises :class:`UploadRejected`.

    The pixel count is checked from the header before anything is decoded (decompression bombs: 413).
    With ``modality`` (the run's ``ct`` or ``cxr``), a DICOM file that the quality gate refuses for its own
    Modality or BodyPartExamined (:data:`ATTRIBUTE_REFUSALS`) is refused here (``wrong_modality``), as DICOM
    intake does, instead of becoming a case the model gives no result.
    """
    limits = QualityLimits(max_pixels=max_pixels)
    try:
        loaded = read_image(data, name=name, limits=limits)
    except ImageRefusedError as exc:
        code = ErrorCode.TOO_MANY_PIXELS if "too_large" in exc.codes else ErrorCode.IMAGE_REFUSED
        raise UploadRejected(name, exc.reason, code) from None
    except InputError as exc:
        raise UploadRejected(
            name,
            f"not a readable image ({exc.reason}); send PNG, JPEG, BMP, TIFF or DICOM files",
            ErrorCode.NOT_AN_IMAGE,
        ) from None
    if modality is not None and loaded.meta.format == "DICOM":
        refused = [r for r in assess(loaded, modality, limits).refusals if r.startswith(ATTRIBUTE_REFUSALS)]
        if refused:
            raise UploadRejected(name, "; ".join(refused), ErrorCode.WRONG_MODALITY)
    height, width = loaded.pixels.shape
    shown = Image.fromarray(to_uint8(loaded.pixels))
    shown.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE))
    buf = io.BytesIO()
    shown.save(buf, format="PNG")
    dicom = _dicom_tags(data) if loaded.meta.format == "DICOM" else None
    return UploadInfo(_suffix(name, data), width, height, buf.getvalue(), dicom)


@dataclass(frozen=True)
class ScoredImage:
    """The model's answer for one image (``error`` set when it was unreadable or refused)."""

    p_covid: float | None
    label: str | None
    uncertain: bool | None
    lungs_found: bool | None
    warnings: list[str]
    error: str | None
    group_id: str | None
    cam_png: bytes | None
    features: np.ndarray | None = field(default=None, repr=False, compare=False)  # shift features


@dataclass(frozen=True)
class ScoredCase:
    """Per-image answers in input order and the case-level (patient or series) prediction."""

    images: list[ScoredImage]
    group: dict[str, Any] | None = field(default=None)


def _label(position: int, uploaded: str, suffix: str) -> str:
    """The name an image goes by in the model's messages (which the doctor reads): the uploaded file's own
    name, reduced to safe characters, with the suffix the decoder needs (blobs are stored under their
    digest alone, and a name's own suffix may be missing or wrong)."""
    stem = re.sub(r"[^\w.\- ]", "_", PurePosixPath(uploaded.replace("\\", "/")).stem)[:80].strip()
    return f"{stem or f'image{position + 1}'}{suffix}"


class Scorer:
    """A run's :class:`Predictor`, built once; ``score`` is serialised (one worker thread owns one model)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.predictor = Predictor.from_run(run_dir, engine="torch", workers=1)
        self.run_dir = self.predictor.run_dir.resolve()
        self._lock = threading.Lock()
        self.identity = self._identity()
        self._reference: np.ndarray | CovidscanError | None = None

    def reference(self) -> np.ndarray:
        """The run's reference shift features (its validation images), computed and checked once per loaded
        run; raises the same :class:`CovidscanError` each time when the run has no usable reference (too
        few validation images for a shift test, no split), so the worker does not retry it per case."""
        with self._lock:
            if self._reference is None:
                try:
                    reference = run_reference(self.predictor)[0]
                    ShiftTest().fit(reference)  # refuses a reference too small to test against
                    self._reference = reference
                except CovidscanError as exc:
                    log.warning("no shift test for run %s: %s", self.run_dir, exc)
                    self._reference = exc
            if isinstance(self._reference, CovidscanError):
                raise self._reference
            return self._reference

    def _identity(self) -> dict[str, Any]:
        checkpoint, cal, metrics = (
            self.predictor.checkpoint,
            self.predictor.calibration,
            self.predictor.metrics,
        )
        shown = {k: v for k, v in (metrics or {}).get("metrics", {}).items() if k in _METRICS_SHOWN}
        return {
            "run": self.run_dir.name,
            "run_path": str(self.run_dir),
            "model_name": checkpoint.model_name,
            "modality": checkpoint.modality,
            "covidscan_version": checkpoint.covidscan_version,
            "weights_sha256": checkpoint.weights_sha256,  # what result records name the model by
            "threshold": cal.threshold,
            "patient_threshold": cal.group_threshold(2),
            "temperature": cal.temperature,
            "band": cal.band,
            "test_metrics": shown,
            "test_n_images": metrics.get("n_images") if metrics else None,
        }

    def score(self, files: list[tuple[Path, str, str]]) -> ScoredCase:
        """Predict ``(stored path, suffix, uploaded name)`` triples of one case, with one Grad-CAM overlay
        PNG per image."""
        sources = [(_label(i, name, suf), path.read_bytes()) for i, (path, suf, name) in enumerate(files)]
        with self._lock, tempfile.TemporaryDirectory(prefix="covidscan-score-") as tmp:
            # Heat layers without text: the case page's viewer draws the image in its own window and shows
            # the probability beside it.
            preds = self.predictor.predict(sources, cam_dir=tmp, cam_layers=True)
            images = [
                ScoredImage(
                    p.p_covid,
                    p.label,
                    p.uncertain,
                    p.lungs_found,
                    list(p.warnings),
                    p.error,
                    p.group_id,
                    Path(p.cam_png).read_bytes() if p.cam_png else None,
                    p.features,
                )
                for p in preds
            ]
        # One case is one patient or series: its group is every readable image, whatever their DICOM ids.
        groups = self.predictor.aggregate(preds, key=lambda _: "case")
        group = None
        if groups:
            g = groups[0]
            group = {
                "n_images": g.n_images,
                "p_covid": g.p_covid,
                "label": g.label,
                "threshold": self.predictor.calibration.group_threshold(g.n_images),
            }
        return ScoredCase(images, group)
