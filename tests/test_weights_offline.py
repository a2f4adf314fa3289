"""Without a network, ImageNet weights fail at once with one line that says what to do.

Deterministic whatever the machine's network: the download host is made unreachable by a proxy on a closed
local port (a dead corporate proxy looks the same to covidscan), or downloads are switched off.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import huggingface_hub.constants
import pytest

import covidscan.training  # imported up front: the timings count the command, not first imports
from covidscan.models.weights import PROBE_TIMEOUT_S, unreachable
from test_cli import covidscan


def _closed_port() -> int:
    """A local TCP port nobody listens on: connecting to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty private torch.hub and Hugging Face caches, downloads allowed, no proxy set."""
    for var in ("COVIDSCAN_OFFLINE", "HF_HUB_OFFLINE", "https_proxy", "HTTPS_PROXY", "http_proxy",
                "HTTP_PROXY", "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


@pytest.fixture
def dead_proxy(empty_caches: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """Every HTTP(S) download goes through a proxy that refuses connections."""
    port = _closed_port()
    for var in ("https_proxy", "http_proxy"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{port}")
    return port


def test_an_unreachable_host_is_one_quick_attempt(empty_caches: Path):
    port = _closed_port()
    start = time.perf_counter()
    reason = unreachable(f"https://127.0.0.1:{port}/weights.pth")
    assert time.perf_counter() - start < PROBE_TIMEOUT_S
    assert reason is not None and f"no network: 127.0.0.1:{port} cannot be reached" in reason

    with socket.socket() as server:  # a listening host is reachable
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert unreachable(f"http://127.0.0.1:{server.getsockname()[1]}/x") is None


def test_the_proxy_is_what_is_probed(dead_proxy: int):
    reason = unreachable("https://download.pytorch.org/models/resnet50-11ad3fa6.pth")
    assert reason is not None and f"127.0.0.1:{dead_proxy}" in reason


@pytest.mark.parametrize(
    ("preset", "weights", "cache"),
    [
        ("paper-b-mobilenet", "timm:mobilenetv1_100", "hf"),  # Hugging Face hub, which retries for 55 s
        ("paper-a-resnet50", "resnet50", "torch/hub/checkpoints/resnet50-11ad3fa6.pth"),  # torch.hub
    ],
)
def test_train_without_network_fails_at_once_naming_set_weights(
    dead_proxy: int, empty_caches: Path, phantom_manifest: Path, preset: str, weights: str, cache: str
):
    start = time.perf_counter()
    result = covidscan("train", preset, "--data", str(phantom_manifest), "--out", str(empty_caches / "run"))
    elapsed = time.perf_counter() - start
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ImageNet weights for " + weights)
    message = lines[0]
    assert f"no network: 127.0.0.1:{dead_proxy} cannot be reached" in message
    assert str(empty_caches / cache) in message  # where covidscan looked
    assert "--set model.weights=path/to/file.pth" in message
    assert elapsed < 5, f"took {elapsed:.1f} s"
    assert not (empty_caches / "run").exists()


def test_hf_hub_offline_skips_the_probe_and_says_so(empty_caches: Path, phantom_manifest: Path,
                                                     monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    result = covidscan("train", "paper-b-mobilenet", "--data", str(phantom_manifest), "--out",
                       str(empty_caches / "run"))
    assert result.returncode == 2 and time.perf_counter() - start < 5
    assert "downloads are off (COVIDSCAN_OFFLINE / HF_HUB_OFFLINE is set)" in result.stderr
    assert "--set model.weights=path/to/file.pth" in result.stderr
