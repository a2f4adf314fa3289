"""model_card.md (covidscan.evaluation.model_card) and `covidscan card`, on the tiny trained run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from covidscan.data import audit_manifest, read_manifest
from covidscan.errors import RunNotFoundError
from covidscan.evaluation import format_value_ci
from covidscan.evaluation.model_card import render_model_card, write_model_card
from covidscan.evaluation.probe import ProbeResult, ProbeScore, add_probe
from covidscan.inference import evaluate_run
from test_cli import covidscan

SECTIONS = ["## Intended use", "## Model details", "## Training data", "## Performance",
            "## External results", "## Unlike the training data", "## Known limitations", "## Lineage",
            "## CLAIM checklist"]


@pytest.fixture
def run(tiny_run: Path, tmp_path: Path) -> Path:
    """A copy of the tiny run, so that cards and extra files never touch the shared fixture."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def _edit_checkpoint(run: Path, **changes: object) -> None:
    path = run / "checkpoint.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes), encoding="utf-8")


def test_the_card_states_the_runs_own_values(run: Path) -> None:
    path = write_model_card(run)
    assert path == run / "model_card.md"
    text = path.read_text(encoding="utf-8")
    assert [s for s in SECTIONS if s not in text] == []
    metrics = json.loads((run / "metrics.json").read_text())
    checkpoint = json.loads((run / "checkpoint.json").read_text())
    assert f"| ROC AUC | {format_value_ci(metrics['metrics']['roc_auc'])} |" in text
    assert f"threshold p(covid) >= {checkpoint['calibration']['threshold']:.3f}" in text
    assert checkpoint["weights_sha256"] in text and "timm:resnet18" in text
    assert "**Not for:** a diagnosis, or any decision about a patient" in text
    splits = pd.read_csv(run / "splits.csv")
    test = splits[splits["split"] == "test"]
    counts = test["label"].value_counts()
    assert (f"| test | {len(test)} | {counts['covid']} | {counts['non_covid']} | "
            f"{test['patient_id'].nunique()} |") in text
    assert "Trained by `covidscan train`" in text
    ood = checkpoint.get("ood")  # fitted when the run has a validation split and covidscan fits OOD scores
    assert (f"its threshold {ood['threshold']:.3f}" if ood else "Not fitted") in text
    assert f"Small test set ({len(test)} images)" in text  # the tiny run's test split is small
    assert "| 29 | uncertainty (confidence intervals) |" in text
    # training audits its own splits, so the card lists the audit and CLAIM item 30 is answered
    assert "**Audit** (`audit.json`)" in text and "| 30 | robustness or sensitivity analysis |" in text
    assert render_model_card(run) == text  # rewriting gives the same card


def test_audit_probe_external_ood_and_lineage_are_shown_when_present(
    run: Path, phantom_manifest: Path
) -> None:
    probe = ProbeResult(
        outside_lungs=ProbeScore(0.91, (0.85, 0.96)), lungs_only=ProbeScore(0.62, (0.5, 0.73)),
        mask_only=ProbeScore(0.55, (0.45, 0.66)),
        mask_method="contour", mask_description="contours", backbone="mobilenet_v2", weights="imagenet",
        size=(224, 224), folds=5, unit="patient", n_images=64, n_used=63, n_patients=32, n_boot=1000,
        excluded=[{"path": "x.png", "status": "no_lungs", "reason": "no lungs found"}],
    )
    audit = add_probe(audit_manifest(read_manifest(phantom_manifest), modality="ct"), probe)
    (run / "audit.json").write_text(json.dumps(audit), encoding="utf-8")
    external = evaluate_run(run, phantom_manifest, run / "phantoms", allow_overlap=True, progress=False)
    _edit_checkpoint(run, ood={"file": "ood.safetensors", "sha256": "c" * 64, "threshold": 0.42,
                               "quantile": 0.95, "n_train": 44, "n_val": 12},
                     parent={"path": "/runs/parent", "weights_sha256": "a" * 64, "data": "/site/cases.csv",
                             "data_sha256": "b" * 64, "n_images": 40, "n_patients": 20, "mode": "head",
                             "cross_validation": {"head": {"roc_auc": 0.97}}})
    text = write_model_card(run).read_text(encoding="utf-8")
    assert "ROC AUC from outside the lungs alone 0.910 (0.850 – 0.960)" in text
    assert "from the lungs alone 0.620 (0.500 – 0.730), from the lung mask alone 0.550 (0.450 – 0.660)" \
        in text
    training = text.split("## Training data")[1].split("## Performance")[0]
    limitations = text.split("## Known limitations")[1].split("## Lineage")[0]
    for section in (training, limitations):  # an audit warning, and so a known limitation
        assert "- shortcut risk: the labels are predictable from outside the lungs alone" in section
    auc = format_value_ci(external["metrics"]["roc_auc"])
    assert f"| phantoms | {external['n_images']} | {auc} |" in text
    ood = text.split("## Unlike")[1].split("##")[0]
    assert "on 44 training images, its threshold 0.420 set from the 12 validation images' scores at their " \
        "95% quantile" in ood
    assert "c" * 64 in ood
    assert "mode **head**) from `/runs/parent`" in text and "head: ROC AUC 0.970" in text
    assert "out of fold on the site's cases" in text
    assert "| 30 | robustness or sensitivity analysis | `audit.json`, `probe.json` |" in text
    assert "| 32 | validation on external data |" in text


def test_a_covidscan_01_checkpoint_gives_its_loose_calibration(run: Path) -> None:
    checkpoint = json.loads((run / "checkpoint.json").read_text())
    legacy = {k: checkpoint[k] for k in ("preprocess", "input_size", "mean", "std")}
    legacy |= {"format": 1, "temperature": 1.5, "threshold": 0.25}
    (run / "checkpoint.json").write_text(json.dumps(legacy), encoding="utf-8")
    text = render_model_card(run)
    assert "temperature 1.500; image threshold p(covid) >= 0.250" in text
    assert "timm:resnet18" in text  # the model identity then comes from config.yaml


def test_card_command(run: Path, tmp_path: Path) -> None:
    (run / "model_card.md").write_text("stale", encoding="utf-8")
    result = covidscan("card", str(run))
    assert result.returncode == 0 and f"wrote {run / 'model_card.md'}" in result.stdout
    assert (run / "model_card.md").read_text(encoding="utf-8").startswith("# Model card: paper-a-resnet50")
    result = covidscan("card", str(tmp_path / "missing"))
    assert result.returncode == 2 and "error:" in result.stderr
    assert "not a covidscan run directory" in result.stderr
    with pytest.raises(RunNotFoundError, match="--out folder"):
        write_model_card(tmp_path)


def _intended_use(text: str) -> str:
    return text.split("## Intended use")[1].split("## Model details")[0]


def test_the_phantom_demo_card_says_it_is_a_demonstration_not_for_use(run: Path) -> None:
    use = _intended_use(render_model_card(run))
    assert "**A demonstration on synthetic phantoms: not for any clinical or research use.**" in use
    splits = pd.read_csv(run / "splits.csv")
    history = json.loads((run / "history.json").read_text())
    assert f"{len(splits)} images, {splits['patient_id'].nunique()} patients in all splits, from synthetic " \
        f"phantoms; {len(history)} epochs;" in use
    assert "no external evaluation" in use and "95% CIs up to" in use
    assert "research on" not in use and "second reader" not in use


def _as_real_data(run: Path, *, ci: tuple[float, float] | None = None) -> None:
    """Make the run look trained on a hospital's scans: real-looking file names and a source column."""
    splits = pd.read_csv(run / "splits.csv")
    splits["path"] = [f"/data/hospital-a/scan{i:04d}.png" for i in range(len(splits))]
    splits["source"] = "hospital-a"
    splits.to_csv(run / "splits.csv", index=False)
    if ci is not None:  # as if the test set were large enough for narrow intervals
        metrics = json.loads((run / "metrics.json").read_text())
        for block in (metrics, metrics["patient_level"]):
            for name in ("recall", "specificity"):
                block["metrics"][name]["ci95"] = list(ci)
        (run / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")


def test_a_real_data_card_claims_only_what_its_figures_support(run: Path, phantom_manifest: Path) -> None:
    _as_real_data(run)
    use = _intended_use(render_model_card(run))
    assert "synthetic" not in use and "from hospital-a" in use
    assert "**An unvalidated research experiment: not for clinical use, and its figures are not evidence " \
        "of accuracy** (its test intervals are wider than 0.3)" in use  # the tiny run's wide intervals

    _as_real_data(run, ci=(0.85, 0.95))
    use = _intended_use(render_model_card(run))
    assert "**Research use; not validated outside hospital-a**, and not for clinical use." in use
    assert "research on chest CT slices" in use

    audit = json.loads((run / "audit.json").read_text())
    audit["warnings"] = ["shortcut risk: format differs between classes (TVD 1.00 > 0.3)"]
    (run / "audit.json").write_text(json.dumps(audit), encoding="utf-8")
    use = _intended_use(render_model_card(run))
    assert "(the audit found shortcut risks)" in use and "1 shortcut warning(s) from the audit" in use

    audit["warnings"] = []
    (run / "audit.json").write_text(json.dumps(audit), encoding="utf-8")
    evaluate_run(run, phantom_manifest, run / "site-b", allow_overlap=True, progress=False)
    use = _intended_use(render_model_card(run))
    assert "**Research use; evaluated outside its training data on site-b**" in use
    assert "not validated for clinical use" in use and "external evaluation on site-b" in use
