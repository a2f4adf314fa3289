"""What covidscan writes never destroys what the user gave it.

* :func:`check_output` refuses an output path that is, or lies above, an input of the command (a data
  folder, a manifest, the images it lists, a run directory and its files, a weights or config file);
* :func:`staged_folder` builds a new run (or any output folder) beside the old one and swaps it in only
  when it is complete, so ``--overwrite`` never deletes before the new result exists and a failed command
  leaves the old folder as it was;
* :func:`write_csv` is the one CSV writer: atomic (a side file and a rename, never half a file), cells that
  a spreadsheet would run as formulas escaped (OWASP: a leading ``'``), file names that are not valid UTF-8
  written as their original bytes; :func:`read_csv` reads such files back exactly.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
from safetensors import SafetensorError

from covidscan.errors import ConfigError, CovidscanError, RunNotFoundError, StorageError
from covidscan.system import process_alive

log = logging.getLogger(__name__)

FORMULA = re.compile(r"'*[=+\-@\t\r]")
"""Cells a spreadsheet would run as formulas (OWASP), optionally behind ``'`` already: those get one more."""
ESCAPED = re.compile(r"'+[=+\-@\t\r]")
ENCODING_ERRORS = "surrogateescape"
"""File names that are not valid UTF-8 (``os.listdir`` gives their bytes as surrogates) go to and come from
CSV files as those same bytes, so a manifest of such files still finds them."""
FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
RUN_ENTRIES = ("config.yaml", "model.safetensors", "checkpoint.json", "ood.safetensors", "splits.csv",
               "excluded.csv", "history.json", "metrics.json", "predictions.csv", "audit.json", "report.md",
               "model_card.md", "figures", "fingerprints.csv",
               "shift_reference.safetensors", "model.int8.onnx")
"""What covidscan writes into a run directory: outputs must not replace any of them."""
REQUIRED_FILES = ("config.yaml", "model.safetensors", "checkpoint.json")
"""What a run directory needs to be loaded (:func:`covidscan.runs.load_run`)."""
PREDICTION_SUFFIXES = (".csv", ".json")
"""The files ``covidscan predict`` writes its predictions to."""


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def escape_cell(value: Any) -> Any:
    """``value`` with a leading ``'`` when it is text a spreadsheet would run as a formula.

    Numbers (``-0.5``, also as text) are left as they are; a cell already starting with ``'`` before a
    formula character gets one more, so :func:`unescape_cell` gives back every value exactly.
    """
    if isinstance(value, str) and FORMULA.match(value) and not _number(value):
        return "'" + value
    return value


def unescape_cell(value: Any) -> Any:
    """The value :func:`escape_cell` was given (cells it did not escape come back unchanged)."""
    if isinstance(value, str) and ESCAPED.match(value) and not _number(value[1:]):
        return value[1:]
    return value


def _text_columns(table: pd.DataFrame) -> list[Any]:
    return [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])
            and not pd.api.types.is_bool_dtype(table[c])]


def csv_text(table: pd.DataFrame) -> str:
    """The table as CSV text (no index), its text cells escaped against formula injection.

    Lines end in CRLF (RFC 4180): the CSV writer then quotes a cell holding a carriage return (a file name
    may), which it leaves bare, splitting the row, with LF line ends.
    """
    safe = table.copy()
    for column in _text_columns(safe):
        safe[column] = safe[column].map(escape_cell)
    return safe.to_csv(index=False, lineterminator="\r\n")


def storage_error(path: str | Path, exc: OSError | SafetensorError, what: str = "") -> StorageError:
    """One line naming the file (``what`` says what it is, e.g. ``"predictions to "``), why it could not
    be written, and what to do."""
    if isinstance(exc, OSError):
        code, reason = exc.errno, exc.strerror or str(exc)
    else:  # safetensors reports the OS error inside its message: "... (os error 28)" or "Os { code: 28"
        found = re.search(r"(?:os error |code: )(\d+)", str(exc))
        code = int(found.group(1)) if found else None
        reason = os.strerror(code) if code else str(exc).strip().splitlines()[0]
    todo = ("free disk space (or raise the file-size limit) and run again" if code in FULL
            else "check that the folder exists and is writable")
    return StorageError(f"cannot write {what}{path}: {reason}; {todo}")


@contextmanager
def writing(path: str | Path, what: str = "") -> Iterator[None]:
    """Turn an OS or safetensors write error inside the block into a :class:`StorageError` for ``path``."""
    try:
        yield
    except (OSError, SafetensorError) as exc:
        raise storage_error(path, exc, what) from None


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once, at import, before any thread starts
    os.umask(mask)
    return mask


_UMASK = _umask()


def write_atomic(path: Path, data: str | bytes, *, errors: str = "strict", durable: bool = False) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` through a unique side file and a rename: readers
    never see half a file.

    ``errors`` is the UTF-8 encoder's error handler (CSV files write undecodable file names as their bytes).
    ``durable`` flushes the file to disk (fsync) before the rename, so that even a power cut leaves the old
    file or the new one (the training state). The file gets the permissions a plain ``open`` would give it
    (mkstemp's are owner-only).
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        binary = isinstance(data, bytes)
        with (os.fdopen(fd, "wb") if binary else
              os.fdopen(fd, "w", encoding="utf-8", errors=errors, newline="")) as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_csv(table: pd.DataFrame, path: str | Path, what: str = "") -> Path:
    """Write ``table`` as CSV through :func:`write_text`; :func:`csv_text` says how cells are written."""
    return write_text(path, csv_text(table), what)


def write_text(path: str | Path, text: str, what: str = "") -> Path:
    """Write ``text`` (UTF-8, see :data:`ENCODING_ERRORS`) to ``path``, all or nothing, parents created.

    A full disk or an unwritable folder is a :class:`StorageError` naming ``path``; the old file (if any)
    stays intact. A device or pipe (``/dev/stdout``) is written to directly, since it cannot be replaced.
    """
    path = Path(path)
    with writing(path, what):
        mode = path.stat().st_mode if path.exists() else None
        if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
            with open(path, "w", encoding="utf-8", errors=ENCODING_ERRORS) as handle:
                handle.write(text)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, text, errors=ENCODING_ERRORS)
    return path


@contextmanager
def replaced_file(path: str | Path, what: str = "") -> Iterator[Path]:
    """Yield a side file beside ``path`` to write (e.g. with safetensors); it replaces ``path`` when the
    block ends. A failure (a full disk: :class:`StorageError`) removes it and leaves ``path`` as it was."""
    path = Path(path)
    side = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.part"
    try:
        with writing(path, what):
            path.parent.mkdir(parents=True, exist_ok=True)
            yield side
            os.replace(side, path)
    finally:
        side.unlink(missing_ok=True)


def _readable(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", ENCODING_ERRORS).decode("utf-8", "backslashreplace")
    return value


def readable(table: pd.DataFrame) -> pd.DataFrame:
    """The table with the bytes of undecodable file names shown as ``\\xNN``: valid UTF-8 (e.g. for JSON)."""
    return table.assign(**{str(c): table[c].map(_readable) for c in _text_columns(table)})


def read_csv(path: str | Path, **options: Any) -> pd.DataFrame:
    """Read a CSV written by :func:`write_csv` (or by hand) with every text cell as it was written."""
    table = pd.read_csv(path, encoding_errors=ENCODING_ERRORS, **options)
    for column in _text_columns(table):
        table[column] = table[column].map(unescape_cell)
    return table


def check_run_dir(path: str | Path) -> Path:
    """``path`` as a run directory, or RunNotFoundError saying what is missing."""
    run = Path(path)
    if not run.is_dir():
        raise RunNotFoundError(
            f"run directory {run} does not exist; pass the --out folder of `covidscan train`"
        )
    missing = [name for name in REQUIRED_FILES if not (run / name).is_file()]
    if missing:
        raise RunNotFoundError(
            f"{run} is not a covidscan run directory (missing {', '.join(missing)}); "
            "pass the --out folder of `covidscan train`"
        )
    return run


def check_predictions_file(
    out: str | Path, run: str | Path | None = None, inputs: Sequence[str | Path | None] = ()
) -> Path:
    """The predictions file name, checked before any work: ``.csv`` or ``.json``, and neither the ``run``'s
    files nor one of the ``inputs`` (images, folders, manifests, an ONNX file): outputs never replace inputs.
    """
    out = Path(out)
    if out.suffix.lower() not in PREDICTION_SUFFIXES:
        raise ConfigError(f"cannot write predictions to {out}: use a .csv or .json file name")
    given = [*(run_files(run) if run is not None else []), *(p for p in inputs if p is not None)]
    return check_output(out, given)


def run_files(run: str | Path) -> list[Path]:
    """A run directory and the files covidscan keeps in it: the inputs an output must leave alone."""
    run = Path(run)
    return [run, *(run / name for name in RUN_ENTRIES)]


def run_inputs(run: str | Path) -> list[str | Path]:
    """:func:`run_files` and the images the run was trained and tested on (its ``splits.csv``), which
    ``evaluate`` and ``adapt`` read again."""
    splits = Path(run) / "splits.csv"
    table = read_csv(splits, dtype=str, keep_default_na=False) if splits.is_file() else pd.DataFrame()
    return [*run_files(run), *table.get("path", [])]


def _real(path: str | Path) -> str:
    return os.path.realpath(os.path.expanduser(os.fspath(path)))


def check_output(out: str | Path, inputs: Iterable[str | Path], *, option: str = "--out") -> Path:
    """Refuse an output ``out`` that is, or lies above, one of the ``inputs`` that exist.

    Paths are compared after resolving symlinks and ``..``: writing ``out`` (or replacing it with
    ``--overwrite``) would overwrite or delete that input. Returns ``out`` as a Path.
    """
    target = _real(out)
    above = target.rstrip(os.sep) + os.sep
    for given in inputs:
        if not os.path.lexists(given):
            continue  # nothing there to destroy
        real = _real(given)
        if real == target or real.startswith(above):
            what = "is" if real == target else "holds"
            raise ConfigError(
                f"{option} {out} {what} the input {given}: writing there would overwrite or delete it; "
                f"choose an output {'folder' if Path(given).is_dir() or what == 'holds' else 'file'} "
                "outside the inputs"
            )
    return Path(out)


def check_folder(out: str | Path, overwrite: bool, *, option: str = "--out") -> Path:
    """``out`` as a folder to create or (with ``overwrite``) replace; refuse a file or a non-empty folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{option} {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{option} folder {out} is not empty; choose another {option}, or pass --overwrite "
                          "to replace it (the old folder is removed only once the new one is complete)")
    return out


def _remove(path: Path) -> None:
    if path.is_symlink():
        path.unlink()  # a link to a folder: drop the link, never what it points at
    elif path.exists():
        shutil.rmtree(path)


def _side_folder(out: Path, kind: str) -> Path:
    """``.NAME.PID@HOST.RANDOM.KIND`` beside ``out``: the owner in the name tells a later command whether
    the process that made it is gone (killed) or may still be writing."""
    return out.parent / f".{out.name}.{os.getpid()}@{socket.gethostname()}.{uuid.uuid4().hex[:8]}.{kind}"


def _left_by_killed_commands(out: Path) -> list[Path]:
    """Side folders of ``out`` whose process, on this machine, no longer runs (a killed command's)."""
    prefix, host, found = f".{out.name}.", socket.gethostname(), []
    for side in out.parent.glob(glob.escape(prefix) + "*"):
        owner, _, kind = side.name[len(prefix):].rpartition(".")
        pid, at, where = owner.rpartition(".")[0].partition("@")
        mine = kind in ("partial", "old") and at and where == host and pid.isdigit()
        if mine and not process_alive(int(pid)):
            found.append(side)
    return sorted(found)


def _clear_leftovers(out: Path) -> None:
    """Delete the half-written side folders of killed commands; name (never delete) an old ``out`` that a
    kill left beside it, which may be the only copy of a previous result."""
    for side in _left_by_killed_commands(out):
        if side.name.endswith(".partial"):
            try:
                _remove(side)
            except OSError as exc:
                log.warning("cannot remove %s, left by an interrupted command: %s", side, exc)
        else:
            log.warning("%s is the earlier %s, left there by an interrupted command; rename it back to "
                        "%s to keep it, or delete it", side, out.name, out.name)


@contextmanager
def staged_folder(out: str | Path) -> Iterator[Path]:
    """Yield an empty side folder beside ``out`` to write into; swap it in for ``out`` when the block ends.

    The side folder is on the same file system (``out``'s parent), so the swap is two renames; the old
    ``out`` is deleted only after the new one is in place. If the block fails, the side folder is removed
    and ``out`` is left exactly as it was. Side folders that killed commands left beside ``out`` (their
    process is gone) are deleted first; an old ``out`` among them is only named in a warning.
    """
    out = Path(out)
    _clear_leftovers(out)
    stage = _side_folder(out, "partial")
    with writing(stage):
        out.parent.mkdir(parents=True, exist_ok=True)
        stage.mkdir()
    old = _side_folder(out, "old")
    try:
        yield stage
        with writing(out):
            if os.path.lexists(out):
                out.rename(old)
            stage.rename(out)
    except BaseException as exc:
        if os.path.lexists(old) and not os.path.lexists(out):
            old.rename(out)  # the second rename failed: put the old folder back
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(exc, CovidscanError) and len(exc.args) == 1:
            exc.args = (str(exc).replace(str(stage), str(out)),)  # name the folder the user gave
        raise
    _remove(old)


__all__ = [
    "ENCODING_ERRORS",
    "PREDICTION_SUFFIXES",
    "REQUIRED_FILES",
    "RUN_ENTRIES",
    "check_folder",
    "check_output",
    "check_predictions_file",
    "check_run_dir",
    "csv_text",
    "escape_cell",
    "read_csv",
    "readable",
    "replaced_file",
    "run_files",
    "run_inputs",
    "staged_folder",
    "storage_error",
    "unescape_cell",
    "write_atomic",
    "write_csv",
    "write_text",
    "writing",
]
