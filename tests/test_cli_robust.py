"""Issue 13, section 4: no traceback whatever a user types, and errors that name the right thing.

Each case runs the real command line (in-process with Typer's CliRunner, or as a process where the
console entry point's own setup matters) and asks for exit code 2, exactly one ``error:`` line that names
the file or setting at fault, and no traceback.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
import typer
from PIL import Image

from covidscan.cli import app
from test_cli import Outcome, covidscan

SRC = Path(__file__).resolve().parents[1] / "src" / "covidscan"


def one_error(result: Outcome | subprocess.CompletedProcess, *named: str) -> str:
    """The single ``error:`` line of a failed command, checked to name each of ``named``."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1, output
    for part in named:
        assert part in errors[0], errors[0]
    return errors[0]


def run_process(*args: str) -> subprocess.CompletedProcess:
    """`covidscan ARGS` as its own process (the entry point installs the warning and log printers)."""
    return subprocess.run([sys.executable, "-m", "covidscan", *args], capture_output=True, text=True,
                          errors="surrogateescape", timeout=300, env={**os.environ, "COLUMNS": "200"})


# ---------------------------------------------------------------- user text printed as given
def test_markup_emoji_and_non_utf8_file_names_print_as_they_are(tmp_path: Path) -> None:
    root = tmp_path / "scan[" / "x]"  # the folder's path reads ".../scan[/x]": a closing tag to rich
    (root / "covid").mkdir(parents=True)
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(root / "stray.png")
    stray = os.fsdecode(b"\xff[bold]:smile:.png")  # not UTF-8, markup and an emoji code in one name
    (root / "stray.png").rename(root / stray)
    result = run_process("data", "scan", str(root), "--out", str(tmp_path / "m.csv"))
    one_error(result, f"dataset folder {root}:", "no readable images")
    assert r"(\xff[bold]:smile:.png)" in result.stderr  # the undecodable byte shown, nothing swallowed


def test_stdout_lines_keep_markup_and_undecodable_bytes_of_the_output_path(tmp_path: Path) -> None:
    out = Path(os.fsdecode(bytes(tmp_path / "s[") + b"/\xff[/x]"))
    result = run_process("data", "synth", "--out", str(out), "--n", "4", "--slices-per-patient", "1")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert f"manifest: {tmp_path}/s[/\\xff[/x]/manifest.csv" in result.stdout
    assert (out / "manifest.csv").is_file()


# The command's first step meets a broken pipe, as a write would: once the reader of stdout is gone (when a
# real pipe breaks is a race, so the child waits for the kernel to report the closed reading end), or with
# stdout open (a broken pipe of some connection).
_BROKEN = """import select, sys, time, covidscan.config
def broken():
    poll = select.poll()
    poll.register(sys.stdout.fileno(), select.POLLERR)
    deadline = time.monotonic() + 60
    while {wait} and not poll.poll(100) and time.monotonic() < deadline:
        pass
    raise BrokenPipeError(32, "Broken pipe")
covidscan.config.list_presets = broken
from covidscan.cli import main
sys.argv = ["covidscan", "presets"]
main()
"""


def test_a_closed_stdout_ends_the_command_silently() -> None:
    # `covidscan tune --help | head -40` used to end with "error: cannot write or read: Broken pipe".
    child = subprocess.Popen([sys.executable, "-c", _BROKEN.format(wait=True)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    child.stdout.close()
    stderr = child.stderr.read()
    assert (child.wait(timeout=120), stderr) == (1, "")


def test_a_broken_pipe_elsewhere_is_still_an_error() -> None:
    result = subprocess.run([sys.executable, "-c", _BROKEN.format(wait=False)], capture_output=True,
                            text=True, timeout=120)
    one_error(result, "Broken pipe")


# ---------------------------------------------------------------- config files and --set
def test_a_latin1_config_file_is_named_and_the_fix_given(tmp_path: Path) -> None:
    config = tmp_path / "mine.yaml"
    config.write_bytes("name: café\nmodality: ct\n".encode("latin-1"))
    result = covidscan("train", str(config), "--data", str(tmp_path), "--out", str(tmp_path / "run"))
    one_error(result, str(config), "not UTF-8", "save it as UTF-8")


def test_a_folder_given_as_config_is_called_a_folder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    result = covidscan("train", str(run), "--data", str(tmp_path), "--out", str(tmp_path / "o"))
    assert "does not exist" not in one_error(result, f"config {run} is a folder")
    (run / "config.yaml").write_text("name: x\n", encoding="utf-8")
    result = covidscan("train", str(run), "--data", str(tmp_path), "--out", str(tmp_path / "o"))
    one_error(result, f"give {run / 'config.yaml'}")


def test_a_set_typo_is_blamed_on_the_set_with_the_setting_it_resembles(tmp_path: Path) -> None:
    result = covidscan("train", "paper-a-resnet50", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                       "--set", "train.epoch=5")
    line = one_error(result, "--set train.epoch=5", "did you mean train.epochs?")
    assert "presets" not in line  # not the packaged preset file's fault
    result = covidscan("train", "paper-a-resnet50", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                       "--set", "trian.epochs=5")
    one_error(result, "--set trian.epochs=5", "did you mean train.epochs?")


@pytest.mark.parametrize(
    "override",
    ["train.lr=inf", "train.lr=.nan", "train.weight_decay=.inf", "preprocess.clip_limit=inf",
     "data.ratios=[0.7,.inf]", "train.epochs=-1", "train.batch_size=0", "train.epochs=five"],
)
def test_impossible_values_are_blamed_on_the_setting_not_the_images(tmp_path: Path, override: str) -> None:
    # The manifest is missing too: the setting is checked first, so the error names it, not the data.
    result = covidscan("train", "paper-a-resnet50", "--data", str(tmp_path / "missing.csv"),
                       "--out", str(tmp_path / "o"), "--set", override)
    one_error(result, f"--set {override}", override.partition("=")[0])


# ---------------------------------------------------------------- data synth
@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--n", str(10**12)], "n=1000000000000 is too large"),
        (["--size", "5000"], "size=5000 is too large"),
        (["--n", "1000000", "--size", "4096"], "MiB free"),  # allowed values, more than any test disk
    ],
)
def test_data_synth_refuses_what_would_fill_the_disk_before_writing(
    tmp_path: Path, args: list[str], named: str
) -> None:
    # Below a regular file, so that a regression fails at mkdir instead of filling the test machine's disk.
    blocker = tmp_path / "file"
    blocker.write_text("not a folder", encoding="utf-8")
    one_error(covidscan("data", "synth", "--out", str(blocker / "synth"), *args), named)


# ---------------------------------------------------------------- messages name what exists
def _commands_and_options() -> tuple[set[str], set[str]]:
    """Every command path (``train``, ``users add``) and option (``--set``) of the real application."""
    commands, options = set(), set()

    def walk(command: click.Command, path: str) -> None:
        commands.add(path)
        options.update(o for p in command.params for o in (*p.opts, *p.secondary_opts))
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}".strip())

    walk(typer.main.get_command(app), "")
    return commands, options


def _message_strings(path: Path) -> list[tuple[int, str]]:
    """String constants of a module (f-string parts included), docstrings left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value) for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_every_option_and_command_a_message_mentions_exists() -> None:
    commands, options = _commands_and_options()
    groups = {c.split()[0] for c in commands if " " in c}
    wrong = []
    for module in sorted(SRC.rglob("*.py")):
        for line, text in _message_strings(module):
            wrong += [f"{module.relative_to(SRC)}:{line}: {option}"
                      for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text) if option not in options]
            for words in re.findall(r"`covidscan ([a-z][a-z-]*(?: [a-z][a-z-]*)?)", text):
                first = words.split()[0]
                if (words if first in groups else first) not in commands:
                    wrong.append(f"{module.relative_to(SRC)}:{line}: covidscan {words}")
    assert not wrong, "messages name options or commands the command line does not have:\n" + "\n".join(wrong)
