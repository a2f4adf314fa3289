"""A held-out corpus of bad inputs and faults, run against the real ``covidscan`` command line.

Each :class:`Scenario` builds its own inputs in a fresh folder (tiny phantoms, copies of one shared tiny run),
runs ``python -m covidscan ARGV`` there as a subprocess with the source tree under test first on
``PYTHONPATH``, and compares what happened with what a demanding user expects:

* ``error``: exit 2 and exactly one ``error:`` line on stderr that names what it should (``mentions``);
* ``ok``: exit 0 and the outputs pass ``check``;
* ``refused-row`` (predict): the file's row has an error and no probability; a clear error naming the file
  (exit 2) is accepted too;
* ``error-or-ok``: either of the first two (where both are right, e.g. a Latin-1 config read or refused).

Every file the scenario gave as input is hashed before and after: one deleted or changed is data lost.
:func:`run_corpus` runs scenarios in parallel and returns one :class:`Result` each, with its verdict:

``clear error`` / ``handled`` (the expected outcome) ; ``flawed`` (exit 2 but the error line is missing, not
alone or does not name what it should) ; ``wrong refusal`` (a valid input refused) ; ``traceback`` (a
``Traceback`` printed or an exit code other than 0 and 2) ; ``silent wrong`` (exit 0 where an error was due,
wrong outputs, or a half-written file left behind) ; ``data lost`` ; ``hang`` (past the time limit).
:data:`FAILING` are the verdicts the corpus must never give. ``benchmarks/fault_corpus.py`` is the runner.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COVIDSCAN_SHARED", REPO.parent / "shared"))
for _helpers in (REPO / "tests", REPO / "tests" / "service"):
    if str(_helpers) not in sys.path:
        sys.path.append(str(_helpers))

from service_helpers import free_port  # noqa: E402

from badinputs import bomb_png  # noqa: E402 - the helpers' folders are put on the path just above
from dicom_files import write_dicom  # noqa: E402

GROUPS = {
    "1-overwrite": "never destroy or overwrite what the user gave",
    "2-judge": "never give a label to what the model cannot judge",
    "3-run": "never trust a run directory blindly",
    "4-crash": "no tracebacks, no injection, no false assurance",
    "5-first-hour": "the first hour of a new user",
    "6-args": "every command's bad arguments and inputs",
}
EXPECTS = ("error", "ok", "refused-row", "error-or-ok")
VERDICTS = (
    "clear error",
    "handled",
    "flawed",
    "wrong refusal",
    "traceback",
    "silent wrong",
    "data lost",
    "hang",
    "setup failed",
    "skipped",
)
FAILING = ("wrong refusal", "traceback", "silent wrong", "data lost", "hang", "setup failed")
REFUSED = "refused: "  # a check's problem that starts so means a valid input was refused
PRESET = "paper-a-resnet50"
TINY = (
    "model.backbone=timm:resnet10t",
    "model.weights=none",
    "model.input_size=64",
    "train.epochs=1",
    "train.views=1",
    "evaluation.n_bootstrap=20",
    "data.ratios=[0.45,0.35,0.2]",
)
"""A run trained in seconds, with enough validation images (>= 20) for an out-of-distribution detector."""


class Skip(Exception):
    """Raised by a setup that cannot run here (e.g. ../shared is absent)."""


# ---------------------------------------------------------------- the shared tiny run
@dataclass(frozen=True)
class Base:
    """What scenarios copy from: phantom data (moved after training) and the run trained on it."""

    data: Path  # folder holding manifest.csv, images/ and masks/
    run: Path
    other_weights: Path  # the same architecture with other weights (another run's, for the hash check)

    @property
    def manifest(self) -> Path:
        return self.data / "manifest.csv"


def build_base(folder: Path) -> Base:
    """Write 100 CT phantoms, train the tiny run on them, then move the data folder (as users do).

    The run therefore cannot find its training images at the recorded paths: overlap checks must rely on
    what the run stored at training time. Reuses a complete earlier base in ``folder``.
    """
    folder = Path(folder)
    base = Base(folder / "data", folder / "run", folder / "other.safetensors")
    if base.other_weights.is_file():
        return base
    from safetensors.numpy import load_file, save_file

    from covidscan.config import load_config
    from covidscan.data.synthetic import write_phantom_dataset
    from covidscan.training import train_experiment

    trained_on = folder / "data-before-moving"
    manifest = write_phantom_dataset(trained_on, n=100, modality="ct", seed=3, slices_per_patient=2)
    train_experiment(load_config(PRESET, list(TINY)), manifest, base.run, progress=False)
    trained_on.rename(base.data)
    tensors = load_file(base.run / "model.safetensors")
    save_file(
        {k: v * np.asarray(1.01, v.dtype) if v.dtype.kind == "f" else v for k, v in tensors.items()},
        base.other_weights,
    )
    return base


# ---------------------------------------------------------------- what a scenario builds and runs
@dataclass
class Call:
    """One command line: its arguments and the user's inputs (hashed before and after the run)."""

    argv: Sequence[str | bytes | os.PathLike]
    inputs: Sequence[Path] = ()
    stdin: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    file_size_limit: int | None = None  # RLIMIT_FSIZE in bytes: a disk that fills up
    keep: Sequence[str] = ()  # file names under the inputs the command may legitimately rewrite


@dataclass
class Ran:
    """What the command did."""

    returncode: int | None  # None: killed at the time limit
    stdout: str
    stderr: str
    seconds: float


class Workspace:
    """A scenario's own folder, with builders of tiny inputs."""

    def __init__(self, folder: Path, base: Callable[[], Base]) -> None:
        self.dir = folder
        self._base = base

    @property
    def base(self) -> Base:
        return self._base()

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    def data(self, name: str = "site-data") -> Path:
        """A copy of the run's (moved) training data (made once); returns its manifest."""
        if not self.path(name).exists():
            shutil.copytree(self.base.data, self.path(name))
        return self.path(name, "manifest.csv")

    def run(self, name: str = "myrun") -> Path:
        """A copy of the tiny run."""
        shutil.copytree(self.base.run, self.path(name))
        return self.path(name)

    def ext(self, name: str = "ext", n: int = 8, seed: int = 11, modality: str = "ct") -> Path:
        """New phantoms the run never saw (patients of 2 slices); returns the manifest."""
        from covidscan.data.synthetic import write_phantom_dataset

        return write_phantom_dataset(self.path(name), n=n, modality=modality, seed=seed, slices_per_patient=2)

    def _target(self, name: str | bytes) -> Path | bytes:
        """Where ``name`` goes; a bytes name (not UTF-8) stays bytes, as ``os.fsencode`` gives it."""
        target = os.path.join(os.fsencode(self.dir), name) if isinstance(name, bytes) else self.path(name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        return target

    def image(self, name: str | bytes, pixels: np.ndarray, **save: object) -> Path | bytes:
        """Write ``pixels`` (floats in [0, 1] become 8-bit) under ``name``; its suffix picks the format."""
        if pixels.dtype.kind == "f":
            pixels = np.clip(np.rint(pixels * 255), 0, 255).astype(np.uint8)
        target = self._target(name)
        with open(target, "wb") as f:
            Image.fromarray(pixels).save(f, format=_format(name), **save)
        return target

    def signed_tiff(self, name: str, pixels: np.ndarray) -> Path:
        """A signed-integer TIFF (int16 or int32 Hounsfield units, as CT exports hold them)."""
        target = self._target(name)
        if not cv2.imwrite(str(target), pixels):
            raise RuntimeError(f"cannot write {target}")
        return target

    def ct(self, name: str | bytes, seed: int = 5, covid: bool = False, size: int = 256) -> Path | bytes:
        return self.image(name, ct(seed, covid, size))

    def text(self, name: str | bytes, content: str | bytes) -> Path | bytes:
        target = self._target(name)
        with open(target, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
        return target

    def manifest(self, name: str, rows: Iterable[Mapping[str, object]]) -> Path:
        target = self.path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(list(rows)).to_csv(target, index=False)
        return target

    def tree(self, name: str = "tree", per_class: int = 3) -> Path:
        """A class-folder tree (covid/, non_covid/) of CT phantoms."""
        for label in ("covid", "non_covid"):
            for i in range(per_class):
                self.ct(f"{name}/{label}/{label}{i}.png", seed=40 + i, covid=label == "covid", size=128)
        return self.path(name)

    def service(self, name: str = "service") -> Path:
        """A fresh review-service data folder (database created)."""
        from covidscan.service.settings import ServiceSettings, open_service

        db, _ = open_service(ServiceSettings(data_dir=self.path(name)))
        db.dispose()
        return self.path(name)

    def split_rows(self, *splits: str) -> list[dict]:
        """Rows of the run's own splits.csv in ``splits``, pointed at this workspace's copy of the data."""
        self.data()
        df = pd.read_csv(self.base.run / "splits.csv")
        df = df[df["split"].isin(splits)]
        return [
            {"path": str(self.path("site-data", *Path(p).parts[-3:])), "label": label, "patient_id": pid}
            for p, label, pid in zip(df["path"], df["label"], df["patient_id"], strict=True)
        ]


def _format(name: str | bytes) -> str:
    suffix = os.path.splitext(os.fsdecode(name))[1].lower()
    return {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP"}.get(
        suffix, "PNG"
    )


def ct(seed: int = 5, covid: bool = False, size: int = 256) -> np.ndarray:
    from covidscan.data.synthetic import make_phantom

    return make_phantom(seed, modality="ct", covid=covid, size=size).image


def cxr(seed: int = 4) -> np.ndarray:
    from covidscan.data.synthetic import make_phantom

    return make_phantom(seed, modality="cxr", covid=True, size=256).image


# ---------------------------------------------------------------- scenarios and their checks
Check = Callable[[Workspace, Ran], "str | None"]


@dataclass(frozen=True)
class Scenario:
    """One bad input or fault, and the outcome a demanding user expects."""

    id: str
    group: str
    description: str
    setup: Callable[[Workspace], Call]
    expect: str = "error"
    mentions: tuple[str | tuple[str, ...], ...] = ()  # the error line holds each (a tuple: one of them)
    forbid: tuple[str, ...] = ()  # ... and none of these
    check: Check | None = None  # on exit 0: the outputs are right (a problem, or None)
    after: Check | None = None  # whatever the exit: nothing half-written or created by mistake
    timeout: float = 120.0
    codes: tuple[int, ...] = (0, 2)  # exit codes that are not a crash


def _csv(ws: Workspace, name: str) -> pd.DataFrame | None:
    path = ws.path(name)
    if not path.is_file():
        return None
    return pd.read_csv(path, keep_default_na=False, dtype=str, encoding_errors="replace")


def _rows(ws: Workspace, key: str, out: str = "preds.csv") -> tuple[pd.DataFrame | None, str | None]:
    df = _csv(ws, out)
    if df is None:
        return None, f"exit 0 but {out} was not written"
    rows = df[df["path"].str.contains(key, regex=False)]
    return (rows, None) if len(rows) else (None, f"{out} has no row for {key!r}")


def refused_row(key: str, out: str = "preds.csv") -> Check:
    """The predictions' row of ``key`` carries an error and neither probability nor label."""

    def check(ws: Workspace, ran: Ran) -> str | None:
        rows, problem = _rows(ws, key, out)
        if problem:
            return problem
        labelled = rows[(rows["p_covid"] != "") | (rows["label"] != "") | (rows["error"] == "")]
        if len(labelled):
            row = labelled.iloc[0]
            label, p = row["label"] or "-", row["p_covid"] or "-"
            return f"{key} labelled {label} (p={p}); warnings: {row['warnings']}"
        return None

    return check


UNLIKE_TRAINING = ("training", "ood", "out-of-distribution")


def scored(*keys: str, out: str = "preds.csv", same: float | None = None, unlike_ok: bool = False) -> Check:
    """Every ``key`` has a probability and no error; ``same``: their probabilities agree within it.

    ``unlike_ok``: a refusal because the image is unlike the run's training data is right too (a real CT
    slice given to a phantom-trained run); any other refusal (not a CT, blank, ...) is a wrong refusal.
    """

    def check(ws: Workspace, ran: Ran) -> str | None:
        ps = []
        for key in keys:
            rows, problem = _rows(ws, key, out)
            if problem:
                return problem
            row = rows.iloc[0]
            if unlike_ok and any(w in row["error"].lower() for w in UNLIKE_TRAINING):
                continue
            if row["error"] or not row["p_covid"]:
                return f"{REFUSED}{key}: {row['error'][:160]}"
            ps.append(float(row["p_covid"]))
        if same is not None and ps and max(ps) - min(ps) > same:
            return f"the same image gives p = {', '.join(f'{p:.3f}' for p in ps)} ({', '.join(keys)})"
        return None

    return check


def files_exist(*names: str) -> Check:
    def check(ws: Workspace, ran: Ran) -> str | None:
        missing = [n for n in names if not ws.path(n).exists()]
        return f"exit 0 but {', '.join(missing)} not written" if missing else None

    return check


def absent(*names: str) -> Check:
    """Nothing half-written or created by mistake at these names."""

    def check(ws: Workspace, ran: Ran) -> str | None:
        left = [n for n in names if ws.path(n).exists()]
        return f"left behind: {', '.join(left)}" if left else None

    return check


def both(*checks: Check) -> Check:
    def check(ws: Workspace, ran: Ran) -> str | None:
        return next((p for c in checks if (p := c(ws, ran))), None)

    return check


FORMULA_START = ("=", "+", "-", "@")


def no_formulas(name: str) -> Check:
    """No cell of the CSV ``name`` (header aside) would run as a spreadsheet formula."""

    def check(ws: Workspace, ran: Ran) -> str | None:
        path = ws.path(name)
        if not path.is_file():
            return f"exit 0 but {name} was not written"
        for row in list(csv.reader(io.StringIO(path.read_text(encoding="utf-8", errors="replace"))))[1:]:
            for cell in row:
                if cell.startswith(FORMULA_START) and not _number(cell):
                    return f"{name} holds a live formula cell {cell[:40]!r}"
        return None

    return check


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def honest_intervals(name: str) -> Check:
    """No 95% interval of zero width in the metrics (a bootstrap that degenerated on few patients)."""

    def check(ws: Workspace, ran: Ran) -> str | None:
        path = ws.path(name)
        if not path.is_file():
            return f"exit 0 but {name} was not written"
        metrics = json.loads(path.read_text())
        for key, m in metrics.get("metrics", {}).items():
            ci = m.get("ci95") if isinstance(m, dict) else None
            if ci and None not in ci and all(map(math.isfinite, ci)) and ci[1] - ci[0] < 1e-9:
                n = metrics.get("n_patients")
                return f"{key} = {m['value']:.3f} with a zero-width 95% CI {ci} ({n} patients)"
        return None

    return check


def card_is_specific(ws: Workspace, ran: Ran) -> str | None:
    text = ws.path("myrun", "model_card.md").read_text(encoding="utf-8").lower()
    if "synthetic" not in text and "phantom" not in text:
        return "the model card never says the run was trained on synthetic phantoms"
    if "must not" not in text and "not for" not in text and "do not use" not in text:
        return "the model card never says what the run must not be used for"
    return None


def stderr_lines(at_most: int) -> Check:
    def check(ws: Workspace, ran: Ran) -> str | None:
        n = len([line for line in ran.stderr.splitlines() if line.strip()])
        return f"{n} lines on stderr (at most {at_most})" if n > at_most else None

    return check


# ---------------------------------------------------------------- small builders of calls
def _s(p: object) -> str | bytes:
    return p if isinstance(p, bytes) else str(p)


def predict(
    ws: Workspace, *inputs: object, out: str = "preds.csv", run: Path | None = None, extra: Sequence[str] = ()
) -> Call:
    run = run or ws.run()
    return Call(
        ["predict", str(run), *map(_s, inputs), "--out", str(ws.path(out)), *extra],
        inputs=[run, *[Path(os.fsdecode(p)) for p in inputs]],
    )


def train(
    ws: Workspace,
    data: object,
    out: object,
    *extra: str,
    config: str = PRESET,
    sets: Sequence[str] = TINY,
    inputs: Sequence[Path] = (),
) -> Call:
    argv = ["train", config, "--data", str(data), "--out", str(out), *extra]
    for s in sets:
        argv += ["--set", s]
    return Call(argv, inputs=[p for p in (data, *inputs) if isinstance(p, Path)])


def evaluate(
    ws: Workspace, data: Path, out: object, *extra: str, run: Path | None = None, inputs: Sequence[Path] = ()
) -> Call:
    run = run or ws.run()
    return Call(
        ["evaluate", str(run), "--data", str(data), "--out", str(out), *extra], inputs=[run, data, *inputs]
    )


def adapt(
    ws: Workspace, data: Path, out: object, *extra: str, run: Path | None = None, inputs: Sequence[Path] = ()
) -> Call:
    run = run or ws.run()
    return Call(
        [
            "adapt",
            str(run),
            "--data",
            str(data),
            "--out",
            str(out),
            "--mode",
            "recalibrate",
            "--folds",
            "2",
            *extra,
        ],
        inputs=[run, data, *inputs],
    )


def simple(*argv: object, inputs: Sequence[Path] = ()) -> Call:
    return Call([_s(a) for a in argv], inputs=list(inputs))


def _edit_checkpoint(ws: Workspace, edit: Callable[[dict], None]) -> Path:
    run = ws.run()
    doc = json.loads((run / "checkpoint.json").read_text())
    edit(doc)
    (run / "checkpoint.json").write_text(json.dumps(doc, indent=2))
    return run


def _ext_rows(ws: Workspace, n: int = 8, seed: int = 11) -> list[dict]:
    """New phantoms' manifest rows, with absolute paths (to list them in a manifest of one's own)."""
    manifest = ws.ext(n=n, seed=seed)
    df = pd.read_csv(manifest)
    return df.assign(path=[str(manifest.parent / p) for p in df["path"]]).to_dict("records")


def _swapped_weights(ws: Workspace) -> Path:
    run = ws.run()
    shutil.copy(ws.base.other_weights, run / "model.safetensors")
    return run


def _damaged(ws: Workspace, name: str, damage: Callable[[Path], object]) -> Path:
    """A run copy whose file ``name`` went through ``damage``."""
    run = ws.run()
    damage(run / name)
    return run


def _as_folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _folder(ws: Workspace, name: str) -> Path:
    ws.path(name).mkdir(parents=True)
    return ws.path(name)


def _local_cases(ws: Workspace) -> Path:
    """A new site's labelled cases for adapt: 12 unseen phantoms of 6 patients."""
    return ws.ext("local", n=12, seed=21)


def _new_manifest(
    ws: Workspace,
    name: str,
    rows: list[dict],
    transform: Callable[[Image.Image], Image.Image],
    suffix: str = ".png",
) -> Path:
    """Copies of ``rows``' images, each passed through ``transform``, listed in a new manifest."""
    out = []
    for i, row in enumerate(rows):
        target = ws.path(name, "images", f"{i:03d}{suffix}")
        target.parent.mkdir(parents=True, exist_ok=True)
        transform(Image.open(row["path"])).save(target, **({"quality": 95} if suffix == ".jpg" else {}))
        out.append({**row, "path": str(target)})
    return ws.manifest(f"{name}/manifest.csv", out)


def _shift(image: Image.Image) -> Image.Image:
    pixels = np.asarray(image.convert("L")).astype(np.int16)
    return Image.fromarray(np.clip(pixels + 1, 0, 255).astype(np.uint8))


def _photo() -> np.ndarray:
    """A colour photo-like image: smooth coloured background and a furry ellipse (nothing medical)."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:256, 0:256] / 255.0
    rgb = np.dstack([0.9 * x + 0.1, 0.6 * y + 0.2, 0.3 + 0.4 * x * y])
    body = ((x - 0.5) / 0.3) ** 2 + ((y - 0.6) / 0.25) ** 2 < 1
    rgb[body] = [0.85, 0.55, 0.25]
    rgb += rng.normal(0, 0.04, rgb.shape)
    return np.clip(rgb * 255, 0, 255).astype(np.uint8)


def _screenshot() -> np.ndarray:
    """A desktop screenshot: white window, a blue title bar, rows of dark 'text'."""
    img = np.full((300, 400, 3), 245, np.uint8)
    img[:24] = [40, 90, 200]
    for row in range(40, 290, 18):
        for start in range(12, 380, 60):
            img[row : row + 8, start : start + 40 - (row % 30)] = 30
    return img


def _framed_black() -> np.ndarray:
    img = np.zeros((256, 256), np.uint8)
    img[:6], img[-6:], img[:, :6], img[:, -6:] = 255, 255, 255, 255
    return img


def _noise() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (256, 256), dtype=np.uint8)


def _multipage(ws: Workspace, name: str, first_black: bool = False) -> Path:
    pages = [Image.fromarray(np.clip(np.rint(ct(s) * 255), 0, 255).astype(np.uint8)) for s in (5, 6)]
    if first_black:
        pages[0] = Image.fromarray(np.zeros((256, 256), np.uint8))
    pages[0].save(ws.path(name), save_all=True, append_images=pages[1:])
    return ws.path(name)


def _hu(pixels: np.ndarray, dtype: type) -> np.ndarray:
    return np.rint(pixels * 1500 - 1350).astype(dtype)


def _multipage_ok(ws: Workspace, ran: Ran) -> str | None:
    """A multi-page TIFF is refused, or scored page by page: never silently by its first page alone."""
    rows, problem = _rows(ws, "stack.tif")
    if problem:
        return problem
    if len(rows) >= 2 or (rows["p_covid"] == "").all():
        return None
    return f"a 2-page TIFF got one probability ({rows.iloc[0]['p_covid']}) and no word about its pages"


def _first_page_black_ok(ws: Workspace, ran: Ran) -> str | None:
    rows, problem = _rows(ws, "blackfirst.tif")
    if problem:
        return problem
    errors = " ".join(rows["error"]).lower().replace("blackfirst.tif", "")  # the name is not a reason
    if any(w in errors for w in ("constant", "blank", "black")):
        return f"{REFUSED}a TIFF whose first page is black was refused as blank: {errors[:120]}"
    return None


def _closed_port() -> str:
    """The URL of a local port nothing listens on."""
    return f"http://127.0.0.1:{free_port()}"


def _broken_db(ws: Workspace) -> Path:
    folder = ws.path("service")
    folder.mkdir()
    (folder / "service.sqlite3").write_bytes(b"this is not a database\x00" * 100)
    return folder


def _all_correct_test_rows(ws: Workspace) -> Path:
    """Test-split images the run labels correctly: a tiny external set where accuracy is exactly 1."""
    ws.data()
    preds = pd.read_csv(ws.base.run / "predictions.csv")
    threshold = json.loads((ws.base.run / "checkpoint.json").read_text())["calibration"]["threshold"]
    right = preds[(preds["p_covid"] >= threshold) == (preds["label"] == "covid")]
    right = right[(right["p_covid"] - threshold).abs() > 2e-4]  # clear of bf16 differences (3e-5)
    if right["label"].nunique() < 2 or len(right) < 4:
        raise Skip("the tiny run labels too few test images correctly for a degenerate-bootstrap set")
    rows = [
        {"path": str(ws.path("site-data", *Path(p).parts[-3:])), "label": label, "patient_id": pid}
        for p, label, pid in zip(right["path"], right["label"], right["patient_id"], strict=True)
    ]
    return ws.manifest("small-ext.csv", rows)


def _shared(*parts: str) -> Path:
    path = SHARED.joinpath("data", *parts)
    if not path.exists():
        raise Skip(f"{path} not found (../shared is absent)")
    return path


def _first_png(folder: Path) -> Path:
    return sorted(folder.rglob("*.png"))[0]


def _preset_text() -> str:
    from covidscan.config import preset_dir

    return (preset_dir() / f"{PRESET}.yaml").read_text(encoding="utf-8")


def _latin1_config(ws: Workspace) -> Path:
    """The preset, renamed with umlauts and saved in Latin-1 (as an older Windows editor does)."""
    text = _preset_text().replace(f"name: {PRESET}", "name: lungen-ct-fälle-münchen")
    return ws.text("fälle.yaml", text.encode("latin-1"))


# ---------------------------------------------------------------- the corpus
def _error(
    id: str, group: str, description: str, setup: Callable[[Workspace], Call], *mentions, **kw
) -> Scenario:
    return Scenario(id, group, description, setup, "error", tuple(mentions), **kw)


def _ok(
    id: str, group: str, description: str, setup: Callable[[Workspace], Call], check: Check, **kw
) -> Scenario:
    return Scenario(id, group, description, setup, "ok", check=check, **kw)


def _refused(
    id: str, group: str, description: str, name: str, write: Callable[[Workspace], object], **kw
) -> Scenario:
    """predict on one file a CT run cannot judge: its row refused (or one clear error naming it)."""
    return Scenario(
        id,
        group,
        description,
        lambda ws: predict(ws, write(ws)),
        "refused-row",
        (name,),
        check=refused_row(name),
        **kw,
    )


G1, G2, G3, G4, G5, G6 = GROUPS
OVERLAP = ("--allow-overlap", "training", "seen")

SCENARIOS: tuple[Scenario, ...] = (
    # ------------------------------------------------ 1. never destroy or overwrite what the user gave
    _error(
        "train-out-is-data-overwrite",
        G1,
        "train --out = the data folder --overwrite: refused, data kept",
        lambda ws: train(ws, m := ws.data(), m.parent, "--overwrite", inputs=[m.parent]),
        "site-data",
    ),
    _error(
        "train-out-is-data",
        G1,
        "train --out = the data folder (no --overwrite): refused",
        lambda ws: train(ws, m := ws.data(), m.parent, inputs=[m.parent]),
        "site-data",
    ),
    _error(
        "train-out-above-data-overwrite",
        G1,
        "train --out = the folder above the data, --overwrite",
        lambda ws: train(
            ws,
            ws.data("project/site-data"),
            ws.path("project"),
            "--overwrite",
            inputs=[ws.path("project")],
        ),
        "project",
    ),
    _error(
        "train-out-is-images-folder-overwrite",
        G1,
        "train --out = the images/ folder the manifest lists",
        lambda ws: train(ws, m := ws.data(), m.parent / "images", "--overwrite", inputs=[m.parent]),
        "images",
    ),
    _error(
        "train-out-is-manifest-file",
        G1,
        "train --out = the manifest CSV itself",
        lambda ws: train(ws, m := ws.data(), m, "--overwrite", inputs=[m.parent]),
        "manifest.csv",
    ),
    _error(
        "train-out-is-class-tree-overwrite",
        G1,
        "train --data TREE --out TREE --overwrite (a class-folder tree, split by image)",
        lambda ws: train(
            ws, t := ws.tree(per_class=6), t, "--overwrite", sets=(*TINY, "data.split_by=image")
        ),
        "tree",
    ),
    _error(
        "train-out-holds-manifest-overwrite",
        G1,
        "the manifest lives in the --out folder, its images elsewhere: --overwrite refused",
        lambda ws: train(
            ws,
            ws.manifest("proj/m.csv", ws.split_rows("train", "val", "test")),
            ws.path("proj"),
            "--overwrite",
            inputs=[ws.path("site-data")],
        ),
        "proj",
    ),
    _error(
        "train-out-is-config-folder-overwrite",
        G1,
        "the YAML config lives in --out: --overwrite refused",
        lambda ws: train(
            ws,
            ws.data(),
            ws.path("cfgdir"),
            "--overwrite",
            config=str(ws.text("cfgdir/tiny.yaml", _preset_text())),
            inputs=[ws.path("cfgdir")],
        ),
        "cfgdir",
    ),
    _error(
        "train-overwrite-failure-keeps-old-run",
        G1,
        "train --overwrite onto an earlier run with a missing manifest: the old run must survive",
        lambda ws: train(
            ws, ws.path("missing.csv"), ws.run("oldrun"), "--overwrite", inputs=[ws.path("oldrun")]
        ),
        "missing.csv",
    ),
    _error(
        "train-overwrite-bad-label-keeps-old-run",
        G1,
        "train --overwrite with a label typo in the data: error, and the earlier run is untouched",
        lambda ws: train(
            ws,
            ws.manifest(
                "typo.csv",
                [
                    {**r, "label": "covd" if i == 0 else r["label"]}
                    for i, r in enumerate(ws.split_rows("train", "val", "test"))
                ],
            ),
            ws.run("oldrun"),
            "--overwrite",
            inputs=[ws.path("oldrun")],
        ),
        "covd",
    ),
    _ok(
        "train-overwrite-earlier-run",
        G1,
        "train --overwrite onto an earlier run (no inputs inside): replaced",
        lambda ws: (ws.run("oldrun"), train(ws, ws.data(), ws.path("oldrun"), "--overwrite"))[1],
        files_exist("oldrun/checkpoint.json", "oldrun/model.safetensors"),
    ),
    _error(
        "train-full-disk",
        G1,
        "the disk fills up while train writes the weights: a clear error, no half run",
        lambda ws: replace(train(ws, ws.data(), ws.path("newrun")), file_size_limit=2_000_000),
        ("newrun", "space", "large", "model.safetensors"),
        after=absent("newrun/model.safetensors"),
    ),
    _error(
        "train-full-disk-overwrite",
        G1,
        "full disk during train --overwrite: the earlier run survives",
        lambda ws: replace(
            train(ws, ws.data(), ws.run("oldrun"), "--overwrite", inputs=[ws.path("oldrun")]),
            file_size_limit=2_000_000,
        ),
        ("oldrun", "space", "large", "model.safetensors"),
    ),
    _error(
        "adapt-out-is-parent-run-overwrite",
        G1,
        "adapt --out = the parent run --overwrite",
        lambda ws: adapt(ws, _local_cases(ws), ws.path("myrun"), "--overwrite"),
        "myrun",
    ),
    _error(
        "adapt-out-is-parent-run",
        G1,
        "adapt --out = the parent run (no --overwrite)",
        lambda ws: adapt(ws, _local_cases(ws), ws.path("myrun")),
        "myrun",
    ),
    _error(
        "adapt-out-is-local-data-overwrite",
        G1,
        "adapt --out = the folder of the local cases --overwrite",
        lambda ws: adapt(ws, m := _local_cases(ws), m.parent, "--overwrite", inputs=[m.parent]),
        "local",
    ),
    _error(
        "adapt-out-above-run-overwrite",
        G1,
        "adapt --out = the folder holding the parent run --overwrite",
        lambda ws: adapt(
            ws,
            _local_cases(ws),
            ws.path("runs"),
            "--overwrite",
            run=ws.run("runs/parent"),
            inputs=[ws.path("runs")],
        ),
        "runs",
    ),
    _error(
        "evaluate-out-is-run",
        G1,
        "evaluate RUN --out RUN would replace the run's own metrics and report",
        lambda ws: evaluate(ws, ws.ext(), ws.path("myrun")),
        "myrun",
    ),
    _error(
        "evaluate-out-is-data-folder",
        G1,
        "evaluate --out = the data folder whose manifest is named predictions.csv (would be replaced)",
        lambda ws: evaluate(
            ws, m := ws.manifest("ext/predictions.csv", _ext_rows(ws)), m.parent, inputs=[m.parent]
        ),
        ("ext", "predictions.csv"),
    ),
    _error(
        "evaluate-out-is-manifest",
        G1,
        "evaluate --out = the manifest file",
        lambda ws: evaluate(ws, m := ws.ext(), m),
        "manifest.csv",
    ),
    _error(
        "predict-out-is-input-manifest",
        G1,
        "predict m.csv --out m.csv overwrote the input manifest",
        lambda ws: predict(ws, ws.manifest("m.csv", ws.split_rows("test")[:3]), out="m.csv"),
        "m.csv",
    ),
    _error(
        "predict-out-is-second-manifest",
        G1,
        "predict a.csv b.csv --out b.csv",
        lambda ws: predict(
            ws,
            ws.manifest("a.csv", ws.split_rows("test")[:2]),
            ws.manifest("b.csv", ws.split_rows("test")[2:4]),
            out="b.csv",
        ),
        "b.csv",
    ),
    _error(
        "predict-out-in-run",
        G1,
        "predict --out RUN/predictions.csv replaces the run's own test predictions",
        lambda ws: predict(ws, ws.ct("x.png"), out="myrun/predictions.csv"),
        "predictions.csv",
    ),
    _error(
        "predict-out-is-checkpoint",
        G1,
        "predict --out RUN/checkpoint.json",
        lambda ws: predict(ws, ws.ct("x.png"), out="myrun/checkpoint.json"),
        "checkpoint.json",
    ),
    _error(
        "predict-full-disk",
        G1,
        "the disk is full when predict writes its CSV: clear error, no 0-byte file",
        lambda ws: replace(predict(ws, ws.data().parent / "images"), file_size_limit=4096),
        ("preds.csv", "space", "large"),
        after=absent("preds.csv"),
        timeout=180,
    ),
    _error(
        "export-onnx-over-weights",
        G1,
        "export --onnx RUN/model.safetensors would replace the weights",
        lambda ws: simple("export", r := ws.run(), "--onnx", r / "model.safetensors", inputs=[r]),
        "model.safetensors",
    ),
    _error(
        "export-onnx-over-checkpoint",
        G1,
        "export --onnx RUN/checkpoint.json",
        lambda ws: simple("export", r := ws.run(), "--onnx", r / "checkpoint.json", inputs=[r]),
        "checkpoint.json",
    ),
    _error(
        "export-full-disk",
        G1,
        "the disk fills while export writes the ONNX file",
        lambda ws: replace(
            simple("export", r := ws.run(), "--onnx", ws.path("m.onnx"), inputs=[r]),
            file_size_limit=1_000_000,
        ),
        ("m.onnx", "space", "large"),
        after=absent("m.onnx"),
        timeout=180,
    ),
    _error(
        "scan-out-is-an-image",
        G1,
        "data scan TREE --out TREE/covid/covid0.png (an input image)",
        lambda ws: simple("data", "scan", t := ws.tree(), "--out", t / "covid" / "covid0.png", inputs=[t]),
        "covid0.png",
    ),
    _error(
        "split-out-is-input",
        G1,
        "data split m.csv --out m.csv: outputs never replace inputs",
        lambda ws: simple("data", "split", m := ws.data(), "--out", m, inputs=[m.parent]),
        "manifest.csv",
    ),
    _error(
        "audit-out-is-manifest",
        G1,
        "data audit m.csv --out m.csv writes JSON over the manifest",
        lambda ws: simple("data", "audit", m := ws.data(), "--out", m, inputs=[m.parent]),
        "manifest.csv",
    ),
    _error(
        "synth-out-holds-user-data",
        G1,
        "data synth --out = a folder holding the user's own manifest/images",
        lambda ws: simple("data", "synth", "--out", (m := ws.data()).parent, "--n", "4", inputs=[m.parent]),
        "site-data",
    ),
    _error(
        "preview-out-is-input-image",
        G1,
        "preprocess preview --out = one of the manifest's images",
        lambda ws: simple(
            "preprocess",
            "preview",
            m := ws.data(),
            "--n",
            "2",
            "--out",
            m.parent / "images/covid/phantom-ct-0001-s0.png",
            inputs=[m.parent],
        ),
        "phantom-ct-0001-s0.png",
    ),
    _error(
        "demo-out-holds-user-data",
        G1,
        "demo --out = a folder holding the user's data (overwrite is the "
        "default): refused before anything is replaced",
        lambda ws: simple("demo", "--out", (m := ws.data()).parent, inputs=[m.parent]),
        "site-data",
        timeout=40,
    ),
    # ------------------------------------------------ 2. never label what the model cannot judge
    _refused(
        "xray-phantom-png",
        G2,
        "a chest X-ray PNG given to a CT run",
        "chest-xray.png",
        lambda ws: ws.image("chest-xray.png", cxr()),
    ),
    _refused(
        "xray-real-png",
        G2,
        "a real chest X-ray (../shared cxr-dev) given to a CT run",
        "real-xray.png",
        lambda ws: shutil.copy(_first_png(_shared("cxr-dev")), ws.path("real-xray.png")),
    ),
    _refused(
        "xray-jpeg",
        G2,
        "a chest X-ray JPEG given to a CT run",
        "xray.jpg",
        lambda ws: ws.image("xray.jpg", cxr(), quality=90),
    ),
    _refused(
        "photo",
        G2,
        "a colour photo (an animal on a gradient)",
        "cat.jpg",
        lambda ws: ws.image("cat.jpg", _photo(), quality=90),
    ),
    _refused(
        "screenshot",
        G2,
        "a desktop screenshot PNG",
        "screenshot.png",
        lambda ws: ws.image("screenshot.png", _screenshot()),
    ),
    _refused(
        "framed-black",
        G2,
        "a black image with a white frame",
        "framed.png",
        lambda ws: ws.image("framed.png", _framed_black()),
    ),
    _refused(
        "noise", G2, "uniform random noise, 256x256", "noise.png", lambda ws: ws.image("noise.png", _noise())
    ),
    _refused(
        "all-white",
        G2,
        "an all-white PNG",
        "white.png",
        lambda ws: ws.image("white.png", np.full((256, 256), 255, np.uint8)),
    ),
    _refused(
        "xray-16bit-png",
        G2,
        "an X-ray saved as 16-bit PNG",
        "xray16.png",
        lambda ws: ws.image("xray16.png", np.rint(cxr() * 65535).astype(np.uint16)),
    ),
    Scenario(
        "mixed-folder",
        G2,
        "a folder of 2 CT slices and an X-ray: the CT rows scored, the X-ray refused",
        lambda ws: (
            ws.ct("mixed/ct1.png", 5),
            ws.ct("mixed/ct2.png", 6),
            ws.image("mixed/xr.png", cxr()),
            predict(ws, ws.path("mixed")),
        )[-1],
        "ok",
        check=both(scored("ct1.png", "ct2.png"), refused_row("xr.png")),
    ),
    Scenario(
        "multipage-tiff",
        G2,
        "a 2-page TIFF of CT slices: refused, or scored page by page (never page 1 alone, silently)",
        lambda ws: predict(ws, _multipage(ws, "stack.tif")),
        "refused-row",
        ("stack.tif",),
        check=_multipage_ok,
    ),
    Scenario(
        "multipage-tiff-black-first",
        G2,
        "a 2-page TIFF whose first page is black: not refused as blank",
        lambda ws: predict(ws, _multipage(ws, "blackfirst.tif", first_black=True)),
        "refused-row",
        ("blackfirst.tif",),
        check=_first_page_black_ok,
    ),
    _ok(
        "png-12bit-in-16bit",
        G2,
        "12-bit CT data in a 16-bit PNG: scored as the 8-bit copy is",
        lambda ws: predict(
            ws, ws.ct("ct8.png"), ws.image("ct12.png", np.rint(ct() * 4095).astype(np.uint16))
        ),
        scored("ct8.png", "ct12.png", same=0.05),
    ),
    _ok(
        "tiff-int16-hu",
        G2,
        "an int16 Hounsfield-unit TIFF of a CT slice: scored",
        lambda ws: predict(ws, ws.signed_tiff("hu16.tif", _hu(ct(), np.int16))),
        scored("hu16.tif"),
    ),
    _ok(
        "tiff-int32-hu",
        G2,
        "an int32 Hounsfield-unit TIFF of a CT slice: scored",
        lambda ws: predict(ws, ws.signed_tiff("hu32.tif", _hu(ct(), np.int32))),
        scored("hu32.tif"),
    ),
    _ok(
        "dicom-ct-hu",
        G2,
        "a CT DICOM in Hounsfield units: scored",
        lambda ws: predict(
            ws,
            write_dicom(
                ws.path("ct.dcm"),
                _hu(ct(), np.int16),
                BodyPartExamined="CHEST",
                RescaleSlope=1,
                RescaleIntercept=0,
            ),
        ),
        scored("ct.dcm"),
    ),
    _ok(
        "ct-phantom-control",
        G2,
        "a plain 8-bit CT slice: scored (no false refusal)",
        lambda ws: predict(ws, ws.ct("plain.png")),
        scored("plain.png"),
    ),
    _ok(
        "ct-real-ucsd",
        G2,
        "real CT slices from ../shared ucsd-ct: scored, or refused only as unlike the training data",
        lambda ws: predict(
            ws,
            *[
                shutil.copy(p, ws.path(f"ucsd{i}.png"))
                for i, p in enumerate(sorted(_shared("ucsd-ct").rglob("*.png"))[::150][:4])
            ],
        ),
        scored("ucsd0.png", "ucsd1.png", "ucsd2.png", unlike_ok=True),
    ),
    _ok(
        "ct-real-luna16",
        G2,
        "real CT slices from ../shared ct-ext-luna16: scored, or refused only as unlike the training data",
        lambda ws: predict(
            ws,
            *[
                shutil.copy(p, ws.path(f"luna{i}.png"))
                for i, p in enumerate(sorted(_shared("ct-ext-luna16").rglob("*.png"))[::60][:3])
            ],
        ),
        scored("luna0.png", "luna1.png", unlike_ok=True),
    ),
    _error(
        "evaluate-strict-xray-in-manifest",
        G2,
        "evaluate --strict on external CT data holding an X-ray",
        lambda ws: evaluate(
            ws,
            ws.manifest(
                "ext.csv",
                [
                    *_ext_rows(ws),
                    {"path": str(ws.image("xray-in-set.png", cxr())), "label": "covid", "patient_id": "x1"},
                ],
            ),
            ws.path("out"),
            "--strict",
        ),
        "xray-in-set.png",
    ),
    # ------------------------------------------------ 3. never trust a run directory blindly
    _error(
        "run-other-weights",
        G3,
        "the run's model.safetensors replaced by another run's weights",
        lambda ws: predict(ws, ws.ct("x.png"), run=_swapped_weights(ws)),
        ("model.safetensors", "checkpoint", "sha"),
    ),
    _error(
        "run-edited-hash",
        G3,
        "checkpoint.json's weights_sha256 edited",
        lambda ws: predict(
            ws, ws.ct("x.png"), run=_edit_checkpoint(ws, lambda d: d.update(weights_sha256="0" * 64))
        ),
        ("model.safetensors", "checkpoint", "sha"),
    ),
    _error(
        "run-edited-input-size",
        G3,
        "checkpoint.json's input_size edited from 64 to 128",
        lambda ws: predict(
            ws, ws.ct("x.png"), run=_edit_checkpoint(ws, lambda d: d.update(input_size=[128, 128]))
        ),
        ("checkpoint", "input_size"),
    ),
    _error(
        "run-edited-threshold",
        G3,
        "checkpoint.json's calibration threshold edited",
        lambda ws: predict(
            ws, ws.ct("x.png"), run=_edit_checkpoint(ws, lambda d: d["calibration"].update(threshold=0.01))
        ),
        ("checkpoint", "threshold"),
    ),
    _error(
        "run-truncated-weights",
        G3,
        "model.safetensors cut in half",
        lambda ws: predict(
            ws,
            ws.ct("x.png"),
            run=_damaged(ws, "model.safetensors", lambda f: f.write_bytes(f.read_bytes()[:5_000_000])),
        ),
        "model.safetensors",
    ),
    _error(
        "run-missing-weights",
        G3,
        "model.safetensors deleted",
        lambda ws: predict(ws, ws.ct("x.png"), run=_damaged(ws, "model.safetensors", Path.unlink)),
        "model.safetensors",
    ),
    _error(
        "run-weights-is-folder",
        G3,
        "model.safetensors is a folder",
        lambda ws: predict(ws, ws.ct("x.png"), run=_damaged(ws, "model.safetensors", _as_folder)),
        "model.safetensors",
    ),
    _error(
        "run-checkpoint-not-json",
        G3,
        "checkpoint.json is not JSON",
        lambda ws: predict(
            ws, ws.ct("x.png"), run=_damaged(ws, "checkpoint.json", lambda f: f.write_text("{ not json"))
        ),
        "checkpoint.json",
    ),
    _error(
        "run-checkpoint-empty",
        G3,
        "checkpoint.json is empty",
        lambda ws: predict(
            ws, ws.ct("x.png"), run=_damaged(ws, "checkpoint.json", lambda f: f.write_text(""))
        ),
        "checkpoint.json",
    ),
    _error(
        "run-future-format",
        G3,
        "checkpoint.json says format 99 (a newer covidscan)",
        lambda ws: predict(ws, ws.ct("x.png"), run=_edit_checkpoint(ws, lambda d: d.update(format=99))),
        ("format", "version", "checkpoint"),
    ),
    _error(
        "run-ood-edited",
        G3,
        "ood.safetensors replaced by other bytes",
        lambda ws: predict(
            ws,
            ws.ct("x.png"),
            run=_damaged(ws, "ood.safetensors", lambda f: f.write_bytes(f.read_bytes()[:-8] + b"\xa5" * 8)),
        ),
        "ood",
    ),
    _error(
        "run-dir-is-data",
        G3,
        "predict given the data folder as its run",
        lambda ws: predict(ws, ws.ct("x.png"), run=ws.data().parent),
        ("site-data", "run directory"),
    ),
    _error(
        "export-other-weights",
        G3,
        "export a run whose weights were swapped",
        lambda ws: simple("export", r := _swapped_weights(ws), "--onnx", ws.path("m.onnx"), inputs=[r]),
        ("model.safetensors", "checkpoint", "sha"),
        after=absent("m.onnx"),
    ),
    _error(
        "evaluate-training-images-moved",
        G3,
        "evaluate on the run's own training images after the data folder moved: refused as overlap",
        lambda ws: evaluate(
            ws, ws.manifest("own.csv", ws.split_rows("train")), ws.path("out"), inputs=[ws.path("site-data")]
        ),
        OVERLAP,
    ),
    _error(
        "evaluate-validation-images-moved",
        G3,
        "evaluate on the run's own validation images (moved)",
        lambda ws: evaluate(
            ws, ws.manifest("own.csv", ws.split_rows("val")), ws.path("out"), inputs=[ws.path("site-data")]
        ),
        OVERLAP,
    ),
    _error(
        "evaluate-whole-moved-data",
        G3,
        "evaluate on the moved data folder's manifest (train+val+test)",
        lambda ws: evaluate(ws, ws.data(), ws.path("out")),
        OVERLAP,
    ),
    _error(
        "evaluate-training-shifted-one-level",
        G3,
        "training images shifted by one gray level",
        lambda ws: evaluate(ws, _new_manifest(ws, "shifted", ws.split_rows("train"), _shift), ws.path("out")),
        OVERLAP,
    ),
    _error(
        "evaluate-training-as-jpeg",
        G3,
        "training images re-saved as JPEG (quality 95)",
        lambda ws: evaluate(
            ws, _new_manifest(ws, "jpeg", ws.split_rows("train"), lambda im: im, ".jpg"), ws.path("out")
        ),
        OVERLAP,
    ),
    _error(
        "adapt-on-parent-training-images",
        G3,
        "adapt with the parent's own (moved) training images",
        lambda ws: adapt(
            ws,
            ws.manifest("local.csv", ws.split_rows("train")),
            ws.path("adapted"),
            inputs=[ws.path("site-data")],
        ),
        OVERLAP,
    ),
    _ok(
        "evaluate-allow-overlap",
        G3,
        "evaluate --allow-overlap on the training images: done, and it says so",
        lambda ws: evaluate(
            ws,
            ws.manifest("own.csv", ws.split_rows("train")),
            ws.path("out"),
            "--allow-overlap",
            inputs=[ws.path("site-data")],
        ),
        lambda ws, ran: (
            None
            if "overlap_with_training" in ws.path("out/metrics.json").read_text()
            else "metrics.json does not record the overlap"
        ),
    ),
    _ok(
        "evaluate-external-control",
        G3,
        "evaluate on new phantoms: no false overlap",
        lambda ws: evaluate(ws, ws.ext(n=12), ws.path("out")),
        files_exist("out/metrics.json"),
    ),
    # ------------------------------------------------ 4. no tracebacks, no injection, no false assurance
    Scenario(
        "markup-name-unreadable",
        G4,
        "a corrupt file at scan[/x].png (rich markup in its name)",
        lambda ws: predict(ws, ws.text("scan[/x].png", b"\x89PNG broken")),
        "refused-row",
        ("x].png",),
        check=refused_row("x].png"),
    ),
    _ok(
        "markup-name-valid",
        G4,
        "a valid CT slice named [bold]a.png: scored, the name kept literally",
        lambda ws: predict(ws, ws.ct("[bold]a.png")),
        scored("[bold]a.png"),
    ),
    _error(
        "markup-name-missing-manifest",
        G4,
        "data audit on a missing [/red]m.csv",
        lambda ws: simple("data", "audit", ws.path("[/red]m.csv")),
        "[/red]m.csv",
    ),
    _error(
        "markup-name-missing-train-data",
        G4,
        "train --data [bold]missing.csv",
        lambda ws: train(ws, ws.path("[bold]missing.csv"), ws.path("r")),
        "[bold]missing.csv",
    ),
    _ok(
        "non-utf8-name-predict",
        G4,
        "a valid CT slice whose file name is not UTF-8 (scan\\xff.png)",
        lambda ws: (ws.ct(b"imgs/scan\xff.png"), predict(ws, ws.path("imgs")))[1],
        scored("scan"),
    ),
    _ok(
        "non-utf8-name-predict-json",
        G4,
        "the same, written as JSON",
        lambda ws: (ws.ct(b"imgs/scan\xfe.png"), predict(ws, ws.path("imgs"), out="p.json"))[1],
        lambda ws, ran: (
            None
            if json.loads(ws.path("p.json").read_bytes())["images"][0]["p_covid"] is not None
            else "no probability in p.json"
        ),
    ),
    Scenario(
        "non-utf8-name-corrupt",
        G4,
        "a corrupt file with a non-UTF-8 name: its row refused, no crash",
        lambda ws: (ws.text(b"imgs/bad\xff.png", b"junk"), predict(ws, ws.path("imgs")))[-1],
        "refused-row",
        ("bad",),
        check=refused_row("bad"),
    ),
    _ok(
        "non-utf8-name-scan",
        G4,
        "data scan of a tree holding a non-UTF-8 file name",
        lambda ws: (
            ws.tree(),
            ws.ct(b"tree/covid/x\xff.png", covid=True, size=128),
            simple("data", "scan", ws.path("tree"), "--out", ws.path("m.csv")),
        )[-1],
        lambda ws, ran: None if len(_csv(ws, "m.csv")) == 7 else f"{len(_csv(ws, 'm.csv'))} rows, not 7",
    ),
    Scenario(
        "latin1-config",
        G4,
        "a Latin-1 YAML config (umlauts): read, or one clear error naming it",
        lambda ws: train(ws, ws.data(), ws.path("r"), config=str(_latin1_config(ws))),
        "error-or-ok",
        ((".yaml", "UTF-8", "utf-8", "encoding"),),
        check=files_exist("r/checkpoint.json"),
    ),
    _error(
        "corrupt-db-users-add",
        G4,
        "users add on a corrupt service database",
        lambda ws: Call(
            [
                "users",
                "add",
                "dr",
                "--role",
                "doctor",
                "--data-dir",
                str(d := _broken_db(ws)),
                "--password-stdin",
            ],
            inputs=[d],
            stdin="a long enough password\n",
        ),
        ("service.sqlite3", "database"),
    ),
    _error(
        "corrupt-db-audit-verify",
        G4,
        "audit-log verify on a corrupt service database",
        lambda ws: simple("audit-log", "verify", "--data-dir", d := _broken_db(ws), inputs=[d]),
        ("service.sqlite3", "database"),
        codes=(0, 1, 2),
    ),
    _error(
        "corrupt-db-users-token",
        G4,
        "users token on a corrupt service database",
        lambda ws: simple("users", "token", "dr", "--data-dir", d := _broken_db(ws), inputs=[d]),
        ("service.sqlite3", "database"),
    ),
    _error(
        "corrupt-db-serve",
        G4,
        "serve on a corrupt service database",
        lambda ws: simple(
            "serve",
            "--data-dir",
            d := _broken_db(ws),
            "--run",
            ws.run(),
            "--port",
            str(free_port()),
            inputs=[d],
        ),
        ("service.sqlite3", "database"),
        timeout=60,
    ),
    _error(
        "serve-port-70000",
        G4,
        "serve --port 70000",
        lambda ws: simple("serve", "--data-dir", ws.path("svc"), "--run", ws.run(), "--port", "70000"),
        "--port",
        timeout=60,
    ),
    _error(
        "serve-port-negative",
        G4,
        "serve --port -1",
        lambda ws: simple("serve", "--data-dir", ws.path("svc"), "--run", ws.run(), "--port", "-1"),
        "--port",
        timeout=60,
    ),
    _error(
        "serve-port-text",
        G4,
        "serve --port abc (a usage error: one error line too)",
        lambda ws: simple("serve", "--port", "abc"),
        "--port",
    ),
    _error(
        "serve-no-data-dir",
        G4,
        "serve without --data-dir or --demo",
        lambda ws: simple("serve"),
        "--data-dir",
    ),
    _error(
        "serve-missing-run",
        G4,
        "serve --run typo",
        lambda ws: simple("serve", "--data-dir", ws.path("svc"), "--run", ws.path("no-such-run")),
        "no-such-run",
        timeout=60,
    ),
    _error(
        "serve-bad-database-url",
        G4,
        "serve --database-url mysql://x (unsupported)",
        lambda ws: simple(
            "serve", "--data-dir", ws.path("svc"), "--database-url", "mysql://x/y", "--run", ws.run()
        ),
        ("mysql", "--database-url"),
        timeout=60,
    ),
    _error(
        "audit-verify-typo",
        G4,
        "audit-log verify --data-dir typo: no new empty database, no 'intact'",
        lambda ws: (ws.service(), simple("audit-log", "verify", "--data-dir", ws.path("servcie")))[1],
        "servcie",
        after=absent("servcie"),
        codes=(0, 1, 2),
    ),
    _error(
        "users-token-typo-dir",
        G4,
        "users token --data-dir typo: no new empty database",
        lambda ws: simple("users", "token", "dr", "--data-dir", ws.path("servcie")),
        "servcie",
        after=absent("servcie"),
    ),
    _error(
        "users-empty-password",
        G4,
        "users add --role doctor --password-stdin with an empty line",
        lambda ws: Call(
            ["users", "add", "dr", "--role", "doctor", "--data-dir", str(ws.service()), "--password-stdin"],
            stdin="\n",
        ),
        "password",
    ),
    _error(
        "users-no-stdin-password",
        G4,
        "users add --role doctor --password-stdin with nothing on stdin",
        lambda ws: Call(
            ["users", "add", "dr", "--role", "admin", "--data-dir", str(ws.service()), "--password-stdin"],
            stdin="",
        ),
        "password",
    ),
    _error(
        "users-unknown-name",
        G4,
        "users token for an account that does not exist",
        lambda ws: simple("users", "token", "nobody", "--data-dir", ws.service()),
        "nobody",
    ),
    _error(
        "users-revoke-unknown",
        G4,
        "users revoke for an account that does not exist",
        lambda ws: simple("users", "revoke", "nobody", "--data-dir", ws.service()),
        "nobody",
    ),
    _error(
        "users-bad-role",
        G4,
        "users add --role nurse",
        lambda ws: Call(
            ["users", "add", "x", "--role", "nurse", "--data-dir", str(ws.service()), "--password-stdin"],
            stdin="a long enough password\n",
        ),
        "nurse",
    ),
    _error(
        "send-closed-port",
        G4,
        "send to a closed local port",
        lambda ws: simple("send", ws.ct("x.png"), "--to", _closed_port(), "--token", "t"),
        ("127.0.0.1", "reach"),
        timeout=60,
    ),
    _error(
        "send-not-a-url",
        G4,
        "send --to not-a-url",
        lambda ws: simple("send", ws.ct("x.png"), "--to", "not-a-url", "--token", "t"),
        ("not-a-url", "--to"),
        timeout=60,
    ),
    _error(
        "send-missing-file",
        G4,
        "send a file that does not exist",
        lambda ws: simple("send", ws.path("nope.png"), "--to", _closed_port(), "--token", "t"),
        "nope.png",
    ),
    _error(
        "send-empty-folder",
        G4,
        "send an empty folder",
        lambda ws: simple("send", _folder(ws, "empty"), "--to", _closed_port(), "--token", "t"),
        "empty",
    ),
    _error(
        "send-negative-wait",
        G4,
        "send --wait -5",
        lambda ws: simple("send", ws.ct("x.png"), "--to", _closed_port(), "--token", "t", "--wait", "-5"),
        "--wait",
    ),
    _ok(
        "csv-injection-predict",
        G4,
        "predict =cmd.png +1.png @x.png -2.png: no live formula in preds.csv",
        lambda ws: Call(
            [
                "predict",
                str(ws.run()),
                *[str(ws.ct(n).name) for n in ("=cmd.png", "+1.png", "@x.png")],
                "--",
                str(ws.ct("-2.png").name),
                "--out",
                "preds.csv",
            ],
            inputs=[ws.path("myrun")],
        ),
        no_formulas("preds.csv"),
    ),
    _ok(
        "csv-injection-scan-patient-ids",
        G4,
        "data scan with patient ids =1+2, @SUM(A1), +cmd, -x from names",
        lambda ws: (
            *[
                ws.ct(f"t/{lab}/{pid}_{i}.png", seed=50 + i, covid=lab == "covid", size=128)
                for i, (lab, pid) in enumerate(
                    [("covid", "=1+2"), ("covid", "@SUM(A1)"), ("non_covid", "+cmd"), ("non_covid", "-x")]
                )
            ],
            simple(
                "data",
                "scan",
                ws.path("t"),
                "--patient-from",
                "regex:^(?P<patient>[^_]+)_",
                "--out",
                ws.path("m.csv"),
            ),
        )[-1],
        no_formulas("m.csv"),
    ),
    _ok(
        "csv-injection-split",
        G4,
        "data split of a manifest whose patient ids start with = + - @",
        lambda ws: simple(
            "data",
            "split",
            ws.manifest(
                "m.csv",
                [
                    {**r, "patient_id": ("=", "+", "-", "@")[i % 4] + "cmd" + str(i // 2)}
                    for i, r in enumerate(ws.split_rows("train", "val", "test"))
                ],
            ),
            "--out",
            ws.path("s.csv"),
        ),
        no_formulas("s.csv"),
    ),
    _ok(
        "csv-injection-evaluate",
        G4,
        "evaluate: patient ids like =HYPERLINK(...) in predictions.csv",
        lambda ws: evaluate(
            ws,
            ws.manifest(
                "ext.csv",
                [{**r, "patient_id": "=HYPERLINK(x)" + r["patient_id"]} for r in _ext_rows(ws, n=12)],
            ),
            ws.path("out"),
        ),
        no_formulas("out/predictions.csv"),
    ),
    _error(
        "synth-huge-n",
        G4,
        "data synth --n 1000000000000 (would fill the disk): refused at once",
        lambda ws: simple("data", "synth", "--out", ws.path("s"), "--n", "1000000000000"),
        "--n",
        timeout=30,
    ),
    _error(
        "synth-negative-n",
        G4,
        "data synth --n -5",
        lambda ws: simple("data", "synth", "--out", ws.path("s"), "--n", "-5"),
        ("--n", "n="),
    ),
    _error(
        "synth-bad-modality",
        G4,
        "data synth --modality mri",
        lambda ws: simple("data", "synth", "--out", ws.path("s"), "--n", "4", "--modality", "mri"),
        "mri",
    ),
    _error(
        "synth-out-is-file",
        G4,
        "data synth --out an existing file",
        lambda ws: simple("data", "synth", "--out", f := ws.text("f.txt", "x"), "--n", "4", inputs=[f]),
        "f.txt",
    ),
    _error(
        "set-lr-inf",
        G4,
        "--set train.lr=inf: blamed on train.lr, not on the images",
        lambda ws: train(ws, ws.data(), ws.path("r"), sets=(*TINY, "train.lr=inf")),
        "train.lr",
    ),
    _error(
        "set-lr-nan",
        G4,
        "--set train.lr=nan",
        lambda ws: train(ws, ws.data(), ws.path("r"), sets=(*TINY, "train.lr=nan")),
        "train.lr",
    ),
    _error(
        "set-lr-negative",
        G4,
        "--set train.lr=-0.1",
        lambda ws: train(ws, ws.data(), ws.path("r"), sets=(*TINY, "train.lr=-0.1")),
        "train.lr",
    ),
    _error(
        "set-epochs-negative",
        G4,
        "--set train.epochs=-3",
        lambda ws: train(ws, ws.data(), ws.path("r"), sets=(*TINY, "train.epochs=-3")),
        "train.epochs",
    ),
    _error(
        "set-epochs-zero",
        G4,
        "--set train.epochs=0",
        lambda ws: train(ws, ws.data(), ws.path("r"), sets=(*TINY, "train.epochs=0")),
        "train.epochs",
    ),
    _error(
        "set-batch-zero",
        G4,
        "--set train.batch_size=0",
        lambda ws: train(ws, ws.data(), ws.path("r"), sets=(*TINY, "train.batch_size=0")),
        "train.batch_size",
    ),
    _error(
        "set-input-size-tiny",
        G4,
        "--set model.input_size=3",
        lambda ws: train(ws, ws.data(), ws.path("r"), sets=(*TINY, "model.input_size=3")),
        "input_size",
    ),
    _error(
        "set-ratios-over-one",
        G4,
        "--set data.ratios=[0.7,0.7,0.2]",
        lambda ws: train(ws, ws.data(), ws.path("r"), sets=(*TINY, "data.ratios=[0.7,0.7,0.2]")),
        "ratios",
    ),
    _error(
        "set-typo-suggests",
        G4,
        "--set train.epoch=5 names train.epochs, not the preset file",
        lambda ws: train(ws, ws.data(), ws.path("r"), sets=(*TINY, "train.epoch=5")),
        "train.epochs",
        forbid=(".yaml",),
    ),
    _error(
        "set-section-typo",
        G4,
        "--set trian.epochs=5 names the section train",
        lambda ws: train(ws, ws.data(), ws.path("r"), sets=(*TINY, "trian.epochs=5")),
        "trian",
        forbid=(".yaml",),
    ),
    _error(
        "set-without-equals",
        G4,
        "--set train.epochs (no value)",
        lambda ws: train(ws, ws.data(), ws.path("r"), sets=(*TINY, "train.epochs")),
        ("--set", "="),
    ),
    _error(
        "set-weights-missing-file",
        G4,
        "--set model.weights=/no/such.pth",
        lambda ws: train(
            ws, ws.data(), ws.path("r"), sets=(*TINY, f"model.weights={ws.path('no/such.pth')}")
        ),
        "such.pth",
    ),
    _error(
        "set-device-cuda",
        G4,
        "--set train.device=cuda on a machine without CUDA names train.device, not a "
        "--device option that does not exist",
        lambda ws: train(ws, ws.data(), ws.path("r"), sets=(*TINY, "train.device=cuda")),
        "train.device",
        forbid=("--device ",),
    ),
    _error(
        "device-option",
        G4,
        "train --device cpu (no such option): one error line naming it",
        lambda ws: train(ws, ws.data(), ws.path("r"), "--device", "cpu"),
        "--device",
    ),
    _error(
        "config-is-folder",
        G4,
        "train CONFIG where CONFIG is a folder: not 'does not exist'",
        lambda ws: train(ws, ws.data(), ws.path("r"), config=str(_folder(ws, "cfg"))),
        "cfg",
        forbid=("does not exist",),
    ),
    _error(
        "config-missing-file",
        G4,
        "train nope.yaml",
        lambda ws: train(ws, ws.data(), ws.path("r"), config=str(ws.path("nope.yaml"))),
        "nope.yaml",
    ),
    _error(
        "config-bad-yaml",
        G4,
        "a YAML config with a syntax error",
        lambda ws: train(
            ws, ws.data(), ws.path("r"), config=str(ws.text("bad.yaml", "model: {backbone: [\n"))
        ),
        "bad.yaml",
    ),
    _error(
        "config-unknown-key",
        G4,
        "a YAML config with an unknown key",
        lambda ws: train(
            ws,
            ws.data(),
            ws.path("r"),
            config=str(ws.text("k.yaml", _preset_text() + "trainn: {epochs: 3}\n")),
        ),
        "trainn",
    ),
    _error(
        "config-is-a-list",
        G4,
        "a YAML config that is a list",
        lambda ws: train(ws, ws.data(), ws.path("r"), config=str(ws.text("l.yaml", "- a\n- b\n"))),
        "l.yaml",
    ),
    _error(
        "config-binary",
        G4,
        "a binary file as the config",
        lambda ws: train(ws, ws.data(), ws.path("r"), config=str(ws.text("c.yaml", bytes(range(256)) * 4))),
        "c.yaml",
    ),
    _error(
        "preset-typo",
        G4,
        "train paper-a-resnet5 (a preset typo) suggests paper-a-resnet50",
        lambda ws: train(ws, ws.data(), ws.path("r"), config="paper-a-resnet5"),
        "paper-a-resnet50",
    ),
    # ------------------------------------------------ 5. the first hour
    _error(
        "offline-pretrained-weights",
        G5,
        "train covidscan-ct offline (no cached weights): fails at once, "
        "names --set model.weights=PATH, at most 3 lines",
        lambda ws: Call(
            **{
                **vars(train(ws, ws.data(), ws.path("r"), config="covidscan-ct", sets=("train.epochs=1",))),
                "env": {
                    "TORCH_HOME": str(ws.path("cache/torch")),
                    "HF_HOME": str(ws.path("cache/hf")),
                    "XDG_CACHE_HOME": str(ws.path("cache")),
                    "HTTPS_PROXY": "http://127.0.0.1:9",
                    "HTTP_PROXY": "http://127.0.0.1:9",
                },
            }
        ),
        "model.weights",
        after=stderr_lines(3),
        timeout=45,
    ),
    _ok(
        "ci-degenerate-bootstrap",
        G5,
        "evaluate where every image is right: no zero-width 95% interval",
        lambda ws: evaluate(ws, _all_correct_test_rows(ws), ws.path("out")),
        honest_intervals("out/metrics.json"),
    ),
    _ok(
        "ci-small-external",
        G5,
        "evaluate on 4 new patients: no zero-width 95% interval",
        lambda ws: evaluate(ws, ws.ext(n=8, seed=31), ws.path("out")),
        honest_intervals("out/metrics.json"),
    ),
    _ok(
        "card-phantom-run",
        G5,
        "card of a phantom-trained 1-epoch run says synthetic data and what not to use it for",
        lambda ws: Call(["card", str(ws.run())], inputs=[ws.path("myrun")], keep=["model_card.md"]),
        card_is_specific,
    ),
    _error(
        "train-one-class",
        G5,
        "train on a one-class dataset",
        lambda ws: train(
            ws,
            ws.manifest(
                "one.csv", [r for r in ws.split_rows("train", "val", "test") if r["label"] == "covid"]
            ),
            ws.path("r"),
        ),
        "one.csv",
    ),
    _error(
        "train-empty-folder",
        G5,
        "train --data an empty folder",
        lambda ws: train(ws, _folder(ws, "empty"), ws.path("r")),
        "empty",
    ),
    _error(
        "train-out-under-a-file",
        G5,
        "train --out somefile/run (a read-only place: the parent is a file)",
        lambda ws: train(ws, ws.data(), ws.text("somefile", "x") / "run", inputs=[ws.path("somefile")]),
        "somefile",
    ),
    _error(
        "reproduce-missing-data",
        G5,
        "reproduce paper-a --data missing.csv",
        lambda ws: simple("reproduce", "paper-a", "--data", ws.path("missing.csv"), "--out", ws.path("o")),
        "missing.csv",
    ),
    _error(
        "evaluate-untrained-dir",
        G5,
        "evaluate an empty folder as a run",
        lambda ws: evaluate(ws, ws.ext(), ws.path("o"), run=_folder(ws, "r")),
        ("run directory", "r"),
    ),
    # ------------------------------------------------ 6. every command's bad arguments and inputs
    _error(
        "scan-missing-root",
        G6,
        "data scan no-such-folder",
        lambda ws: simple("data", "scan", ws.path("no-such-folder"), "--out", ws.path("m.csv")),
        "no-such-folder",
    ),
    _error(
        "scan-root-is-file",
        G6,
        "data scan a file",
        lambda ws: simple("data", "scan", ws.ct("x.png"), "--out", ws.path("m.csv")),
        "x.png",
    ),
    _error(
        "scan-empty-folder",
        G6,
        "data scan an empty folder",
        lambda ws: simple("data", "scan", _folder(ws, "empty"), "--out", ws.path("m.csv")),
        "empty",
        after=absent("m.csv"),
    ),
    _error(
        "scan-no-class-folders",
        G6,
        "data scan a folder of images without class subfolders",
        lambda ws: (
            ws.ct("flat/a.png"),
            ws.ct("flat/b.png", 6),
            simple("data", "scan", ws.path("flat"), "--out", ws.path("m.csv")),
        )[-1],
        "flat",
    ),
    _error(
        "scan-bad-patient-from",
        G6,
        "data scan --patient-from visit",
        lambda ws: simple("data", "scan", ws.tree(), "--patient-from", "visit", "--out", ws.path("m.csv")),
        "visit",
    ),
    _error(
        "scan-regex-no-group",
        G6,
        "data scan --patient-from regex without a (?P<patient>) group",
        lambda ws: simple(
            "data", "scan", ws.tree(), "--patient-from", "regex:^[a-z]+", "--out", ws.path("m.csv")
        ),
        "patient",
    ),
    _error(
        "scan-regex-invalid",
        G6,
        "data scan --patient-from regex:( (invalid regex)",
        lambda ws: simple("data", "scan", ws.tree(), "--patient-from", "regex:(", "--out", ws.path("m.csv")),
        ("regex", "("),
    ),
    _error(
        "scan-out-under-file",
        G6,
        "data scan --out somefile/m.csv",
        lambda ws: simple("data", "scan", ws.tree(), "--out", ws.text("somefile", "x") / "m.csv"),
        "somefile",
    ),
    _error(
        "scan-out-is-folder",
        G6,
        "data scan --out an existing folder",
        lambda ws: simple("data", "scan", ws.tree(), "--out", _folder(ws, "outdir")),
        "outdir",
    ),
    _error(
        "split-missing-label-column",
        G6,
        "data split of a manifest without a label column",
        lambda ws: simple(
            "data", "split", ws.text("m.csv", "path,patient_id\na.png,p1\n"), "--out", ws.path("s.csv")
        ),
        "label",
    ),
    _error(
        "split-binary-manifest",
        G6,
        "data split of a binary file named .csv",
        lambda ws: simple(
            "data", "split", ws.text("m.csv", bytes(range(256)) * 8), "--out", ws.path("s.csv")
        ),
        "m.csv",
    ),
    _error(
        "split-empty-manifest",
        G6,
        "data split of a 0-byte manifest",
        lambda ws: simple("data", "split", ws.text("m.csv", b""), "--out", ws.path("s.csv")),
        "m.csv",
    ),
    _error(
        "split-header-only",
        G6,
        "data split of a manifest with a header and no rows",
        lambda ws: simple(
            "data", "split", ws.text("m.csv", "path,label,patient_id\n"), "--out", ws.path("s.csv")
        ),
        "m.csv",
    ),
    _error(
        "split-bad-by",
        G6,
        "data split --by visit",
        lambda ws: simple("data", "split", ws.data(), "--by", "visit", "--out", ws.path("s.csv")),
        "visit",
    ),
    _error(
        "split-ratios-over-one",
        G6,
        "data split --ratios 0.7,0.7,0.2",
        lambda ws: simple("data", "split", ws.data(), "--ratios", "0.7,0.7,0.2", "--out", ws.path("s.csv")),
        ("--ratios", "split ratios"),
    ),
    _error(
        "split-ratios-negative",
        G6,
        "data split --ratios 1.2,-0.2",
        lambda ws: simple("data", "split", ws.data(), "--ratios", "1.2,-0.2", "--out", ws.path("s.csv")),
        ("--ratios", "split ratios"),
    ),
    _error(
        "split-patient-column-missing",
        G6,
        "data split --patient-column nope",
        lambda ws: simple("data", "split", ws.data(), "--patient-column", "nope", "--out", ws.path("s.csv")),
        "nope",
    ),
    _error(
        "split-label-typo",
        G6,
        "data split of a manifest with the label 'covd'",
        lambda ws: simple(
            "data",
            "split",
            ws.manifest(
                "m.csv",
                [
                    {**r, "label": "covd" if i == 3 else r["label"]}
                    for i, r in enumerate(ws.split_rows("train", "val", "test"))
                ],
            ),
            "--out",
            ws.path("s.csv"),
        ),
        "covd",
    ),
    _error(
        "audit-missing-files",
        G6,
        "data audit of a manifest listing files that do not exist",
        lambda ws: simple(
            "data",
            "audit",
            ws.manifest(
                "m.csv",
                [
                    {
                        "path": str(ws.path(f"gone{i}.png")),
                        "label": ("covid", "non_covid")[i % 2],
                        "patient_id": f"p{i}",
                    }
                    for i in range(4)
                ],
            ),
            "--out",
            ws.path("a.json"),
        ),
        "gone",
    ),
    _error(
        "audit-directory-as-manifest",
        G6,
        "data audit of a folder that is no class-folder tree",
        lambda ws: simple("data", "audit", _folder(ws, "d"), "--out", ws.path("a.json")),
        "d",
    ),
    _error(
        "audit-near-threshold-negative",
        G6,
        "data audit --near-threshold -1",
        lambda ws: simple("data", "audit", ws.data(), "--near-threshold", "-1", "--out", ws.path("a.json")),
        ("--near-threshold", "near_threshold"),
    ),
    _error(
        "audit-near-threshold-huge",
        G6,
        "data audit --near-threshold 300 (of 256 bits)",
        lambda ws: simple("data", "audit", ws.data(), "--near-threshold", "300", "--out", ws.path("a.json")),
        ("--near-threshold", "near_threshold"),
    ),
    _error(
        "audit-probe-no-modality",
        G6,
        "data audit --probe without --modality",
        lambda ws: simple("data", "audit", ws.data(), "--probe", "--out", ws.path("a.json")),
        "--modality",
    ),
    _error(
        "audit-out-is-folder",
        G6,
        "data audit --out an existing folder",
        lambda ws: simple("data", "audit", ws.data(), "--out", _folder(ws, "o")),
        "o",
    ),
    _error(
        "preview-n-zero",
        G6,
        "preprocess preview --n 0",
        lambda ws: simple("preprocess", "preview", ws.data(), "--n", "0", "--out", ws.path("s.png")),
        ("--n", "preview n"),
    ),
    _error(
        "preview-bad-modality",
        G6,
        "preprocess preview --modality mri",
        lambda ws: simple("preprocess", "preview", ws.data(), "--modality", "mri", "--out", ws.path("s.png")),
        "mri",
    ),
    _error(
        "train-missing-data",
        G6,
        "train --data missing.csv",
        lambda ws: train(ws, ws.path("missing.csv"), ws.path("r")),
        "missing.csv",
        after=absent("r"),
    ),
    _error(
        "train-label-typo",
        G6,
        "train on a manifest with a label typo",
        lambda ws: train(
            ws,
            ws.manifest(
                "m.csv",
                [
                    {**r, "label": "covd" if i == 5 else r["label"]}
                    for i, r in enumerate(ws.split_rows("train", "val", "test"))
                ],
            ),
            ws.path("r"),
        ),
        "covd",
    ),
    _error(
        "train-missing-columns",
        G6,
        "train on a manifest with no path column",
        lambda ws: train(ws, ws.text("m.csv", "file,label\na.png,covid\n"), ws.path("r")),
        "path",
    ),
    _error(
        "train-binary-manifest",
        G6,
        "train on a binary file named .csv",
        lambda ws: train(ws, ws.text("m.csv", bytes(range(256)) * 8), ws.path("r")),
        "m.csv",
    ),
    _error(
        "train-manifest-missing-images",
        G6,
        "train on a manifest whose images are all gone",
        lambda ws: train(
            ws,
            ws.manifest(
                "m.csv",
                [
                    {**r, "path": r["path"].replace("site-data", "gone")}
                    for r in ws.split_rows("train", "val", "test")
                ],
            ),
            ws.path("r"),
        ),
        ("gone", "m.csv"),
    ),
    _error(
        "evaluate-missing-data",
        G6,
        "evaluate --data missing.csv",
        lambda ws: evaluate(ws, ws.path("missing.csv"), ws.path("o")),
        "missing.csv",
    ),
    _error(
        "evaluate-bad-split",
        G6,
        "evaluate --split nosuch on a manifest with a split column",
        lambda ws: evaluate(
            ws,
            ws.manifest("s.csv", [{**r, "split": "test"} for r in _ext_rows(ws)]),
            ws.path("o"),
            "--split",
            "nosuch",
        ),
        "nosuch",
    ),
    _error(
        "evaluate-out-under-file",
        G6,
        "evaluate --out somefile/o",
        lambda ws: evaluate(ws, ws.ext(), ws.text("somefile", "x") / "o"),
        "somefile",
    ),
    _error(
        "adapt-bad-mode",
        G6,
        "adapt --mode magic",
        lambda ws: adapt(ws, _local_cases(ws), ws.path("a"), "--mode", "magic"),
        "magic",
    ),
    _error(
        "adapt-one-fold",
        G6,
        "adapt --folds 1",
        lambda ws: adapt(ws, _local_cases(ws), ws.path("a"), "--folds", "1"),
        ("--folds", "folds"),
    ),
    _error(
        "adapt-missing-data",
        G6,
        "adapt --data missing.csv",
        lambda ws: adapt(ws, ws.path("missing.csv"), ws.path("a")),
        "missing.csv",
    ),
    _error(
        "adapt-not-a-run",
        G6,
        "adapt a folder that is not a run",
        lambda ws: adapt(ws, _local_cases(ws), ws.path("a"), run=_folder(ws, "nr")),
        ("nr", "run directory"),
    ),
    _error(
        "predict-empty-folder",
        G6,
        "predict an empty folder",
        lambda ws: predict(ws, _folder(ws, "empty")),
        "empty",
        codes=(0, 2),
    ),
    _error(
        "predict-band-negative",
        G6,
        "predict --band -0.5",
        lambda ws: predict(ws, ws.ct("x.png"), extra=["--band", "-0.5"]),
        ("--band", "band"),
    ),
    _error(
        "predict-band-over-one",
        G6,
        "predict --band 3",
        lambda ws: predict(ws, ws.ct("x.png"), extra=["--band", "3"]),
        ("--band", "band"),
    ),
    _error(
        "predict-workers-zero",
        G6,
        "predict --workers 0",
        lambda ws: predict(ws, ws.ct("x.png"), extra=["--workers", "0"]),
        ("--workers", "workers"),
    ),
    _error(
        "predict-batch-zero",
        G6,
        "predict --batch-size 0",
        lambda ws: predict(ws, ws.ct("x.png"), extra=["--batch-size", "0"]),
        ("--batch-size", "batch_size"),
    ),
    _error(
        "predict-bad-engine",
        G6,
        "predict --engine tpu",
        lambda ws: predict(ws, ws.ct("x.png"), extra=["--engine", "tpu"]),
        "tpu",
    ),
    _error(
        "predict-onnx-missing",
        G6,
        "predict --engine onnx --onnx missing.onnx",
        lambda ws: predict(
            ws, ws.ct("x.png"), extra=["--engine", "onnx", "--onnx", str(ws.path("missing.onnx"))]
        ),
        "missing.onnx",
    ),
    _error(
        "predict-onnx-is-folder",
        G6,
        "predict --onnx a folder",
        lambda ws: predict(ws, ws.ct("x.png"), extra=["--onnx", str(_folder(ws, "o.onnx"))]),
        "o.onnx",
    ),
    _error(
        "predict-onnx-not-onnx",
        G6,
        "predict --onnx a text file",
        lambda ws: predict(ws, ws.ct("x.png"), extra=["--onnx", str(ws.text("m.onnx", "not onnx"))]),
        "m.onnx",
    ),
    _error(
        "predict-out-is-folder",
        G6,
        "predict --out a folder named p.csv",
        lambda ws: predict(ws, ws.ct("x.png"), out=(_folder(ws, "p.csv"), "p.csv")[1]),
        "p.csv",
    ),
    _error(
        "predict-cam-under-file",
        G6,
        "predict --cam somefile/cams",
        lambda ws: predict(ws, ws.ct("x.png"), extra=["--cam", str(ws.text("somefile", "x") / "cams")]),
        "somefile",
    ),
    _error(
        "predict-manifest-no-path",
        G6,
        "predict a manifest with no path column",
        lambda ws: predict(ws, ws.text("m.csv", "file,label\nx.png,covid\n")),
        ("path", "m.csv"),
    ),
    _error(
        "predict-manifest-binary",
        G6,
        "predict a binary file named .csv",
        lambda ws: predict(ws, ws.text("m.csv", bytes(range(256)) * 8)),
        "m.csv",
    ),
    Scenario(
        "predict-png-bomb",
        G6,
        "a 17 KB PNG declaring 12000x12000 pixels",
        lambda ws: predict(ws, ws.text("bomb.png", bomb_png())),
        "refused-row",
        ("bomb.png",),
        check=refused_row("bomb.png"),
    ),
    Scenario(
        "predict-corrupt-dicom",
        G6,
        "a DICOM cut in half",
        lambda ws: predict(
            ws,
            ws.text("half.dcm", write_dicom(ws.path("whole.dcm"), _hu(ct(), np.int16)).read_bytes()[:3000]),
        ),
        "refused-row",
        ("half.dcm",),
        check=refused_row("half.dcm"),
    ),
    Scenario(
        "predict-corrupt-jpeg",
        G6,
        "a JPEG of random bytes after its header",
        lambda ws: predict(ws, ws.text("bad.jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 20)),
        "refused-row",
        ("bad.jpg",),
        check=refused_row("bad.jpg"),
    ),
    _error(
        "export-not-a-run",
        G6,
        "export a folder that is not a run",
        lambda ws: simple("export", _folder(ws, "nr"), "--onnx", ws.path("m.onnx")),
        ("nr", "run directory"),
    ),
    _error(
        "export-onnx-under-file",
        G6,
        "export --onnx somefile/m.onnx",
        lambda ws: simple("export", ws.run(), "--onnx", ws.text("somefile", "x") / "m.onnx"),
        "somefile",
    ),
    _error(
        "export-onnx-wrong-suffix",
        G6,
        "export --onnx m.txt",
        lambda ws: simple("export", ws.run(), "--onnx", ws.path("m.txt")),
        ("m.txt", ".onnx"),
    ),
    _error(
        "card-not-a-run",
        G6,
        "card of a folder that is not a run",
        lambda ws: simple("card", _folder(ws, "nr")),
        ("nr", "run directory"),
    ),
    _error(
        "card-corrupt-metrics",
        G6,
        "card of a run whose metrics.json is not JSON",
        lambda ws: Call(
            ["card", str(r := _damaged(ws, "metrics.json", lambda f: f.write_text("{oops")))],
            inputs=[r],
            keep=["model_card.md"],
        ),
        "metrics.json",
    ),
    _error(
        "lungseg-train-missing-images",
        G6,
        "lungseg train --images missing",
        lambda ws: simple(
            "lungseg",
            "train",
            "--out",
            ws.path("l.safetensors"),
            "--images",
            ws.path("missing"),
            "--epochs",
            "1",
        ),
        ("missing", "--masks"),
        timeout=60,
    ),
    _error(
        "lungseg-train-bad-suffix",
        G6,
        "lungseg train --out l.pt",
        lambda ws: simple("lungseg", "train", "--out", ws.path("l.pt"), "--phantoms", "4", "--epochs", "1"),
        "l.pt",
    ),
    _error(
        "lungseg-train-bad-size",
        G6,
        "lungseg train --size 100 (not a multiple of 16)",
        lambda ws: simple(
            "lungseg",
            "train",
            "--out",
            ws.path("l.safetensors"),
            "--phantoms",
            "4",
            "--epochs",
            "1",
            "--size",
            "100",
        ),
        ("--size", "input size"),
        timeout=90,
    ),
    _error(
        "lungseg-preview-missing-weights",
        G6,
        "lungseg preview --weights missing.safetensors",
        lambda ws: simple(
            "lungseg",
            "preview",
            ws.image("x.png", cxr()),
            "--weights",
            ws.path("missing.safetensors"),
            "--out",
            ws.path("s.png"),
        ),
        "missing.safetensors",
    ),
    _error(
        "lungseg-preview-missing-image",
        G6,
        "lungseg preview a missing file",
        lambda ws: simple("lungseg", "preview", ws.path("nope.png"), "--out", ws.path("s.png")),
        ("nope.png", "cxr_lungs"),
    ),
    _error(
        "worker-corrupt-db",
        G6,
        "worker on a corrupt service database",
        lambda ws: simple("worker", "--data-dir", d := _broken_db(ws), inputs=[d]),
        ("service.sqlite3", "database"),
        timeout=60,
    ),
)


# ---------------------------------------------------------------- running
@dataclass
class Result:
    """A scenario's outcome: its verdict and what the user saw."""

    id: str
    group: str
    verdict: str
    detail: str
    argv: list[str]
    returncode: int | None
    error_line: str
    seconds: float


def snapshot(paths: Iterable[Path], keep: Sequence[str] = ()) -> dict[str, str]:
    """sha256 of every file under ``paths`` (symlinks not followed), by path."""
    hashes: dict[str, str] = {}
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else [Path(d, f) for d, _, fs in os.walk(root) for f in fs]
        for f in files:
            if f.name in keep or f.is_symlink() or not f.is_file():
                continue
            hashes[os.fsdecode(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return hashes


def lost(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    """Input files deleted or changed."""
    return [f"{'changed' if p in after else 'deleted'} {p}" for p, h in before.items() if after.get(p) != h]


_LIMITED = (
    "import resource, runpy, sys; n = int(sys.argv.pop(1)); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); sys.argv[0] = 'covidscan'; "
    "runpy.run_module('covidscan', run_name='__main__')"
)


def execute(call: Call, cwd: Path, timeout: float, source: Path) -> Ran:
    """Run ``covidscan`` with ``call``'s arguments in ``cwd``; the whole process group dies at the limit."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **call.env}
    env["PYTHONPATH"] = os.pathsep.join([str(source), *filter(None, [os.environ.get("PYTHONPATH")])])
    prefix = (
        [sys.executable, "-c", _LIMITED, str(call.file_size_limit)]
        if call.file_size_limit
        else [sys.executable, "-m", "covidscan"]
    )
    start = time.monotonic()
    proc = subprocess.Popen(
        [*prefix, *call.argv],
        cwd=cwd,
        env=env,
        start_new_session=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = proc.communicate((call.stdin or "").encode(), timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        code = None
    return Ran(code, out.decode(errors="replace"), err.decode(errors="replace"), time.monotonic() - start)


def _alternatives(m: str | tuple[str, ...]) -> tuple[str, ...]:
    return m if isinstance(m, tuple) else (m,)


def classify(s: Scenario, ws: Workspace, ran: Ran, gone: list[str]) -> tuple[str, str, str]:
    """The verdict, a one-line detail and the error line."""
    errors = [line for line in ran.stderr.splitlines() if line.startswith("error:")]
    error_line = errors[0] if errors else ""
    last = next((line for line in reversed((ran.stdout + ran.stderr).splitlines()) if line.strip()), "")
    if gone:
        return "data lost", f"{len(gone)} input files lost, e.g. {gone[0]}", error_line
    if ran.returncode is None:
        return "hang", f"no result after {ran.seconds:.0f} s; last line: {last[:160]}", error_line
    if "Traceback" in ran.stdout + ran.stderr or ran.returncode not in s.codes:
        return "traceback", f"exit {ran.returncode}: {last[:200]}", error_line
    after = s.after(ws, ran) if s.after else None
    if ran.returncode == 0:
        if s.expect == "error":
            first = next((line for line in ran.stdout.splitlines() if line.strip()), "")
            return "silent wrong", f"exit 0 where an error was due: {first[:160]}", error_line
        problem = (s.check(ws, ran) if s.check else None) or after
        if problem:
            return ("wrong refusal" if problem.startswith(REFUSED) else "silent wrong"), problem, error_line
        return "handled", "", error_line
    if s.expect == "ok":
        return "wrong refusal", f"exit {ran.returncode}: {(error_line or last)[:200]}", error_line
    if after:
        return "silent wrong", f"error given, but {after}", error_line
    if len(errors) != 1:
        return "flawed", f"{len(errors)} 'error:' lines; last line: {last[:160]}", error_line
    missing = [
        " or ".join(_alternatives(m))
        for m in s.mentions
        if not any(alt in error_line for alt in _alternatives(m))
    ]
    wrong = [f for f in s.forbid if f in error_line]
    if missing or wrong:
        said = f"does not name {', '.join(missing)}" if missing else f"names {', '.join(wrong)}"
        return "flawed", f"error line {said}: {error_line[:200]}", error_line
    return "clear error", "", error_line


def run_scenario(s: Scenario, base: Callable[[], Base], folder: Path, source: Path) -> Result:
    """Set up ``s`` in ``folder``, run it and judge what happened."""
    folder.mkdir(parents=True, exist_ok=True)
    ws = Workspace(folder, base)
    try:
        call = s.setup(ws)
    except Skip as exc:
        return Result(s.id, s.group, "skipped", str(exc), [], None, "", 0.0)
    except Exception as exc:  # a broken scenario must show, not stop the corpus
        return Result(s.id, s.group, "setup failed", f"{type(exc).__name__}: {exc}", [], None, "", 0.0)
    before = snapshot(call.inputs, call.keep)
    ran = execute(call, folder, s.timeout, source)
    gone = lost(before, snapshot(call.inputs, call.keep))
    verdict, detail, error_line = classify(s, ws, ran, gone)
    return Result(
        s.id,
        s.group,
        verdict,
        detail,
        [os.fsdecode(a) for a in call.argv],
        ran.returncode,
        error_line,
        ran.seconds,
    )


def select(pattern: str | None = None, ids: Iterable[str] | None = None) -> list[Scenario]:
    """Scenarios whose id holds ``pattern`` (or whose id is in ``ids``)."""
    chosen = [s for s in SCENARIOS if (pattern is None or pattern in s.id) and (ids is None or s.id in ids)]
    if ids is not None and len(chosen) != len(set(ids)):
        raise KeyError(f"unknown scenario ids: {sorted(set(ids) - {s.id for s in chosen})}")
    return chosen


def run_corpus(
    scenarios: Sequence[Scenario],
    *,
    jobs: int = 2,
    base_dir: Path | None = None,
    work: Path | None = None,
    source: Path = REPO / "src",
    keep: bool = False,
    progress: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Run ``scenarios`` (``jobs`` at a time) against the source tree ``source``; the tiny run is trained
    once, into ``base_dir`` (a temporary folder by default), when a scenario first needs it."""
    root = Path(tempfile.mkdtemp(prefix="covidscan-faults-")) if work is None else Path(work)
    lock = threading.Lock()
    built: list[Base] = []

    def base() -> Base:
        with lock:
            if not built:
                built.append(build_base(base_dir or root / "base"))
            return built[0]

    def one(s: Scenario) -> Result:
        folder = root / s.id
        result = run_scenario(s, base, folder, source)
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
        if progress:
            progress(result)
        return result

    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            return list(pool.map(one, scenarios))
    finally:
        if not keep and work is None:
            shutil.rmtree(root, ignore_errors=True)


def tally(results: Iterable[Result]) -> dict[str, dict[str, int]]:
    """Counts of verdicts per group, and under ``"total"``."""
    table: dict[str, dict[str, int]] = {g: dict.fromkeys(VERDICTS, 0) for g in [*GROUPS, "total"]}
    for r in results:
        table[r.group][r.verdict] += 1
        table["total"][r.verdict] += 1
    return table
