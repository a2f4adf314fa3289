"""Issue 13 §3: a run directory is checked, not trusted.

Loading checks the weights against checkpoint.json's SHA-256 and checkpoint.json against config.yaml and
the model it builds; `evaluate` and `adapt` recognise the run's own training and validation images by the
fingerprints stored at training time (pixel hash and pHash), after the data moved or were re-saved.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from covidscan.data.fingerprints import MATCH_DISTANCE, Fingerprints
from covidscan.errors import ManifestError, StorageError
from covidscan.inference import evaluate_run
from covidscan.runs import checkpoint_seal, load_checkpoint, load_fingerprints, load_run, write_checkpoint
from covidscan.training.adapt import adapt_run
from legacy_runs import legacy_checkpoint
from test_cli import covidscan


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def run(tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny run, free to damage."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def _edit_checkpoint(run: Path, **changes) -> None:
    file = run / "checkpoint.json"
    file.write_text(json.dumps(json.loads(file.read_text()) | changes))


def _refused_on_the_command_line(run: Path, tmp_path: Path, *names: str) -> None:
    """`covidscan predict` on the run: exit 2 and one `error:` line naming every one of ``names``."""
    image = pd.read_csv(run / "splits.csv")["path"].iloc[0]
    result = covidscan("predict", str(run), image, "--out", str(tmp_path / "p.csv"))
    assert result.returncode == 2 and not (tmp_path / "p.csv").exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
    assert all(name in lines[0] for name in names), lines[0]


# ------------------------------------------------------------------------------------------ load checks
def test_another_runs_weights_are_refused(run: Path, tmp_path: Path):
    # Weights of the same architecture that load without complaint: only the hash tells them apart.
    state = load_file(str(run / "model.safetensors"))
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()},
              str(run / "model.safetensors"))
    before = tree_digest(run)
    with pytest.raises(StorageError, match=r"model\.safetensors does not match the SHA-256"):
        load_run(run)
    _refused_on_the_command_line(run, tmp_path, str(run / "model.safetensors"), "SHA-256")
    assert tree_digest(run) == before


def test_an_edited_hash_is_refused(run: Path, tmp_path: Path):
    _edit_checkpoint(run, weights_sha256="0" * 64)
    with pytest.raises(StorageError, match=r"model\.safetensors does not match"):
        load_run(run)
    _refused_on_the_command_line(run, tmp_path, "model.safetensors")


def test_an_edited_input_size_is_refused(run: Path, tmp_path: Path):
    _edit_checkpoint(run, input_size=[128, 128])
    with pytest.raises(StorageError, match=r"records input_size \[128, 128\] .* built for \[64, 64\]"):
        load_run(run)
    _refused_on_the_command_line(run, tmp_path, str(run / "checkpoint.json"), "input_size")


def test_edited_normalisation_is_refused(run: Path):
    _edit_checkpoint(run, mean=[0.0, 0.0, 0.0])
    with pytest.raises(StorageError, match=r"checkpoint\.json records mean"):
        load_run(run)


def test_a_config_that_disagrees_with_the_checkpoint_is_refused(run: Path, tmp_path: Path):
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["modality"] = config["preprocess"]["modality"] = "cxr"  # the CT model now claims to read X-rays
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(StorageError, match=r"checkpoint\.json and config\.yaml disagree on preprocess"):
        load_run(run)
    _refused_on_the_command_line(run, tmp_path, "config.yaml", "preprocess")


def test_runs_written_by_covidscan_0_1_still_load_and_are_checked(run: Path, tiny_run: Path):
    new = load_checkpoint(tiny_run)
    legacy = legacy_checkpoint(new)
    (run / "checkpoint.json").write_text(json.dumps(legacy))
    (run / "fingerprints.csv").unlink()  # covidscan 0.1 wrote none
    before = tree_digest(run)
    loaded = load_run(run)
    assert loaded.checkpoint.weights_sha256 == new.weights_sha256 and loaded.checkpoint.fingerprints is None
    assert tree_digest(run) == before  # read in memory, never rewritten
    (run / "checkpoint.json").write_text(json.dumps(legacy | {"input_size": [32, 32]}))
    with pytest.raises(StorageError, match="input_size"):
        load_run(run)


def test_damaged_fingerprints_are_refused(run: Path):
    checkpoint = load_checkpoint(run)
    assert checkpoint.fingerprints is not None and checkpoint.fingerprints.n_images == len(
        pd.read_csv(run / "splits.csv").query("split != 'test'"))
    with (run / "fingerprints.csv").open("a") as f:
        f.write("/elsewhere/x.png,train,abc,00\n")
    with pytest.raises(StorageError, match=r"fingerprints\.csv is missing or does not match"):
        load_fingerprints(run, checkpoint)


# ------------------------------------------------------------------------------------------ fingerprints
def _relocate(run: Path, tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    """The run's training data as if their folder had moved: the files are copied to a new folder and the
    run's records (splits.csv, fingerprints.csv) point to the old one, which no longer exists. Returns the
    new folder and the splits with the new paths."""
    splits = pd.read_csv(run / "splits.csv")
    root = Path(os.path.commonpath(splits["path"].tolist()))
    moved, gone = tmp_path / "moved", tmp_path / "gone"
    shutil.copytree(root, moved)
    for name in ("splits.csv", "fingerprints.csv"):
        file = run / name
        file.write_text(file.read_text().replace(str(root), str(gone)))
    digest = hashlib.sha256((run / "fingerprints.csv").read_bytes()).hexdigest()
    checkpoint = load_checkpoint(run)
    write_checkpoint(run, checkpoint.model_copy(
        update={"fingerprints": checkpoint.fingerprints.model_copy(update={"sha256": digest})}))
    return moved, splits.assign(path=[str(moved / Path(p).relative_to(root)) for p in splits["path"]])


def _variant(source: str, target: Path, kind: str) -> str:
    """A near-identical copy of an image file: one gray level brighter, re-encoded as JPEG, or resized."""
    gray = np.asarray(Image.open(source).convert("L"))
    if kind == "gray+1":
        Image.fromarray(np.clip(gray.astype(np.int16) + 1, 0, 255).astype(np.uint8)).save(target)
    elif kind == "jpeg":
        buffer = io.BytesIO()
        Image.fromarray(gray).save(buffer, format="JPEG", quality=75)
        target.write_bytes(buffer.getvalue())
    else:
        h, w = gray.shape
        Image.fromarray(gray).resize((round(w * 0.9), round(h * 0.9)), Image.Resampling.LANCZOS).save(target)
    return str(target)


def test_evaluate_refuses_training_images_after_the_data_moved(run: Path, tmp_path: Path):
    _, splits = _relocate(run, tmp_path)
    external = tmp_path / "external.csv"
    rows = pd.concat([splits[splits["split"] == "test"].head(4), splits[splits["split"] == "train"].head(2),
                      splits[splits["split"] == "val"].head(1)])
    rows.drop(columns="split").to_csv(external, index=False)
    with pytest.raises(ManifestError, match=r"shares 3 of 7 images.*2 in train \(same pixels\), 1 in val"):
        evaluate_run(run, external, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    result = covidscan("evaluate", str(run), "--data", str(external), "--out", str(tmp_path / "out"), "-q")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {external} shares 3")


def test_near_identical_copies_of_training_images_are_refused(run: Path, tmp_path: Path):
    splits = pd.read_csv(run / "splits.csv")
    train = splits[splits["split"] == "train"]["path"].tolist()
    copies = [_variant(path, tmp_path / f"{kind}{i}.{'jpg' if kind == 'jpeg' else 'png'}", kind)
              for i, (path, kind) in enumerate(zip(train, ("gray+1", "jpeg", "resize"), strict=False))]
    unseen = splits[splits["split"] == "test"].head(5)
    rows = pd.concat([unseen, pd.DataFrame({"path": copies, "label": "covid"})]).drop(columns="split")
    rows.to_csv(tmp_path / "copies.csv", index=False)
    with pytest.raises(ManifestError, match=r"shares 3 of 8 images.*near-identical pixels") as info:
        evaluate_run(run, tmp_path / "copies.csv", tmp_path / "out", progress=False)
    assert f"within {MATCH_DISTANCE}/256 bits" in str(info.value)
    result = covidscan("evaluate", str(run), "--data", str(tmp_path / "copies.csv"), "--out",
                       str(tmp_path / "out"), "-q")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "near-identical" in result.stderr
    metrics = evaluate_run(run, tmp_path / "copies.csv", tmp_path / "out", allow_overlap=True, progress=False)
    assert sorted(o["path"] for o in metrics["overlap_with_training"]) == sorted(copies)
    assert {o["match"] for o in metrics["overlap_with_training"]} == {"near"}


def test_a_run_without_fingerprints_falls_back_to_its_recorded_paths(run: Path, tmp_path: Path, caplog):
    write_checkpoint(run, load_checkpoint(run).model_copy(update={"fingerprints": None}))
    (run / "fingerprints.csv").unlink()
    splits = pd.read_csv(run / "splits.csv")
    seen = splits[splits["split"] == "train"].head(1)
    copy = _variant(seen["path"].iloc[0], tmp_path / "shifted.png", "gray+1")
    rows = pd.concat([seen, seen.assign(path=copy)]).drop(columns="split")
    rows.to_csv(tmp_path / "seen.csv", index=False)
    with pytest.raises(ManifestError, match=r"shares 2 of 2 images.*same path.*near-identical"):
        evaluate_run(run, tmp_path / "seen.csv", tmp_path / "out", progress=False)
    assert "no stored image fingerprints" in caplog.text


# ------------------------------------------------------------------------------------------ adapt
def _parents_own_cases(run: Path, tmp_path: Path) -> Path:
    """A local manifest of the parent's training images, with patient ids (enough to cross-validate)."""
    splits = pd.read_csv(run / "splits.csv")
    local = tmp_path / "local.csv"
    splits[splits["split"] == "train"].drop(columns="split").to_csv(local, index=False)
    return local


def test_adapt_refuses_the_parents_training_images(run: Path, tmp_path: Path):
    local = _parents_own_cases(run, tmp_path)
    before = tree_digest(run)
    with pytest.raises(ManifestError, match=r"local\.csv shares \d+ of \d+ local cases with the parent"):
        adapt_run(run, local, tmp_path / "adapted", mode="recalibrate", folds=2, progress=False)
    result = covidscan("adapt", str(run), "--data", str(local), "--out", str(tmp_path / "adapted"),
                       "--mode", "recalibrate", "--folds", "2", "-q")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {local} shares")
    assert "--allow-overlap" in lines[0]
    assert not (tmp_path / "adapted").exists() and tree_digest(run) == before


def test_an_adapted_run_keeps_its_parents_fingerprints(run: Path, tmp_path: Path):
    local = _parents_own_cases(run, tmp_path)
    adapted = adapt_run(run, local, tmp_path / "adapted", mode="recalibrate", folds=2, allow_overlap=True,
                        progress=False)
    assert "were in the parent run's own training" in (adapted.run_dir / "report.md").read_text()
    parent, child = load_checkpoint(run).fingerprints, load_checkpoint(adapted.run_dir).fingerprints
    n_local = len(pd.read_csv(local))
    assert parent is not None and child is not None and child.n_images == parent.n_images + n_local
    stored = load_fingerprints(adapted.run_dir, load_checkpoint(adapted.run_dir))
    own = load_fingerprints(run, load_checkpoint(run))
    assert isinstance(stored, Fingerprints) and own is not None and set(own.paths) <= set(stored.paths)
    # the parent's validation images are refused by the adapted run too (lineage)
    val = pd.read_csv(run / "splits.csv").query("split == 'val'").drop(columns="split")
    val.to_csv(tmp_path / "val.csv", index=False)
    with pytest.raises(ManifestError, match=f"shares {len(val)} of {len(val)} images"):
        evaluate_run(adapted.run_dir, tmp_path / "val.csv", tmp_path / "out", progress=False)


def test_a_checkpoint_edited_by_hand_is_refused(run: Path):
    meta = json.loads((run / "checkpoint.json").read_text())
    assert meta["seal"] == checkpoint_seal(meta)
    meta["calibration"]["threshold"] = 0.01  # every image would be called covid
    (run / "checkpoint.json").write_text(json.dumps(meta, indent=2))
    with pytest.raises(StorageError, match="changed after covidscan wrote it"):
        load_run(run)
    result = covidscan("predict", str(run), str(run / "figures"), "--out", str(run.parent / "p.csv"))
    assert result.returncode == 2 and "checkpoint.json was changed after covidscan wrote it" in result.stderr
    del meta["seal"]  # a run written before checkpoints were sealed still loads
    (run / "checkpoint.json").write_text(json.dumps(meta, indent=2))
    assert load_run(run).calibration.threshold == 0.01
