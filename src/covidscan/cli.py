"""The ``covidscan`` command line. It only parses arguments and calls library functions."""

from __future__ import annotations

import logging
import os
import select
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from covidscan import __version__
from covidscan.console import PlainRichHandler, labelled, stderr as console, stdout as out_console
from covidscan.errors import ConfigError, CovidscanError, ManifestError
from covidscan.system import keep_freed_memory, short_spin_waits

_QUIET = ("-q", "--quiet")


class _Commands(TyperGroup):
    """The root command group: a library error anywhere below becomes one ``error:`` line and exit code 2.

    ``-q``/``--quiet`` is accepted anywhere on the line (``covidscan predict ... -q`` as well as
    ``covidscan -q predict ...``): it is moved in front of the subcommand before parsing.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        end = args.index("--") if "--" in args else len(args)
        quiet = [a for a in args[:end] if a in _QUIET]
        rest = [a for a in args[:end] if a not in _QUIET] + args[end:]
        return super().parse_args(ctx, quiet[:1] + rest)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CovidscanError as exc:
            _error(exc)
        except OSError as exc:  # a folder that cannot be written, a full disk: the file and why, no traceback
            if isinstance(exc, BrokenPipeError) and _reader_gone():
                # The reader of stdout went away (`covidscan tune --help | head -40`): end silently with
                # exit code 1, as rich's console does where it meets this itself; stdout now points at
                # /dev/null so that the interpreter's final flush cannot fail again. A broken pipe elsewhere
                # (a connection) is an error like any other.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                ctx.exit(1)
            where = f" {exc.filename}" if exc.filename else ""
            _error(f"cannot write or read{where}: {exc.strerror or exc}; check the path and its permissions")
        ctx.exit(2)


def _reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end is closed (the kernel reports an error condition)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLERR)
        return bool(poll.poll(0))
    except (OSError, ValueError, AttributeError):  # no file descriptor behind stdout; no poll (Windows)
        return False


def _error(message: object) -> None:
    """The one ``error: ...`` line (user text in it is printed as given, see covidscan.console)."""
    console.print(labelled("error:", "bold red", message))


app = typer.Typer(
    cls=_Commands,
    help="Detect COVID-19 in chest CT slices and chest X-rays, with honest evaluation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Build, split and audit datasets.", no_args_is_help=True)
preprocess_app = typer.Typer(help="Inspect preprocessing (CLAHE, lung crop).", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(preprocess_app, name="preprocess")

Strict = Annotated[
    bool, typer.Option(help="Stop when any image is unreadable or refused, instead of leaving it out.")
]
PrecisionOption = Annotated[
    str,
    typer.Option(help="auto (bf16 where this CPU runs it natively and the run's check allows it), fp32 (the "
                      "same numbers on every CPU) or bf16 (where the run's check allows it)."),
]
Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value, e.g. --set train.epochs=5 (repeatable)."),
]


def _version(value: bool) -> None:
    if value:
        out_console.print(f"covidscan {__version__}")
        raise typer.Exit()


def _show_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    """Python warnings as ``warning: ...`` lines, not ``file.py:76: UserWarning`` source dumps."""
    console.print(labelled("warning:", "yellow", message))


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or info logs.")] = False,
) -> None:
    logging.getLogger().setLevel(logging.WARNING if quiet else logging.INFO)


def _progress() -> bool:
    """Progress bars unless --quiet was given."""
    return logging.getLogger().level <= logging.INFO


def _check_run(run: Path) -> None:
    """A wrong run directory named before the model libraries load (they take seconds)."""
    from covidscan.outputs import check_run_dir

    check_run_dir(run)


def _n(count: int, noun: str) -> str:
    """``1 image``, ``2 images``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _ratios(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--ratios {text!r}: give comma-separated numbers such as 0.7,0.15,0.15") from None


# ---------------------------------------------------------------- data
Modality = Annotated[
    str | None,
    typer.Option(help="ct or cxr: the quality gate judges images for that kind of model (default: either)."),
]


@data_app.command("scan")
def data_scan(
    root: Annotated[Path, typer.Argument(help="Folder with one subfolder per class (covid/, normal/, ...).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Manifest CSV to write.")] = Path("manifest.csv"),
    patient_from: Annotated[
        str | None,
        typer.Option(help="Fill patient_id from: dicom (DICOM PatientID), folder (class/patient/file), or "
                     "regex:PATTERN with a (?P<patient>...) group matched in the file name."),
    ] = None,
    modality: Modality = None,
) -> None:
    """Build a manifest CSV from class subfolders; files the quality gate refuses are listed, not kept."""
    from covidscan.data import scan_dataset, write_manifest, write_quality

    df = scan_dataset(root, patient_from=patient_from, modality=modality)
    write_manifest(df, out)
    counts = df["label"].value_counts().to_dict()
    patients = df["patient_id"].nunique()
    out_console.print(f"wrote {out} ({_n(len(df), 'image')}: {counts}; "
                      + (f"{patients} patients)" if patients else "no patient ids: see --patient-from)"))
    quality = df.attrs["quality"]
    if quality:
        listed = write_quality(quality, out.with_name(out.stem + ".quality.csv"))
        statuses = {s: sum(q["status"] == s for q in quality) for s in ("unreadable", "refused", "doubtful")}
        out_console.print(f"quality: {statuses['unreadable']} unreadable and {statuses['refused']} refused "
                          f"(left out), {statuses['doubtful']} doubtful (kept); every one listed in {listed}")


@data_app.command("split")
def data_split(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV or class-folder tree.")],
    by: Annotated[
        str, typer.Option(help="patient (default, honest) or image (the papers' protocol).")
    ] = "patient",
    ratios: Annotated[str, typer.Option(help="train,val,test (or train,test) fractions.")] = "0.7,0.15,0.15",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    patient_column: Annotated[str | None, typer.Option(help="Column holding patient ids.")] = None,
    resplit: Annotated[bool, typer.Option(help="Ignore an existing split column.")] = False,
    out: Annotated[Path, typer.Option("--out", "-o", help="Manifest CSV to write.")] = Path("split.csv"),
) -> None:
    """Split a manifest into train/val/test, grouped by patient and stratified by label.

    A one-class dataset or patients carrying both labels are reported (train refuses them).
    """
    from covidscan.data import read_manifest, split_manifest, write_manifest

    df = read_manifest(manifest, patient_column=patient_column)
    df = split_manifest(df, by=by, ratios=_ratios(ratios), seed=seed, keep_existing=not resplit)
    write_manifest(df, out)
    table = df.groupby("split")["label"].value_counts().unstack(fill_value=0)
    out_console.print(table.to_string())
    out_console.print(f"wrote {out}")


@data_app.command("audit")
def data_audit(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV or class-folder tree.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="JSON report to write.")] = Path("audit.json"),
    near_threshold: Annotated[
        int, typer.Option(help="Max Hamming distance (of 256 dHash bits) for a near-duplicate.")
    ] = 14,
    patient_column: Annotated[str | None, typer.Option(help="Column holding patient ids.")] = None,
    modality: Modality = None,
    probe: Annotated[
        bool, typer.Option(help="Also train linear probes on what lies outside the lungs, on the lungs alone "
                           "and on the lung mask: a high outside-lungs AUC means the labels are readable "
                           "without the lungs (needs --modality).")
    ] = False,
    probe_backbone: Annotated[
        str, typer.Option(help="Backbone of the probe's frozen features (as model.backbone).")
    ] = "mobilenet_v2",
    probe_weights: Annotated[
        str, typer.Option(help="imagenet (torchvision / timm cache) or a state_dict file for the backbone.")
    ] = "imagenet",
    probe_size: Annotated[int, typer.Option(help="Side in pixels the probe's images are resized to.")] = 224,
    probe_mask: Annotated[
        str, typer.Option(help="Lung masks of the probe: contour (the lung crop's) or unet (the X-ray lung "
                          "model of `covidscan lungseg train`).")
    ] = "contour",
) -> None:
    """Audit leakage (patients across splits, duplicates), labels, shortcut signals and image quality."""
    from covidscan.data import audit_manifest, format_audit, read_manifest
    from covidscan.data.audit import write_audit

    df = read_manifest(manifest, patient_column=patient_column)
    report = audit_manifest(df, near_threshold=near_threshold, progress=_progress(), modality=modality)
    if probe:
        from covidscan.evaluation.probe import add_probe, shortcut_probe

        result = shortcut_probe(df, modality=modality, backbone=probe_backbone, weights=probe_weights,
                                size=probe_size, mask=probe_mask, progress=_progress())
        report = add_probe(report, result)
    write_audit(report, out, [manifest, *df["path"]])
    out_console.print(format_audit(report))
    out_console.print(f"wrote {out}")


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write images, masks and manifest.csv.")],
    n: Annotated[int, typer.Option(help="Number of images.")] = 200,
    modality: Annotated[str, typer.Option(help="ct or cxr.")] = "ct",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    slices_per_patient: Annotated[int, typer.Option(help="Images per synthetic patient.")] = 4,
    size: Annotated[int, typer.Option(help="Image side in pixels (64 to 4096).")] = 256,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an earlier phantom dataset in --out (never other files).")
    ] = False,
) -> None:
    """Generate a synthetic phantom dataset with lung and lesion masks."""
    from covidscan.data.synthetic import write_phantom_dataset

    path = write_phantom_dataset(
        out, n=n, modality=modality, seed=seed, slices_per_patient=slices_per_patient, size=size,
        overwrite=overwrite,
    )
    out_console.print(f"wrote {n} {modality} phantoms; manifest: {path}")


# ---------------------------------------------------------------- preprocess
@preprocess_app.command("preview")
def preprocess_preview(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV or class-folder tree.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG contact sheet to write.")] = Path("sheet.png"),
    n: Annotated[int, typer.Option(help="Images on the sheet.")] = 32,
    modality: Annotated[str, typer.Option(help="ct or cxr.")] = "ct",
    seed: Annotated[int, typer.Option(help="Which images to draw.")] = 0,
) -> None:
    """Draw images with their lung-mask outlines and crop boxes, to check the lung crop by eye."""
    from covidscan.data import read_manifest
    from covidscan.outputs import check_output
    from covidscan.preprocess import preview_sheet

    check_output(out, [manifest])
    stats = preview_sheet(read_manifest(manifest), out, n=n, modality=modality, seed=seed)
    out_console.print(f"wrote {out}; lungs found in {stats['found']} of {stats['n']} images")


# ---------------------------------------------------------------- models
@app.command("presets")
def presets() -> None:
    """List the packaged experiment presets."""
    from covidscan.config import list_presets, load_config

    for name in list_presets():
        out_console.print(labelled(f"{name}:", "bold", load_config(name).description))


@app.command("train")
def train(
    config: Annotated[str, typer.Argument(help="Preset name (see `covidscan presets`) or YAML config file.")],
    data: Annotated[Path, typer.Option(help="Manifest CSV or class-folder tree.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory to write.")] = None,
    overrides: Overrides = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty run directory.")] = False,
    strict: Strict = False,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue the interrupted training of this run directory from its last finished "
                          "epoch (same config and data; --out may be left out)."),
    ] = None,
    nproc: Annotated[
        int,
        typer.Option(min=1, help="Training processes (gloo on the CPU, one GPU each with nccl): they share "
                                 "each global batch, or the feature extraction when the base is frozen."),
    ] = 1,
) -> None:
    """Train and evaluate one experiment; writes a run directory with report.md."""
    from covidscan.config import load_config
    from covidscan.evaluation import format_metrics_table
    from covidscan.training import train_experiment

    if resume is not None and out is not None and resume.resolve() != out.resolve():
        raise ConfigError(f"--resume {resume} and --out {out} differ; give only --resume RUN")
    run = resume or out
    if run is None:
        raise ConfigError("give --out RUN (the run directory to write), or --resume RUN")
    cfg = load_config(config, overrides or [])
    result = train_experiment(cfg, data, run, overwrite=overwrite, strict=strict, progress=_progress(),
                              inputs=[Path(config)], resume=resume is not None, nproc=nproc)
    out_console.print(format_metrics_table(result.metrics))
    out_console.print(f"report: {result.run_dir / 'report.md'}")


@app.command("evaluate")
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run directory written by `covidscan train`.")],
    data: Annotated[
        list[Path],
        typer.Option(help="Manifest CSV or class-folder tree (e.g. an external set); repeat for several."),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for metrics.json, figures, report.md (per set).")
    ],
    split: Annotated[
        str | None,
        typer.Option(help="Only rows of this split (default: test if the manifest has splits, else all)."),
    ] = None,
    allow_overlap: Annotated[
        bool, typer.Option(help="Evaluate even on images the run was trained or validated on (inflated!).")
    ] = False,
    strict: Strict = False,
    precision: PrecisionOption = "auto",
) -> None:
    """Evaluate a trained run on any dataset with the run's own threshold and calibration.

    With several --data sets: one sub-folder per set under --out, and table.md/table.json comparing them.
    """
    _check_run(run)
    from covidscan.evaluation import format_metrics_table
    from covidscan.inference import evaluate_many, evaluate_run

    if len(data) > 1:
        table = evaluate_many(run, data, out, split=split, allow_overlap=allow_overlap, strict=strict,
                              precision=precision, progress=_progress())
        out_console.print(table.read_text(encoding="utf-8"))
        out_console.print(f"table: {table}")
        return
    metrics = evaluate_run(run, data[0], out, split=split, allow_overlap=allow_overlap, strict=strict,
                           precision=precision, progress=_progress())
    out_console.print(format_metrics_table(metrics))
    out_console.print(f"report: {out / 'report.md'}")


@app.command("adapt")
def adapt(
    run: Annotated[Path, typer.Argument(help="Run directory to adapt (written by `covidscan train`).")],
    data: Annotated[
        Path, typer.Option(help="The site's labelled cases: manifest CSV (path,label,patient_id); with "
                                "--unlabelled, a folder or manifest of its images.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to write the adapted run to.")],
    mode: Annotated[
        str, typer.Option(help="auto (cross-validation chooses), recalibrate (threshold and temperature) "
                               "or head (retrain the head on the frozen features).")
    ] = "auto",
    mix_original: Annotated[
        bool, typer.Option(help="Train the head on the local and the parent's own training images.")
    ] = False,
    folds: Annotated[int, typer.Option(help="Patient-grouped cross-validation folds (at most).")] = 5,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty run directory.")] = False,
    allow_overlap: Annotated[
        bool, typer.Option(help="Adapt even on images the parent was trained or validated on (inflated!).")
    ] = False,
    strict: Strict = False,
    unlabelled: Annotated[
        bool, typer.Option(help="No verdicts yet: --data is a folder or manifest of the site's images, whose "
                                "features are aligned to the training features, kept only if held-out "
                                "images say it helps.")
    ] = False,
    align: Annotated[
        str, typer.Option(help="With --unlabelled: auto (both judged), standardize or coral.")
    ] = "auto",
    max_rate_change: Annotated[
        float, typer.Option(help="With --unlabelled: refuse an alignment that moves the share of held-out "
                                 "site images called covid by more than this (a guard against label shift).")
    ] = 0.2,
) -> None:
    """Adapt a run to a new site from its labelled cases (reports what each mode gains, out of fold), or
    with --unlabelled align it to the site's images, kept only if held-out images say it helps."""
    given = ({"--mode": mode != "auto", "--mix-original": mix_original, "--allow-overlap": allow_overlap}
             if unlabelled else {"--align": align != "auto", "--max-rate-change": max_rate_change != 0.2})
    misplaced = [name for name, used in given.items() if used]
    if misplaced:
        raise ConfigError(f"{', '.join(misplaced)} {'do' if len(misplaced) > 1 else 'does'} not go with "
                          f"{'--unlabelled' if unlabelled else 'labelled adaptation (add --unlabelled)'}")
    if unlabelled:
        from covidscan.training.align import align_run, format_judgements

        aligned = align_run(run, data, out, method=align, max_rate_change=max_rate_change,
                            overwrite=overwrite, strict=strict, progress=_progress())
        out_console.print(format_judgements(aligned.judgements, aligned.method))
        if aligned.run_dir is None:
            console.print("alignment refused on held-out site images: nothing written; the run serves the "
                          "site as it is until signed cases allow `covidscan adapt --data signed.csv`")
            raise typer.Exit(1)
        out_console.print(f"run: {aligned.run_dir}; report: {aligned.run_dir / 'report.md'}")
        return
    from covidscan.training.adapt import adapt_run, format_comparison

    result = adapt_run(run, data, out, mode=mode, mix_original=mix_original, folds=folds,
                       overwrite=overwrite, allow_overlap=allow_overlap, strict=strict, progress=_progress())
    out_console.print(format_comparison(result.compared, result.mode))
    out_console.print(f"run: {result.run_dir}; report: {result.run_dir / 'report.md'}")


@app.command("ensemble")
def ensemble(
    runs: Annotated[list[Path], typer.Argument(help="Two or more trained runs (same data, split and "
                                                    "preprocessing; different backbones or seeds).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to write the ensemble to.")],
    name: Annotated[str | None, typer.Option(help="The run's name (default: ensemble-N-FIRST).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty run directory.")] = False,
) -> None:
    """Combine trained runs into one ensemble run: averaged logits, calibrated on their validation split."""
    from covidscan.evaluation import format_metrics_table
    from covidscan.training.ensemble import build_ensemble_run

    result = build_ensemble_run(runs, out, name=name, overwrite=overwrite, progress=_progress())
    out_console.print(format_metrics_table(result.metrics))
    out_console.print(f"run: {result.run_dir} ({len(result.members)} members); "
                      f"report: {result.run_dir / 'report.md'}")


@app.command("reproduce")
def reproduce(
    paper: Annotated[str, typer.Argument(help="paper-a (CT) or paper-b (X-ray).")],
    data: Annotated[Path, typer.Option(help="Manifest CSV or class-folder tree.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for one run per row and table.md.")],
    overrides: Overrides = None,
) -> None:
    """Every row of a paper's table, under its random image split and under patient-level splits."""
    from covidscan.training import reproduce_paper

    table = reproduce_paper(paper, data, out, overrides or [], progress=_progress())
    out_console.print(table.read_text(encoding="utf-8"))
    out_console.print(f"table: {table}")


@app.command("predict")
def predict(
    run: Annotated[Path, typer.Argument(help="Run directory written by `covidscan train`.")],
    inputs: Annotated[
        list[Path], typer.Argument(help="Image/DICOM files, folders (searched recursively) or manifest CSVs.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="preds.csv or preds.json to write.")] = Path(
        "preds.csv"
    ),
    cam: Annotated[
        Path | None, typer.Option("--cam", help="Folder for one Grad-CAM overlay PNG per image.")
    ] = None,
    engine: Annotated[
        str,
        typer.Option(
            help="auto (the --onnx file if given, else the fastest engine the run allows on this CPU, "
            "timed once and cached), torch, compiled (torch.compile for this CPU: seconds to compile, "
            "then the fastest PyTorch path; for long jobs), onnx, int8 (the run's model.int8.onnx, where "
            "its int8 check allowed it: `covidscan export RUN --int8`), or ray (Ray Data: --out is a "
            "folder of Parquet shards, resumable; pip install 'covidscan[ray]')."
        ),
    ] = "auto",
    onnx: Annotated[Path | None, typer.Option("--onnx", help="ONNX file for the onnx engine.")] = None,
    band: Annotated[
        float | None,
        typer.Option(help="Width of the 'uncertain' zone around the threshold (default: the run's)."),
    ] = None,
    workers: Annotated[int, typer.Option(help="Threads decoding and preprocessing images.")] = 2,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    precision: PrecisionOption = "auto",
    address: Annotated[
        str | None,
        typer.Option(help="--engine ray: the cluster (auto, or ray://HOST:10001); default a local Ray."),
    ] = None,
    num_workers: Annotated[
        int | None, typer.Option(help="--engine ray: actors, one model each (default: the cluster's CPUs).")
    ] = None,
) -> None:
    """Predict images with a trained run: calibrated probability, label, uncertainty, warnings."""
    from covidscan.outputs import check_predictions_file

    if engine == "ray":
        _predict_on_ray(run, inputs, out, cam=cam, onnx=onnx, band=band, batch_size=batch_size,
                        precision=precision, address=address, num_workers=num_workers)
        return
    if address is not None or num_workers is not None:
        raise ConfigError("--address and --num-workers are for --engine ray")
    check_predictions_file(out, run, [*inputs, onnx])
    _check_run(run)
    from covidscan.inference import predict as run_predict, write_predictions

    df = run_predict(
        run, inputs, engine=engine, onnx_path=onnx, band=band, cam_dir=cam, workers=workers,
        batch_size=batch_size, precision=precision, progress=_progress(),
    )
    write_predictions(df, out)
    ok = df["error"] == ""
    counts = df.loc[ok, "label"].value_counts().to_dict()
    warned = int((ok & (df["warnings"] != "")).sum())
    refused = int(df["error"].str.startswith("refused image").sum())
    out_console.print(
        f"{_n(len(df), 'image')}: {counts}, {int(df.loc[ok, 'uncertain'].sum())} uncertain, "
        f"{warned} with warnings; not predicted: {refused} refused, {int((~ok).sum()) - refused} unreadable"
    )
    for path, error in df.loc[~ok, ["path", "error"]].itertuples(index=False):
        console.print(labelled("skipped", "yellow", f"{path}: {error}"))
    out_console.print(f"wrote {out}")
    if not ok.any() and not refused:
        # nothing found or readable is a failure, not a result (a refusal is an answer: exit 0)
        first = f"{df['path'].iloc[0]}: {df['error'].iloc[0]}"
        raise ManifestError(f"none of the {_n(len(df), 'input')} could be read (first: {first}); every "
                            f"reason is in {out}")


def _predict_on_ray(
    run: Path, inputs: list[Path], out: Path, *, cam: Path | None, onnx: Path | None, band: float | None,
    **options: Any,
) -> None:
    """`covidscan predict --engine ray`: the Ray Data driver, and what it did."""
    from covidscan.inference.ray_predict import predict_on_ray

    options_given = (("--cam", cam), ("--onnx", onnx), ("--band", band))
    given = [name for name, value in options_given if value is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} cannot be used with --engine ray; predict without it")
    if out.suffix.lower() in (".csv", ".json"):
        raise ConfigError(f"--engine ray writes a folder of Parquet shards: give --out DIR, not {out}")
    done = predict_on_ray(run, inputs, out, progress=console.is_terminal, **options)
    out_console.print(
        f"{_n(done.images, 'image')}: {done.predicted} predicted now, {done.resumed} in earlier shards, "
        f"{done.errors} with an error (the rows say why); shards in {done.out_dir / 'shards'}"
    )
    if done.merged is not None:
        out_console.print(f"wrote {done.merged}")


@app.command("shift")
def shift(
    run: Annotated[Path, typer.Argument(help="Run directory written by `covidscan train` or `adapt`.")],
    data: Annotated[
        Path, typer.Option(help="Folder (searched recursively) or manifest CSV: 30 or more images of a site.")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Folder for shift.json, shift.csv and shift.png.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the folds, permutations and bootstrap.")] = 0,
    precision: PrecisionOption = "auto",
) -> None:
    """Do these images look like the run's validation images? A shift alarm before any verdict.

    An alarm means "not yet validated here", never "wrong": only the site's signed cases say how well the
    model works there.
    """
    _check_run(run)
    from covidscan.inference.shift import shift_report

    report = shift_report(run, data, out, seed=seed, precision=precision)
    result = report.result
    ci = f" (95% CI {result.auc_ci[0]:.2f}-{result.auc_ci[1]:.2f})" if result.auc_ci else ""
    left_out = len(report.table) - result.n_sample
    out_console.print(
        f"{_n(result.n_sample, 'image')} of {data} against {result.n_reference} reference images of {run} "
        f"({report.reference})" + (f"; {left_out} left out (unreadable or refused)" if left_out else "")
    )
    out_console.print(f"effect size: ROC AUC {result.auc:.2f}{ci} (0.5: the two groups look alike)")
    out_console.print(f"p-value: {result.p_value:.3g} ({result.n_permutations} permutations; alarm below "
                      f"{result.level:g})")
    out_console.print(f"verdict: {result.verdict}")
    for path in report.files:
        out_console.print(f"wrote {path}")


@app.command("export")
def export(
    run: Annotated[Path, typer.Argument(help="Run directory written by `covidscan train`.")],
    onnx: Annotated[
        Path | None, typer.Option("--onnx", help="ONNX file to write (default model.onnx, without --int8).")
    ] = None,
    int8: Annotated[
        bool,
        typer.Option("--int8", help="Also quantise to int8 (onnxruntime, static QDQ, calibrated on the run's "
                     "validation images) and write the run's model.int8.onnx where, on its test split, int8 "
                     "changes at most 0.5% of the fp32 labels and the ROC AUC by at most 0.005. The check "
                     "holds for CPUs with this one's kind of int8 kernels (with VNNI or AMX, or without: "
                     "there onnxruntime adds int8 products in 16 bits, which clip): run it where it serves."),
    ] = False,
) -> None:
    """Export a run's model to ONNX, with its preprocessing, threshold and calibration in the metadata."""
    _check_run(run)
    from covidscan.export import export_int8, export_onnx

    if onnx is not None or not int8:
        out_console.print(f"wrote {export_onnx(run, onnx or Path('model.onnx'))}")
    if int8:
        verdict = export_int8(run, progress=_progress())
        out_console.print(f"int8 allowed on CPUs with {verdict.int8_kernels} int8 kernels: {verdict.reason}")
        out_console.print(f"wrote {Path(run) / 'model.int8.onnx'} and its verdict in checkpoint.json")


@app.command("card")
def card(
    run: Annotated[Path, typer.Argument(help="Run directory written by `covidscan train` or `adapt`.")],
) -> None:
    """(Re)write a run's model_card.md: intended use, model, data, metrics, limitations, CLAIM items."""
    from covidscan.evaluation.model_card import write_model_card

    out_console.print(f"wrote {write_model_card(run)}")


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo's data and run.")] = Path(
        "runs/demo"
    ),
    seed: Annotated[int, typer.Option(help="Seed of the phantoms, the split and the training.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier demo in --out.")] = True,
) -> None:
    """Generate phantoms, audit them, train and evaluate a model end to end (no download)."""
    from covidscan.demo import run_demo

    report = run_demo(out, seed=seed, overwrite=overwrite, progress=_progress())
    out_console.print(f"report: {report}")


# ---------------------------------------------------------------- lung segmentation (issue 9)
lungseg_app = typer.Typer(help="Train and check the chest X-ray lung U-Net of the masked mode.",
                          no_args_is_help=True)
app.add_typer(lungseg_app, name="lungseg")


@lungseg_app.command("train")
def lungseg_train(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Weights file to write (.safetensors); "
                                             "default: the location the masked mode reads.")] = None,
    images: Annotated[Path | None, typer.Option(help="The ieee8023 X-rays the masks belong to: a manifest "
                                                "CSV (patient-disjoint hold-out) or a folder.")] = None,
    masks: Annotated[Path | None, typer.Option(help="semantic_masks_v7labs_lungs.zip or a torchxrayvision "
                                               "wheel (default: the installed torchxrayvision).")] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 12,
    seed: Annotated[int, typer.Option(help="Seed of the split, the augmentation and the weights.")] = 0,
    phantoms: Annotated[int, typer.Option(help="Phantom X-rays added to the training images.")] = 0,
    size: Annotated[int, typer.Option(help="U-Net input side in pixels (a multiple of 16).")] = 128,
) -> None:
    """Train the lung U-Net on real lung masks and report its IoU on held-out images."""
    from covidscan.preprocess.lungseg import default_lung_model
    from covidscan.training.lungseg import train_lung_model

    result = train_lung_model(out or default_lung_model(), images=images, masks=masks, epochs=epochs,
                              seed=seed, phantoms=phantoms, size=size, progress=_progress())
    out_console.print(result.summary())


@lungseg_app.command("preview")
def lungseg_preview(
    images: Annotated[list[Path], typer.Argument(help="Chest X-ray files or folders.")],
    weights: Annotated[Path | None, typer.Option(help="Lung model (default: its default location).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG contact sheet to write.")] = Path("sheet.png"),
    n: Annotated[int, typer.Option(help="Images on the sheet.")] = 32,
    seed: Annotated[int, typer.Option(help="Which images to draw.")] = 0,
) -> None:
    """Draw X-rays with the U-Net's lung outline; what the masked mode blanks is tinted red."""
    from covidscan.preprocess import format_preview, preview_lung_model

    out_console.print(format_preview(preview_lung_model(images, out, weights=weights, n=n, seed=seed)))
# ---------------------------------------------------------------- end of lung segmentation block


# ---------------------------------------------------------------- settings by cross-validation (issue 17)
@app.command("tune")
def tune(
    config: Annotated[str, typer.Argument(help="Preset name (see `covidscan presets`) or YAML config file.")],
    data: Annotated[Path, typer.Option(help="Manifest CSV or class-folder tree (test rows are not read).")],
    grid: Annotated[
        list[str] | None,
        typer.Option("--grid", help="Values to try: key=v1,v2 (repeatable; every combination is tried)."),
    ] = None,
    overrides: Overrides = None,
    folds: Annotated[int, typer.Option(help="Patient-grouped cross-validation folds.")] = 5,
    seed: Annotated[int | None, typer.Option(help="Seed of the folds (default: train.seed).")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Folder for tune.json, tune.csv, oof.csv, best.yaml.")
    ] = None,
    cache: Annotated[
        Path | None, typer.Option(help="Folder of cached features (default: $COVIDSCAN_CACHE/features).")
    ] = None,
    train_best: Annotated[
        bool, typer.Option(help="Then train the best setting into OUT/best (scored on test, once).")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out folder.")] = False,
    strict: Strict = False,
) -> None:
    """Choose settings by patient-grouped cross-validation on the train and validation rows."""
    from covidscan.evaluation import format_metrics_table
    from covidscan.training import tune as tuning

    if train_best and out is None:
        raise ConfigError("--train-best needs --out (the chosen run is written to OUT/best)")
    result = tuning.tune(config, data, grid or [], overrides=overrides or [], folds=folds, seed=seed, out=out,
                         overwrite=overwrite, cache=cache, strict=strict, progress=_progress())
    out_console.print(tuning.format_tune(result))
    out_console.print(f"best: {result.best_setting.label}" + (f"; written to {out}" if out else ""))
    if train_best and out is not None:
        trained = tuning.train_best(result, data, out / "best", overwrite=overwrite, strict=strict,
                                    progress=_progress())
        out_console.print(format_metrics_table(trained.metrics))
        out_console.print(f"report: {trained.run_dir / 'report.md'}")
# ---------------------------------------------------------------- end of settings by cross-validation block


# ---------------------------------------------------------------- review service (issue 10)
from covidscan.service.cli import register as _register_service  # noqa: E402 - after the core commands

_register_service(app)
# ---------------------------------------------------------------- end of review service block


def main() -> None:
    """Console entry point: library errors become one clear line and exit code 2, never a traceback."""
    logging.basicConfig(
        level=logging.INFO, format="%(message)s",
        handlers=[PlainRichHandler(console=console, show_path=False, show_time=False)],
    )
    warnings.showwarning = _show_warning
    keep_freed_memory()
    short_spin_waits()
    app(prog_name="covidscan")
