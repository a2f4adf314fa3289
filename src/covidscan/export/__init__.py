"""ONNX export of a trained run and an onnxruntime engine with the same call shape as the torch model.

The exported file is self-contained: one ``.onnx`` (no external-data side files) with input ``image``
``(N, 3, H, W)`` float32, normalised as the model expects, and output ``logits`` ``(N, 2)`` in
``covidscan.CLASSES`` order. Everything needed to preprocess images and read the logits (classes, modality,
preprocessing settings, input size, mean/std, threshold, temperature, ...) is stored as JSON under the
``covidscan`` key of the model's ``metadata_props``.
"""

from __future__ import annotations

from covidscan.export.exporter import MIN_OPSET, export_onnx
from covidscan.export.quantize import MAX_AUC_DELTA, Int8Refused, export_int8, quantize_onnx
from covidscan.export.runtime import METADATA_KEY, OnnxModel, read_onnx_metadata

__all__ = ["MAX_AUC_DELTA", "METADATA_KEY", "MIN_OPSET", "Int8Refused", "OnnxModel", "export_int8",
           "export_onnx", "quantize_onnx", "read_onnx_metadata"]
