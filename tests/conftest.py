"""Shared fixtures. Tests that need the real data in ../shared skip with a reason when it is absent."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COVIDSCAN_SHARED", REPO.parent / "shared"))


def run_temp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This test run's temp folder, the same for all its pytest-xdist workers (their own folders' parent)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session", autouse=True)
def covidscan_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """covidscan's cache (compiled graphs, ONNX exports, engine choices) in this test run's temp folder,
    shared by its pytest-xdist workers: the tests leave the user's ``~/.cache/covidscan`` alone (they wrote
    about 50 MB there). Subprocesses the tests start inherit it."""
    folder = run_temp(tmp_path_factory) / "covidscan-cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COVIDSCAN_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ``../shared`` folder (or ``$COVIDSCAN_SHARED``); skips the test when it is not there."""
    if not (SHARED / "data").is_dir():
        pytest.skip(f"real data folder not found at {SHARED} (set COVIDSCAN_SHARED to use another place)")
    return SHARED


@pytest.fixture(scope="session")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The bad-input corpus of tests/badinputs.py, written once: ``{case id: BadInput}``."""
    from badinputs import write_corpus

    return write_corpus(tmp_path_factory.mktemp("badinputs"))


@pytest.fixture(scope="session")
def phantom_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CT phantom dataset (64 images, 2 slices per patient) with lung and lesion masks."""
    from covidscan.data.synthetic import write_phantom_dataset

    return write_phantom_dataset(
        tmp_path_factory.mktemp("phantoms"), n=64, modality="ct", seed=1, slices_per_patient=2
    )


@pytest.fixture(scope="session")
def ood_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run with enough validation images (>= 20) for an out-of-distribution detector."""
    from covidscan.config import load_config
    from covidscan.data.synthetic import write_phantom_dataset
    from covidscan.training import train_experiment

    data = write_phantom_dataset(tmp_path_factory.mktemp("ood_phantoms"), n=100, modality="ct", seed=3,
                                 slices_per_patient=2)
    cfg = load_config("paper-a-resnet50", [
        "model.backbone=timm:resnet18", "model.weights=none", "model.input_size=64", "train.epochs=1",
        "train.views=1", "evaluation.n_bootstrap=20", "data.ratios=[0.45,0.35,0.2]",
    ])
    out = tmp_path_factory.mktemp("ood_run")
    train_experiment(cfg, data, out, progress=False)
    return out


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder ``name``, filled by ``build`` once for the whole run: under pytest-xdist (addopts' ``-n``)
    every worker would otherwise build its own, so the first builds it under a file lock and the others
    wait and reuse it (pytest-xdist's recipe for session fixtures). Only for folders tests never write."""
    from filelock import FileLock

    root = run_temp(tmp_path_factory)
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a worker that failed half-way left
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def phantom_parent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo preset trained on 400 CT phantoms of the training style (2 slices per patient; about 1.5
    min on 2 CPU cores): the parent of the site-loop tests, trained once for the library's and the
    service's. They only read it (the service writes its challengers into its own data folder)."""
    from covidscan.config import load_config
    from covidscan.data.synthetic import write_phantom_dataset
    from covidscan.training import train_experiment

    def build(root: Path) -> None:
        data = write_phantom_dataset(root / "data", n=400, seed=1, slices_per_patient=2)
        train_experiment(load_config("demo-ct-phantom", ["evaluation.n_bootstrap=100"]), data, root / "run",
                         progress=False)

    return built_once(tmp_path_factory, "phantom_parent", build) / "run"


@pytest.fixture(scope="session")
def tiny_run(phantom_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained run directory of a tiny frozen-base model (seconds to train); for prediction tests."""
    from covidscan.config import load_config
    from covidscan.training import train_experiment

    cfg = load_config(
        "paper-a-resnet50",
        [
            "model.backbone=timm:resnet18",
            "model.weights=none",
            "model.input_size=64",
            "train.epochs=2",
            "train.views=1",
            "evaluation.n_bootstrap=50",
        ],
    )
    out = tmp_path_factory.mktemp("tiny_run")
    train_experiment(cfg, phantom_manifest, out, progress=False)
    return out


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``tmpfs(size)``: a real file system of ``size`` (``"8k"``, ``"8m"``) mounted in the test's folder, to
    fill up; the test is skipped where mounting is not allowed (it needs root)."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"tmpfs-{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)
