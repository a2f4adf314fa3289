"""One scoring path: ``Predictor.from_model`` serves a model in memory exactly as a saved run is served,
and one quality gate (``covidscan.io.gate``) stands before every scored or trained image."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covidscan.errors import ConfigError, ImageRefusedError
from covidscan.inference import Predictor
from covidscan.io import gate, read_image
from covidscan.runs import draft_checkpoint, load_run


@pytest.fixture(scope="module")
def phantoms(phantom_manifest: Path) -> list[Path]:
    return sorted((phantom_manifest.parent / "images").rglob("*.png"))[:12]


def test_a_model_in_memory_scores_as_its_saved_run(tiny_run: Path, phantoms: list[Path]):
    run = load_run(tiny_run)
    saved = Predictor.from_run(tiny_run, precision="fp32").predict(phantoms)
    in_memory = Predictor.from_model(run.model, draft_checkpoint(run.config, run.model, run.calibration),
                                     precision="fp32")
    again = in_memory.predict(phantoms)
    assert [p.p_covid for p in again] == [p.p_covid for p in saved]
    assert [p.label for p in again] == [p.label for p in saved] and all(p.p_covid is not None for p in again)
    # The draft's weights hash is the one save_run writes: the same bytes, hashed before they are saved.
    weights = hashlib.sha256((tiny_run / "model.safetensors").read_bytes()).hexdigest()
    assert in_memory.checkpoint.weights_sha256 == weights == run.checkpoint.weights_sha256
    assert in_memory.run_dir is None and in_memory.metrics is None and in_memory.engine == "torch"


def test_a_model_in_memory_has_no_onnx_file_to_serve(tiny_run: Path, tmp_path: Path):
    run = load_run(tiny_run)
    with pytest.raises(ConfigError, match="a model in memory has no ONNX file"):
        Predictor.from_model(run.model, run.checkpoint, engine="onnx")
    with pytest.raises(ConfigError, match="engine must be"):
        Predictor.from_model(run.model, run.checkpoint, engine="tensorrt")  # type: ignore[arg-type]


def test_the_gate_refuses_with_the_file_named_and_passes_warnings(tmp_path: Path, phantoms: list[Path]):
    blank = tmp_path / "blank.png"
    Image.fromarray(np.zeros((256, 256), np.uint8)).save(blank)
    with pytest.raises(ImageRefusedError, match=r"blank\.png") as info:
        gate(read_image(blank), "ct")
    assert info.value.codes and info.value.hint
    report = gate(read_image(phantoms[0]), "ct")
    assert report.ok and report.path == phantoms[0]
