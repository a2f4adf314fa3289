"""Run directories: what a trained model needs to be reloaded, re-evaluated or re-created.

A run directory holds::

    config.yaml          the fully resolved experiment config (re-creates the run)
    model.safetensors    the weights
    checkpoint.json      a :class:`Checkpoint`: everything needed to use the model as it was validated
    splits.csv           the manifest with the split every image was in
    history.json         per-epoch loss and accuracy
    metrics.json         test metrics (schema in the README)
    ood.safetensors      the out-of-distribution detector (training features and image statistics)
    fingerprints.csv     pixel and perceptual hashes of every training and validation image
    shift_reference.safetensors  the shift features of the validation images (the shift test's reference)
    model.int8.onnx      the int8 model (``covidscan export RUN --int8``), only where its check allowed it
    members/NAME/        an ensemble's (``covidscan ensemble``): each member's config.yaml, checkpoint.json
    figures/*.png, report.md

Nothing that predicts from a run writes into it, so one run can serve many processes at once. Loading
checks that the files belong together: the weights, the OOD detector and the fingerprints against the
SHA-256 recorded in checkpoint.json, and checkpoint.json against config.yaml and the model it builds.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import safetensors
import safetensors.numpy
import safetensors.torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file

from covidscan import CLASSES, __version__
from covidscan.config import ExperimentConfig, dump_config, load_config
from covidscan.data import read_manifest
from covidscan.data.fingerprints import Fingerprints
from covidscan.errors import ConfigError, ManifestError, StorageError
from covidscan.evaluation import Calibration
from covidscan.models import (
    Classifier,
    EnsembleConfig,
    ModelConfig,
    OODDetector,
    PrecisionVerdict,
    build_ensemble,
    build_model,
)
from covidscan.outputs import check_run_dir, read_csv, write_atomic, write_text, writing
from covidscan.preprocess import PreparedSet, PreprocessConfig, prepare_manifest
from covidscan.preprocess.lungseg import lung_model_path
from covidscan.system import int8_kernels

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2
"""Format 1 (covidscan 0.1) kept threshold and temperature as loose keys; it is still read."""
OOD_FILE = "ood.safetensors"
FINGERPRINTS_FILE = "fingerprints.csv"
SHIFT_FILE = "shift_reference.safetensors"
INT8_FILE = "model.int8.onnx"
_SHIFT_FORMAT = "covidscan-shift/1"
SHA256 = r"^[0-9a-f]{64}$"


class ParentRun(BaseModel):
    """Lineage of an adapted run (``covidscan adapt``): the run it came from and the local data it used.

    ``cross_validation`` holds the patient-grouped out-of-fold figures of every mode that was compared
    (mode -> metric -> value), so the choice can be checked from the checkpoint alone.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    weights_sha256: str = Field(pattern=SHA256)
    data: str
    data_sha256: str = Field(pattern=SHA256)
    n_images: int = Field(gt=0)
    n_patients: int | None = Field(None, gt=0)
    mode: str
    cross_validation: dict[str, dict[str, float | None]] = Field(default_factory=dict)


class OODInfo(BaseModel):
    """Where a run's out-of-distribution detector lives and how it flags (``covidscan.models.OODDetector``).

    ``threshold`` is the ``quantile`` of the validation images' OOD scores; ``n_train`` and ``n_val`` are
    the images it was fitted and scaled on.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = OOD_FILE
    sha256: str = Field(pattern=SHA256)
    threshold: float
    quantile: float
    n_train: int = Field(gt=0)
    n_val: int = Field(gt=0)


class FingerprintInfo(BaseModel):
    """Where a run's image fingerprints live (:class:`covidscan.data.fingerprints.Fingerprints`).

    ``n_images`` training and validation images (an adapted run: its local cases plus its parent's).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = FINGERPRINTS_FILE
    sha256: str = Field(pattern=SHA256)
    n_images: int = Field(ge=0)


class ShiftReferenceInfo(BaseModel):
    """Where a run's shift-test reference lives: the shift features
    (:func:`covidscan.evaluation.shift.shift_features`) of ``n_images`` images, ``source`` saying which
    (a trained run: its validation split; an adapted run: the local cases its figures were measured on).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = SHIFT_FILE
    sha256: str = Field(pattern=SHA256)
    n_images: int = Field(gt=0)
    source: str


class Int8Verdict(PrecisionVerdict):
    """Whether the run's int8 model (:data:`INT8_FILE`) may serve: the same check as bf16's (int8 vs fp32 on
    the run's test split), plus the file's SHA-256 (a file other than the one checked is refused), the
    onnxruntime that quantised and measured it and the kind of int8 kernels it was measured with."""

    sha256: str | None = Field(None, pattern=SHA256)
    onnxruntime: str = ""
    int8_kernels: str = ""
    """:func:`covidscan.system.int8_kernels` of the CPU that checked it; "" for a run checked before covidscan
    recorded it (on CPUs with VNNI)."""

    def holds_here(self) -> bool:
        """Whether the check speaks for this CPU: measured with the same kind of int8 kernels (a check from
        before they were recorded holds everywhere but on the saturating kind)."""
        here = int8_kernels()
        return self.int8_kernels == here or (not self.int8_kernels and here != "saturating")


class Checkpoint(BaseModel):
    """The typed ``checkpoint.json``: model identity, preprocessing, normalisation and calibration.

    Prediction needs this file and the weights only; ``config.yaml`` is for re-creating the run.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[2] = CHECKPOINT_FORMAT
    covidscan_version: str
    name: str
    classes: tuple[str, str] = CLASSES
    preprocess: PreprocessConfig
    model: ModelConfig
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_sha256: str = Field(pattern=SHA256)
    calibration: Calibration
    bf16: PrecisionVerdict | None = None
    int8: Int8Verdict | None = None
    """Set by ``covidscan export RUN --int8``; None where int8 was never checked."""
    parent: ParentRun | None = None
    """Set on runs written by ``covidscan adapt``; absent (None) on trained runs."""
    ood: OODInfo | None = None
    """None when the run has no detector (too few validation images, or a covidscan 0.1 run)."""
    lung_model_sha256: str | None = Field(None, pattern=SHA256)
    """SHA-256 of the X-ray lung U-Net the run was trained with (masked ``cxr`` runs only)."""
    fingerprints: FingerprintInfo | None = None
    """None on runs written before covidscan stored fingerprints: their splits.csv paths are re-read."""
    shift_reference: ShiftReferenceInfo | None = None
    """None on runs written before covidscan stored it (it is then computed from splits.csv's validation
    rows), and on runs without backbone features or without a validation split."""
    ensemble: EnsembleConfig | None = None
    """Set on runs written by ``covidscan ensemble``: the members (``model`` is then the first member's)."""
    seal: str | None = Field(None, pattern=SHA256)
    """SHA-256 of this file's other keys (:func:`checkpoint_seal`): a threshold or temperature edited by
    hand is caught on load. None on runs written before covidscan sealed its checkpoints."""

    def check_lung_model(self) -> None:
        """Refuse to serve a masked X-ray run with a lung model other than the one it was trained with."""
        if self.lung_model_sha256 is None:
            return
        path = lung_model_path(self.preprocess.lung_model)
        found = file_sha256(path) if path.is_file() else None
        if found != self.lung_model_sha256:
            what = "is missing" if found is None else "is another lung model than the run was trained with"
            raise ConfigError(
                f"the X-ray lung model {path} {what} (the run needs SHA-256 "
                f"{self.lung_model_sha256[:12]}...); copy the training machine's file there, or set "
                "preprocess.lung_model to it"
            )

    @property
    def modality(self) -> str:
        """``ct`` or ``cxr``: what the model was trained on (kept in the preprocessing settings only)."""
        return self.preprocess.modality

    @property
    def model_name(self) -> str:
        """The backbone's name, e.g. ``mobilenet_v2`` or ``timm:resnet18`` (an ensemble: ``ensemble(..)``)."""
        return self.model.backbone if self.ensemble is None else self.ensemble.description


@dataclass
class LoadedRun:
    """A trained model (eval mode) with its checkpoint and config."""

    path: Path
    checkpoint: Checkpoint
    config: ExperimentConfig
    model: Classifier

    @property
    def calibration(self) -> Calibration:
        """How the model's logits become probabilities and labels."""
        return self.checkpoint.calibration


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_run(
    out: Path,
    cfg: ExperimentConfig,
    model: Classifier,
    calibration: Calibration,
    *,
    bf16: PrecisionVerdict | None = None,
    parent: ParentRun | None = None,
    ood: tuple[OODDetector, int, int] | None = None,
    fingerprints: Fingerprints | None = None,
    shift_reference: tuple[np.ndarray, str] | None = None,
) -> Checkpoint:
    """Write config.yaml, model.safetensors, checkpoint.json (and ood.safetensors, fingerprints.csv) into
    ``out``.

    ``parent`` records where an adapted run came from (see :class:`ParentRun`); ``ood`` is a fitted
    detector with the numbers of training and validation images it saw; ``fingerprints`` those of the
    images the run was trained and validated on; ``shift_reference`` the shift features of the images its
    figures were measured on, with a few words saying which. Returns the checkpoint. A write that fails (a
    full disk) is a StorageError naming the file; callers write into a staged folder
    (:func:`covidscan.outputs.staged_folder`), so nothing half-written is left behind.
    """
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    with writing(out / "config.yaml"):
        dump_config(cfg, out / "config.yaml")
    weights = out / "model.safetensors"
    data = weights_bytes(model)
    with writing(weights):
        weights.write_bytes(data)
    lung_sha = None
    if cfg.preprocess.mask_outside_lungs and cfg.preprocess.modality == "cxr":
        lung_sha = file_sha256(lung_model_path(cfg.preprocess.lung_model))
    fingerprint_info = None if fingerprints is None else save_fingerprints(out, fingerprints)
    shift_info = None if shift_reference is None else save_shift_reference(out, *shift_reference)
    ood_info = None
    if ood is not None:
        detector, n_train, n_val = ood
        assert detector.threshold_ is not None and detector.quantile_ is not None
        with writing(out / OOD_FILE):
            ood_file = detector.save(out / OOD_FILE)
        ood_info = OODInfo(sha256=file_sha256(ood_file), threshold=detector.threshold_,
                           quantile=detector.quantile_, n_train=n_train, n_val=n_val)
    checkpoint = draft_checkpoint(
        cfg, model, calibration, weights_sha256=hashlib.sha256(data).hexdigest(), bf16=bf16, parent=parent,
        ood=ood_info, lung_model_sha256=lung_sha, fingerprints=fingerprint_info, shift_reference=shift_info,
    )
    return write_checkpoint(out, checkpoint)


def weights_bytes(model: Classifier) -> bytes:
    """The model's weights exactly as ``model.safetensors`` holds them (their SHA-256 is the checkpoint's)."""
    # contiguous() because safetensors refuses views (e.g. channels_last or sliced tensors).
    return safetensors.torch.save({k: v.contiguous() for k, v in model.state_dict().items()})


def draft_checkpoint(
    cfg: ExperimentConfig,
    model: Classifier,
    calibration: Calibration | None = None,
    *,
    weights_sha256: str | None = None,
    **fields: Any,
) -> Checkpoint:
    """The checkpoint of a model in memory, as :func:`save_run` writes it (unsealed): what serving the model
    before it is saved needs (training's test scoring through ``Predictor.from_model``).

    ``calibration`` defaults to the identity (raw logits are all a draft is used for until calibration is
    fitted); ``weights_sha256`` to the hash of the weights in memory; ``fields`` are further checkpoint keys.
    """
    return Checkpoint(
        covidscan_version=__version__,
        name=cfg.name,
        preprocess=cfg.preprocess,
        model=cfg.model,
        input_size=model.input_size,
        mean=model.mean,
        std=model.std,
        weights_sha256=weights_sha256 or hashlib.sha256(weights_bytes(model)).hexdigest(),
        calibration=calibration or Calibration(),
        ensemble=cfg.ensemble,
        **fields,
    )


def checkpoint_seal(meta: dict[str, Any]) -> str:
    """SHA-256 of a checkpoint's keys other than ``seal``, as canonical JSON (sorted keys, no spaces), so
    that keys added by later covidscan versions never break an older run's seal."""
    rest = {k: v for k, v in meta.items() if k != "seal"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_checkpoint(out: Path, checkpoint: Checkpoint) -> Checkpoint:
    """Write ``out/checkpoint.json`` sealed (:func:`checkpoint_seal`); returns the sealed checkpoint.

    Every deliberate rewrite of a checkpoint goes through here; an edit by hand breaks the seal.
    """
    meta = json.loads(checkpoint.model_dump_json(exclude={"seal"}))
    sealed = checkpoint.model_copy(update={"seal": checkpoint_seal(meta)})
    with writing(out / "checkpoint.json"):
        write_atomic(out / "checkpoint.json", sealed.model_dump_json(indent=2))
    return sealed


def _check_seal(run: Path) -> None:
    """The checkpoint as written by covidscan: its seal, where it has one, matches its other keys."""
    file = run / "checkpoint.json"
    meta = json.loads(file.read_text(encoding="utf-8"))  # read and validated by load_checkpoint already
    seal = meta.get("seal")
    if seal is not None and seal != checkpoint_seal(meta):
        raise StorageError(
            f"{file} was changed after covidscan wrote it (its seal no longer matches: a threshold, "
            "temperature or other value edited by hand?); copy the run again from where it was trained, "
            "or train again"
        )


def save_fingerprints(out: Path, fingerprints: Fingerprints) -> FingerprintInfo:
    """Write ``out/fingerprints.csv``; returns what the checkpoint records of it."""
    file = write_text(out / FINGERPRINTS_FILE, fingerprints.to_csv())
    return FingerprintInfo(sha256=file_sha256(file), n_images=len(fingerprints))


def load_fingerprints(run: str | Path, checkpoint: Checkpoint) -> Fingerprints | None:
    """The run's stored fingerprints, checked against the checkpoint's hash; None when the run has none."""
    if checkpoint.fingerprints is None:
        return None
    file = Path(run) / checkpoint.fingerprints.file
    try:
        data = file.read_bytes()
    except OSError:
        data = None
    if data is None or hashlib.sha256(data).hexdigest() != checkpoint.fingerprints.sha256:
        raise StorageError(
            f"{file} is missing or does not match checkpoint.json (edited, or another run's file?); the run "
            "directory is damaged: copy the run again from where it was trained, or train again"
        )
    try:
        return Fingerprints.from_csv(data)
    except (ValueError, KeyError) as exc:
        raise StorageError(f"{file} is not a covidscan fingerprint table ({exc}); train again") from None


def seen_fingerprints(run: str | Path, checkpoint: Checkpoint, *, workers: int = 2) -> Fingerprints:
    """The fingerprints of the run's training and validation images: those stored in the run or, for a run
    written before covidscan stored them, those of the files its splits.csv lists that can still be read
    (moved or deleted ones are then missed, and a warning says so)."""
    stored = load_fingerprints(run, checkpoint)
    if stored is not None:
        return stored
    log.warning("%s has no stored image fingerprints (written by an older covidscan): its training and "
                "validation images are recognised only where its splits.csv says they are; train again to "
                "store them", run)
    splits = Path(run) / "splits.csv"
    try:
        table = read_csv(splits, dtype=str, keep_default_na=False)
        seen = table[table["split"].isin(["train", "val"])]
        paths, names = seen["path"].tolist(), seen["split"].tolist()
    except (OSError, KeyError, ValueError) as exc:
        raise StorageError(f"cannot read {splits} ({exc}): the run's training images are unknown; "
                           "train again") from None
    return Fingerprints.of_files(paths, names, workers=workers)


def save_shift_reference(out: Path, features: np.ndarray, source: str) -> ShiftReferenceInfo:
    """Write ``out/shift_reference.safetensors`` (float32 (N, D)); returns what the checkpoint records."""
    file = out / SHIFT_FILE
    meta = {"format": _SHIFT_FORMAT, "source": source}
    with writing(file):
        safetensors.numpy.save_file({"features": np.ascontiguousarray(features, dtype=np.float32)}, file,
                                    metadata={"covidscan_shift": json.dumps(meta)})
    return ShiftReferenceInfo(sha256=file_sha256(file), n_images=len(features), source=source)


def load_shift_reference(run: str | Path, checkpoint: Checkpoint) -> np.ndarray | None:
    """The run's stored shift features (N, D), checked against the checkpoint's hash; None when the run
    has none (written before covidscan stored them)."""
    info = checkpoint.shift_reference
    if info is None:
        return None
    file = Path(run) / info.file
    if not file.is_file() or file_sha256(file) != info.sha256:
        raise StorageError(f"{file} is missing or does not match checkpoint.json (another run's file?); the "
                           "run directory is damaged: copy the run again from where it was trained, or "
                           "train again")
    try:
        with safetensors.safe_open(str(file), framework="numpy") as handle:
            meta = json.loads((handle.metadata() or {})["covidscan_shift"])
            features = handle.get_tensor("features")
    except (OSError, KeyError, ValueError, SafetensorError) as exc:
        raise StorageError(f"{file} is not a covidscan shift reference ({type(exc).__name__}: {exc}); "
                           "train again") from None
    if meta.get("format") != _SHIFT_FORMAT:
        raise StorageError(f"{file} was written by another covidscan version ({meta.get('format')}); "
                           "train again")
    return features


def _legacy(meta: dict[str, Any], cfg: ExperimentConfig, run: Path) -> Checkpoint:
    """A covidscan 0.1 (format 1) checkpoint, read in memory; the run directory is not changed."""
    return Checkpoint(
        covidscan_version=str(meta.get("covidscan_version", "0.1")),
        name=cfg.name,
        preprocess=meta["preprocess"],
        model=cfg.model,
        input_size=meta["input_size"],
        mean=meta["mean"],
        std=meta["std"],
        weights_sha256=file_sha256(run / "model.safetensors"),
        calibration=Calibration(
            temperature=meta["temperature"], threshold=meta["threshold"],
            patient_threshold=meta.get("patient_threshold"),
        ),
    )


def load_checkpoint(path: str | Path) -> Checkpoint:
    """The typed checkpoint of a run directory (format 2, or format 1 converted in memory)."""
    run = check_run_dir(path)
    file = run / "checkpoint.json"
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StorageError(f"cannot read {file}: {exc}; the run directory is damaged, train again") from None
    if not isinstance(meta, dict):
        raise StorageError(f"{file} is not a covidscan checkpoint (a JSON object is expected)")
    fmt = meta.get("format")
    try:
        if fmt == 1:
            checkpoint = _legacy(meta, load_config(run / "config.yaml"), run)
        elif fmt == CHECKPOINT_FORMAT:
            checkpoint = Checkpoint.model_validate(meta)
        else:
            raise StorageError(
                f"{file} has checkpoint format {fmt!r}; this covidscan {__version__} reads formats 1 and "
                f"{CHECKPOINT_FORMAT} (upgrade covidscan to read newer runs)"
            )
    except KeyError as exc:
        raise StorageError(f"{file} lacks the key {exc}; the run directory is damaged, train again") from None
    except (ValidationError, ConfigError) as exc:
        raise StorageError(f"{file} is not a valid covidscan checkpoint: {exc}") from None
    if tuple(checkpoint.classes) != CLASSES:
        raise StorageError(f"{file} has classes {list(checkpoint.classes)}, not {list(CLASSES)}")
    return checkpoint


def load_ood(run: str | Path, checkpoint: Checkpoint) -> OODDetector | None:
    """The run's OOD detector, checked against the checkpoint's hash; None when the run has none."""
    if checkpoint.ood is None:
        return None
    file = Path(run) / checkpoint.ood.file
    if not file.is_file() or file_sha256(file) != checkpoint.ood.sha256:
        raise StorageError(
            f"{file} is missing or does not match checkpoint.json (another run's file?); the run directory "
            "is damaged, train again"
        )
    try:
        return OODDetector.load(file)
    except ConfigError as exc:
        raise StorageError(str(exc)) from None


def _check_belongs_together(run: Path, checkpoint: Checkpoint, config: ExperimentConfig) -> None:
    """Refuse weights other than those checkpoint.json was written with, and a checkpoint.json that
    disagrees with config.yaml (an edited file, or files of two runs mixed)."""
    weights = run / "model.safetensors"
    # 0.07 s for a ResNet50's 96 MB on a Xeon with SHA extensions: cheap next to building the model.
    if file_sha256(weights) != checkpoint.weights_sha256:
        raise StorageError(
            f"{weights} does not match the SHA-256 recorded in checkpoint.json (another run's weights, or a "
            "damaged or edited file or hash); copy the run directory again from where it was trained, or "
            "train again"
        )
    pairs = {"name": (checkpoint.name, config.name), "model": (checkpoint.model, config.model),
             "preprocess": (checkpoint.preprocess, config.preprocess),
             "ensemble": (checkpoint.ensemble, config.ensemble)}
    differ = [key for key, (ours, theirs) in pairs.items() if ours != theirs]
    if differ:
        raise StorageError(
            f"{run / 'checkpoint.json'} and config.yaml disagree on {', '.join(differ)} (one was edited, or "
            "they come from different runs); copy the run directory again from where it was trained, or "
            "train again"
        )


def _check_model_inputs(run: Path, checkpoint: Checkpoint, model: Classifier) -> None:
    """Refuse a checkpoint whose input size or normalisation is not what its model is built for."""
    built = {"input_size": model.input_size, "mean": model.mean, "std": model.std}
    for key, expected in built.items():
        recorded = getattr(checkpoint, key)
        if tuple(recorded) != tuple(expected):
            raise StorageError(
                f"{run / 'checkpoint.json'} records {key} {list(recorded)} but its model "
                f"({checkpoint.model_name}, config.yaml) is built for {list(expected)}: the checkpoint was "
                "edited; copy the run directory again from where it was trained, or train again"
            )


def load_run(path: str | Path) -> LoadedRun:
    """Load a run directory written by ``covidscan train``; the model is returned in eval mode.

    Raises RunNotFoundError for a path that is not a run, StorageError for a damaged one or one whose
    files do not belong together (weights, checkpoint.json and config.yaml are checked against each other).
    """
    run = check_run_dir(path)
    checkpoint = load_checkpoint(run)
    try:
        config = load_config(run / "config.yaml")
    except ConfigError as exc:
        raise StorageError(f"{run / 'config.yaml'}: {exc}") from None
    _check_belongs_together(run, checkpoint, config)
    # The saved weights replace any pretrained ones, so never look for ImageNet files when loading.
    model = (build_ensemble(checkpoint.ensemble) if checkpoint.ensemble is not None
             else build_model(checkpoint.model.model_copy(update={"weights": "none"})))
    _check_model_inputs(run, checkpoint, model)
    _check_seal(run)
    weights = run / "model.safetensors"
    try:
        model.load_state_dict(load_file(str(weights)))
    except (OSError, RuntimeError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StorageError(
            f"cannot load weights {weights}: {first}; the file is damaged or belongs to another model"
        ) from None
    model.eval()
    return LoadedRun(run, checkpoint, config, model)


__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "FingerprintInfo",
    "LoadedRun",
    "OODInfo",
    "ParentRun",
    "PrecisionVerdict",
    "ShiftReferenceInfo",
    "checkpoint_seal",
    "file_sha256",
    "load_checkpoint",
    "load_fingerprints",
    "load_ood",
    "load_run",
    "load_shift_reference",
    "save_fingerprints",
    "save_run",
    "save_shift_reference",
    "seen_fingerprints",
    "write_checkpoint",
]


def run_split(run: LoadedRun, split: str, *, progress: bool = False) -> PreparedSet:
    """A run's own images of one split (``train``, ``val``, ``test``; its splits.csv), prepared as at
    inference. ManifestError when splits.csv is gone, lists none of them, or none can be read any more."""
    splits = run.path / "splits.csv"
    if not splits.is_file():
        raise ManifestError(f"{splits} is missing: the run's {split} images are unknown; train the run again "
                            "with this covidscan")
    df = read_manifest(splits)
    df = df[df["split"] == split]
    if df.empty:
        raise ManifestError(f"{splits} lists no {split} images")
    prepared = prepare_manifest(df, run.checkpoint.preprocess, run.checkpoint.input_size, progress=progress)
    if not len(prepared):
        raise ManifestError(f"none of the {len(df)} {split} images in {splits} can be read any more; restore "
                            "them, or train again")
    return prepared
