"""Challenger against champion at one site: :func:`covidscan.training.adapt.adapt_run` on the site's signed
verdicts, reduced to what a site page and the service's adaptation job show and store.

The champion is the run now serving the site (adapt's ``parent`` mode: as it is); the challenger is the
mode adapt keeps. Both are scored out of fold on the same signed cases, patient-grouped, with
patient-bootstrap 95% CIs -- adapt computes all of it; this module only reads it out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from covidscan.errors import ConfigError
from covidscan.training.adapt import AUC_TIE, AdaptResult, adapt_run

COMPARED: dict[str, str] = {"roc_auc": "roc_auc", "sensitivity": "recall", "specificity": "specificity"}
"""The figures compared, by their site name and their metrics.json name."""


@dataclass(frozen=True)
class Challenge:
    """The champion's and the challenger's out-of-fold figures (metrics.json entries) on the same cases."""

    run_dir: Path
    mode: str
    champion: dict[str, dict[str, Any]]
    challenger: dict[str, dict[str, Any]]
    n_images: int
    n_patients: int | None

    @property
    def better(self) -> bool:
        """Whether adapt preferred an adapted mode to the run as it is: a higher out-of-fold ROC AUC (by
        more than ``AUC_TIE``), or within it a better balanced accuracy. Promotion stays an admin's call."""
        return self.mode != "parent"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict for the site page and the job's stored result."""
        return {"run_dir": str(self.run_dir), "mode": self.mode, "better": self.better, "auc_tie": AUC_TIE,
                "n_images": self.n_images, "n_patients": self.n_patients,
                "champion": self.champion, "challenger": self.challenger}


def challenge_from(result: AdaptResult) -> Challenge:
    """The comparison inside an ``adapt_run(..., mode="auto")`` result (which compares ``parent``)."""
    if "parent" not in result.compared:
        raise ConfigError("the adaptation did not compare the parent as it is: "
                          "call adapt_run with mode='auto'")

    def figures(mode: str) -> dict[str, dict[str, Any]]:
        return {site: dict(result.compared[mode]["metrics"][name]) for site, name in COMPARED.items()}

    kept = result.compared[result.mode]
    return Challenge(run_dir=result.run_dir, mode=result.mode, champion=figures("parent"),
                     challenger=figures(result.mode), n_images=int(kept["n_images"]),
                     n_patients=kept.get("n_patients"))


def challenge(run_dir: str | Path, signed: str | Path, out: str | Path, *, folds: int = 5, seed: int = 0,
              overwrite: bool = False, progress: bool = False) -> Challenge:
    """Adapt the site's champion ``run_dir`` to its signed verdicts (a manifest ``path,label,patient_id``,
    as the service exports them) into ``out``, and compare the two out of fold (see :func:`challenge_from`).

    Errors are adapt's: too few patients of a class, cases the champion was trained on, a busy ``out``.
    """
    return challenge_from(adapt_run(run_dir, signed, out, mode="auto", folds=folds, seed=seed,
                                    overwrite=overwrite, progress=progress))


__all__ = ["COMPARED", "Challenge", "challenge", "challenge_from"]
