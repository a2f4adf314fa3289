"""``covidscan predict --engine ray`` on a real local Ray (2 CPUs): the same probabilities as the in-process
engine, resumable shards, an unreadable file as a row with its error, and the command line; and on a cluster
started apart, through ``--address auto`` and ``--address ray://``."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from covidscan.cli import app
from covidscan.errors import ConfigError, StorageError
from covidscan.inference import predict
from covidscan.inference.predict import collect_inputs
from covidscan.inference.ray_predict import MERGED, SHARDS, _blocks, _Scorer, predict_on_ray
from covidscan.outputs import read_csv

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'covidscan[ray]')")
pytestmark = pytest.mark.slow  # a local Ray starts in about 10 s


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray with 2 CPUs for the module, as on the 2-core CI machine (no usage report sent)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def images(phantom_manifest: Path, tmp_path: Path) -> Path:
    """12 phantom slices and one corrupt 'image'."""
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted(phantom_manifest.parent.rglob("*.png"))[:12]:
        if "mask" not in str(path):
            shutil.copy(path, folder / path.name)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return folder


def test_the_same_probabilities_as_the_torch_engine_and_a_bad_file_is_a_row(
    local_ray, tiny_run: Path, images: Path, tmp_path: Path
):
    done = predict_on_ray(tiny_run, [images], tmp_path / "out", num_workers=2, batch_size=2, progress=False)
    ref = predict(tiny_run, [images], engine="torch", progress=False)
    merged = pd.read_csv(done.merged, keep_default_na=False, na_values=[""])
    assert done.predicted == done.images == len(ref) and done.resumed == 0
    assert list(merged.columns) == list(ref.columns) and list(merged["path"]) == list(ref["path"])
    ok = ref["error"] == ""
    assert (merged.loc[ok, "p_covid"] - ref.loc[ok, "p_covid"]).abs().max() <= 1e-4
    assert (merged.loc[ok, "label"] == ref.loc[ok, "label"]).all()
    bad = merged[merged["path"].str.endswith("corrupt.png")]
    assert len(bad) == 1 and bad["error"].iloc[0] and pd.isna(bad["p_covid"].iloc[0])
    assert done.errors == 1
    assert len(list((tmp_path / "out" / SHARDS).glob("*.parquet"))) >= 2  # blocks went to several shards


def test_a_rerun_predicts_only_what_is_missing(local_ray, tiny_run: Path, images: Path, tmp_path: Path):
    out = tmp_path / "out"
    first = sorted(images.glob("*.png"))[:5]
    done = predict_on_ray(tiny_run, first, out, num_workers=1, batch_size=1, progress=False)  # 4 + 1
    assert (done.predicted, done.resumed) == (5, 0)
    shard = sorted((out / SHARDS).glob("*.parquet"))[0]
    cut = len(pd.read_parquet(shard))
    shard.write_bytes(shard.read_bytes()[:20])  # a shard damaged after it was written: its images again
    done = predict_on_ray(tiny_run, [images], out, num_workers=2, batch_size=4, progress=False)
    assert done.images == 13 and done.resumed == 5 - cut
    assert done.predicted == 13 - done.resumed
    merged = pd.read_csv(out / MERGED)
    assert merged["path"].is_unique and len(merged) == 13


def test_the_command_writes_shards_and_the_joined_csv(
    local_ray, tiny_run: Path, images: Path, tmp_path: Path
):
    out = tmp_path / "out"
    args = ["predict", str(tiny_run), str(images), "--engine", "ray", "--num-workers", "1", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "13 images: 13 predicted now, 0 in earlier shards, 1 with an error" in said
    assert len(pd.read_csv(out / MERGED)) == 13
    again = CliRunner().invoke(app, args)
    assert "0 predicted now, 13 in earlier shards" in " ".join(again.output.split())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--out", "preds.csv"], "give --out DIR"),
        (["--out", "o", "--cam", "cams"], "--cam cannot be used with --engine ray"),
        (["--out", "o", "--num-workers", "0"], "--num-workers and --batch-size must be at least 1"),
    ],
)
def test_the_command_refuses_what_ray_does_not_do(
    tiny_run: Path, images: Path, extra: list[str], message: str
):
    result = CliRunner().invoke(app, ["predict", str(tiny_run), str(images), "--engine", "ray", *extra])
    assert result.exit_code != 0 and message in " ".join(result.output.split())


def test_a_file_name_that_is_not_utf8_is_predicted_and_kept(
    local_ray, tiny_run: Path, images: Path, tmp_path: Path
):
    # Arrow (Ray's blocks, Parquet) carries only valid UTF-8 text; the name travels as its own bytes
    source = next(images.glob("*.png"))
    odd = os.fsdecode(bytes(images) + b"/\xff-slice.png")
    shutil.copy(source, odd)
    done = predict_on_ray(tiny_run, [odd, source], tmp_path / "out", num_workers=1, progress=False)
    merged = read_csv(done.merged)
    assert list(merged["path"]) == [odd, str(source)] and merged["p_covid"].notna().all()
    assert merged["p_covid"].iloc[0] == pytest.approx(merged["p_covid"].iloc[1], abs=1e-6)  # same pixels
    again = predict_on_ray(tiny_run, [odd, source], tmp_path / "out", num_workers=1, progress=False)
    assert (again.predicted, again.resumed) == (0, 2)


def test_each_actor_call_writes_its_block_as_one_whole_shard(tiny_run: Path, images: Path, tmp_path: Path):
    # What each Ray actor runs, called here directly: the block's shard exists when the call returns.
    items = collect_inputs(images)
    shards = tmp_path / SHARDS
    shards.mkdir()
    scorer = _Scorer(str(tiny_run), str(shards), "auto", 5, 1)
    for k, block in enumerate(_blocks(list(enumerate(items)), 5), start=1):
        result = scorer(block)
        assert result.to_dict("list") == {"rows": [len(block)], "error": [""]}
        assert len(list(shards.iterdir())) == k
    rows = pd.concat([pd.read_parquet(s) for s in sorted(shards.iterdir())])
    assert sorted(rows["index"]) == list(range(len(items))) == list(range(13))


def _same_as_in_process(merged: Path, tiny_run: Path, inputs: list[Path]) -> None:
    ref = predict(tiny_run, inputs, engine="torch", progress=False)
    got = pd.read_csv(merged, keep_default_na=False, na_values=[""])
    assert list(got["path"]) == list(ref["path"])
    assert (got["p_covid"] - ref["p_covid"]).abs().max() <= 1e-4


@pytest.fixture
def many(images: Path, tmp_path: Path) -> Path:
    """40 links to the 12 phantom slices: a job of 10 blocks of 4 (batch size 1)."""
    folder = tmp_path / "many"
    folder.mkdir()
    slices = [p for p in sorted(images.glob("*.png")) if p.name != "corrupt.png"]
    for i in range(40):
        (folder / f"{i:02d}-{slices[i % len(slices)].name}").symlink_to(slices[i % len(slices)])
    return folder


def test_a_killed_job_keeps_the_blocks_written_before_and_a_rerun_finishes(
    local_ray, tiny_run: Path, many: Path, tmp_path: Path
):
    # Shards are written as the blocks are scored (not all at the end), so a job killed half-way keeps them.
    out = tmp_path / "out"
    job = subprocess.Popen(
        [sys.executable, "-m", "covidscan", "-q", "predict", str(tiny_run), str(many), "--engine", "ray",
         "--num-workers", "1", "--batch-size", "1", "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while len(list((out / SHARDS).glob("*.parquet"))) < 2 and time.monotonic() < deadline:
            assert job.poll() is None, "the job ended before it had written 2 of its 10 shards"
            time.sleep(0.02)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the driver and what shares its session
        job.wait()
    # Ray may run the actor outside the driver's session: it can finish its block (a whole shard) after the
    # kill. Count what was kept once no shard has appeared for 3 s.
    count, still_since = -1, time.monotonic()
    while time.monotonic() - still_since < 3 and time.monotonic() < deadline + 30:
        now = len(list((out / SHARDS).glob("*.parquet")))
        if now != count:
            count, still_since = now, time.monotonic()
        time.sleep(0.1)
    kept = sum(len(pd.read_parquet(s)) for s in (out / SHARDS).glob("*.parquet"))
    assert 4 <= kept < 40 and not (out / MERGED).exists()
    assert not [p for p in (out / SHARDS).iterdir() if not p.name.endswith(".parquet")]  # no side files
    done = predict_on_ray(tiny_run, [many], out, num_workers=2, batch_size=1, progress=False)
    assert (done.resumed, done.predicted) == (kept, 40 - kept)
    _same_as_in_process(done.merged, tiny_run, [many])


def test_a_full_disk_is_one_error_that_keeps_what_was_written(local_ray, tiny_run: Path, many: Path, tmpfs):
    small_disk = tmpfs("8k")  # room for a shard or two
    out = small_disk / "out"
    with pytest.raises(StorageError) as caught:
        predict_on_ray(tiny_run, [many], out, num_workers=1, batch_size=1, progress=False)
    message = str(caught.value)
    assert "Traceback" not in message and "No space left on device; free disk space" in message
    assert "blocks of predictions could not be written: the other" in message
    assert str(out / SHARDS) in message
    shards = list((out / SHARDS).iterdir())
    assert shards and all(s.name.endswith(".parquet") for s in shards)  # whole shards, no side files
    kept = sum(len(pd.read_parquet(s)) for s in shards)
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)  # space freed
    done = predict_on_ray(tiny_run, [many], out, num_workers=1, batch_size=1, progress=False)
    assert (done.resumed, done.predicted) == (kept, 40 - kept)
    _same_as_in_process(done.merged, tiny_run, [many])


# A cluster started apart by `ray start --head`, as on a cluster's head node, with token authentication on
# (Ray's default for it in 2.60), reached as a node of it (--address auto) and from outside through Ray
# Client (--address ray://HOST:PORT).


def _free_port() -> int:
    # the kernel's ephemeral ports, above the 10002-19999 Ray gives its workers
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment of the cluster and of covidscan beside it: token authentication with a token of its
    own, and a Ray temp folder of its own, where `ray start` leaves the address that ``auto`` finds (in
    /tmp/ray it would outlive the test and send a later local ``ray.init`` to the stopped cluster)."""
    token = tmp_path_factory.mktemp("ray-token") / "auth_token"
    token.write_text(secrets.token_hex(32))
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's Unix sockets live under it
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "RAY_TMPDIR"))}
    yield {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_TMPDIR": ray_tmp}
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """A folder that the cluster's node does not see, as a path on another machine would be: an empty tmpfs
    covers it in the head's own mount namespace. None where this machine cannot make one (unshare needs
    root, or the right to make user namespaces)."""
    folder = tmp_path_factory.mktemp("elsewhere")
    probe = subprocess.run(["unshare", "--mount", "mount", "-t", "tmpfs", "none", str(folder)],
                           capture_output=True, check=False) if shutil.which("unshare") else None
    return folder if probe and probe.returncode == 0 else None


@pytest.fixture(scope="module")
def head(
    cluster_env: dict[str, str], elsewhere: Path | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[int]:
    """A 2-CPU Ray head in its own session (and mount namespace, hiding ``elsewhere``), and its Ray Client
    port; stopped with all it started."""
    client = _free_port()
    log = tmp_path_factory.mktemp("ray-head") / "head.log"
    hide = [] if elsewhere is None else [
        "unshare", "--mount", "sh", "-c", 'mount -t tmpfs none "$0" && exec "$@"', str(elsewhere)]
    command = [*hide, shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray", "start", "--head",
               "--block", f"--port={_free_port()}", f"--ray-client-server-port={client}", "--num-cpus=2",
               "--include-dashboard=false", "--disable-usage-stats"]
    with log.open("w") as out:
        process = subprocess.Popen(command, env=cluster_env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:  # the client server is the last part up
            assert process.poll() is None, log.read_text()[-3000:]
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", client)) == 0:
                    break
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield client
    finally:
        # `ray start --block` stops its processes on SIGTERM, but gracefully (30 s here): whatever is left
        # of a test cluster after a few seconds is killed, every process of its session
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _predict(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "covidscan", "-q", "predict", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def _client_server_logs(env: dict[str, str]) -> str:
    """The head's Ray Client server logs, which say why a connection's server did not start."""
    logs = sorted(Path(env["RAY_TMPDIR"]).glob("**/logs/ray_client_server*.*"))
    return "".join(f"\n--- {log.name}:\n{log.read_text(errors='replace')[-2000:]}" for log in logs)


@pytest.mark.parametrize("how", ["auto", "ray-client"])
def test_a_cluster_started_apart_predicts_like_in_process(head, cluster_env, tiny_run, images, tmp_path, how):
    # auto: on a node of the cluster, where `ray start` left its address; ray://: from outside it
    address = "auto" if how == "auto" else f"ray://127.0.0.1:{head}"
    out = tmp_path / "out"
    args = [str(tiny_run), str(images), "--engine", "ray", "--address", address, "--out", str(out)]
    done = _predict(args, cluster_env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:] + _client_server_logs(cluster_env)
    said = " ".join(done.stdout.split())
    assert "13 images: 13 predicted now, 0 in earlier shards, 1 with an error" in said
    assert "SIGTERM" not in done.stderr  # a line of Ray Client's that means nothing to the user
    _same_as_in_process(out / MERGED, tiny_run, [images])


def test_a_client_server_that_died_starting_is_tried_again_then_named(monkeypatch):
    # The head starts one Ray Client server process per connection; one that dies while starting (seen in
    # CI, on a head busy with other work) is a new try, not an error, unless it keeps happening.
    from covidscan.inference import ray_predict

    calls: list[str] = []

    def init(address, **_):
        calls.append(address)
        if len(calls) < failures + 1:
            raise ConnectionAbortedError(  # what Ray Client raises for it
                f"Initialization failure from server: {ray_predict.CLIENT_SERVER_FAILED}. "
                "See ray_client_server_23000.err for detailed logs.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray_predict.time, "sleep", lambda s: None)
    failures = 1
    assert ray_predict._start_ray("ray://head:10001") is ray and calls == ["ray://head:10001"] * 2
    calls.clear()
    failures = ray_predict.CLIENT_SERVER_ATTEMPTS
    with pytest.raises(ConfigError, match=r"cannot connect to Ray at 'ray://head:10001'.*ray_client_server_23000"):
        ray_predict._start_ray("ray://head:10001")
    assert len(calls) == ray_predict.CLIENT_SERVER_ATTEMPTS


def test_a_cluster_that_wants_a_token_says_so(head, cluster_env, tiny_run, images, tmp_path):
    env = {k: v for k, v in cluster_env.items() if not k.startswith("RAY_AUTH")}
    # Ray Client's connection timeouts, 5 s growing to 30 s, cut to 1-2 s: the outcome is the same, sooner
    env |= {"RAY_CLIENT_INITIAL_CONNECTION_TIMEOUT_S": "1", "RAY_CLIENT_MAX_CONNECTION_TIMEOUT_S": "2"}
    args = [str(tiny_run), str(images), "--engine", "ray", "--address", f"ray://127.0.0.1:{head}",
            "--out", str(tmp_path / "out")]
    done = _predict(args, env)
    said = " ".join((done.stdout + done.stderr).split())
    assert done.returncode != 0 and "Traceback" not in said
    assert f"cannot connect to Ray at 'ray://127.0.0.1:{head}'" in said and "RAY_AUTH_MODE=token" in said


def test_every_path_the_cluster_lacks_is_named_with_the_fix(
    head, elsewhere, cluster_env, tiny_run, images, tmp_path
):
    # Over ray:// the cluster reads the run and the images, and writes the shards, at this machine's paths;
    # all it lacks is said at once (each check over Ray Client takes seconds).
    if elsewhere is None:
        pytest.skip("a folder hidden from the cluster needs `unshare --mount` (root)")
    run, inputs = shutil.copytree(tiny_run, elsewhere / "run"), shutil.copytree(images, elsewhere / "images")
    out = elsewhere / "out"
    done = _predict([str(run), str(inputs), "--engine", "ray", "--address", f"ray://127.0.0.1:{head}",
                     "--out", str(out)], cluster_env)
    said = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2 and "Traceback" not in said, said[-3000:]
    assert "on the Ray cluster's node" in said, said[-3000:]
    for what in (f"the run {run} is not there", f"the image {inputs}/", f"the output folder {out}/"):
        assert what in said, said[-3000:]
    assert said.count("is not there") == 3
    assert "same paths on its nodes" in said and "--address auto" in said
