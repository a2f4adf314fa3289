"""The Predictor: stages, reuse, threads, a run directory never written to, old runs, bf16 policy, errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from covidscan.errors import ConfigError, RunNotFoundError, StorageError
from covidscan.evaluation import Calibration
from covidscan.inference import GroupPrediction, Prediction, Predictor, predictor as predictor_module
from covidscan.io import read_image
from covidscan.models import PrecisionVerdict, bf16_supported, bf16_verdict
from covidscan.preprocess import PreparedImage, to_model_batch
from covidscan.runs import load_checkpoint, load_run, write_checkpoint
from legacy_runs import legacy_checkpoint


@pytest.fixture(scope="module")
def predictor(tiny_run: Path) -> Predictor:
    return Predictor.from_run(tiny_run)


@pytest.fixture(scope="module")
def phantoms(phantom_manifest: Path) -> list[Path]:
    return sorted((phantom_manifest.parent / "images").rglob("*.png"))


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_stages_compose_into_predict(predictor: Predictor, phantoms: list[Path]):
    loaded = [read_image(p) for p in phantoms[:5]]
    prepared = [predictor.prepare(image) for image in loaded]
    assert all(isinstance(p, PreparedImage) for p in prepared)
    pixels = prepared[0].pixels
    assert pixels.dtype == np.float32 and pixels.shape == predictor.checkpoint.input_size
    scored = predictor.score(prepared, group_ids=["a", "a", "b", None, None])
    assert all(isinstance(s, Prediction) for s in scored)
    assert [s.source for s in scored] == [str(p) for p in phantoms[:5]]
    cal = predictor.calibration
    for s in scored:
        assert 0 <= s.p_covid <= 1 and s.label == ("covid" if s.p_covid >= cal.threshold else "non_covid")
        assert s.uncertain == (abs(s.p_covid - cal.threshold) < cal.band / 2) and s.error is None
    # predict() is the same three stages over paths, with decoding in threads.
    again = predictor.predict(phantoms[:5], group_ids=["a", "a", "b", None, None])
    assert [s.p_covid for s in again] == pytest.approx([s.p_covid for s in scored], abs=1e-6)
    groups = predictor.aggregate(scored)
    assert [g.group_id for g in groups] == ["a", "b"] and all(isinstance(g, GroupPrediction) for g in groups)
    assert groups[0].n_images == 2
    assert groups[0].p_covid == pytest.approx(np.mean([s.p_covid for s in scored[:2]]))
    # A one-image group is that image: it never gets a label that contradicts the image's own.
    assert groups[1].n_images == 1 and groups[1].label == scored[2].label


def test_single_image_groups_use_the_image_threshold():
    cal = Calibration(threshold=0.5, patient_threshold=0.8)
    assert cal.group_threshold(1) == 0.5 and cal.group_threshold(3) == 0.8
    assert Calibration(threshold=0.5).group_threshold(3) == 0.5


def test_bytes_uploads_and_bad_sources_become_rows(predictor: Predictor, phantoms: list[Path], tmp_path):
    data = phantoms[0].read_bytes()
    missing = tmp_path / "missing.png"
    out = predictor.predict([("upload.png", data), phantoms[0], missing, ("notes.png", b"plain text")])
    assert out[0].source == "upload.png" and out[0].p_covid == pytest.approx(out[1].p_covid, abs=1e-6)
    assert out[2].error and "does not exist" in out[2].error and out[2].p_covid is None
    assert out[3].error and "notes.png" in out[3].error and out[3].label is None


def test_second_call_reuses_the_loaded_model(predictor: Predictor, phantoms: list[Path], monkeypatch):
    # After from_run nothing is loaded again: a second call must not touch the run directory's files.
    monkeypatch.setattr(predictor_module, "load_run", lambda *a, **k: pytest.fail("loaded the run again"))
    first = predictor.predict(phantoms[:4])
    second = predictor.predict(phantoms[:4])
    assert [p.p_covid for p in first] == [p.p_covid for p in second]


def test_one_predictor_serves_many_threads(predictor: Predictor, phantoms: list[Path]):
    prepared = [predictor.prepare(read_image(p)) for p in phantoms[:16]]
    expected = [s.p_covid for s in predictor.score(prepared)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda k: [s.p_covid for s in predictor.score(prepared[k:] + prepared[:k])],
                                range(8)))
    for k, got in enumerate(results):
        assert got == pytest.approx(expected[k:] + expected[:k], abs=1e-6)


@pytest.mark.slow
def test_predict_command_leaves_the_run_untouched_even_when_run_twice_at_once(
    tiny_run: Path, phantoms: list[Path], tmp_path: Path
):
    before = tree_digest(tiny_run)
    env_cache = {"COVIDSCAN_CACHE": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "covidscan", "-q", "predict", str(tiny_run), *map(str, phantoms[:6]),
             "--engine", engine, "--out", str(tmp_path / f"p{k}.csv")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **env_cache},
        )
        for k, engine in enumerate(("onnx", "onnx"))  # both export the cached ONNX file at the same time
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert tree_digest(tiny_run) == before
    a, b = ((tmp_path / f"p{k}.csv").read_text() for k in range(2))
    assert a == b and len(a.splitlines()) == 7
    assert len(list((tmp_path / "cache" / "onnx").glob("*.onnx"))) == 1
    assert not list((tmp_path / "cache" / "onnx").glob("*.part"))


def test_runs_written_by_covidscan_0_1_still_load(tiny_run: Path, phantoms: list[Path], tmp_path: Path):
    old = tmp_path / "old"
    shutil.copytree(tiny_run, old)
    new = load_checkpoint(tiny_run)
    legacy = legacy_checkpoint(new)
    (old / "checkpoint.json").write_text(json.dumps(legacy))
    before = tree_digest(old)
    converted = load_checkpoint(old)
    assert converted.calibration.threshold == new.calibration.threshold
    assert converted.weights_sha256 == new.weights_sha256 and converted.modality == "ct"
    # fp32 on both: a format-1 run has no bf16 check, so under auto it would serve fp32 beside a bf16 one
    a = Predictor.from_run(old, precision="fp32").predict(phantoms[:3])
    b = Predictor.from_run(tiny_run, precision="fp32").predict(phantoms[:3])
    assert [p.p_covid for p in a] == pytest.approx([p.p_covid for p in b], abs=1e-6)
    assert tree_digest(old) == before  # read in memory, never rewritten


@pytest.mark.parametrize(
    ("damage", "error", "match"),
    [
        (lambda run: (run / "model.safetensors").write_bytes(b"not weights"), StorageError, "safetensors"),
        (lambda run: (run / "model.safetensors").write_text("x" * 64), StorageError, "safetensors"),
        (lambda run: (run / "checkpoint.json").write_text("{"), StorageError, "checkpoint.json"),
        (lambda run: (run / "checkpoint.json").write_text('{"format": 1}'), StorageError, "lacks the key"),
        (lambda run: (run / "checkpoint.json").write_text('{"format": 9}'), StorageError, "format 9"),
        (lambda run: (run / "checkpoint.json").unlink(), RunNotFoundError, "not a covidscan run"),
    ],
)
def test_damaged_runs_name_the_file(tiny_run: Path, tmp_path: Path, damage, error, match):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    damage(run)
    with pytest.raises(error, match=match):
        Predictor.from_run(run)


def test_missing_run_is_a_not_found_error(tmp_path: Path):
    with pytest.raises(RunNotFoundError, match="does not exist") as info:
        Predictor.from_run(tmp_path / "nowhere")
    assert info.value.http_status == 404


def _run_with_verdict(tiny_run: Path, folder: Path, verdict: PrecisionVerdict | None) -> Path:
    """A copy of the tiny run whose checkpoint carries ``verdict`` as its bf16 check."""
    shutil.copytree(tiny_run, folder)
    write_checkpoint(folder, load_checkpoint(folder).model_copy(update={"bf16": verdict}))
    return folder


@pytest.fixture(scope="module")
def measured_verdict(tiny_run: Path, phantoms: list[Path]) -> PrecisionVerdict:
    """The tiny run's bf16 check measured for real on 8 phantoms (emulated bf16 where the CPU lacks it)."""
    run = load_run(tiny_run)
    prepare = Predictor.from_run(tiny_run, precision="fp32").prepare
    pixels = np.stack([prepare(read_image(p)).pixels for p in phantoms[:8]])
    batches = [to_model_batch(pixels[i : i + 4], run.model.mean, run.model.std) for i in range(0, 8, 4)]
    return bf16_verdict(run.model, batches, run.calibration.proba, run.calibration.threshold)


def test_precision_auto_follows_the_cpu_and_the_run(tiny_run, measured_verdict, phantoms, tmp_path):
    allowed = measured_verdict.model_copy(update={"allowed": True})
    run = _run_with_verdict(tiny_run, tmp_path / "allowed", allowed)
    native = bf16_supported()
    assert Predictor.from_run(run).precision == ("bf16" if native else "fp32")  # emulated bf16 is slower
    assert Predictor.from_run(run, precision="fp32").precision == "fp32"
    # asked for, bf16 runs on every CPU (emulated without native bf16): the same path the service takes on AMX
    bf16 = Predictor.from_run(run, precision="bf16")
    fp32 = Predictor.from_run(run, precision="fp32")
    assert bf16.precision == "bf16"
    p16 = np.array([p.p_covid for p in bf16.predict(phantoms[:6])])
    p32 = np.array([p.p_covid for p in fp32.predict(phantoms[:6])])
    assert np.abs(p16 - p32).max() < 0.02  # bf16 keeps 8 bits of mantissa: close, not equal
    # engines that compute in fp32 only stay in fp32 under auto, whatever the CPU
    assert Predictor.from_run(run, fast=False).precision == "fp32"


def test_precision_bf16_is_refused_where_the_run_did_not_allow_it(tiny_run, measured_verdict, tmp_path):
    verdict = measured_verdict.model_copy(update={"allowed": False, "reason": "3 of 8 changed"})
    refused = _run_with_verdict(tiny_run, tmp_path / "refused", verdict)
    never = _run_with_verdict(tiny_run, tmp_path / "never", None)
    for run in (refused, never):
        assert Predictor.from_run(run).precision == "fp32"
    with pytest.raises(ConfigError, match=r"refused bf16 \(3 of 8 changed\)"):
        Predictor.from_run(refused, precision="bf16")
    with pytest.raises(ConfigError, match="never measured"):
        Predictor.from_run(never, precision="bf16")
    with pytest.raises(ConfigError, match="torch or compiled engine"):
        Predictor.from_run(tiny_run, precision="bf16", fast=False)
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, bf16"):
        Predictor.from_run(tiny_run, precision="fp16")


def test_bf16_verdict_counts_changed_labels(tiny_run: Path, phantoms: list[Path]):
    run = load_run(tiny_run)
    predictor = Predictor.from_run(tiny_run)
    pixels = np.stack([predictor.prepare(read_image(p)).pixels for p in phantoms[:8]])
    batches = [to_model_batch(pixels[i : i + 4], run.model.mean, run.model.std) for i in range(0, 8, 4)]
    cal = run.calibration
    verdict = bf16_verdict(run.model, batches, cal.proba, cal.threshold)
    assert verdict.images == 8 and 0 <= verdict.labels_changed <= 8
    assert verdict.allowed == (verdict.labels_changed / 8 <= 0.005) and verdict.max_abs_dp < 0.1
    never = bf16_verdict(run.model, [], cal.proba, cal.threshold)
    assert not never.allowed and never.images == 0
