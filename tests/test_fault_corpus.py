"""The held-out fault corpus (tests/faults.py) through the real command line.

The test runs a few scenarios, one or more of each class of defect; ``benchmarks/fault_corpus.py`` runs
them all (587 s on 2 cores: too long for CI) and prints the verdicts as a table. Neither may see
a wrong refusal, a traceback, a silently wrong result, lost data or a hang.
"""

from __future__ import annotations

from pathlib import Path

from faults import EXPECTS, FAILING, SCENARIOS, run_corpus, select

REPRESENTATIVE = (
    "split-out-is-input",  # 1: an output that replaces an input
    "xray-phantom-png",  # 2: a radiograph given to a CT run
    "run-edited-hash",  # 3: a run directory edited by hand
    "markup-name-missing-manifest",  # 4: rich markup in a file name
    "audit-verify-typo",
    "csv-injection-scan-patient-ids",
    "card-phantom-run",  # 5: a model card that says what its figures support
    "split-label-typo",  # 6: plain argument errors (passes today: a control)
)


def _failures(results) -> str:
    return "\n".join(f"[{r.verdict}] {r.id}: {r.detail}" for r in results if r.verdict in FAILING)


def test_every_scenario_is_well_formed():
    ids = [s.id for s in SCENARIOS]
    assert len(ids) == len(set(ids)), "scenario ids must be unique"
    assert all(s.expect in EXPECTS for s in SCENARIOS)
    assert all(s.mentions for s in SCENARIOS if s.expect == "error"), "an error must say what it names"
    assert all(s.check for s in SCENARIOS if s.expect != "error"), "an ok outcome needs a check"
    assert set(select(ids=REPRESENTATIVE)) <= set(SCENARIOS)


def test_representative_scenarios(tmp_path: Path):
    failures = _failures(run_corpus(select(ids=REPRESENTATIVE), jobs=2, work=tmp_path))
    assert not failures, failures
