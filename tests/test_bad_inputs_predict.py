"""The bad-input corpus (tests/badinputs.py) through the whole prediction path and through training.

At the image level (tests/test_io.py) each case is read and judged; here each goes through a trained
run as a user's file would: every refused or unreadable image ends with its reason, no probability and no
label; every warned or handled one gets a probability, with its warnings.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from covidscan.config import load_config
from covidscan.inference import Predictor
from covidscan.training import train_experiment

# The corpus's 144-Mpx case is refused by covidscan's own limit; PIL's warning about it is expected.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


@pytest.fixture(scope="module")
def outcomes(tiny_run: Path, bad_inputs: dict) -> dict:
    """Every CT case predicted by the tiny CT run: ``{id: (case, prediction)}``."""
    cases = [case for case in bad_inputs.values() if case.modality == "ct"]
    predictions = Predictor.from_run(tiny_run).predict([case.path for case in cases])
    return {case.id: (case, pred) for case, pred in zip(cases, predictions, strict=True)}


def test_every_case_of_the_corpus_is_covered(outcomes: dict, bad_inputs: dict):
    assert len(bad_inputs) >= 30  # the 17 failures of the issue and the unusual-but-valid inputs
    assert {case.outcome for case, _ in outcomes.values()} == {"unreadable", "refused", "warned", "handled"}


def test_refused_and_unreadable_inputs_get_no_label_and_no_probability(outcomes: dict):
    for case, pred in outcomes.values():
        if case.outcome in ("unreadable", "refused"):
            assert pred.p_covid is None and pred.label is None and pred.uncertain is None, case.id
            assert pred.error and case.code in pred.error, (case.id, pred.error)


def test_warned_and_handled_inputs_are_predicted_with_their_warnings(outcomes: dict):
    for case, pred in outcomes.values():
        if case.outcome not in ("warned", "handled"):
            continue
        assert pred.error is None and 0.0 <= pred.p_covid <= 1.0, (case.id, pred.error)
        codes = [w.split(":", 1)[0] for w in pred.warnings if not w.startswith("no_lungs")]
        if case.outcome == "warned":
            assert case.code in codes, (case.id, pred.warnings)
        else:
            assert codes == [], (case.id, pred.warnings)


@pytest.mark.slow
def test_training_leaves_the_corpus_out_and_lists_every_file(phantom_manifest: Path, bad_inputs: dict,
                                                             tmp_path: Path):
    df = pd.read_csv(phantom_manifest)
    df["path"] = [str(phantom_manifest.parent / p) for p in df["path"]]
    bad = [c for c in bad_inputs.values() if c.modality == "ct" and c.outcome in ("unreadable", "refused")
           and Path(c.path).is_file()]
    extra = pd.DataFrame({"path": [str(c.path) for c in bad], "label": "covid", "patient_id": "bad-files",
                          "split": "train"})
    pd.concat([df, extra]).to_csv(tmp_path / "m.csv", index=False)
    cfg = load_config("paper-a-resnet50", ["model.backbone=timm:resnet18", "model.weights=none",
                                           "model.input_size=64", "train.epochs=1",
                                           "evaluation.n_bootstrap=20"])
    train_experiment(cfg, tmp_path / "m.csv", tmp_path / "run", progress=False)
    excluded = pd.read_csv(tmp_path / "run" / "excluded.csv")
    assert sorted(excluded["path"]) == sorted(str(c.path) for c in bad)
    assert set(excluded["status"]) == {"unreadable", "refused"}
