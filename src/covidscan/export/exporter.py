"""Export a trained run directory to a single, self-describing ONNX file."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import onnx
import torch

from covidscan import __version__
from covidscan.errors import ConfigError, CovidscanError, StorageError
from covidscan.export.runtime import METADATA_KEY
from covidscan.outputs import check_output, run_files
from covidscan.runs import LoadedRun, load_run

MIN_OPSET = 18
"""torch's torch.export-based exporter implements opset 18 and newer only."""
_EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")
# Protobuf cannot serialise a message of 2 GiB or more, so bigger weights would need external-data files.
_MAX_WEIGHT_BYTES = 2**31 - 2**24


def export_onnx(
    run_dir: str | Path, out_path: str | Path, *, opset: int = MIN_OPSET, dynamic_batch: bool = True
) -> Path:
    """Export a run's model to ``out_path`` (.onnx): input ``image`` (N, 3, H, W), outputs ``logits`` (N, 2)
    and ``features`` (N, C), the pooled backbone features the run's out-of-distribution detector scores.

    The run's checkpoint (classes, preprocessing with modality, model identity and weights hash, input
    size, mean, std, calibration) plus ``covidscan_version`` and ``source_run`` is stored as JSON in the
    model's ``metadata_props`` under ``covidscan``. The file is written through a unique side file and
    renamed, so concurrent exports to one path never leave a broken file. Returns the written path.
    """
    out = Path(out_path)
    if out.suffix.lower() != ".onnx":
        raise ConfigError(f"output {out} must end in .onnx (e.g. {out.with_suffix('.onnx').name})")
    if opset < MIN_OPSET:
        raise ConfigError(
            f"opset {opset} is not supported: the ONNX exporter writes opset {MIN_OPSET} or newer"
        )
    run = load_run(run_dir)
    check_output(out, run_files(run.path), option="--onnx")
    weight_bytes = sum(t.nbytes for t in run.model.state_dict().values())
    if weight_bytes > _MAX_WEIGHT_BYTES:
        raise CovidscanError(
            f"{run.path}: the model has {weight_bytes / 2**30:.1f} GiB of weights, more than a single "
            "ONNX file can hold (2 GiB protobuf limit)"
        )
    tmp: Path | None = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # Opened before the (slow) export so that an unwritable path fails at once; a unique side file,
        # renamed at the end, so that neither a failure nor a second exporter leaves a truncated .onnx.
        fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
        tmp = Path(name)
        with os.fdopen(fd, "wb") as handle:
            handle.write(_to_onnx(run, opset, dynamic_batch).SerializeToString())
        os.replace(tmp, out)
    except OSError as exc:
        raise StorageError(f"cannot write {out}: {exc.strerror or exc}; choose a writable path") from None
    finally:
        if tmp is not None:
            with suppress(OSError):
                tmp.unlink(missing_ok=True)
    return out


@contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    """The ONNX tool chain logs every optimisation pass at INFO; a user needs only its warnings."""
    loggers = [logging.getLogger(name) for name in _EXPORTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class _LogitsAndFeatures(torch.nn.Module):
    """The classifier with its pooled features as a second output (one backbone pass for both)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_pooled(x)


def _to_onnx(run: LoadedRun, opset: int, dynamic_batch: bool) -> onnx.ModelProto:
    """The run's model as a checked ModelProto carrying the covidscan metadata."""
    # Batch 2 when dynamic: torch.export specialises size-1 dimensions, which would pin the batch axis.
    example = torch.zeros(2 if dynamic_batch else 1, 3, *run.model.input_size)
    try:
        with _quiet_exporter_logs():
            # dynamo=True: the maintained torch.export-based exporter (the TorchScript one is deprecated and
            # scheduled for removal).
            program = torch.onnx.export(
                _LogitsAndFeatures(run.model).eval(),
                (example,),
                None,
                input_names=["image"],
                output_names=["logits", "features"],
                opset_version=opset,
                dynamo=True,
                external_data=False,
                dynamic_shapes={"x": {0: torch.export.Dim("batch")}} if dynamic_batch else None,
                verbose=False,
            )
    except torch.onnx.OnnxExporterError as exc:
        raise CovidscanError(f"cannot export the model of {run.path} to ONNX: {exc}") from exc
    proto = program.model_proto
    # The exporter falls back to opset 18 (logging the failure) when it cannot convert to the one asked for.
    written = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if written != opset:
        raise CovidscanError(
            f"torch could not export opset {opset} (it wrote {written}); use opset {written}"
        )
    meta = {**run.checkpoint.model_dump(mode="json"), "covidscan_version": __version__,
            "source_run": str(run.path.resolve())}
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(meta)})
    proto.doc_string = f"covidscan {__version__} model exported from {run.path.resolve()}"
    onnx.checker.check_model(proto, full_check=True)
    return proto
