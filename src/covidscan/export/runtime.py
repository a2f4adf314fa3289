"""Run an exported covidscan ONNX file with onnxruntime and read its metadata."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from google.protobuf.message import DecodeError
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors
from pydantic import ValidationError

from covidscan import CLASSES
from covidscan.errors import ConfigError, CovidscanError, ResourceNotFoundError
from covidscan.evaluation import Calibration
from covidscan.preprocess import PreprocessConfig

METADATA_KEY = "covidscan"
"""``metadata_props`` key holding the JSON description of the model and its preprocessing."""
REQUIRED_KEYS = ("classes", "preprocess", "input_size", "mean", "std", "calibration")
_LEGACY_CALIBRATION = ("temperature", "threshold", "patient_threshold")  # covidscan 0.1 kept these flat
# onnxruntime's errors are pybind types deriving straight from Exception; these are the ones loading a bad,
# unsupported or unreadable file raises.
_ORT_LOAD_ERRORS = (
    ort_errors.Fail,
    ort_errors.InvalidArgument,
    ort_errors.InvalidGraph,
    ort_errors.InvalidProtobuf,
    ort_errors.NoSuchFile,
    ort_errors.NotImplemented,
)


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise ResourceNotFoundError(f"ONNX file {path} not found; create one with `covidscan export`")


def _parse_metadata(props: Mapping[str, str], path: Path) -> dict[str, Any]:
    """The covidscan metadata dict from an ONNX file's metadata_props, validated."""
    if METADATA_KEY not in props:
        raise CovidscanError(
            f"{path} has no covidscan metadata (metadata_props key {METADATA_KEY!r}); "
            "export the model with `covidscan export` instead of another tool"
        )
    try:
        meta = json.loads(props[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise CovidscanError(
            f"{path}: covidscan metadata is not valid JSON ({exc}); re-export the model"
        ) from None
    if isinstance(meta, dict) and "calibration" not in meta and {"temperature", "threshold"} <= set(meta):
        meta["calibration"] = {k: meta[k] for k in _LEGACY_CALIBRATION if meta.get(k) is not None}
    missing = [k for k in REQUIRED_KEYS if k not in meta] if isinstance(meta, dict) else list(REQUIRED_KEYS)
    if missing:
        raise CovidscanError(f"{path}: covidscan metadata lacks {', '.join(missing)}; re-export the model")
    if meta["classes"] != list(CLASSES):
        raise CovidscanError(f"{path} has classes {meta['classes']}; this covidscan expects {list(CLASSES)}")
    try:
        Calibration.model_validate(meta["calibration"])
    except ValidationError as exc:
        raise CovidscanError(f"{path}: invalid calibration in the covidscan metadata ({exc})") from None
    return meta


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The covidscan metadata stored in an exported ONNX file (raises CovidscanError for other files)."""
    path = Path(path)
    _check_file(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (OSError, DecodeError) as exc:
        raise CovidscanError(f"{path} is not a readable ONNX file: {exc}") from None
    return _parse_metadata({p.key: p.value for p in model.metadata_props}, path)


class OnnxModel:
    """An exported model in an onnxruntime CPU session; ``model(batch)`` returns logits ``(N, 2)``.

    ``batch`` is ``(N, 3, H, W)`` normalised exactly as for the torch model (numpy or torch, any float
    dtype); files exported with a fixed batch (1) are run image by image. ``threads`` sets
    onnxruntime's intra-op threads (None: onnxruntime's default, all cores).
    """

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        self.path = Path(path)
        _check_file(self.path)
        if threads is not None and threads < 1:
            raise ConfigError(f"threads must be >= 1 (or None for all cores), got {threads}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle workers sleep instead of spinning: predict decodes images in threads while the model runs,
        # and spinning workers take their cores (96 ucsd-ct files on the 2-core EPYC, 2026-12-06: 88 ->
        # 100 images/s end to end; the model alone did not slow down).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except _ORT_LOAD_ERRORS as exc:
            raise CovidscanError(f"onnxruntime cannot load {self.path}: {exc}") from None
        self.metadata = _parse_metadata(self.session.get_modelmeta().custom_metadata_map, self.path)
        image = self.session.get_inputs()[0]
        self._input = image.name
        names = [o.name for o in self.session.get_outputs()]
        # Files from covidscan <= 0.2 have no features output: they still predict, without an OOD score.
        self._outputs = [names[0], "features"] if "features" in names else [names[0]]
        # A file exported with dynamic_batch=False has an int batch dimension; others a symbolic one.
        self.fixed_batch: int | None = image.shape[0] if isinstance(image.shape[0], int) else None

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) the model expects."""
        height, width = self.metadata["input_size"]
        return int(height), int(width)

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel normalisation mean."""
        return tuple(float(v) for v in self.metadata["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel normalisation std."""
        return tuple(float(v) for v in self.metadata["std"])

    @property
    def calibration(self) -> Calibration:
        """Temperature, thresholds and uncertain band: how the logits become probabilities and labels."""
        return Calibration.model_validate(self.metadata["calibration"])

    @property
    def preprocess(self) -> PreprocessConfig:
        """The preprocessing (CLAHE, lung crop) the model was trained with."""
        return PreprocessConfig.model_validate(self.metadata["preprocess"])

    def __call__(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """Logits ``(N, 2)`` in ``covidscan.CLASSES`` order."""
        return self.run(batch)[0]

    def run(self, batch: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits ``(N, 2)`` and pooled features ``(N, C)``; None for files exported without them."""
        array = batch.detach().cpu().numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
        expected = (3, *self.input_size)
        if array.ndim != 4 or array.shape[1:] != expected:
            raise CovidscanError(
                f"{self.path} takes a (N, {', '.join(map(str, expected))}) batch; got shape {array.shape}"
            )
        feed = np.ascontiguousarray(array, dtype=np.float32)
        if not len(feed):
            return np.zeros((0, len(CLASSES)), np.float32), None
        # A fixed-batch file (export_onnx's dynamic_batch=False gives batch 1) runs image by image, so callers
        # never need to know how the file was exported.
        step = self.fixed_batch or len(feed)
        chunks = [self.session.run(self._outputs, {self._input: feed[i : i + step]})
                  for i in range(0, len(feed), step)]
        logits = np.concatenate([c[0] for c in chunks])
        return logits, (np.concatenate([c[1] for c in chunks]) if len(self._outputs) > 1 else None)
