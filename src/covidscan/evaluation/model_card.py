"""``model_card.md``: what a run is for, what it is not for, and the evidence behind it, from its own files.

The card is written from the run directory alone (checkpoint.json, config.yaml, splits.csv, metrics.json,
history.json, excluded.csv and, when present, audit.json, probe.json and evaluations saved inside the run),
so ``covidscan card RUN`` can write it for any run, old or new. It reads the files as JSON/YAML/CSV rather
than through :mod:`covidscan.runs`, which imports this package. The last section maps the run onto the
CLAIM checklist (Checklist for Artificial Intelligence in Medical Imaging, Mongan et al., Radiology: AI
2020): which items the run answers, and in which file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from covidscan.errors import RunNotFoundError, StorageError
from covidscan.evaluation.metrics import METRIC_NAMES
from covidscan.evaluation.report import METRIC_LABELS, format_value_ci
from covidscan.evaluation.schema import MetricsSchemaError, read_metrics
from covidscan.models import astra
from covidscan.models.ensemble import MEMBERS_DIR
from covidscan.outputs import read_csv

CARD_NAME = "model_card.md"
SMALL_TEST = 100
"""Test sets with fewer images are called small: a 95% interval on a proportion is then ±0.1 wide or more."""
MODALITY_WORDS = {"ct": "chest CT slices", "cxr": "frontal chest X-rays"}


@dataclass
class _Run:
    """The files of one run directory, parsed (None where a file is absent)."""

    path: Path
    checkpoint: dict[str, Any]
    config: dict[str, Any] | None = None
    splits: pd.DataFrame | None = None
    metrics: dict[str, Any] | None = None
    history: list[dict[str, Any]] | None = None
    audit: dict[str, Any] | None = None
    probe: dict[str, Any] | None = None
    n_excluded: int | None = None
    external: dict[str, dict[str, Any]] = field(default_factory=dict)  # sub-folder -> its metrics.json

    @property
    def calibration(self) -> dict[str, Any]:
        # format 1 (covidscan 0.1) kept threshold and temperature as loose keys
        return self.checkpoint.get("calibration") or {
            k: self.checkpoint.get(k) for k in ("temperature", "threshold", "patient_threshold")}

    @property
    def modality(self) -> str:
        return str((self.checkpoint.get("preprocess") or {}).get("modality", "ct"))

    @property
    def model(self) -> dict[str, Any]:
        return self.checkpoint.get("model") or (self.config or {}).get("model") or {}


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StorageError(f"cannot read {path}: {exc}; the run directory is damaged") from None


def _optional_json(path: Path) -> Any:
    return _json(path) if path.is_file() else None


def _read_run(run_dir: str | Path) -> _Run:
    path = Path(run_dir)
    file = path / "checkpoint.json"
    if not file.is_file():
        raise RunNotFoundError(f"{path} is not a covidscan run directory (no checkpoint.json); pass the "
                               "--out folder of `covidscan train` or `covidscan adapt`")
    checkpoint = _json(file)
    if not isinstance(checkpoint, dict):
        raise StorageError(f"{file} is not a covidscan checkpoint (a JSON object is expected)")
    run = _Run(path, checkpoint)
    if (path / "config.yaml").is_file():
        try:
            run.config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise StorageError(f"cannot read {path / 'config.yaml'}: {exc}") from None
    for name, attr in (("splits.csv", "splits"), ("excluded.csv", "excluded")):
        if (path / name).is_file():
            try:
                table = read_csv(path / name)  # as written: escaped cells, undecodable file names
            except (OSError, ValueError) as exc:
                raise StorageError(f"cannot read {path / name}: {exc}") from None
            if attr == "splits":
                run.splits = table
            else:
                run.n_excluded = len(table)
    try:
        run.metrics = read_metrics(path / "metrics.json") if (path / "metrics.json").is_file() else None
        # An evaluation saved inside the run (`covidscan evaluate RUN --out RUN/NAME`) is listed as external.
        run.external = {m.parent.name: read_metrics(m) for m in sorted(path.glob("*/metrics.json"))}
    except MetricsSchemaError as exc:
        raise StorageError(str(exc)) from None
    run.history = _optional_json(path / "history.json")
    run.audit = _optional_json(path / "audit.json")
    run.probe = _optional_json(path / "probe.json") or (run.audit or {}).get("probe")
    return run


def _num(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


_PHANTOM_NAME = re.compile(r"phantom-(?:ct|cxr)-\d+-s\d+\.png$")
WIDE_CI = 0.3
"""A test interval on sensitivity or specificity this wide cannot tell a useful model from a poor one."""


def _synthetic_share(run: _Run) -> float | None:
    """Share of the run's images that are covidscan's phantoms (`covidscan data synth`), None when unknown.

    A phantom is known by its file name (``phantom-ct-0007-s1.png``) or a ``source`` of ``synthetic``; a run
    of the demo preset counts as synthetic even without splits.csv.
    """
    if run.splits is None or run.splits.empty:
        return 1.0 if str((run.config or {}).get("name", "")).startswith("demo-") else None
    df = run.splits
    phantom = df["path"].astype(str).str.contains(_PHANTOM_NAME)
    if "source" in df:
        phantom |= df["source"].astype(str).str.lower().isin({"synthetic", "phantom", "phantoms"})
    return float(phantom.mean())


def _sources(run: _Run) -> str:
    """The training data's sources as named in splits.csv, or the folder its images came from."""
    df = run.splits
    if df is None or df.empty:
        return "its unrecorded training data"
    if "source" in df and df["source"].notna().any():
        return ", ".join(sorted(df["source"].dropna().astype(str).unique()))
    folders = sorted({Path(p).parent.parent.name or Path(p).parent.name for p in df["path"].astype(str)})
    return "the data in " + ", ".join(f"`{f}`" for f in folders[:3]) + (", ..." if len(folders) > 3 else "")


def _shortcut_findings(run: _Run) -> list[str]:
    """The audit's and the probe's shortcut warnings, each once."""
    lines = [*(run.audit or {}).get("warnings", []), *(run.probe or {}).get("warnings", [])]
    return list(dict.fromkeys(w for w in lines if "shortcut" in w))


def _widest_test_ci(run: _Run) -> tuple[float | None, str]:
    """Widest 95% interval of test sensitivity/specificity (patient level when present) and its wording."""
    m = run.metrics
    if m is None:
        return None, "no test metrics in the run"
    block, unit = (m["patient_level"], "patient") if m.get("patient_level") else (m, "image")
    widths = []
    for name in ("recall", "specificity"):
        low, high = block["metrics"][name]["ci95"]
        if low is None or high is None:
            return None, f"test {METRIC_LABELS[name]} has no confidence interval ({unit} level)"
        widths.append(high - low)
    return max(widths), f"test sensitivity/specificity 95% CIs up to {max(widths):.2f} wide ({unit} level)"


def _use_verdict(run: _Run, synthetic: float | None, shortcuts: list[str], width: float | None) -> str:
    """The one-sentence scope the run's own figures support (never more)."""
    if synthetic is not None and synthetic >= 1.0:
        return ("**A demonstration on synthetic phantoms: not for any clinical or research use.** Its "
                "figures describe phantoms drawn by covidscan, not patients, and say nothing of real scans.")
    if synthetic:
        return (f"**Not for any clinical use, nor as research evidence:** {synthetic:.0%} of its images are "
                "synthetic phantoms, so its figures mix phantoms with real scans.")
    weak = [why for bad, why in (
        (run.metrics is None, "it has no test metrics"),
        (width is None and run.metrics is not None, "its test set is too small for confidence intervals"),
        (width is not None and width > WIDE_CI, f"its test intervals are wider than {WIDE_CI}"),
        (bool(shortcuts), "the audit found shortcut risks"),
    ) if bad]
    if weak:
        return ("**An unvalidated research experiment: not for clinical use, and its figures are not "
                f"evidence of accuracy** ({'; '.join(weak)}).")
    if run.external:
        return (f"**Research use; evaluated outside its training data on {', '.join(run.external)}** (see "
                "*External results*), retrospectively: not validated for clinical use.")
    return f"**Research use; not validated outside {_sources(run)}**, and not for clinical use."


def _intended_use(run: _Run) -> list[str]:
    """What the run may be used for, derived from its own files: data, epochs, tests, audit, bf16, OOD."""
    what = MODALITY_WORDS.get(run.modality, run.modality)
    synthetic, shortcuts = _synthetic_share(run), _shortcut_findings(run)
    width, width_words = _widest_test_ci(run)
    df = run.splits
    if df is None or df.empty:
        data = "training data not recorded (no splits.csv)"
    else:
        patients = f", {df['patient_id'].nunique()} patients" if "patient_id" in df else ""
        kind = ("synthetic phantoms" if synthetic and synthetic >= 1.0 else
                f"{synthetic:.0%} synthetic phantoms" if synthetic else _sources(run))
        data = f"{len(df)} images{patients} in all splits, from {kind}"
    planned = ((run.config or {}).get("train") or {}).get("epochs")
    ran = len(run.history) if run.history else None
    of_planned = f" of {planned} planned" if planned and planned != ran else ""
    members = (run.checkpoint.get("ensemble") or {}).get("members")
    epochs = ("adapted from a parent run" if run.checkpoint.get("parent") else
              f"an ensemble of {len(members)} trained runs" if members else
              "epochs not recorded" if ran is None else f"{ran} epoch{'s' * (ran != 1)}{of_planned}")
    external = (f"external evaluation on {', '.join(run.external)}" if run.external else
                "no external evaluation")
    audit = ("no audit" if run.audit is None and run.probe is None else
             f"{len(shortcuts)} shortcut warning(s) from the audit" if shortcuts else
             "no shortcut warnings from the audit")
    bf16 = run.checkpoint.get("bf16")
    bf16_words = ("bf16 not measured (served in fp32)" if bf16 is None else
                  f"bf16 serving {'allowed' if bf16.get('allowed') else 'refused'}")
    ood = ("out-of-distribution score fitted" if run.checkpoint.get("ood") else
           "no out-of-distribution score: images unlike the training data get no warning")
    return [
        "## Intended use", "",
        _use_verdict(run, synthetic, shortcuts, width), "",
        f"- **What its figures rest on:** {data}; {epochs}; {width_words}; {external}; {audit}; "
        f"{bf16_words}; {ood}.",
        f"- **For:** {'nothing beyond trying covidscan out' if synthetic else 'research on ' + what}: it "
        "flags images (and patients) as COVID-19 or not, with a calibrated probability and a Grad-CAM map.",
        "- **Not for:** a diagnosis, or any decision about a patient; images other than "
        f"{what} (another modality, body part or view); patients, hospitals or scanners unlike the training "
        "data (see *Training data*) until an external evaluation (`covidscan evaluate`) on them says it "
        "works; finding any other disease (it only tells COVID-19 from non-COVID).",
    ]


def _preprocessing(pre: Mapping[str, Any]) -> str:
    steps = []
    if pre.get("clahe"):
        grid = "×".join(str(v) for v in pre.get("tile_grid", ()))
        steps.append(f"CLAHE (clip limit {pre.get('clip_limit')}, tiles {grid})")
    if pre.get("lung_crop"):
        steps.append(f"contour lung crop ({pre.get('modality')}, margin {pre.get('margin')})")
    return ", then ".join(steps) or "none (the whole image, resized)"


def _details(run: _Run) -> list[str]:
    ck, model, cal = run.checkpoint, run.model, run.calibration
    size = "×".join(str(v) for v in ck.get("input_size", ()))
    bf16 = ck.get("bf16")
    members = [(m.get("name"), m.get("model") or {}) for m in (ck.get("ensemble") or {}).get("members", [])]
    licensed = [m.get("weights", "imagenet") for m in ([m for _, m in members] or [model])
                if m.get("backbone") == astra.ASTRA]
    rows = [
        ("name", ck.get("name", run.path.name)),
        ("trained on", MODALITY_WORDS.get(run.modality, run.modality)),
        *((f"member {name}", f"{m.get('backbone')} (initial weights: {m.get('weights')}), head "
                             f"{m.get('head')}; `{MEMBERS_DIR}/{name}/`") for name, m in members),
        *(() if members else (
            ("backbone", f"{model.get('backbone')} (initial weights: {model.get('weights')}; "
                         f"train mode: {model.get('train_mode')})"),
            ("head", f"{model.get('head')} (dropout {model.get('dropout')})"))),
        *(("backbone weights", astra.provenance(str(w))) for w in licensed[:1]),  # a licence of their own
        ("weights SHA-256", f"`{ck.get('weights_sha256', 'n/a')}` (model.safetensors)"),
        ("preprocessing", _preprocessing(ck.get("preprocess") or {})),
        ("input size", f"{size} px, normalised with mean {ck.get('mean')} and std {ck.get('std')}"),
        ("calibration", f"temperature {_num(cal.get('temperature'))}; image threshold p(covid) >= "
                        f"{_num(cal.get('threshold'))} ({cal.get('method', 'n/a')} rule on validation); "
                        f"patient threshold {_num(cal.get('patient_threshold'))}; uncertain band "
                        f"{_num(cal.get('band'), 2)} wide"),
        ("bf16 serving", "not measured (no native bf16 where it was trained): served in fp32" if bf16 is None
                         else ("allowed" if bf16.get("allowed") else "refused") + f": {bf16.get('reason')}"),
        ("covidscan version", ck.get("covidscan_version", "n/a")),
    ]
    lines = ["## Model details", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    if cal.get("notes"):
        lines += ["", "Calibration notes: " + "; ".join(cal["notes"]) + "."]
    return lines


def _split_method(run: _Run) -> str:
    data = (run.config or {}).get("data") or {}
    if run.checkpoint.get("parent"):
        return "the site's labelled cases, all used for training (cross-validated out of fold)"
    if data.get("split_column"):
        return f"the manifest's own split column `{data['split_column']}`"
    by, ratios = data.get("split_by", "patient"), data.get("ratios")
    return f"by {by}, stratified by label, ratios {ratios} (seed {data.get('seed')}), unless the manifest " \
           "had a split column"


def _training_data(run: _Run) -> list[str]:
    lines = ["## Training data", ""]
    if run.splits is None:
        return [*lines, "No splits.csv in the run: the data it was trained on is not recorded."]
    df = run.splits
    lines.append(f"Split: {_split_method(run)}. Every image and its split is listed in `splits.csv`.")
    lines += ["", "| split | images | covid | non_covid | patients |", "|---|---|---|---|---|"]
    groups = dict(list(df.groupby(df["split"] if "split" in df else ["all"] * len(df))))
    usual = ("train", "val", "test")
    order = [s for s in usual if s in groups] + sorted(set(groups) - set(usual))
    for name in order:
        group = groups[name]
        counts = group["label"].value_counts()
        patients = group["patient_id"].nunique() if "patient_id" in group else 0
        lines.append(f"| {name} | {len(group)} | {counts.get('covid', 0)} | {counts.get('non_covid', 0)} | "
                     f"{patients or 'no ids'} |")
    if run.n_excluded:
        lines += ["", f"{run.n_excluded} images were left out by the quality gate (`excluded.csv`)."]
    if run.audit is None:
        lines += ["", "**Audit**: none in the run. `covidscan data audit DATA --modality MODALITY --probe "
                  "--out RUN/audit.json` checks leakage, duplicates and shortcuts; the card then lists its "
                  "warnings."]
    elif run.audit.get("warnings"):
        lines += ["", "**Audit** (`audit.json`) warnings:", ""] + [f"- {w}" for w in run.audit["warnings"]]
    else:
        lines += ["", "**Audit** (`audit.json`): no leakage or shortcut warnings."]
    if run.probe is not None:
        p = run.probe
        lines += ["", f"**Shortcut probe** ({p.get('mask_method')} lung masks, {p.get('backbone')} "
                  f"features, {p.get('folds')}-fold cross-validation by {p.get('unit')}): ROC AUC from "
                  f"outside the lungs alone {format_value_ci(p['outside_lungs'])}, from the lungs alone "
                  f"{format_value_ci(p['lungs_only'])}, from the lung mask alone "
                  f"{format_value_ci(p['mask_only'])}; {p.get('n_no_lungs', 0)} of {p.get('n_images')} "
                  "images without lungs found were left out."]
    return lines


def _metrics_table(metrics: Mapping[str, Any]) -> list[str]:
    patient = metrics.get("patient_level")
    head = "| metric | images (95% CI) |" + (" patients (95% CI) |" if patient else "")
    lines = [head, "|---|---|" + ("---|" if patient else "")]
    for name in METRIC_NAMES:
        row = f"| {METRIC_LABELS[name]} | {format_value_ci(metrics['metrics'][name])} |"
        if patient:
            row += f" {format_value_ci(patient['metrics'][name])} |"
        lines.append(row)
    return lines


def _performance(run: _Run) -> list[str]:
    m = run.metrics
    lines = ["## Performance", ""]
    if m is None:
        return [*lines, "No metrics.json in the run."]
    where = "out of fold on the site's cases" if run.checkpoint.get("parent") else "on the test split"
    patients = "" if m.get("n_patients") is None else f", {m['n_patients']} patients"
    lines += [f"From `metrics.json`, {where}: {m['n_images']} images{patients}, threshold p(covid) >= "
              f"{m['threshold']:.3f}; 95% CIs by a {m.get('bootstrap_unit', 'image')} bootstrap "
              f"({m.get('n_bootstrap', 'n/a')} resamples).", ""]
    lines += _metrics_table(m)
    if m.get("ood_share") is not None:
        lines += ["", f"Share of these images flagged unlike the training data: {m['ood_share']:.1%}."]
    cam = m.get("cam_energy_in_lungs")
    lines += ["", "Grad-CAM share inside the lungs: " + (
        format_value_ci(cam) if isinstance(cam, Mapping) else _num(cam) if cam is not None else
        "not measured in this run (`covidscan predict RUN IMAGES --cam DIR` writes the maps).")]
    return lines


def _external(run: _Run) -> list[str]:
    lines = ["## External results", ""]
    if not run.external:
        return [*lines, "None saved in this run. `covidscan evaluate RUN --data SET --out DIR` writes its "
                        "metrics.json and report.md into DIR, outside the run; this card lists only what is "
                        "inside the run directory (use `--out RUN/NAME` to keep an evaluation with it)."]
    lines += ["| set | images | ROC AUC | sensitivity | specificity | flagged unlike training |",
              "|---|---|---|---|---|---|"]
    for name, m in run.external.items():
        cells = [format_value_ci(m["metrics"][k]) for k in ("roc_auc", "recall", "specificity")]
        ood = "n/a" if m.get("ood_share") is None else f"{m['ood_share']:.1%}"
        lines.append(f"| {name} | {m['n_images']} | " + " | ".join(cells) + f" | {ood} |")
    return lines


def _ood(run: _Run) -> list[str]:
    ood = run.checkpoint.get("ood")
    lines = ["## Unlike the training data (out-of-distribution score)", ""]
    if not ood:
        return [*lines, "Not fitted: this run cannot say when an image is unlike its training data, so "
                        "images from other sources get confident predictions without a warning."]
    quantile = ood.get("quantile")
    scale = f"the {ood.get('n_val')} validation images' scores" + (
        "" if quantile is None else f" at their {quantile:.0%} quantile")
    return [*lines, f"Fitted (`{ood.get('file', 'ood.safetensors')}`, SHA-256 `{ood.get('sha256')}`, "
                    f"checkpoint.json `ood`) on {ood.get('n_train')} training images, its threshold "
                    f"{_num(ood.get('threshold'))} set from {scale}: `predict` warns `unlike_training_data` "
                    "above it. The share flagged on an external set is `ood_share` in that evaluation's "
                    "metrics.json."]


def _limitations(run: _Run) -> list[str]:
    out = []
    data = (run.config or {}).get("data") or {}
    if data.get("split_by") == "image":
        out.append("Images were split at random, not by patient: slices of one patient can be in train and "
                   "test, which inflates every figure.")
    m = run.metrics
    if m is not None and m["n_images"] < SMALL_TEST:
        out.append(f"Small test set ({m['n_images']} images): the intervals are wide; read the CIs, not the "
                   "point values.")
    if m is not None and m.get("bootstrap_unit") == "image":
        out.append("No patient ids: the intervals treat images as independent and are too narrow if several "
                   "come from one patient.")
    source = ((run.audit or {}).get("shortcuts") or {}).get("features", {}).get("source") or {}
    if source.get("tvd") is not None and source["tvd"] >= 0.99:
        out.append("Each class comes from its own source (audit source TVD 1.00): the model may detect the "
                   "source rather than the disease.")
    probe = run.probe or {}
    if probe.get("warnings"):
        out += probe["warnings"]
    if not run.external:
        out.append("No external evaluation is recorded in the run: how it does elsewhere is unknown.")
    out.append("Only the two classes COVID-19 and non-COVID were learnt; other findings were not modelled.")
    return ["## Known limitations", ""] + [f"- {line}" for line in out]


def _lineage(run: _Run) -> list[str]:
    parent = run.checkpoint.get("parent")
    members = (run.checkpoint.get("ensemble") or {}).get("members")
    if members and not parent:
        built = "; ".join(f"`{m.get('run')}` (weights SHA-256 `{m.get('weights_sha256')}`)" for m in members)
        return ["## Lineage", "",
                f"Built by `covidscan ensemble` from {len(members)} trained runs: {built}. The mean of their "
                "temperature-scaled logits was calibrated on their shared validation split; each member's "
                f"config.yaml (it re-creates the member), checkpoint.json and metrics.json are in "
                f"`{MEMBERS_DIR}/`."]
    if not parent:
        return ["## Lineage", "", "Trained by `covidscan train` (not adapted from another run)."]
    compared = parent.get("cross_validation", {}).items()
    if str(parent.get("mode", "")).startswith("align:"):  # `adapt --unlabelled`: no labels, no AUC
        cv = "; ".join(f"{mode}: shift AUC {_num(m.get('shift_auc_before'))} -> "
                       f"{_num(m.get('shift_auc_after'))}, {'kept' if m.get('accepted') else 'refused'}"
                       for mode, m in compared)
        cv = f"unlabelled, on held-out site images: {cv}" if cv else cv
    else:
        cv = "; ".join(f"{mode}: ROC AUC {_num(m.get('roc_auc'))}" for mode, m in compared)
    return ["## Lineage", "",
            f"Adapted (`covidscan adapt`, mode **{parent.get('mode')}**) from `{parent.get('path')}` "
            f"(weights SHA-256 `{parent.get('weights_sha256')}`) on `{parent.get('data')}` (SHA-256 "
            f"`{parent.get('data_sha256')}`, {parent.get('n_images')} images, {parent.get('n_patients')} "
            f"patients). Out-of-fold comparison: {cv or 'n/a'}."]


# (item number, CLAIM item, where this run answers it, when the run can answer it)
_CLAIM: list[tuple[int, str, str, str]] = [
    (3, "intended use and clinical role", "this card, *Intended use*", "always"),
    (7, "data sources", "`splits.csv` (`path`, `source` where given)", "splits"),
    (9, "data pre-processing", "`checkpoint.json` `preprocess`; *Model details*", "always"),
    (13, "handling of missing or unusable data", "`excluded.csv` / the quality gate; *Training data*",
     "splits"),
    (20, "assignment of data to partitions, proportions", "`config.yaml` `data`; `splits.csv` `split`",
     "splits"),
    (21, "level at which partitions are disjoint", "`config.yaml` `data.split_by`; `audit.json` `patients`",
     "splits"),
    (22, "model description: inputs, outputs, layers", "`checkpoint.json` `model`, `input_size`; "
     "`config.yaml` `model`", "always"),
    (23, "software libraries and versions", "`checkpoint.json` `covidscan_version` (dependencies pinned in "
     "covidscan's requirements/constraints.txt)", "always"),
    (24, "initialisation of model parameters", "`checkpoint.json` `model.weights`", "always"),
    (25, "training details: augmentation, hyperparameters", "`config.yaml` `train`", "config"),
    (26, "selection of the final model", "`history.json` (the epoch with the lowest validation loss); "
     "`checkpoint.json` `parent.cross_validation` for adapted runs", "history"),
    (28, "performance metrics", "`metrics.json` `metrics`", "metrics"),
    (29, "uncertainty (confidence intervals)", "`metrics.json` `ci95`, `bootstrap_unit`, `n_bootstrap`",
     "metrics"),
    (30, "robustness or sensitivity analysis", "`audit.json`, `probe.json`", "audit"),
    (31, "explainability and its validation", "Grad-CAM (`covidscan predict --cam`); CAM share inside the "
     "lungs in `metrics.json` when measured", "always"),
    (32, "validation on external data", "evaluations saved in sub-folders of the run", "external"),
    (33, "flow of cases, inclusion and exclusion", "`splits.csv`, `excluded.csv`", "splits"),
    (35, "performance on the partitions", "`metrics.json` (test or out of fold), `history.json` (train and "
     "validation loss)", "metrics"),
    (36, "diagnostic accuracy with precision (95% CI)", "`metrics.json` sensitivity / specificity `ci95`",
     "metrics"),
    (37, "failure analysis of misclassified cases", "`predictions.csv` (`p_covid` per test image with its "
     "label) and `figures/`", "predictions"),
    (38, "limitations, bias, generalisability", "this card, *Known limitations*", "always"),
]
_CLAIM_OPEN = ("5 (prospective or retrospective), 8 (eligibility criteria), 11-12 (data elements, "
               "de-identification), 14-18 (ground truth: reference standard, annotators, inter-rater "
               "variability), 19 (sample size), 34 (demographics per partition), 40-42 (registration, "
               "protocol, funding)")


def _claim(run: _Run) -> list[str]:
    present = {
        "always": True, "splits": run.splits is not None, "config": run.config is not None,
        "history": run.history is not None or bool(run.checkpoint.get("parent")),
        "metrics": run.metrics is not None, "audit": run.audit is not None or run.probe is not None,
        "external": bool(run.external), "predictions": (run.path / "predictions.csv").is_file(),
    }
    lines = ["## CLAIM checklist", "",
             "Items of the Checklist for Artificial Intelligence in Medical Imaging (Mongan et al., 2020) "
             "that this run answers, and where:", "", "| item | topic | answered in |", "|---|---|---|"]
    lines += [f"| {n} | {topic} | {where} |" for n, topic, where, needs in _CLAIM if present[needs]]
    missing = [f"{n} ({topic})" for n, topic, _, needs in _CLAIM if not present[needs]]
    lines += ["", "Not answered by the files of this run: " + ", ".join([*missing, _CLAIM_OPEN]) + "."]
    return lines


def render_model_card(run_dir: str | Path) -> str:
    """The text of a run's model card (Markdown), from the files in ``run_dir`` only."""
    run = _read_run(run_dir)
    sections = [_intended_use(run), _details(run), _training_data(run), _performance(run), _external(run),
                _ood(run), _limitations(run), _lineage(run), _claim(run)]
    title = [f"# Model card: {run.checkpoint.get('name', run.path.name)}", "",
             "Written from the files of this run directory (`covidscan card RUN` rewrites it); every figure "
             "below is read from the file named beside it."]
    return "\n\n".join("\n".join(part) for part in [title, *sections]) + "\n"


def write_model_card(run_dir: str | Path) -> Path:
    """Write (or rewrite) ``run_dir/model_card.md``; returns its path."""
    path = Path(run_dir) / CARD_NAME
    text = render_model_card(run_dir)
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}; check the folder's permissions") \
            from None
    return path


def intended_use(run_dir: str | Path) -> list[str]:
    """The paragraphs of a run's *Intended use* section (Markdown), for records that quote the card."""
    return [line for line in _intended_use(_read_run(run_dir))[1:] if line]
