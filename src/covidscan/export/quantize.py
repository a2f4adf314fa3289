"""int8 on the CPU: onnxruntime static QDQ quantisation of a run's ONNX export, allowed per run, measured.

Weights are quantised per output channel (int8) and activations per tensor (uint8, the U8S8 form
onnxruntime's x86 kernels run fastest, with VNNI where the CPU has it), their ranges calibrated on the run's
own validation images prepared exactly as at inference. The result serves only where, on the run's test
split, it changes at most :data:`~covidscan.models.fast.MAX_LABEL_CHANGE` of the fp32 labels and the ROC AUC
by at most :data:`MAX_AUC_DELTA`; the verdict and its figures go into the run's checkpoint either way. The
verdict speaks for CPUs with the checking one's kind of int8 kernels (:func:`covidscan.system.int8_kernels`):
without VNNI onnxruntime adds pairs of u8 x s8 products in 16 bits, which clip, and the same file gives other
results there (``benchmarks/measure_int8_kernels.py``: on an AVX2-only CPU a run's int8 model moved 35 of 203
test labels, where computed exactly it moved 9). 7-bit weights (``reduce_range``) would not clip anywhere,
but they moved 17-18 labels of the 203: coarser weights everywhere, for the CPUs without VNNI.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from covidscan.errors import CovidscanError
from covidscan.export.exporter import export_onnx
from covidscan.inference import Predictor
from covidscan.models.fast import MAX_AUC_DELTA, MAX_LABEL_CHANGE, compare_precision
from covidscan.outputs import write_atomic, writing
from covidscan.preprocess import PreparedSet
from covidscan.runs import (
    INT8_FILE,
    Int8Verdict,
    LoadedRun,
    file_sha256,
    load_run,
    run_split,
    write_checkpoint,
)
from covidscan.system import int8_kernels

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 128
"""Validation images the activation ranges are calibrated on (more only slows the export)."""
_BATCH = 16


class Int8Refused(CovidscanError):
    """The run's int8 check refused int8 (the verdict, with its figures, is in the checkpoint)."""


class _Batches(CalibrationDataReader):
    """The calibration images as the exported model's ``image`` input, one batch at a time."""

    def __init__(self, batches: list[np.ndarray]) -> None:
        self._batches: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"image": batch}


def export_int8(
    run_dir: str | Path,
    *,
    max_label_change: float = MAX_LABEL_CHANGE,
    max_auc_delta: float = MAX_AUC_DELTA,
    progress: bool = False,
) -> Int8Verdict:
    """Quantise a run to int8, check it on the run's test split and record the verdict in its checkpoint.

    Allowed: ``model.int8.onnx`` is written into the run (through a side file and a rename) and the verdict
    returned. Refused: any earlier ``model.int8.onnx`` is removed, the verdict recorded and
    :class:`Int8Refused` raised with the figures. ``max_label_change`` and ``max_auc_delta`` are the
    limits (tests loosen or tighten them; leave them for real use).
    """
    run = load_run(run_dir)
    val, test = run_split(run, "val", progress=progress), run_split(run, "test", progress=progress)
    with tempfile.TemporaryDirectory(prefix="covidscan-int8-") as tmp_name:
        tmp = Path(tmp_name)
        fp32 = export_onnx(run.path, tmp / "model.onnx")
        int8 = tmp / INT8_FILE
        step = max(1, len(val) // CALIBRATION_IMAGES)  # an even spread over the split when it is large
        reference = _scorer(run, fp32)
        quantize_onnx(fp32, int8, _batches(reference, val.images[::step][:CALIBRATION_IMAGES]))
        verdict = _verdict(run, reference, int8, test, max_label_change, max_auc_delta)
        target = run.path / INT8_FILE
        if verdict.allowed:
            with writing(target):
                write_atomic(target, int8.read_bytes())
    if not verdict.allowed:
        with suppress(FileNotFoundError):
            target.unlink()
    write_checkpoint(run.path, run.checkpoint.model_copy(update={"int8": verdict}))
    if not verdict.allowed:
        raise Int8Refused(f"int8 refused for {run.path}: {verdict.reason}; serve it with the fp32 or bf16 "
                          "engines (predict --engine auto, torch or onnx)")
    return verdict


def _batches(scorer: Predictor, images: np.ndarray) -> list[np.ndarray]:
    """Normalised (N, 3, H, W) float32 batches, exactly as the Predictor feeds the model."""
    return [scorer.batch(images[i : i + _BATCH]).contiguous().numpy() for i in range(0, len(images), _BATCH)]


def quantize_onnx(fp32: Path, out: Path, calibration: list[np.ndarray]) -> None:
    """Static QDQ quantisation of an exported model: per-channel int8 weights, uint8 activations with
    min-max ranges over the ``calibration`` batches (normalised ``image`` inputs), metadata kept.

    No check: :func:`export_int8` is what decides whether a run may serve the result."""
    prepared = out.with_name("prepared.onnx")
    try:
        # onnxruntime's pre-processing (shape inference, graph optimisation) lets it quantise every conv.
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(out), _Batches(calibration),
            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        )
    except (RuntimeError, ValueError, ort.capi.onnxruntime_pybind11_state.Fail) as exc:
        raise CovidscanError(f"onnxruntime cannot quantise {fp32}: {exc}") from None
    # quantize_static keeps the graph but not always the model's metadata; the file must describe itself.
    source, quantised = onnx.load(str(fp32)), onnx.load(str(out))
    onnx.helper.set_model_props(quantised, {p.key: p.value for p in source.metadata_props})
    onnx.save(quantised, str(out))


def _scorer(run: LoadedRun, onnx_file: Path) -> Predictor:
    """The run served from ``onnx_file`` exactly as ``predict --engine onnx`` serves it."""
    return Predictor.from_model(run.model, run.checkpoint, run_dir=run.path, engine="onnx",
                                onnx_path=onnx_file)


def _verdict(
    run: LoadedRun, fp32: Predictor, int8: Path, test: PreparedSet, max_label_change: float,
    max_auc_delta: float,
) -> Int8Verdict:
    """int8 vs fp32 (both through onnxruntime) on the test split: bf16's check (:func:`compare_precision`)."""
    a, b = (run.calibration.proba(scorer.logits(test.images)) for scorer in (fp32, _scorer(run, int8)))
    found = compare_precision(a, b, run.calibration.threshold, test.labels,
                              max_label_change=max_label_change, max_auc_delta=max_auc_delta)
    if found["auc_delta"] is None:  # one class: an int8 model is only trusted with its ROC AUC measured
        found["allowed"] = False
    return Int8Verdict(**found, torch=torch.__version__, sha256=file_sha256(int8),
                       onnxruntime=ort.__version__, int8_kernels=int8_kernels())
