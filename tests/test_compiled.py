"""The compiled engine: the torch engine's model compiled by torch.compile, one padded batch shape, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.runtime.cache_dir_utils import default_cache_dir
from torch.profiler import profile
from typer.testing import CliRunner

from covidscan.cli import app
from covidscan.errors import ConfigError
from covidscan.inference import Predictor
from covidscan.io import read_image
from covidscan.models import CompiledClassifier, FastClassifier, PrecisionVerdict
from covidscan.models.fast import _inductor_cache_of_this_cpu
from covidscan.runs import load_checkpoint, write_checkpoint


@pytest.fixture(scope="module")
def phantoms(phantom_manifest: Path) -> list[Path]:
    return sorted((phantom_manifest.parent / "images").rglob("*.png"))[:9]


@pytest.fixture(scope="module")
def compiled(tiny_run: Path) -> Predictor:
    return Predictor.from_run(tiny_run, engine="compiled", precision="fp32", batch_size=4)


def prepared(predictor: Predictor, paths: list[Path]) -> np.ndarray:
    return np.stack([predictor.prepare(read_image(p)).pixels for p in paths])


def test_compiled_engine_gives_the_torch_engines_numbers(tiny_run, compiled, phantoms):
    eager = Predictor.from_run(tiny_run, engine="torch", precision="fp32", batch_size=4)
    assert (compiled.engine, compiled.precision) == ("compiled", "fp32")
    pixels = prepared(eager, phantoms)
    logits, features = compiled.logits_and_features(pixels)  # batches of 4, 4 and 1 (padded)
    want_logits, want_features = eager.logits_and_features(pixels)
    assert logits.shape == want_logits.shape == (9,)
    np.testing.assert_allclose(logits, want_logits, atol=1e-4)
    np.testing.assert_allclose(features, want_features, atol=1e-4)
    got = [p.p_covid for p in compiled.predict(phantoms)]
    want = [p.p_covid for p in eager.predict(phantoms)]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_an_images_result_does_not_depend_on_the_images_beside_it(compiled, phantoms):
    pixels = prepared(compiled, phantoms)
    alone = compiled.logits(pixels[:1])
    in_a_full_batch = compiled.logits(pixels[:4])
    in_a_padded_batch = compiled.logits(pixels[[0, 5]])
    # One graph for every batch; oneDNN's sums may still round differently in the last bits (so does the
    # torch engine's, across batch sizes).
    np.testing.assert_allclose([in_a_full_batch[0], in_a_padded_batch[0]], alone[0], rtol=0, atol=1e-5)


def test_no_batch_compiles_a_second_graph(tiny_run):
    model = Predictor.from_run(tiny_run, engine="torch", precision="fp32").model
    net = FastClassifier(model, torch.float32)
    compiled = CompiledClassifier(net, 4, model.input_size)
    shape = (4, 3, *model.input_size)
    with torch.inference_mode():
        made_in_inference_mode = torch.randn(shape)
    batches = [
        torch.randn(shape).contiguous(memory_format=torch.channels_last),  # as to_model_batch makes them
        torch.randn(shape),
        made_in_inference_mode,
        torch.randn(2, *shape[1:]),  # padded
        torch.randn(9, *shape[1:]),  # 4 + 4 + 1
    ]
    with torch._dynamo.config.patch(error_on_recompile=True):  # a second graph raises here
        for x in batches:
            logits, pooled = compiled.forward_pooled(x)
            with torch.inference_mode():
                want_logits, want_pooled = net.forward_pooled(x)
            np.testing.assert_allclose(logits, want_logits, atol=1e-4)
            np.testing.assert_allclose(pooled, want_pooled, atol=1e-4)


def test_one_compiled_predictor_serves_many_threads(compiled, phantoms):
    pixels = prepared(compiled, phantoms)
    want = compiled.logits(pixels)
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: compiled.logits(pixels), range(6)))
    for got in results:
        np.testing.assert_array_equal(got, want)


def test_compiled_bf16_where_the_run_allows_it(tiny_run, compiled, phantoms, tmp_path):
    run = tmp_path / "allowed"
    shutil.copytree(tiny_run, run)
    allowed = PrecisionVerdict(allowed=True, reason="0 of 8 test labels changed", images=8)
    write_checkpoint(run, load_checkpoint(run).model_copy(update={"bf16": allowed}))
    bf16 = Predictor.from_run(run, engine="compiled", precision="bf16", batch_size=4)
    assert bf16.precision == "bf16"
    pixels = prepared(compiled, phantoms)
    z16 = bf16.logits(pixels)
    p16, p32 = bf16.calibration.proba(z16), compiled.calibration.proba(compiled.logits(pixels))
    assert np.abs(p16 - p32).max() < 0.02  # bf16 keeps 8 bits of mantissa: close, not equal
    # The run's bf16 verdict was measured on the torch engine's bf16 model; it holds for the compiled one
    # because both compute the same numbers (Inductor hands the convolutions to the same oneDNN kernels).
    eager16 = Predictor.from_run(run, engine="torch", precision="bf16", batch_size=4)
    assert eager16.precision == "bf16"
    np.testing.assert_allclose(z16, eager16.logits(pixels), atol=1e-3)


def test_compiled_engine_errors_say_what_to_do(tiny_run, monkeypatch):
    with pytest.raises(ConfigError, match="compiles the fast"):
        Predictor.from_run(tiny_run, engine="compiled", fast=False)
    monkeypatch.setenv("CXX", "no-such-compiler-for-covidscan")
    with pytest.raises(ConfigError, match=r"needs a C\+\+ compiler .* use the torch engine"):
        Predictor.from_run(tiny_run, engine="compiled")


def test_predict_command_runs_the_compiled_engine(tiny_run, phantoms, tmp_path):
    out = tmp_path / "preds.csv"
    args = ["predict", str(tiny_run), *map(str, phantoms[:3]), "--engine", "compiled", "--out", str(out)]
    result = CliRunner().invoke(app, args, prog_name="covidscan")
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(out)
    assert len(rows) == 3 and rows["error"].isna().all()
    assert rows["p_covid"].between(0, 1).all()


def test_every_model_a_process_compiles_stays_compiled(tiny_run):
    # Dynamo counts each model compiled from the same forward function as a recompilation of it and past
    # its recompile limit runs the rest eagerly, with only a log line; the limit is lowered here to 1 so
    # that the second model would be the one lost.
    model = Predictor.from_run(tiny_run, engine="torch", precision="fp32").model
    x = torch.randn(3, 3, *model.input_size)
    with torch._dynamo.config.patch(recompile_limit=1):
        nets, compiled = [], []
        for _ in range(2):
            nets.append(FastClassifier(model, torch.float32))  # folded afresh: weights of its own
            before = counters["stats"]["unique_graphs"]
            compiled.append(CompiledClassifier(nets[-1], 4, model.input_size))
            assert counters["stats"]["unique_graphs"] == before + 1  # compiled, not skipped
        for net, model_compiled in zip(nets, compiled, strict=True):
            with profile() as prof:
                logits, _ = model_compiled.forward_pooled(x)
            assert any(e.name.startswith("Torch-Compiled Region") for e in prof.events())
            with torch.inference_mode():
                np.testing.assert_allclose(logits, net.forward_pooled(x)[0], atol=1e-4)


_LOGITS = """
import json, sys
import numpy as np
from covidscan.inference import Predictor
predictor = Predictor.from_run(sys.argv[1], engine="compiled", precision="fp32", batch_size=4)
pixels = np.random.default_rng(0).random((4, *predictor.checkpoint.input_size), dtype=np.float32)
print(json.dumps(predictor.logits(pixels).tolist()))
"""


def test_a_graph_cached_for_another_cpu_kind_is_not_reused(tiny_run, tmp_path):
    # Inductor's own cache keys ignore the CPU; ATEN_CPU_CAPABILITY=avx2 stands in for a CPU without AVX-512.
    # Where the CPU has none, a second process would be the same kind: one checks the numbers (20 s less).
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "ATEN_CPU_CAPABILITY")}
    env["COVIDSCAN_CACHE"] = str(tmp_path / "cache")
    got = []
    native = torch.backends.cpu.get_cpu_capability().lower()
    for capability in (None,) if native == "avx2" else (None, "avx2"):
        run_env = env if capability is None else {**env, "ATEN_CPU_CAPABILITY": capability}
        done = subprocess.run([sys.executable, "-c", _LOGITS, str(tiny_run)], env=run_env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        got.append(json.loads(done.stdout.strip().splitlines()[-1]))
    eager = Predictor.from_run(tiny_run, engine="torch", precision="fp32", batch_size=4)
    pixels = np.random.default_rng(0).random((4, *eager.checkpoint.input_size), dtype=np.float32)
    for logits in got:
        np.testing.assert_allclose(logits, eager.logits(pixels), atol=1e-4)
    assert len(list((tmp_path / "cache" / "inductor").iterdir())) >= 1


def test_a_cache_folder_the_user_names_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("COVIDSCAN_CACHE", str(tmp_path / "cache"))
    _inductor_cache_of_this_cpu.cache_clear()  # once per process: let it look again
    try:
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
        _inductor_cache_of_this_cpu()
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
        # Inductor sets the variable to its own default folder, which is not a choice of the user's
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
        _inductor_cache_of_this_cpu.cache_clear()
        _inductor_cache_of_this_cpu()
        ours = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
        assert ours.parent == tmp_path / "cache" / "inductor" and ours.is_dir()
    finally:
        _inductor_cache_of_this_cpu.cache_clear()


def test_an_unwritable_cache_folder_is_named(tiny_run, phantoms, tmp_path, monkeypatch):
    # The compiled engine keeps Inductor's cache in covidscan's; a folder that cannot be made is one error.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("COVIDSCAN_CACHE", str(blocker / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    _inductor_cache_of_this_cpu.cache_clear()  # once per process: let it look again
    try:
        args = ["predict", str(tiny_run), str(phantoms[0]), "--engine", "compiled", "--out",
                str(tmp_path / "preds.csv")]
        result = CliRunner().invoke(app, args, prog_name="covidscan")
    finally:
        _inductor_cache_of_this_cpu.cache_clear()
    assert result.exit_code != 0
    assert "cannot create the cache folder" in result.output and "set COVIDSCAN_CACHE" in result.output
    assert str(blocker) in result.output.replace("\n", "")
    assert "Traceback" not in result.output
