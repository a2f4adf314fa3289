"""ONNX export: parity with PyTorch, dynamic batch, metadata round trip, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from covidscan import CLASSES, __version__
from covidscan.config import load_config
from covidscan.data import read_manifest
from covidscan.errors import CovidscanError
from covidscan.evaluation import Calibration
from covidscan.export import METADATA_KEY, MIN_OPSET, OnnxModel, export_onnx, read_onnx_metadata
from covidscan.models import Classifier, build_model
from covidscan.preprocess import PreprocessConfig, prepare_paths, to_model_batch
from covidscan.runs import load_run, save_run

N_IMAGES = 8


def _phantom_batch(manifest: Path, preprocess: PreprocessConfig, model: Classifier) -> torch.Tensor:
    """Phantom CT slices prepared and normalised exactly as ``model`` expects them."""
    paths = read_manifest(manifest)["path"].tolist()[:N_IMAGES]
    prepared, errors = prepare_paths(paths, preprocess, model.input_size, progress=False)
    assert not errors
    images = np.stack([p.pixels for p in prepared])
    return to_model_batch(images, model.mean, model.std).contiguous()


def _untrained_run(out: Path, manifest: Path, backbone: str, size: int, *more: str) -> Path:
    """A run directory of a randomly initialised torchvision model (weights none) at a small input size."""
    cfg = load_config(
        "paper-a-resnet50",
        [f"model.backbone={backbone}", "model.weights=none", f"model.input_size={size}", *more],
    )
    torch.manual_seed(0)
    model = build_model(cfg.model)
    # With fresh BatchNorm statistics (mean 0, var 1) a random net gives nearly the same logits for every
    # image; estimating them on the phantoms makes outputs differ per image, so parity is tested on a spread.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the one batch
            module.train()
    with torch.no_grad():
        model(_phantom_batch(manifest, cfg.preprocess, model))
    model.eval()
    save_run(out, cfg, model, Calibration(threshold=0.4, temperature=1.5, patient_threshold=0.6))
    return out


@pytest.fixture(scope="module")
def tiny_onnx(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny_run fixture exported with a dynamic batch axis."""
    return export_onnx(tiny_run, tmp_path_factory.mktemp("onnx") / "tiny.onnx")


@pytest.fixture(scope="module")
def mobilenet_static(tmp_path_factory: pytest.TempPathFactory, phantom_manifest: Path) -> tuple[Path, Path]:
    """An untrained MobileNetV2 run at 80 px, exported with a fixed batch (1)."""
    run_dir = _untrained_run(tmp_path_factory.mktemp("mobilenet_v2"), phantom_manifest, "mobilenet_v2", 80)
    return run_dir, export_onnx(run_dir, run_dir / "model.onnx", dynamic_batch=False)


@pytest.fixture(scope="module")
def resnet50_dynamic(tmp_path_factory: pytest.TempPathFactory, phantom_manifest: Path) -> tuple[Path, Path]:
    """An untrained ResNet50 run at 64 px, exported with a dynamic batch."""
    run_dir = _untrained_run(tmp_path_factory.mktemp("resnet50"), phantom_manifest, "resnet50", 64)
    return run_dir, export_onnx(run_dir, run_dir / "model.onnx")


@pytest.fixture(scope="module")
def avgmax_dynamic(tmp_path_factory: pytest.TempPathFactory, phantom_manifest: Path) -> tuple[Path, Path]:
    """An untrained MobileNetV2 run at 64 px whose head pools average and maximum, dynamic batch."""
    run_dir = _untrained_run(
        tmp_path_factory.mktemp("avgmax"), phantom_manifest, "mobilenet_v2", 64, "model.pooling=avgmax"
    )
    return run_dir, export_onnx(run_dir, run_dir / "model.onnx")


# Exports are the slow part (torch.export + ONNX translation, seconds each), so each file is exported once
# and the fixed-batch export path is covered by the MobileNetV2 parity case rather than by another export.
@pytest.mark.parametrize(
    "which",
    [
        "tiny",
        "avgmax_dynamic",
        pytest.param("mobilenet_static", marks=pytest.mark.slow),
        pytest.param("resnet50_dynamic", marks=pytest.mark.slow),
    ],
)
def test_parity_with_pytorch(which: str, request: pytest.FixtureRequest, phantom_manifest: Path) -> None:
    if which == "tiny":
        run_dir, path = request.getfixturevalue("tiny_run"), request.getfixturevalue("tiny_onnx")
    else:
        run_dir, path = request.getfixturevalue(which)
    run = load_run(run_dir)
    batch = _phantom_batch(phantom_manifest, run.config.preprocess, run.model)
    with torch.inference_mode():
        expected = run.model(batch).numpy()
    got = OnnxModel(path, threads=2)(batch)
    assert got.shape == (N_IMAGES, len(CLASSES))
    assert got.dtype == np.float32
    scale = max(1.0, float(np.abs(expected).max()))
    assert np.abs(got - expected).max() <= 1e-4 * scale
    p_torch = torch.softmax(torch.from_numpy(expected), 1)[:, 1].numpy()
    p_onnx = torch.softmax(torch.from_numpy(got), 1)[:, 1].numpy()
    assert np.abs(p_onnx - p_torch).max() <= 1e-4


def test_dynamic_batch_and_input_types(tiny_run: Path, tiny_onnx: Path, phantom_manifest: Path) -> None:
    run = load_run(tiny_run)
    batch = _phantom_batch(phantom_manifest, run.config.preprocess, run.model)[:5]
    model = OnnxModel(tiny_onnx)
    assert model.fixed_batch is None
    # Idle workers sleep rather than spin, leaving the cores to predict's decoding threads.
    options = model.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    five = model(batch)
    one = model(batch[:1].numpy())
    assert five.shape == (5, 2) and one.shape == (1, 2)
    np.testing.assert_allclose(one, five[:1], atol=1e-5)
    # float64 numpy is accepted and cast; the result does not depend on the input type.
    np.testing.assert_allclose(model(batch.numpy().astype(np.float64)), five, atol=1e-6)
    assert model(batch[:0]).shape == (0, 2)
    dims = onnx.load(str(tiny_onnx)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 64, 64]


@pytest.mark.slow
def test_static_batch(mobilenet_static: tuple[Path, Path]) -> None:
    _, path = mobilenet_static
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 80, 80]
    model = OnnxModel(path)
    assert model.fixed_batch == 1
    batch = np.random.default_rng(0).normal(size=(3, 3, 80, 80)).astype(np.float32)
    np.testing.assert_allclose(model(batch)[1:2], model(batch[1:2]), atol=1e-6)


def test_metadata_round_trip(tiny_run: Path, tiny_onnx: Path) -> None:
    checkpoint = json.loads((tiny_run / "checkpoint.json").read_text())
    meta = read_onnx_metadata(tiny_onnx)
    assert meta == {**checkpoint, "covidscan_version": __version__, "source_run": str(tiny_run.resolve())}
    assert set(meta["preprocess"]) >= {"clahe", "clip_limit", "tile_grid", "lung_crop", "margin"}

    model = OnnxModel(tiny_onnx)
    run = load_run(tiny_run)
    assert model.metadata == meta
    assert model.input_size == run.model.input_size == (64, 64)
    assert model.mean == pytest.approx(run.model.mean) and model.std == pytest.approx(run.model.std)
    assert model.calibration == run.calibration
    assert model.preprocess == run.config.preprocess == run.checkpoint.preprocess

    proto = onnx.load(str(tiny_onnx))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["logits", "features"]  # features: for the OOD score
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= MIN_OPSET
    # Self-contained: all weights inside the one file, no external-data side files.
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer)
    assert sorted(p.name for p in tiny_onnx.parent.iterdir()) == ["tiny.onnx"]


def test_export_bad_inputs(tiny_run: Path, tmp_path: Path) -> None:
    with pytest.raises(CovidscanError, match="not a covidscan run directory"):
        export_onnx(tmp_path, tmp_path / "x.onnx")
    with pytest.raises(CovidscanError, match=r"must end in \.onnx"):
        export_onnx(tiny_run, tmp_path / "model.pt")
    with pytest.raises(CovidscanError, match="opset 17"):
        export_onnx(tiny_run, tmp_path / "x.onnx", opset=17)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(CovidscanError, match=r"cannot write .*a_file"):
        export_onnx(tiny_run, blocker / "x.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def _plain_onnx(path: Path) -> Path:
    """A valid ONNX file (identity graph) that was not written by covidscan."""
    io = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "plain",
        [io("x", onnx.TensorProto.FLOAT, [1])],
        [io("y", onnx.TensorProto.FLOAT, [1])],
    )
    # IR version 10: what onnxruntime reads (onnx's newest default may be ahead of it).
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=10)
    onnx.save(model, str(path))
    return path


def test_loading_bad_files(tmp_path: Path) -> None:
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model")
    plain = _plain_onnx(tmp_path / "plain.onnx")
    cases = [(tmp_path / "missing.onnx", "not found"), (text, "notes.onnx"), (plain, "no covidscan metadata")]
    for path, message in cases:
        with pytest.raises(CovidscanError, match=message):
            OnnxModel(path)
        with pytest.raises(CovidscanError, match=message):
            read_onnx_metadata(path)
    model = onnx.load(str(plain))
    onnx.helper.set_model_props(model, {METADATA_KEY: json.dumps({"classes": list(CLASSES)})})
    onnx.save(model, str(plain))
    with pytest.raises(CovidscanError, match="lacks preprocess"):
        read_onnx_metadata(plain)


def test_call_bad_inputs(tiny_onnx: Path) -> None:
    model = OnnxModel(tiny_onnx)
    with pytest.raises(CovidscanError, match=r"takes a \(N, 3, 64, 64\) batch"):
        model(np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(CovidscanError, match="takes a"):
        model(np.zeros((3, 64, 64), np.float32))
    with pytest.raises(CovidscanError, match="threads must be >= 1"):
        OnnxModel(tiny_onnx, threads=0)
