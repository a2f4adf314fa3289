"""``covidscan predict --engine ray --address``: a Ray cluster started apart by ``ray start --head``, as on a
cluster's head node, with token authentication on (Ray's default for local clusters since 2.59), reached as a
node of it (``--address auto``) and from outside through Ray Client (``--address ray://HOST:PORT``)."""

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

from covidscan.inference import predict

pytest.importorskip("ray", reason="Ray is not installed (pip install 'covidscan[ray]')")
pytestmark = pytest.mark.slow  # a cluster starts in about 10 s, each job in 10-30 s


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
def head(cluster_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A 2-CPU Ray head in its own session, and its Ray Client port; stopped with all it started."""
    client = _free_port()
    log = tmp_path_factory.mktemp("ray-head") / "head.log"
    command = [shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray", "start", "--head",
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


@pytest.fixture(scope="module")
def images(phantom_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cluster-images")
    for path in sorted((phantom_manifest.parent / "images").rglob("*.png"))[:10]:
        shutil.copy(path, folder / path.name)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return folder


def _same_as_in_process(out: Path, tiny_run: Path, images: Path) -> None:
    got = pd.read_csv(out / "predictions.csv")
    want = predict(tiny_run, [images], engine="torch", progress=False)
    assert list(got["path"]) == list(want["path"]) and len(got) == 11
    assert (got["p_covid"] - want["p_covid"]).abs().max() <= 1e-4
    assert got["error"].notna().sum() == 1  # the corrupt file: a row with its error


@pytest.mark.parametrize("how", ["auto", "ray-client"])
def test_a_cluster_started_apart_predicts_like_in_process(head, cluster_env, tiny_run, images, tmp_path, how):
    # auto: on a node of the cluster, where `ray start` left its address; ray://: from outside it
    address = "auto" if how == "auto" else f"ray://127.0.0.1:{head}"
    out = tmp_path / "out"
    args = [str(tiny_run), str(images), "--engine", "ray", "--address", address, "--out", str(out)]
    done = _predict(args, cluster_env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    said = " ".join(done.stdout.split())
    assert "11 images: 11 predicted now, 0 in earlier shards, 1 with an error" in said
    _same_as_in_process(out, tiny_run, images)


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
