"""int8: static QDQ quantisation of a run, its per-run check in the checkpoint, and the int8 engine."""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import covidscan.export
from covidscan.cli import app
from covidscan.errors import ConfigError
from covidscan.export import export_int8
from covidscan.inference import Predictor
from covidscan.io import list_images
from covidscan.runs import INT8_FILE, file_sha256, load_run, write_checkpoint
from covidscan.system import INT8_KERNELS, cache_dir, int8_kernels, int8_kernels_of


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Engine choices and ONNX exports go to this test's folder, never the user's cache."""
    monkeypatch.setenv("COVIDSCAN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def int8_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of tiny_run (shared by other tests, so never written to) with an allowed int8 model.

    The limits are loosened: a 2-epoch model's probabilities sit near its threshold, and whether int8
    moves one of them across depends on the CPU's int8 kernels; the refusal is tested with tight limits.
    """
    run = tmp_path_factory.mktemp("int8") / "run"
    shutil.copytree(tiny_run, run)
    export_int8(run, max_label_change=1.0, max_auc_delta=1.0)
    return run


@pytest.fixture(scope="module")
def phantoms(phantom_manifest: Path) -> list[str]:
    return [str(p) for p in list_images(phantom_manifest.parent / "images")][:12]


def test_allowed_int8_is_recorded_in_the_checkpoint_and_serves_like_fp32(int8_run, phantoms):
    verdict = load_run(int8_run).checkpoint.int8  # the rewritten checkpoint still loads (its seal holds)
    assert verdict is not None and verdict.allowed
    assert verdict.sha256 == file_sha256(int8_run / INT8_FILE)
    assert verdict.int8_kernels == int8_kernels()  # the kind of CPU it speaks for
    assert verdict.images > 0 and verdict.labels_changed <= verdict.images and verdict.auc_delta is not None
    assert "test labels changed" in verdict.reason and "ROC AUC" in verdict.reason
    int8 = Predictor.from_run(int8_run, engine="int8")
    fp32 = Predictor.from_run(int8_run, engine="torch", precision="fp32")
    assert (int8.engine, int8.precision) == ("int8", "int8")
    p8 = np.array([p.p_covid for p in int8.predict(phantoms)])
    p32 = np.array([p.p_covid for p in fp32.predict(phantoms)])
    # int8 moves probabilities by quantisation noise only: well under what a label change would take
    assert np.abs(p8 - p32).max() < 0.05
    # auto times torch against int8 once, keeps the choice in the cache, and serves one of them
    auto = Predictor.from_run(int8_run)
    assert auto.engine in ("torch", "int8")
    choices = list(cache_dir("engines").glob("*.json"))
    assert len(choices) == 1 and auto.engine in choices[0].read_text()
    # precision fp32 asks for the fp32 numbers: auto then never picks int8
    assert Predictor.from_run(int8_run, precision="fp32").engine == "torch"


def test_a_changed_int8_file_is_refused(int8_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(int8_run, run)
    with open(run / INT8_FILE, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ConfigError, match="not the file its int8 check measured"):
        Predictor.from_run(run, engine="int8")
    (run / INT8_FILE).unlink()
    with pytest.raises(ConfigError, match="is missing"):
        Predictor.from_run(run, engine="int8")
    assert Predictor.from_run(run).engine == "torch"  # auto leaves a missing int8 model out
    checkpoint = load_run(run).checkpoint
    assert checkpoint.int8 is not None
    refused = checkpoint.int8.model_copy(update={"allowed": False})
    write_checkpoint(run, checkpoint.model_copy(update={"int8": refused}))
    with pytest.raises(ConfigError, match="its int8 check refused it"):
        Predictor.from_run(run, engine="int8")


AVX2_ONLY = frozenset({"sse4_2", "avx", "avx2", "fma"})


@pytest.mark.parametrize(("machine", "flags", "kind"), [
    ("x86_64", AVX2_ONLY, "saturating"),  # VPMADDUBSW: pairs of products added in 16 bits
    ("x86_64", AVX2_ONLY | {"avx512f", "avx512bw"}, "saturating"),  # AVX-512 without VNNI: the same
    ("x86_64", AVX2_ONLY | {"avx512f", "avx512_vnni"}, "vnni"),
    ("x86_64", AVX2_ONLY | {"avx_vnni"}, "vnni"),
    ("x86_64", AVX2_ONLY | {"avx512f", "avx512_vnni", "amx_int8", "amx_tile"}, "vnni"),
    ("aarch64", frozenset({"asimd", "asimddp"}), "other"),
    ("x86_64", frozenset(), "other"),  # flags that could not be read
])
def test_int8_kernels_follow_the_cpu(machine, flags, kind):
    assert int8_kernels_of(machine, flags) == kind


def test_an_int8_check_made_on_another_kind_of_cpu_does_not_serve_here(int8_run, tmp_path):
    # benchmarks/measure_int8_kernels.py on an AVX2-only EPYC: a run's int8 model computed exactly (as with
    # VNNI) moved 9 of 203 test labels, on that CPU's kernels 35: one kind's check says nothing of another.
    run = tmp_path / "run"
    shutil.copytree(int8_run, run)
    checkpoint = load_run(run).checkpoint
    assert checkpoint.int8 is not None
    other = next(kind for kind in INT8_KERNELS if kind != int8_kernels())
    write_checkpoint(run, checkpoint.model_copy(update={"int8": checkpoint.int8.model_copy(
        update={"int8_kernels": other})}))
    with pytest.raises(ConfigError, match=f"measured with {other} int8 kernels and this CPU has "
                                          f"{int8_kernels()} ones.*covidscan export {run} --int8"):
        Predictor.from_run(run, engine="int8")
    assert Predictor.from_run(run).engine != "int8"  # auto leaves it out
    # a check from before the kind was recorded (made on VNNI CPUs) serves wherever products do not clip
    write_checkpoint(run, checkpoint.model_copy(update={"int8": checkpoint.int8.model_copy(
        update={"int8_kernels": ""})}))
    if int8_kernels() == "saturating":
        with pytest.raises(ConfigError, match="measured with vnni int8 kernels"):
            Predictor.from_run(run, engine="int8")
    else:
        assert Predictor.from_run(run, engine="int8").engine == "int8"


@pytest.mark.slow  # a second quantisation and check (about 10 s)
def test_export_int8_refused_says_why_exits_non_zero_and_removes_the_old_file(
    int8_run, tmp_path, monkeypatch, tiny_run
):
    run = tmp_path / "run"
    shutil.copytree(int8_run, run)
    # No real model can pass a negative limit: the refusal path, whatever this CPU's int8 kernels give.
    monkeypatch.setattr(covidscan.export, "export_int8", partial(export_int8, max_auc_delta=-1.0))
    result = CliRunner().invoke(app, ["-q", "export", str(run), "--int8"])
    assert result.exit_code != 0
    assert "int8 refused" in result.output and "test labels changed" in result.output
    assert not (run / INT8_FILE).exists()  # the earlier, allowed file no longer serves
    verdict = load_run(run).checkpoint.int8
    assert verdict is not None and not verdict.allowed and verdict.auc_delta is not None
    with pytest.raises(ConfigError, match="refused"):
        Predictor.from_run(run, engine="int8")
    never = CliRunner().invoke(app, ["predict", str(tiny_run), str(tmp_path), "--engine", "int8",
                                     "--out", str(tmp_path / "p.csv")])
    assert never.exit_code != 0 and "int8 was never checked" in never.output
