"""Site adaptation (``covidscan adapt``) and the multi-set ``covidscan evaluate``, on tiny phantoms."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from covidscan.cli import app
from covidscan.data.synthetic import write_phantom_dataset
from covidscan.errors import ConfigError, ManifestError
from covidscan.inference import Predictor, evaluate_many
from covidscan.models import bf16_supported
from covidscan.runs import file_sha256, load_checkpoint, load_run
from covidscan.training.adapt import AUC_TIE, CANDIDATES, adapt_run, choose_mode


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another hospital's scanner (site style scanner-b), 2 slices per patient (8 patients per class)."""
    return write_phantom_dataset(tmp_path_factory.mktemp("site"), n=32, modality="ct", seed=7,
                                 slices_per_patient=2, site="scanner-b")


def _absolute(manifest: Path) -> pd.DataFrame:
    df = pd.read_csv(manifest)
    return df.assign(path=[str(manifest.parent / p) for p in df["path"]])


@pytest.fixture(scope="module")
def signed(site: Path) -> Path:
    """The site's signed cases plus one file that is no image: the quality gate leaves it out."""
    broken = site.parent / "broken.png"
    broken.write_bytes(b"not an image")
    rows = pd.concat([_absolute(site), pd.DataFrame([{"path": str(broken), "label": "covid",
                                                        "patient_id": "x"}])])
    rows.to_csv(site.parent / "signed.csv", index=False)
    return site.parent / "signed.csv"


@pytest.fixture(scope="module")
def auto_run(tiny_run: Path, signed: Path, tmp_path_factory: pytest.TempPathFactory):
    return adapt_run(tiny_run, signed, tmp_path_factory.mktemp("adapted") / "run", folds=2, progress=False)


def covidscan(*args: str):
    """The command line in this process; a traceback the user would see fails the test."""
    result = CliRunner().invoke(app, list(args), prog_name="covidscan")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def _weights(run: Path) -> dict:
    return load_file(str(run / "model.safetensors"))


def test_auto_compares_every_mode_out_of_fold_and_records_the_parent(auto_run, tiny_run: Path, signed: Path):
    # the tiny run's own training images are readable, so head+original is compared too
    assert list(auto_run.compared) == list(CANDIDATES)
    assert auto_run.mode == choose_mode(auto_run.compared)
    for metrics in auto_run.compared.values():
        assert metrics["n_images"] == 32 and metrics["n_patients"] == 16
        low, high = metrics["metrics"]["roc_auc"]["ci95"]
        assert low is not None and low <= metrics["metrics"]["roc_auc"]["value"] <= high
    checkpoint = load_checkpoint(auto_run.run_dir)
    lineage = checkpoint.parent
    assert lineage is not None and lineage.mode == auto_run.mode
    assert Path(lineage.path) == tiny_run.resolve()
    assert lineage.weights_sha256 == load_checkpoint(tiny_run).weights_sha256
    assert lineage.data_sha256 == file_sha256(signed) and (lineage.n_images, lineage.n_patients) == (32, 16)
    assert set(lineage.cross_validation) == set(CANDIDATES)
    head_auc = auto_run.compared["head"]["metrics"]["roc_auc"]["value"]
    assert lineage.cross_validation["head"]["roc_auc"] == head_auc
    saved = json.loads((auto_run.run_dir / "metrics.json").read_text())
    assert saved["adaptation"]["mode"] == auto_run.mode
    assert set(saved["adaptation"]["compared"]) == set(CANDIDATES)
    report = (auto_run.run_dir / "report.md").read_text()
    assert "## Modes compared" in report and f"**{auto_run.mode}** (kept)" in report
    # parent and recalibrate share the parent's logits, so they rank the local cases identically
    aucs = [auto_run.compared[mode]["metrics"]["roc_auc"] for mode in ("parent", "recalibrate")]
    assert aucs[0] == aucs[1]
    # the file that is no image was left out and listed
    excluded = pd.read_csv(auto_run.run_dir / "excluded.csv")
    assert excluded["path"].str.endswith("broken.png").tolist() == [True] and saved["excluded"] == 1
    # the local cases count as seen by the adapted run: evaluate refuses them like training data
    splits = pd.read_csv(auto_run.run_dir / "splits.csv")
    assert splits["path"].isin(_absolute(signed)["path"]).sum() == 32


def test_adapted_run_predicts_and_refuses_the_local_cases_in_evaluate(auto_run, site: Path, tmp_path: Path):
    predictor = Predictor.from_run(auto_run.run_dir)
    paths = _absolute(site)["path"].tolist()[:4]
    predictions = predictor.predict(paths)
    assert all(p.error is None and 0 <= p.p_covid <= 1 for p in predictions)
    assert predictor.calibration == load_checkpoint(auto_run.run_dir).calibration
    with pytest.raises(ManifestError, match="shares 32 of 32 images"):
        evaluate_many(auto_run.run_dir, [site, site.parent / "copy.csv"], tmp_path)


def test_cli_recalibrate_changes_only_the_calibration(tiny_run: Path, site: Path, tmp_path: Path):
    result = covidscan("adapt", str(tiny_run), "--data", str(site), "--out", str(tmp_path / "recal"),
                       "--mode", "recalibrate", "--folds", "2", "-q")
    assert result.exit_code == 0, result.stderr
    assert "**recalibrate** (kept)" in result.stdout and "head" not in result.stdout
    weights = "model.safetensors"
    assert file_sha256(tmp_path / "recal" / weights) == file_sha256(tiny_run / weights)  # byte-identical
    new, old = load_checkpoint(tmp_path / "recal"), load_checkpoint(tiny_run)
    assert new.calibration != old.calibration and new.parent.mode == "recalibrate"
    # fingerprints: the adapted run's cover the local cases as well as the parent's images; the shift
    # reference is the local cases (the images its figures were measured on)
    changed = {"calibration", "parent", "name", "fingerprints", "bf16", "seal", "shift_reference"}
    assert new.model_dump(exclude=changed) == old.model_dump(exclude=changed)
    assert new.shift_reference.source.startswith("adapted")
    assert new.shift_reference.n_images == len(pd.read_csv(site))
    # the bf16 check is measured again, on the site's cases: the labels it compares move with the threshold
    if bf16_supported():
        assert new.bf16 is not None and new.bf16.images == len(pd.read_csv(site))
    else:
        assert new.bf16 is None
    result = covidscan("adapt", str(tiny_run), "--data", str(site), "--out", str(tmp_path / "recal"), "-q")
    assert result.exit_code == 2 and "--overwrite" in result.stderr


@pytest.mark.slow
def test_head_changes_only_the_head_weights(tiny_run: Path, site: Path, tmp_path: Path):
    result = adapt_run(tiny_run, site, tmp_path / "head", mode="head", folds=2, progress=False)
    assert result.mode == "head"
    new, old = _weights(tmp_path / "head"), _weights(tiny_run)
    assert new.keys() == old.keys()
    changed = {k for k in old if not (new[k] == old[k]).all()}
    assert changed and all(k.startswith("head.") for k in changed)
    assert all(k in changed for k in old if k.startswith("head.") and k.endswith("weight"))
    assert load_run(tmp_path / "head").checkpoint.parent.mode == "head"


def test_too_few_patients_names_how_many_are_needed(tiny_run: Path, site: Path, tmp_path: Path):
    df = _absolute(site)
    few = pd.concat([df[df["label"] == "covid"].head(2), df[df["label"] == "non_covid"]])  # one covid patient
    few.to_csv(tmp_path / "few.csv", index=False)
    with pytest.raises(ManifestError, match="at least 2 patients of each class"):
        adapt_run(tiny_run, tmp_path / "few.csv", tmp_path / "out", progress=False)
    df[df["label"] == "covid"].to_csv(tmp_path / "one_class.csv", index=False)
    with pytest.raises(ManifestError, match="one-class dataset"):
        adapt_run(tiny_run, tmp_path / "one_class.csv", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_local_data_and_outputs_are_refused(tiny_run: Path, site: Path, signed: Path, tmp_path: Path):
    with pytest.raises(ManifestError, match=r"broken\.png"):
        adapt_run(tiny_run, signed, tmp_path / "out", strict=True, progress=False)
    _absolute(site).assign(label="maybe").to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(ManifestError, match="unknown label"):
        adapt_run(tiny_run, tmp_path / "labels.csv", tmp_path / "out", progress=False)
    mixed = _absolute(site)
    mixed.loc[0, "label"] = "non_covid" if mixed.loc[0, "label"] == "covid" else "covid"
    mixed.to_csv(tmp_path / "mixed.csv", index=False)
    with pytest.raises(ManifestError, match="carry both labels"):
        adapt_run(tiny_run, tmp_path / "mixed.csv", tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match=r"is the input .*tiny_run"):
        adapt_run(tiny_run, site, tiny_run, overwrite=True, progress=False)
    with pytest.raises(ConfigError, match="is a folder"):
        adapt_run(tiny_run, site.parent, tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match="mode must be"):
        adapt_run(tiny_run, site, tmp_path / "out", mode="finetune", progress=False)  # type: ignore[arg-type]


@pytest.mark.slow
def test_evaluate_on_several_sets_writes_one_table(tiny_run: Path, site: Path, tmp_path: Path):
    other = write_phantom_dataset(tmp_path / "other", n=16, modality="ct", seed=11, slices_per_patient=2)
    result = covidscan("evaluate", str(tiny_run), "--data", str(site), "--data", str(other),
                       "--out", str(tmp_path / "eval"), "-q")
    assert result.exit_code == 0, result.stderr
    # both manifests are called manifest.csv, which says nothing: the folder names name the sets
    names = [site.parent.name, "other"]
    for name in names:
        assert (tmp_path / "eval" / name / "metrics.json").is_file()
    table = json.loads((tmp_path / "eval" / "table.json").read_text())
    assert [row["set"] for row in table["sets"]] == names
    assert [row["n_images"] for row in table["sets"]] == [32, 16]
    assert all(row["ood_share"] is None for row in table["sets"])
    # 16 patients get an AUC interval; 8 are too few for one, and the entry says so (with its count)
    assert [(row["roc_auc"]["ci95"][0] is not None, row["roc_auc"]["ci_method"], row["roc_auc"]["ci_n"])
            for row in table["sets"]] == [(True, "shifted percentile", 16), (False, "too few", 8)]
    markdown = (tmp_path / "eval" / "table.md").read_text()
    header = "| set | images | patients | accuracy | sensitivity | specificity | ROC AUC | OOD share |"
    assert header in markdown
    assert markdown.count("| other | 16 | 8 |") == 1 and "table:" in result.stdout


def test_trained_runs_without_lineage_still_load(tiny_run: Path, tmp_path: Path):
    run = tmp_path / "older"
    shutil.copytree(tiny_run, run)
    meta = json.loads((run / "checkpoint.json").read_text())
    assert meta.pop("parent") is None  # a trained run has no parent
    (run / "checkpoint.json").write_text(json.dumps(meta))  # as a format-2 run written before lineage existed
    assert load_checkpoint(run).parent is None


def _scores(auc: float, sensitivity: float, specificity: float) -> dict:
    values = {"roc_auc": auc, "recall": sensitivity, "specificity": specificity}
    return {"metrics": {name: {"value": v, "ci95": [v, v]} for name, v in values.items()}}


def test_choice_best_auc_then_balanced_accuracy_then_the_simpler_mode():
    assert choose_mode({"parent": _scores(0.70, 0.8, 0.8), "recalibrate": _scores(0.70, 0.8, 0.8),
                        "head": _scores(0.90, 0.6, 0.6)}) == "head"
    # within AUC_TIE of the best, the better operating point wins even when simpler
    assert choose_mode({"parent": _scores(0.80, 0.9, 0.3), "recalibrate": _scores(0.80, 0.7, 0.7),
                        "head": _scores(0.80 + AUC_TIE / 2, 0.6, 0.7)}) == "recalibrate"
    same = _scores(0.80, 0.7, 0.7)
    assert choose_mode({"parent": same, "recalibrate": same}) == "parent"
