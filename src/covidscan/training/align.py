"""Align a run to a site that has no verdicts yet (``covidscan adapt --unlabelled``).

A site's images are shifted (another scanner, window, reconstruction) but nobody has signed a case, so
``adapt`` has nothing to learn from. What can be done without labels is to move the site's pooled
backbone features onto the training features' statistics (:class:`~covidscan.models.align.FeatureAlignment`:
per-feature standardisation, or CORAL) and fold that map into the head, so the adapted run is an ordinary
run that every engine serves.

Without labels nobody can tell whether that helped, so it is kept only when an unsupervised rule, judged on
held-out site images, says it did no visible harm (:func:`judge_alignment`): the site's images are split in
two halves (by patient where known); each half is aligned by a map fitted on the other; then

1. the shift test (:mod:`covidscan.evaluation.shift`, on pooled features: what the head sees) must find the
   aligned held-out images closer to the run's validation images: its ROC AUC (below 0.5 counted as 0.5)
   must drop by at least ``min_gain``, and
2. the share of held-out images called covid may move by at most ``max_rate_change``: alignment pulls the
   site's mean onto the training mean, which also removes a real difference in prevalence (label shift: a
   site that sees mostly COVID would be aligned towards calling fewer of them). A bound on that movement is
   the only guard available without labels, and it cannot tell a corrected operating point from a damaged
   one; the README's measurement shows both.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from covidscan import CLASSES
from covidscan.config import ExperimentConfig
from covidscan.data import read_manifest
from covidscan.errors import ConfigError, ManifestError, ResourceNotFoundError
from covidscan.evaluation import write_model_card
from covidscan.evaluation.shift import MIN_IMAGES, ShiftTest, shift_features
from covidscan.io import list_images
from covidscan.models import PIXELS
from covidscan.models.align import ALIGN_METHODS, AlignMethod, FeatureAlignment
from covidscan.outputs import run_inputs, staged_folder, write_text
from covidscan.preprocess import PreparedSet
from covidscan.preprocess.prepare import prepare_paths
from covidscan.runs import (
    LoadedRun,
    ParentRun,
    file_sha256,
    load_ood,
    load_run,
    load_shift_reference,
    run_split,
    save_run,
    seen_fingerprints,
)
from covidscan.training.adapt import _head_logits, parent_features
from covidscan.training.run import measure_bf16, prepare_run_dir

Choice = Literal["auto", "standardize", "coral"]
MIN_SITE_IMAGES = 2 * MIN_IMAGES
"""Half the site's images fit the map and the other half judge it, and the shift test needs 30."""
MIN_SHIFT_GAIN = 0.05
"""The shift test's ROC AUC must drop at least this much on held-out site images (its bootstrap CIs are
about +-0.05 wide at 100 images, so a smaller drop is noise)."""
MAX_RATE_CHANGE = 0.2
"""At most this change in the share of held-out site images called covid (a guard against label shift)."""
ALIGNMENT_FILE = "alignment.safetensors"
JUDGEMENT_FILE = "alignment.json"
ALIGNABLE_HEADS = ("paper_a", "linear")
"""Heads whose first layer is linear on the pooled features, so the map folds into it."""


@dataclass(frozen=True)
class Judgement:
    """What one alignment method did to held-out site images, and whether the rule keeps it."""

    method: str
    shift_auc_before: float
    shift_auc_after: float
    positive_rate_before: float
    positive_rate_after: float
    accepted: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """A plain dict for JSON."""
        return asdict(self)


@dataclass
class AlignResult:
    """The judgement of every method tried, the one kept (None: refused) and the aligned run (None if so)."""

    judgements: list[Judgement]
    method: str | None
    run_dir: Path | None


def halves(groups: np.ndarray, seed: int) -> np.ndarray:
    """0/1 per image: two halves with no group (patient) on both sides, the groups shuffled by ``seed``."""
    names = np.unique(groups)
    order = np.random.default_rng(seed).permutation(len(names))
    side = dict(zip(names[order], np.arange(len(names)) % 2, strict=True))
    return np.array([side[g] for g in groups])


def held_out_aligned(
    method: AlignMethod, site: np.ndarray, groups: np.ndarray, source: np.ndarray, seed: int = 0
) -> np.ndarray:
    """The site's features, each half aligned by a map fitted on the other half (:func:`halves`)."""
    side = halves(groups, seed)
    if min((side == 0).sum(), (side == 1).sum()) < MIN_IMAGES // 2:
        raise ManifestError(
            f"the site's images fall into {len(np.unique(groups))} patients: too few to hold "
            f"half of them out (each half needs {MIN_IMAGES // 2} images); give more patients"
        )
    aligned = np.empty_like(site, dtype=np.float64)
    for half in (0, 1):
        fitted = FeatureAlignment(method).fit(site[side != half], source)
        aligned[side == half] = fitted.transform(site[side == half])
    return aligned


def head_probabilities(parent: LoadedRun, features: np.ndarray) -> np.ndarray:
    """The run's calibrated P(covid) of pooled backbone features (its head and temperature)."""
    z = _head_logits(parent.model.head_tail, torch.from_numpy(np.asarray(features, np.float32)))
    return parent.calibration.proba(z)


def judge_alignment(
    method: AlignMethod,
    site: np.ndarray,
    groups: np.ndarray,
    source: np.ndarray,
    reference: np.ndarray,
    positive: Callable[[np.ndarray], np.ndarray],
    *,
    min_gain: float = MIN_SHIFT_GAIN,
    max_rate_change: float = MAX_RATE_CHANGE,
    seed: int = 0,
) -> Judgement:
    """Judge ``method`` on held-out site images, without labels.

    ``site`` (N, D) are the site's pooled features with their patient ``groups``; ``source`` the training
    features the map aims at; ``reference`` the run's validation features (the shift test's reference,
    never fitted on); ``positive`` maps features to a 0/1 array (the run's label: covid or not). Each half
    of the site is aligned by a map fitted on the other half, then the rule of the module docstring decides.
    """
    aligned = held_out_aligned(method, site, groups, source, seed)
    test = ShiftTest(seed=seed).fit(reference)
    before, after = test.test(site).auc, test.test(aligned).auc
    rate_before = float(np.mean(positive(site)))
    rate_after = float(np.mean(positive(aligned)))
    # an out-of-fold AUC below 0.5 is noise, not a group "more alike than alike": count it as 0.5
    if max(after, 0.5) > max(before, 0.5) - min_gain:
        reason = (
            f"refused: the shift test's AUC went {before:.3f} -> {after:.3f}, not {min_gain} closer to "
            "the validation images"
        )
    elif abs(rate_after - rate_before) > max_rate_change:
        reason = (
            f"refused: the share called covid moved {rate_before:.2f} -> {rate_after:.2f}, more than "
            f"{max_rate_change} (label shift cannot be told from a corrected operating point without "
            "labels)"
        )
    else:
        reason = (
            f"accepted: shift AUC {before:.3f} -> {after:.3f}, share called covid {rate_before:.2f} -> "
            f"{rate_after:.2f}"
        )
    return Judgement(method, before, after, rate_before, rate_after, reason.startswith("accepted"), reason)


def choose(judgements: list[Judgement], tie: float = MIN_SHIFT_GAIN) -> str | None:
    """The accepted method with the lowest held-out shift AUC, or None.

    AUCs within ``tie`` of the lowest count as equal (a difference the shift test cannot resolve), and the
    simpler method, listed first, wins.
    """
    accepted = [j for j in judgements if j.accepted]
    if not accepted:
        return None
    best = min(j.shift_auc_after for j in accepted)
    return next(j.method for j in accepted if j.shift_auc_after <= best + tie)


def format_judgements(judgements: list[Judgement], kept: str | None) -> str:
    """Markdown table of every method's held-out figures, the kept one marked."""
    lines = [
        "| method | shift AUC before | shift AUC after | called covid before | called covid after | "
        "verdict |",
        "|---|---|---|---|---|---|",
    ]
    for j in judgements:
        name = f"**{j.method}** (kept)" if j.method == kept else j.method
        lines.append(
            f"| {name} | {j.shift_auc_before:.3f} | {j.shift_auc_after:.3f} | "
            f"{j.positive_rate_before:.2f} | {j.positive_rate_after:.2f} | {j.reason} |"
        )
    return "\n".join(lines)


@dataclass
class _Site:
    """The site's usable images, prepared as the parent was trained, with their patient groups."""

    prepared: PreparedSet
    groups: np.ndarray
    has_patients: bool


def _site_paths(data: Path) -> tuple[list[str], list[str | None]]:
    """Image paths and patient ids (None where unknown) of a folder or a manifest CSV; labels are ignored."""
    if not data.exists():
        raise ResourceNotFoundError(
            f"--data {data} does not exist; give the folder of the site's images or "
            "a manifest CSV (path[,patient_id])"
        )
    if data.is_dir():
        paths = [str(p) for p in list_images(data)]
        return paths, [None] * len(paths)
    df = read_manifest(data, for_prediction=True)
    pids = df["patient_id"] if "patient_id" in df else pd.Series([None] * len(df))
    return df["path"].astype(str).tolist(), [None if pd.isna(p) or p == "" else str(p) for p in pids]


def _read_site(data: Path, parent: LoadedRun, strict: bool, progress: bool) -> _Site:
    """Prepare the site's images (the quality gate refuses another modality); at least MIN_SITE_IMAGES."""
    paths, pids = _site_paths(data)
    checkpoint = parent.checkpoint
    prepared, errors = prepare_paths(
        paths, checkpoint.preprocess, checkpoint.input_size, progress=progress, desc="site images"
    )
    kept = [i for i, p in enumerate(prepared) if p is not None]
    if len(kept) < MIN_SITE_IMAGES or (strict and errors):
        listing = "".join(f"\n  {e}" for e in errors[:5]) + (
            f"\n  ... and {len(errors) - 5} more" if len(errors) > 5 else ""
        )
        why = (
            "--strict makes any of them an error"
            if strict and errors
            else f"unlabelled alignment needs at least {MIN_SITE_IMAGES} usable images of the run's "
            f"modality, {checkpoint.modality} (half fit the alignment, half judge it)"
        )
        raise ManifestError(f"{data}: {len(kept)} of {len(paths)} images are usable ({why}){listing}")
    images = [prepared[i] for i in kept]
    assert all(p is not None for p in images)
    groups = [
        pids[i] or (p.meta.series_uid or p.meta.patient_id if p.meta is not None else None)
        for i, p in zip(kept, images, strict=True)
    ]
    has_patients = all(g is not None for g in groups)
    site = PreparedSet(
        images=np.stack([p.pixels for p in images]),
        labels=np.zeros(len(images), np.int64),
        patient_ids=groups,
        paths=[paths[i] for i in kept],
        lungs_found=[p.lungs_found for p in images],
        stats=np.stack([p.stats for p in images]),
        excluded=[{"path": str(e.path), "reason": str(e)} for e in errors],
    )
    group_ids = np.array(
        [g if g is not None else f"image:{path}" for g, path in zip(groups, site.paths, strict=True)]
    )
    return _Site(site, group_ids, has_patients)


def _data_sha256(data: Path, paths: list[str]) -> str:
    """A manifest's SHA-256; for a folder, the SHA-256 of its images' sorted (name, SHA-256) list."""
    if data.is_file():
        return file_sha256(data)
    listing = "\n".join(f"{Path(p).relative_to(data)} {file_sha256(Path(p))}" for p in sorted(paths))
    return hashlib.sha256(listing.encode()).hexdigest()


def align_run(
    run_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    method: Choice = "auto",
    min_gain: float = MIN_SHIFT_GAIN,
    max_rate_change: float = MAX_RATE_CHANGE,
    seed: int = 0,
    overwrite: bool = False,
    strict: bool = False,
    progress: bool = True,
) -> AlignResult:
    """Align the run in ``run_dir`` to the unlabelled site images in ``data`` (a folder or a manifest).

    ``method``: ``standardize``, ``coral`` or ``auto`` (both judged; the accepted one with the lowest
    held-out shift AUC is kept, the simpler within ``MIN_SHIFT_GAIN`` of it). The rule
    (:func:`judge_alignment`, with ``min_gain`` and ``max_rate_change``) is judged on held-out halves of
    the site; when it refuses every method nothing is written and ``AlignResult.method`` is None.
    Otherwise the map is refitted on all site images, folded into the head's first linear layer and
    written to ``out`` as an ordinary run with the parent's calibration, OOD detector and shift reference
    (the images are still unlike the training images: only signed cases can validate the run here), plus
    ``alignment.safetensors`` (the map) and ``alignment.json`` (the judgements). The parent's training
    and validation images are read again (its splits.csv) for the training features and the shift
    test's reference.
    """
    if method not in ("auto", *ALIGN_METHODS):
        raise ConfigError(f"alignment method must be auto, {' or '.join(ALIGN_METHODS)}, got {method!r}")
    if not 0 <= max_rate_change <= 1 or not 0 <= min_gain < 0.5:
        raise ConfigError(
            f"--max-rate-change must be in [0, 1] and the minimum shift gain in [0, 0.5); got "
            f"{max_rate_change} and {min_gain}"
        )
    data, out = Path(data), Path(out)
    parent = load_run(run_dir)
    head = parent.config.model.head
    if parent.model.backbone.name == PIXELS or head not in ALIGNABLE_HEADS:
        raise ConfigError(
            f"{parent.path} has head {head!r} on backbone {parent.model.backbone.name!r}: "
            f"unlabelled alignment needs a head on pooled backbone features "
            f"({' or '.join(ALIGNABLE_HEADS)}); adapt it with signed cases instead"
        )
    site = _read_site(data, parent, strict, progress)
    prepare_run_dir(out, overwrite, [*run_inputs(parent.path), data, *site.prepared.paths])
    train = run_split(parent, "train", progress=progress)
    val = run_split(parent, "val", progress=progress)
    site_feats, source, reference = parent_features(parent, site.prepared.images, train.images, val.images)
    calibration = parent.calibration

    def positive(x: np.ndarray) -> np.ndarray:
        return calibration.label(head_probabilities(parent, x)) == CLASSES[1]

    judgements = [
        judge_alignment(
            m,
            site_feats,
            site.groups,
            source,
            reference,
            positive,
            min_gain=min_gain,
            max_rate_change=max_rate_change,
            seed=seed,
        )
        for m in (ALIGN_METHODS if method == "auto" else (method,))
    ]
    kept = choose(judgements)
    if kept is None:
        return AlignResult(judgements, None, None)

    alignment = FeatureAlignment(kept).fit(site_feats, source)  # type: ignore[arg-type]
    aligned = copy.deepcopy(parent.model)
    alignment.fold_into(aligned.head_tail)
    cfg: ExperimentConfig = parent.config.model_copy(update={"name": f"{parent.config.name}-aligned"})
    chosen = next(j for j in judgements if j.method == kept)
    lineage = ParentRun(
        path=str(parent.path.resolve()),
        weights_sha256=parent.checkpoint.weights_sha256,
        data=str(data.resolve()),
        data_sha256=_data_sha256(data, site.prepared.paths),
        n_images=len(site.prepared),
        n_patients=len(set(site.groups)) if site.has_patients else None,
        mode=f"align:{kept}",
        cross_validation={
            j.method: {k: float(v) for k, v in j.to_dict().items() if k not in ("method", "reason")}
            for j in judgements
        },
    )
    stored = load_shift_reference(parent.path, parent.checkpoint)
    info = parent.checkpoint.shift_reference
    shift_reference = (
        (stored, info.source)
        if stored is not None and info is not None
        else (shift_features(reference, val.stats), "validation split (computed when aligning)")
    )
    ood, ood_info = load_ood(parent.path, parent.checkpoint), parent.checkpoint.ood
    with staged_folder(out) as stage:
        save_run(
            stage,
            cfg,
            aligned,
            calibration,
            parent=lineage,
            bf16=measure_bf16(aligned, site.prepared, calibration, parent.config.train.batch_size),
            ood=None if ood is None or ood_info is None else (ood, ood_info.n_train, ood_info.n_val),
            fingerprints=seen_fingerprints(parent.path, parent.checkpoint),
            shift_reference=shift_reference,
        )
        alignment.save(stage / ALIGNMENT_FILE)
        write_text(stage / "splits.csv", (parent.path / "splits.csv").read_text(encoding="utf-8"))
        record = {
            "kept": kept,
            "judgements": [j.to_dict() for j in judgements],
            "data": str(data),
            "n_images": len(site.prepared),
            "excluded": site.prepared.excluded,
            "min_gain": min_gain,
            "max_rate_change": max_rate_change,
            "seed": seed,
        }
        write_text(stage / JUDGEMENT_FILE, json.dumps(record, indent=2))
        write_text(stage / "report.md", _report(cfg.name, data, site, judgements, kept, chosen))
        write_model_card(stage)
    return AlignResult(judgements, kept, out)


def _report(
    name: str, data: Path, site: _Site, judgements: list[Judgement], kept: str, chosen: Judgement
) -> str:
    unit = (
        "patient"
        if site.has_patients
        else "image (no patient ids: slices of one patient may fall on "
        "both sides, which flatters the judgement)"
    )
    intro = (
        f"{len(site.prepared)} site images ({len(site.prepared.excluded)} left out by the quality gate), "
        f"no labels. Each method was judged on held-out halves of the site, split by {unit}: one half "
        "aligned by a map fitted on the other. Kept only if the shift test's AUC against the run's "
        "validation images dropped and the share called covid did not move beyond the bound."
    )
    caveat = (
        f"Kept: {kept} ({chosen.reason}). Nothing here says how accurate the aligned run is at this site: "
        "that takes signed cases (`covidscan adapt RUN --data signed.csv`). The run's calibration, OOD "
        "detector and shift reference are the parent's, so the site's images are still flagged as unlike "
        "the training images and the shift alarm still rings."
    )
    title = f"# {name}: unlabelled alignment ({kept}) to {data}"
    return "\n\n".join([title, intro, format_judgements(judgements, kept), caveat]) + "\n"


__all__ = [
    "ALIGNMENT_FILE",
    "JUDGEMENT_FILE",
    "MAX_RATE_CHANGE",
    "MIN_SHIFT_GAIN",
    "MIN_SITE_IMAGES",
    "AlignResult",
    "Judgement",
    "align_run",
    "choose",
    "format_judgements",
    "halves",
    "head_probabilities",
    "held_out_aligned",
    "judge_alignment",
]
