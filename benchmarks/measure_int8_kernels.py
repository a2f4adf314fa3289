"""Why an int8 check holds only on its own kind of CPU: the same int8 model, fused and computed exactly.

onnxruntime runs a QDQ model's convolutions as int8 (U8S8) matrix products. With VNNI or AMX each u8 x s8
product is added into 32 bits: the quantised model's exact result. Without them (AVX2, AVX-512 without
VNNI) VPMADDUBSW adds pairs of products into 16 bits, which clip. This script quantises a run as
``covidscan export --int8`` does (8-bit weights), and with 7-bit weights (``reduce_range``, which keeps the
pairs inside 16 bits), and scores the run's test split with each model twice: fused (onnxruntime's own
int8 kernels on this CPU) and unfused (graph optimisations off: DequantizeLinear, then fp32 operators,
i.e. the exact result a VNNI CPU computes). Every line is the run's own int8 check (labels changed at the
run's threshold, ROC AUC change) against the fp32 ONNX model.

    python benchmarks/measure_int8_kernels.py RUN
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from covidscan.export import export_onnx
from covidscan.export.quantize import CALIBRATION_IMAGES, _Batches, _batches, _scorer
from covidscan.inference.engines import cpu_features
from covidscan.models.fast import compare_precision
from covidscan.runs import load_run, run_split


def _session(path: Path, *, fused: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if not fused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _binary_logits(session: ort.InferenceSession, batches: list[np.ndarray]) -> np.ndarray:
    out = np.concatenate([session.run(None, {"image": x})[0] for x in batches])
    return out[:, 1] - out[:, 0]


def _images_per_s(session: ort.InferenceSession, batch: np.ndarray, iters: int = 3) -> float:
    session.run(None, {"image": batch})
    best = min(_timed(session, batch) for _ in range(iters))
    return len(batch) / best


def _timed(session: ort.InferenceSession, batch: np.ndarray) -> float:
    start = time.perf_counter()
    session.run(None, {"image": batch})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path)
    args = parser.parse_args()
    run = load_run(args.run)
    val, test = run_split(run, "val"), run_split(run, "test")
    print(f"CPU: {cpu_features()['model']}, {', '.join(cpu_features()['features'])}; int8 kernels "
          f"{cpu_features()['int8_kernels']}; onnxruntime {ort.__version__}; {len(test)} test images")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        fp32 = export_onnx(run.path, tmp / "model.onnx")
        reference = _scorer(run, fp32)
        step = max(1, len(val) // CALIBRATION_IMAGES)
        calibration = _batches(reference, val.images[::step][:CALIBRATION_IMAGES])
        batches = _batches(reference, test.images)
        timing = np.concatenate(batches)[:32]
        prepared = tmp / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        p32 = run.calibration.proba(_binary_logits(_session(fp32, fused=True), batches))
        print(f"fp32 onnxruntime: {_images_per_s(_session(fp32, fused=True), timing):.1f} images/s")
        for bits, reduce_range in ((8, False), (7, True)):
            int8 = tmp / f"int8-{bits}.onnx"
            quantize_static(
                str(prepared), str(int8), _Batches(list(calibration)), quant_format=QuantFormat.QDQ,
                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax, reduce_range=reduce_range,
            )
            for fused in (True, False):
                session = _session(int8, fused=fused)
                p8 = run.calibration.proba(_binary_logits(session, batches))
                found = compare_precision(p32, p8, run.calibration.threshold, test.labels)
                how = "fused (this CPU's int8 kernels)" if fused else "unfused (exact)"
                speed = f", {_images_per_s(session, timing):.1f} images/s" if fused else ""
                print(f"{bits}-bit weights, {how}: {found['reason']}; "
                      f"max |dp| {found['max_abs_dp']:.4f}{speed}")


if __name__ == "__main__":
    main()
