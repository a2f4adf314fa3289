"""covidscan.inference.engines: CPU features, the engines auto considers, the timed choice and its cache."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from covidscan.inference.engines import ENGINES, auto_candidates, choose_engine, cpu_features
from covidscan.runs import load_checkpoint
from covidscan.system import cache_dir


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Engine choices go to this test's folder, never the user's cache."""
    monkeypatch.setenv("COVIDSCAN_CACHE", str(tmp_path / "cache"))


def test_cpu_features_name_the_instruction_sets():
    cpu = cpu_features()
    assert {"model", "cores", "features", "torch_capability", "native_bf16"} <= set(cpu)
    assert set(cpu["features"]) <= {"AVX2", "AVX-512", "AVX-512 VNNI", "AVX-VNNI", "AVX-512 bf16", "AMX bf16",
                                    "AMX int8"}
    json.dumps(cpu)  # it goes into the cache and the benchmark's JSON as it is


def test_auto_considers_only_what_the_run_allows(tiny_run, tmp_path):
    checkpoint = load_checkpoint(tiny_run)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    options = {"precision": "auto", "fast": True, "onnx_path": None}
    assert auto_candidates(tiny_run, checkpoint, cpu, **options) == ["torch"]  # nothing exported, no int8
    assert auto_candidates(tiny_run, checkpoint, cpu, **{**options, "onnx_path": "m.onnx"}) == ["onnx"]
    assert auto_candidates(tiny_run, checkpoint, cuda, **options) == ["torch"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.onnx").write_bytes(b"")
    (run / "model.int8.onnx").write_bytes(b"")
    # an int8 file without an allowing verdict in the checkpoint is never a candidate
    assert auto_candidates(run, checkpoint, cpu, **options) == ["torch", "onnx"]
    assert auto_candidates(run, checkpoint, cpu, **{**options, "precision": "bf16"}) == ["torch"]
    assert set(auto_candidates(run, checkpoint, cpu, **options)) <= set(ENGINES)


def test_choice_is_timed_once_then_read_from_the_cache(tiny_run):
    checkpoint = load_checkpoint(tiny_run)
    built: list[str] = []

    def build(name: str):
        built.append(name)
        delay = {"torch": 0.02, "onnx": 0.0}[name]
        return lambda x: time.sleep(delay)

    assert choose_engine(tiny_run, checkpoint, ["torch"], build, batch_size=8) == "torch"
    assert built == []  # a single candidate is never timed
    assert choose_engine(tiny_run, checkpoint, ["torch", "onnx"], build, batch_size=8) == "onnx"
    assert built == ["torch", "onnx"]
    (record,) = cache_dir("engines").glob("*.json")
    saved = json.loads(record.read_text())
    assert saved["choice"] == "onnx" and saved["images_per_s"]["onnx"] > saved["images_per_s"]["torch"]
    assert saved["cpu"] == cpu_features()
    assert choose_engine(tiny_run, checkpoint, ["torch", "onnx"], build, batch_size=8) == "onnx"
    assert built == ["torch", "onnx"]  # the cached choice: nothing built or timed again
    record.write_text("{not json")  # a damaged cache file is measured again, not an error
    assert choose_engine(tiny_run, checkpoint, ["torch", "onnx"], build, batch_size=8) == "onnx"
    assert built == ["torch", "onnx"] * 2
