"""Nothing covidscan writes destroys what the user gave it (issue 13, section 1), and its CSV files are safe
to open in a spreadsheet and to write on any file name or a full disk (section 4). Real CLI runs on tiny
phantom data; every refused command is checked to leave every file as it was."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from covidscan.config import preset_dir
from covidscan.data import read_manifest
from covidscan.data.synthetic import write_phantom_dataset
from covidscan.errors import StorageError
from covidscan.outputs import csv_text, escape_cell, read_csv, staged_folder, unescape_cell, write_csv
from test_cli import covidscan

TINY = ["--set", "model.backbone=timm:resnet18", "--set", "model.weights=none",
        "--set", "model.input_size=64", "--set", "train.epochs=1", "--set", "train.views=1",
        "--set", "evaluation.n_bootstrap=20"]
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) with the SHA-256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def user_data(tmp_path: Path) -> Path:
    """A user's data folder D: 24 phantom CT slices (12 patients), their masks and D/manifest.csv."""
    return write_phantom_dataset(tmp_path / "D", n=24, modality="ct", seed=2, slices_per_patient=2)


@pytest.fixture
def parent_run(tiny_run: Path, tmp_path: Path) -> Path:
    """A copy of the tiny run in tmp/runs/parent (the tests may try to replace it)."""
    return Path(shutil.copytree(tiny_run, tmp_path / "runs" / "parent"))


def test_train_never_deletes_or_replaces_its_data(user_data: Path, tmp_path: Path):
    data = user_data.parent
    (tmp_path / "link").symlink_to(data)
    before = snapshot(tmp_path)
    assert len(before) == 3 * 24 + 1  # images, lung and lesion masks, manifest
    for out, why in [(data, "holds the input"),  # the data folder itself
                     (tmp_path, "holds the input"),  # a folder above the data
                     (data / "images" / "covid", "holds the input"),  # holds the images, not the manifest
                     (tmp_path / "link", "holds the input"),  # a symlink to the data folder
                     (user_data, "is the input")]:  # the manifest file
        result = covidscan("train", "paper-a-resnet50", "--data", str(user_data), "--out", str(out),
                           "--overwrite", *TINY)
        assert result.returncode == 2, result.stdout
        assert f"--out {out} {why}" in result.stderr and "Traceback" not in result.stderr
        assert snapshot(tmp_path) == before, out


def test_train_refuses_an_out_holding_its_config_file(user_data: Path, tmp_path: Path):
    config = tmp_path / "exp" / "exp.yaml"
    config.parent.mkdir()
    shutil.copy(preset_dir() / "paper-a-resnet50.yaml", config)
    before = snapshot(tmp_path)
    result = covidscan("train", str(config), "--data", str(user_data), "--out", str(config.parent),
                       "--overwrite", *TINY)
    assert result.returncode == 2 and f"holds the input {config}" in result.stderr
    assert snapshot(tmp_path) == before


def test_demo_and_reproduce_refuse_a_folder_of_the_users(user_data: Path, tmp_path: Path):
    (tmp_path / "notes.txt").write_text("the user's own notes")
    before = snapshot(tmp_path)
    demo = covidscan("demo", "--out", str(tmp_path))  # holds D/ and notes.txt: not an earlier demo
    assert demo.returncode == 2 and "not an earlier demo's (D, notes.txt" in demo.stderr
    reproduce = covidscan("reproduce", "paper-a", "--data", str(user_data), "--out", str(user_data.parent))
    assert reproduce.returncode == 2 and "holds the input" in reproduce.stderr
    assert snapshot(tmp_path) == before


def test_adapt_out_may_not_hold_the_parent_run_or_the_local_cases(parent_run: Path, tmp_path: Path):
    site = write_phantom_dataset(tmp_path / "site", n=32, modality="ct", seed=7, slices_per_patient=2,
                                 site="scanner-b")
    before = snapshot(tmp_path)
    for out in (tmp_path / "runs", parent_run, parent_run / "figures", site.parent, tmp_path):
        result = covidscan("adapt", str(parent_run), "--data", str(site), "--out", str(out), "--overwrite")
        assert result.returncode == 2 and f"--out {out} " in result.stderr, result.stderr
        assert snapshot(tmp_path) == before, out


def test_evaluate_predict_and_data_outputs_never_replace_their_inputs(parent_run: Path, tmp_path: Path):
    ext = write_phantom_dataset(tmp_path / "ext", n=8, modality="ct", seed=11, slices_per_patient=2)
    image = next(ext.parent.glob("images/covid/*.png"))
    (tmp_path / "run.onnx").symlink_to(parent_run)
    before = snapshot(tmp_path)
    refused = [
        ("evaluate", str(parent_run), "--data", str(ext), "--out", str(parent_run)),  # the run's own report
        ("evaluate", str(parent_run), "--data", str(ext), "--out", str(ext.parent)),
        ("predict", str(parent_run), str(ext), "--out", str(ext)),  # the input manifest
        ("predict", str(parent_run), str(image), "--out", str(parent_run / "checkpoint.json")),
        ("predict", str(parent_run), str(image), "--out", str(tmp_path / "p.csv"), "--cam",
         str(image.parent)),
        ("data", "split", str(ext), "--out", str(ext)),
        ("data", "audit", str(ext), "--out", str(ext)),
        ("data", "scan", str(ext.parent / "images"), "--out", str(image)),
        ("export", str(parent_run), "--onnx", str(tmp_path / "run.onnx")),  # a link to the run
    ]
    for args in refused:
        result = covidscan(*args)
        assert result.returncode == 2 and "the input" in result.stderr, (args, result.stderr)
        assert snapshot(tmp_path) == before, args
    # A new folder inside the run (as the README shows for external sets) is no input: it is written.
    result = covidscan("evaluate", str(parent_run), "--data", str(ext), "--out", str(parent_run / "ext"))
    assert result.returncode == 0, result.stderr
    assert (parent_run / "ext" / "metrics.json").is_file()
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("runs/parent/ext/")} == before


def test_overwrite_swaps_in_a_complete_run_and_a_failed_run_keeps_the_old(phantom_manifest: Path,
                                                                          tmp_path: Path):
    out = tmp_path / "run"
    first = covidscan("train", "paper-a-resnet50", "--data", str(phantom_manifest), "--out", str(out), *TINY)
    assert first.returncode == 0, first.stderr
    old = snapshot(out)
    again = covidscan("train", "paper-a-resnet50", "--data", str(phantom_manifest), "--out", str(out),
                      "--overwrite", "--set", "train.seed=1", *TINY)
    assert again.returncode == 0, again.stderr
    new = snapshot(out)
    assert new["model.safetensors"] != old["model.safetensors"]
    assert set(new) >= {"checkpoint.json", "report.md", "splits.csv"}
    assert os.listdir(tmp_path) == ["run"]  # no side folder left beside it

    broken = tmp_path / "broken.png"
    broken.write_bytes(next(phantom_manifest.parent.glob("images/covid/*.png")).read_bytes()[:200])
    rows = read_manifest(phantom_manifest)[["path", "label", "patient_id"]]
    rows.loc[len(rows)] = [str(broken), "covid", "p-broken"]
    rows.to_csv(tmp_path / "bad.csv", index=False)
    failed = covidscan("train", "paper-a-resnet50", "--data", str(tmp_path / "bad.csv"), "--out", str(out),
                       "--overwrite", "--strict", *TINY)
    assert failed.returncode == 2 and "broken.png" in failed.stderr
    assert snapshot(out) == new  # the run of the second command, untouched
    assert sorted(os.listdir(tmp_path)) == ["bad.csv", "broken.png", "run"]


def test_staged_folder_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_folder(out) as stage:
        (stage / "new.txt").write_text("new")
        assert (out / "old.txt").is_file()  # nothing is removed while the new result is written
        raise RuntimeError("the run failed")
    assert os.listdir(out) == ["old.txt"] and os.listdir(tmp_path) == ["out"]
    with staged_folder(out) as stage:
        (stage / "new.txt").write_text("new")
    assert os.listdir(out) == ["new.txt"] and os.listdir(tmp_path) == ["out"]



def test_staged_folder_clears_what_killed_commands_left_and_keeps_the_rest(tmp_path: Path, caplog):
    out, host = tmp_path / "out", socket.gethostname()
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)
    dead = int(ended.stdout)  # a process that has ended: what a killed command leaves behind
    killed = tmp_path / f".out.{dead}@{host}.1a2b3c4d.partial"
    earlier = tmp_path / f".out.{dead}@{host}.5e6f7a8b.old"  # killed between the swap's two renames
    running = tmp_path / f".out.{os.getpid()}@{host}.00000000.partial"  # another command still writing
    elsewhere = tmp_path / f".out.{dead}@another-host.00000000.partial"  # on a shared disk: cannot tell
    other = tmp_path / f".out2.{dead}@{host}.00000000.partial"  # another output's
    for side in (killed, earlier, running, elsewhere, other):
        side.mkdir()
        (side / "model.safetensors").write_text("weights")
    with caplog.at_level("WARNING", logger="covidscan.outputs"), staged_folder(out) as stage:
        (stage / "new.txt").write_text("new")
    assert os.listdir(out) == ["new.txt"]
    assert not killed.exists()
    assert all((side / "model.safetensors").is_file() for side in (earlier, running, elsewhere, other))
    assert f"{earlier} is the earlier out, left there by an interrupted command" in caplog.text

def _cells(text: str) -> list[str]:
    return [cell for row in csv.reader(io.StringIO(text)) for cell in row]


def _live_formulas(text: str) -> list[str]:
    """Cells a spreadsheet would evaluate: starting with a formula character and not a plain number."""
    def number(cell: str) -> bool:
        try:
            float(cell)
        except ValueError:
            return False
        return True
    return [c for c in _cells(text) if c.startswith(FORMULA_START) and not number(c)]


def test_escaping_round_trips_every_value_and_leaves_numbers():
    values = ["=1+1", "+x", "-x", "@SUM(A1)", "\tx", "\rx", "'=x", "''-x", "-0.5", "+3", "-1e5", "'-5",
              "plain", "it's", ""]
    assert [unescape_cell(escape_cell(v)) for v in values] == values
    assert escape_cell("-0.5") == "-0.5" and escape_cell("=1+1") == "'=1+1" and escape_cell("'=x") == "''=x"
    table = pd.DataFrame({"name": values, "score": [-0.5] * len(values)})
    text = csv_text(table)
    assert not _live_formulas(text) and "-0.5" in _cells(text)


def test_formula_cells_are_escaped_in_predictions_and_manifests(parent_run: Path, tmp_path: Path):
    src = sorted(write_phantom_dataset(tmp_path / "ph", n=8, modality="ct", seed=4).parent.glob("images/*/*"))
    folder = tmp_path / "in"
    folder.mkdir()
    names = ["=1+1.png", "-y.png", "+z.png", "@w.png"]
    for name, image in zip(names, src, strict=False):
        shutil.copy(image, folder / name)
    patients = ['=HYPERLINK("http://evil.example","x")', "-2+3", "@cmd", "-7"]
    manifest = folder / "m.csv"
    pd.DataFrame({"path": names[1:], "label": ["covid", "non_covid", "covid"],
                  "patient_id": patients[1:]}).to_csv(manifest, index=False)
    pd.DataFrame({"path": names, "label": ["covid", "non_covid", "covid", "non_covid"],
                  "patient_id": patients}).to_csv(folder / "all.csv", index=False)

    result = covidscan("predict", str(parent_run), "=1+1.png", "m.csv", "--out", "preds.csv", cwd=folder)
    assert result.returncode == 0, result.stderr
    text = (folder / "preds.csv").read_text(encoding="utf-8")
    assert not _live_formulas(text), _live_formulas(text)
    assert "'=1+1.png" in _cells(text) and "'-2+3" in _cells(text) and "-7" in _cells(text)
    preds = read_csv(folder / "preds.csv", dtype={"group_id": str})
    assert preds["path"].tolist() == ["=1+1.png", *(str(folder / n) for n in names[1:])]
    assert preds["group_id"].tolist()[1:] == patients[1:] and preds["p_covid"].notna().all()

    result = covidscan("data", "split", "all.csv", "--ratios", "0.5,0.5", "--by", "image", "--out", "s.csv",
                       cwd=folder)
    assert result.returncode == 0, result.stderr
    text = (folder / "s.csv").read_text(encoding="utf-8")
    assert not _live_formulas(text) and "'=1+1.png" in _cells(text) and "'-2+3" in _cells(text)
    back = read_manifest(folder / "s.csv")  # reads the escaped cells back as they were
    assert sorted(back["path"]) == sorted(str(folder / n) for n in names)
    assert sorted(back["patient_id"]) == sorted(patients)


def _write_undecodable(folder: Path, image: Path) -> Path:
    """A copy of ``image`` named ``scan-\\xff.png``: bytes that are not UTF-8, as a Latin-1 system writes."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(os.fsencode(folder) + b"/scan-\xff.png", "wb") as handle:
        handle.write(image.read_bytes())
    return folder / os.fsdecode(b"scan-\xff.png")


def test_a_file_name_that_is_not_utf8_is_predicted_written_and_read_back(parent_run: Path,
                                                                          phantom_manifest: Path,
                                                                          tmp_path: Path):
    images = sorted(phantom_manifest.parent.glob("images/*/*.png"))
    odd = _write_undecodable(tmp_path / "in", images[0])
    for suffix in (".csv", ".json"):
        out = tmp_path / f"preds{suffix}"
        result = covidscan("predict", str(parent_run), str(odd.parent), "--out", str(out))
        assert result.returncode == 0, result.stderr
    assert b"scan-\xff.png" in (tmp_path / "preds.csv").read_bytes()  # the name's own bytes
    assert json.loads((tmp_path / "preds.json").read_text(encoding="utf-8"))["images"][0]["path"].endswith(
        "scan-\\xff.png")  # JSON is UTF-8: the byte is shown
    preds = read_csv(tmp_path / "preds.csv")
    assert preds["path"].tolist() == [str(odd)] and Path(preds["path"][0]).is_file()
    assert preds["p_covid"].notna().all() and preds["error"].isna().all()
    # Grad-CAM overlays into a folder whose name is not UTF-8 (cv2.imwrite killed the process there)
    cams = Path(os.fsdecode(bytes(tmp_path / "cams") + b"-\xfe"))
    result = covidscan("predict", str(parent_run), str(odd), "--out", str(tmp_path / "c.csv"),
                       "--cam", str(cams))
    assert result.returncode == 0, result.stderr
    assert len(list(cams.glob("*.png"))) == 1

    tree = tmp_path / "tree"
    _write_undecodable(tree / "covid", images[0])
    _write_undecodable(tree / "normal", images[-1])
    result = covidscan("data", "scan", str(tree), "--out", str(tmp_path / "m.csv"))
    assert result.returncode == 0, result.stderr
    assert all(Path(p).is_file() for p in read_manifest(tmp_path / "m.csv")["path"])


def test_a_run_trained_on_a_file_name_that_is_not_utf8_is_complete(phantom_manifest: Path, tmp_path: Path):
    rows = read_manifest(phantom_manifest)[["path", "label", "patient_id"]]
    odd = _write_undecodable(tmp_path / "odd", Path(rows.loc[0, "path"]))
    rows.loc[0, "path"] = str(odd)
    write_csv(rows, tmp_path / "m.csv")
    result = covidscan("train", "paper-a-resnet50", "--data", str(tmp_path / "m.csv"), "--out",
                       str(tmp_path / "run"), *TINY)
    assert result.returncode == 0, result.stderr
    assert str(odd) in read_csv(tmp_path / "run" / "splits.csv")["path"].tolist()
    assert (tmp_path / "run" / "model_card.md").is_file()


def test_a_full_disk_is_one_error_line_and_no_partial_file(phantom_manifest: Path, tmp_path: Path):
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    with pytest.raises(StorageError, match="cannot write /dev/full: No space left on device; free disk"):
        write_csv(pd.DataFrame({"a": [1]}), "/dev/full")
    result = covidscan("data", "split", str(phantom_manifest), "--out", "/dev/full")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: cannot write manifest /dev/full: No space left on device; free disk space" in result.stderr
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)  # written to, never replaced

    old = tmp_path / "split.csv"
    write_csv(pd.DataFrame({"path": ["a.png"], "label": ["covid"]}), old)
    kept = old.read_bytes()
    limited = _limited_run(["data", "split", str(phantom_manifest), "--out", str(old)], 64)
    assert limited.returncode == 2 and "File too large; free disk space" in limited.stderr, limited.stderr
    assert old.read_bytes() == kept and os.listdir(tmp_path) == ["split.csv"]  # no 0-byte or side file


def _limited_run(args: list[str], max_bytes: int) -> subprocess.CompletedProcess:
    """``covidscan ARGS`` in a real process that may write no file larger than ``max_bytes`` (EFBIG, as a
    full disk gives ENOSPC: the same OS error path, without root or a small file system)."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return subprocess.run([sys.executable, "-m", "covidscan", "-q", *args], capture_output=True, text=True,
                          preexec_fn=limit, timeout=600)


@pytest.mark.slow
def test_a_full_disk_during_train_is_a_clear_error_and_keeps_the_old_run(parent_run: Path,
                                                                         phantom_manifest: Path):
    before = snapshot(parent_run)
    result = _limited_run(["train", "paper-a-resnet50", "--data", str(phantom_manifest), "--out",
                           str(parent_run), "--overwrite", *TINY], 1 << 20)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    # The first large file written is the training state after epoch 1 (two copies of the weights).
    state = parent_run / ".training" / "state.pt"
    assert f"cannot write the training state {state}: File too large; free disk" in result.stderr
    assert snapshot(parent_run) == before and os.listdir(parent_run.parent) == ["parent"]
    assert not state.parent.exists()  # nothing was saved, so no empty folder is left in the old run


def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path: Path):
    # mkstemp makes owner-only files: predictions and reports written through it were unreadable to a group
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    written = write_csv(pd.DataFrame({"a": [1]}), tmp_path / "t.csv")
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    assert written.read_bytes() == b"a\r\n1\r\n"  # newline="": CRLF stays CRLF on every platform


def test_synth_never_writes_over_a_users_dataset(phantom_manifest: Path, tmp_path: Path):
    data = tmp_path / "mine"
    (data / "images" / "covid").mkdir(parents=True)
    (data / "images" / "covid" / "scan.png").write_bytes(b"my scan")
    (data / "manifest.csv").write_text("path,label\nimages/covid/scan.png,covid\n")
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    result = covidscan("data", "synth", "--out", str(data), "--n", "4", "--size", "64")
    assert result.returncode == 2 and "not empty" in result.stderr
    result = covidscan("data", "synth", "--out", str(data), "--n", "4", "--size", "64", "--overwrite")
    assert result.returncode == 2 and "not part of an earlier phantom dataset" in result.stderr
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before
    # an earlier phantom dataset is replaced only when asked (the demo does so)
    again = tmp_path / "phantoms"
    assert covidscan("data", "synth", "--out", str(again), "--n", "4", "--size", "64").returncode == 0
    assert covidscan("data", "synth", "--out", str(again), "--n", "4", "--size", "64").returncode == 2
    result = covidscan("data", "synth", "--out", str(again), "--n", "6", "--size", "64", "--overwrite")
    assert result.returncode == 0 and len(read_csv(again / "manifest.csv")) == 6


def test_preview_sheet_never_replaces_an_image_it_shows(phantom_manifest: Path, tmp_path: Path):
    image = sorted(phantom_manifest.parent.glob("images/*/*.png"))[0]
    before = image.read_bytes()
    result = covidscan("preprocess", "preview", str(phantom_manifest), "--out", str(image))
    assert result.returncode == 2 and str(image) in result.stderr and image.read_bytes() == before


def test_predict_that_predicts_nothing_fails_and_keeps_the_reasons(parent_run: Path, tmp_path: Path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "p.csv"
    result = covidscan("predict", str(parent_run), str(tmp_path / "empty"), "--out", str(out))
    assert result.returncode == 2 and "none of the 1 input could be read" in result.stderr
    assert "no images found" in read_csv(out)["error"].iloc[0]
