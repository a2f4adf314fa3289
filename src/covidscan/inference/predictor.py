"""The serving core: a trained run loaded once, then prepare -> score -> aggregate as often as needed.

``predict``, ``explain``, ``export``, the review service and the batch engine all stand on this one object.
It never writes into the run directory, so many processes can serve one run at once; whatever must be
produced once per run and is not in the run (an ONNX file) goes to covidscan's cache with an atomic
rename. A loaded Predictor is safe to share between threads.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, BinaryIO, Literal, TypeVar

import numpy as np
import torch

from covidscan.errors import ConfigError, ImageRefusedError, InputError
from covidscan.evaluation import Calibration
from covidscan.evaluation.shift import shift_features
from covidscan.inference.engines import ENGINES, TORCH_ENGINES, auto_candidates, choose_engine
from covidscan.io import LoadedImage, QualityLimits, gate, read_image
from covidscan.io.quality import MODEL_MODALITIES
from covidscan.models import Classifier, CompiledClassifier, FastClassifier, OODDetector, Precision, use_bf16
from covidscan.models.ood import REFUSAL_FACTOR
from covidscan.preprocess import PreparedImage, prepare_image, to_model_batch
from covidscan.runs import INT8_FILE, Checkpoint, file_sha256, load_ood, load_run
from covidscan.system import cache_dir, int8_kernels, resolve_device

log = logging.getLogger(__name__)

Engine = Literal["auto", "torch", "compiled", "onnx", "int8"]
Forward = Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray | None]]
"""A normalised batch -> (binary logits (N,), pooled backbone features (N, C) or None)."""
OOD_WARNING = "unlike_training_data"
_OOD_PARTS = ("its content (backbone features)", "its intensities, size or format")
Source = str | Path | bytes | tuple[str, bytes] | BinaryIO
"""A path, raw bytes, ``(name, bytes)`` (an upload) or a binary file object."""
_OODScores = tuple[np.ndarray, np.ndarray, np.ndarray]  # score, highest part, refused (see ood_scores)
_T = TypeVar("_T")
_R = TypeVar("_R")
_END = object()


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one image (or why there is none: ``error``)."""

    source: str
    p_covid: float | None = None
    label: str | None = None
    uncertain: bool | None = None
    lungs_found: bool | None = None
    warnings: tuple[str, ...] = ()
    error: str | None = None
    group_id: str | None = None
    ood_score: float | None = None
    cam_png: str | None = None
    features: np.ndarray | None = field(default=None, repr=False, compare=False)
    """The image's shift features (:func:`covidscan.evaluation.shift.shift_features`: pooled backbone
    features and image statistics, float32) from the same forward pass, for a shift test of a group of
    images; None when the image could not be read or the engine gives no features. Not in :meth:`to_dict`."""

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (warnings as a list, no ``features``) for JSON and tables."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "features"} | {
            "warnings": list(self.warnings)}


@dataclass(frozen=True)
class GroupPrediction:
    """One probability for a patient or series: the mean (or max) of its readable images."""

    group_id: str
    n_images: int
    p_covid: float
    label: str

    def to_dict(self) -> dict[str, Any]:
        """A plain dict for JSON."""
        return asdict(self)


def _source_name(source: Source) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, tuple):
        return str(source[0])
    if isinstance(source, bytes):
        return "<bytes>"
    return str(getattr(source, "name", "<stream>"))


def ordered_map(fn: Callable[[_T], _R], items: Iterable[_T], *, workers: int, ahead: int) -> Iterator[_R]:
    """``map`` in a thread pool, in order, keeping at most ``ahead`` results in flight (bounded memory)."""
    it = iter(items)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = deque(pool.submit(fn, item) for _, item in zip(range(ahead), it, strict=False))
        while pending:
            result = pending.popleft().result()
            nxt = next(it, _END)
            if nxt is not _END:
                pending.append(pool.submit(fn, nxt))
            yield result


class Predictor:
    """A trained run, loaded once (weights, BatchNorm folding, engine and precision), ready to serve.

    Build it with :meth:`from_run` (a run directory) or :meth:`from_model` (a model in memory). The three
    stages are usable alone: :meth:`prepare` (decoded image -> model-ready :class:`PreparedImage` with
    warnings), :meth:`score` (prepared images -> predictions, in batches) and :meth:`aggregate`
    (predictions -> one per patient or series); :meth:`predict` runs all
    three over files, folders' files, bytes or uploads with decoding in a thread pool.
    """

    def __init__(
        self,
        run_dir: Path | None,
        checkpoint: Checkpoint,
        model: Classifier,
        forward: Forward,
        *,
        engine: str,
        precision: str,
        device: torch.device,
        batch_size: int = 32,
        workers: int = 2,
        limits: QualityLimits | None = None,
        ood: OODDetector | None = None,
    ) -> None:
        if batch_size < 1 or workers < 1:
            raise ConfigError(f"batch_size (--batch-size) and workers (--workers) must be >= 1, got "
                              f"{batch_size} and {workers}")
        self.run_dir = run_dir
        self.checkpoint = checkpoint
        self.model = model
        self.engine = engine
        self.precision = precision
        self.device = device
        self.batch_size = batch_size
        self.workers = workers
        self.limits = limits or QualityLimits()
        self.ood = ood
        self._forward = forward
        self._cam_lock = threading.Lock()  # Grad-CAM hooks the shared fp32 model: one explanation at a time

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        *,
        engine: Engine = "auto",
        device: str = "cpu",
        onnx_path: str | Path | None = None,
        band: float | None = None,
        fast: bool = True,
        precision: Precision = "auto",
        batch_size: int = 32,
        workers: int = 2,
    ) -> Predictor:
        """Load a run directory once and serve it (see :meth:`from_model` for the engines and precisions).

        ``band`` replaces the run's uncertain-zone width.
        """
        run = load_run(run_dir)
        checkpoint = run.checkpoint
        checkpoint.check_lung_model()
        if band is not None:
            if not 0.0 <= band < 1.0:
                raise ConfigError(f"band (--band, width of the uncertain zone around the threshold) must "
                                  f"be in [0, 1), got {band}")
            calibration = checkpoint.calibration.model_copy(update={"band": band})
            checkpoint = checkpoint.model_copy(update={"calibration": calibration})
        return cls.from_model(run.model, checkpoint, run_dir=run.path, ood=load_ood(run.path, checkpoint),
                              engine=engine, device=device, onnx_path=onnx_path, fast=fast,
                              precision=precision, batch_size=batch_size, workers=workers)

    @classmethod
    def from_model(
        cls,
        model: Classifier,
        checkpoint: Checkpoint,
        *,
        run_dir: Path | None = None,
        ood: OODDetector | None = None,
        engine: Engine = "auto",
        device: str | torch.device = "cpu",
        onnx_path: str | Path | None = None,
        fast: bool = True,
        precision: Precision = "auto",
        batch_size: int = 32,
        workers: int = 2,
    ) -> Predictor:
        """Serve a model in memory exactly as a saved run is served: the same engines, precisions and gate.

        Training scores its validation and test splits this way before the run is written (``checkpoint``
        from :func:`covidscan.runs.draft_checkpoint`); :meth:`from_run` loads a run and calls this.
        ``run_dir`` is the run the model was loaded from (None for a model in memory), ``ood`` its detector.
        ``engine``: ``torch`` (BatchNorm folded, channels_last, bf16 when the CPU runs it natively and the
        run's training-time check allowed it; ``fast=False`` is the plain fp32 model), ``compiled`` (that
        model at that precision compiled for this CPU by ``torch.compile``, seconds once per process: for
        long jobs and servers; :class:`~covidscan.models.CompiledClassifier`), ``onnx``
        (onnxruntime on ``onnx_path``, else the run's ``model.onnx``, else an export cached outside the
        run), ``int8`` (onnxruntime on the run's ``model.int8.onnx``, where its int8 check allowed it), or
        ``auto`` (``onnx_path`` when given, else the fastest engine the run allows, timed once per CPU: see
        :mod:`covidscan.inference.engines`; a model in memory: torch).
        ``device`` is ``cpu``, ``cuda`` or ``auto`` (torch engine only). ``precision``: ``auto`` (bf16
        where the CPU has it natively and the run's check allows it), ``fp32`` (the same numbers on every
        CPU) or ``bf16`` (where the run's check allows it; emulated on CPUs without native bf16) -- see
        :func:`covidscan.models.use_bf16`.
        """
        if engine not in ("auto", *ENGINES):
            raise ConfigError(f"engine must be 'auto', 'torch', 'compiled', 'onnx' or 'int8', got {engine!r}")
        target = device if isinstance(device, torch.device) else resolve_device(device)

        def build(name: str) -> Forward:  # one engine's forward; auto times several before choosing
            if name == "int8":
                return _int8_forward(run_dir, checkpoint)
            if name == "onnx":
                return _onnx_forward(run_dir, checkpoint, onnx_path)
            return _torch_forward(model, target, fast, fast and use_bf16(precision, checkpoint.bf16, target),
                                  batch_size if name == "compiled" else None)

        if engine == "auto":
            candidates = auto_candidates(run_dir, checkpoint, target, precision=precision, fast=fast,
                                         onnx_path=onnx_path)
            engine = choose_engine(run_dir, checkpoint, candidates, build, batch_size=batch_size)
        if engine != "torch" and target.type != "cpu":
            raise ConfigError(f"the {engine} engine runs on the CPU only; use engine='torch' for CUDA")
        if engine != "onnx" and onnx_path is not None:
            raise ConfigError(f"ONNX file {onnx_path} given with the {engine} engine; choose the onnx engine")
        if engine == "compiled" and not fast:
            raise ConfigError("the compiled engine compiles the fast (folded) model; use engine torch "
                              "for the plain fp32 model")
        # onnxruntime and the unfolded model compute in fp32 (or int8)
        plain = engine not in TORCH_ENGINES or not fast
        if plain and precision == "bf16":
            raise ConfigError("precision bf16 needs the torch or compiled engine (fast); use precision auto "
                              "or fp32")
        bf16 = use_bf16(precision, checkpoint.bf16, target) and not plain
        return cls(run_dir, checkpoint, model, build(engine), engine=engine,
                   precision="int8" if engine == "int8" else "bf16" if bf16 else "fp32", device=target,
                   batch_size=batch_size, workers=workers, ood=ood)

    # ------------------------------------------------------------------ properties
    @property
    def calibration(self) -> Calibration:
        """Temperature, thresholds and uncertain band of the run."""
        return self.checkpoint.calibration

    @property
    def modality(self) -> str:
        """``ct`` or ``cxr``."""
        return self.checkpoint.modality

    @property
    def metrics(self) -> dict[str, Any] | None:
        """The run's test metrics (``metrics.json``), or None when the run has none (or is in memory)."""
        if self.run_dir is None:
            return None
        path = self.run_dir / "metrics.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    # ------------------------------------------------------------------ stages
    def load(self, source: Source) -> LoadedImage:
        """Decode a path, bytes, ``(name, bytes)`` or a binary file object (InputError when unreadable)."""
        if isinstance(source, tuple):
            name, data = source
            return read_image(data, name=name, limits=self.limits)
        return read_image(source, limits=self.limits)

    def prepare(self, image: LoadedImage, *, keep_original: bool = False) -> PreparedImage:
        """Preprocess a decoded image as the run was trained, with the quality gate's warnings attached.

        Raises ImageRefusedError when the gate (:func:`covidscan.io.gate`) refuses the image for this
        run's modality: such an image gets no probability and no label.
        """
        report = gate(image, self.modality, self.limits)
        prepared = prepare_image(image, self.checkpoint.preprocess, self.checkpoint.input_size,
                                 keep_original=keep_original)
        found = [*report.warnings, *prepared.warnings]
        if prepared.lungs_found is False:
            kind = MODEL_MODALITIES[self.modality]
            found.append(f"no_lungs: the lung finder found no lungs (not like the {kind} the model was "
                         "trained on?), the whole image was used")
        return replace(prepared, warnings=tuple(found))

    def batch(self, prepared: Sequence[PreparedImage] | np.ndarray) -> torch.Tensor:
        """The normalised model batch (N, 3, H, W) of prepared images (or their stacked (N, H, W) pixels)."""
        pixels = prepared if isinstance(prepared, np.ndarray) else np.stack([p.pixels for p in prepared])
        return to_model_batch(pixels, self.checkpoint.mean, self.checkpoint.std,
                              channels_last=self.engine in TORCH_ENGINES)

    def logits(self, prepared: Sequence[PreparedImage] | np.ndarray) -> np.ndarray:
        """Binary logits ``z = logit_covid - logit_non_covid`` of prepared images, in batches."""
        return self.logits_and_features(prepared)[0]

    def logits_and_features(
        self, prepared: Sequence[PreparedImage] | np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits and pooled backbone features (None when the engine gives none), in batches."""
        out = [self._forward(self.batch(prepared[i : i + self.batch_size]))
               for i in range(0, len(prepared), self.batch_size)]
        if not out:
            return np.zeros(0, np.float32), None
        feats = None if any(f is None for _, f in out) else np.concatenate([f for _, f in out])
        return np.concatenate([z for z, _ in out]), feats

    def ood_scores(
        self, features: np.ndarray | None, stats: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Per image, the OOD score, the index of the part that scored highest (see ``_OOD_PARTS``) and
        whether it is refused (``OODDetector.refuses``), from pooled features and
        :func:`~covidscan.io.image_stats`; None when the run has no detector or the engine gives none."""
        if self.ood is None or features is None or stats is None:
            return None
        parts = self.ood.score_parts(features, stats)
        return parts.max(axis=1), parts.argmax(axis=1), self.ood.refuses(parts)

    def score(
        self, prepared: Sequence[PreparedImage], *, group_ids: Sequence[str | None] | None = None
    ) -> list[Prediction]:
        """Calibrated predictions for prepared images (``group_ids`` overrides the DICOM series/patient)."""
        if group_ids is not None and len(group_ids) != len(prepared):
            raise ConfigError(f"{len(group_ids)} group ids for {len(prepared)} images; give one per image")
        cal = self.calibration
        z, features = self.logits_and_features(prepared)
        p = cal.proba(z)
        labels, uncertain = cal.label(p), cal.uncertain(p)
        has_stats = prepared and all(prep.stats is not None for prep in prepared)
        stats = np.stack([prep.stats for prep in prepared]) if has_stats else None
        ood = self.ood_scores(features, stats)
        shift = None if features is None or stats is None else shift_features(features, stats)
        predictions = []
        for i, prep in enumerate(prepared):
            source = str(prep.meta.path) if prep.meta is not None else f"<image {i}>"
            group = (group_ids[i] if group_ids is not None else None) or _meta_group(prep)
            ood_score = None if ood is None else round(float(ood[0][i]), 4)
            feats = None if shift is None else shift[i]
            refusal = self._ood_refusal(ood, i, source)
            if refusal is not None:
                predictions.append(Prediction(source=source, lungs_found=prep.lungs_found,
                                              warnings=prep.warnings, error=refusal, group_id=group,
                                              ood_score=ood_score, features=feats))
                continue
            predictions.append(Prediction(
                source=source, p_covid=float(p[i]), label=str(labels[i]), uncertain=bool(uncertain[i]),
                lungs_found=prep.lungs_found, warnings=prep.warnings + self._ood_warning(ood, i),
                group_id=group, ood_score=ood_score, features=feats,
            ))
        return predictions

    def _ood_text(self, ood: _OODScores, i: int) -> str:
        assert self.ood is not None and self.ood.threshold_ is not None
        return (f"OOD score {ood[0][i]:.2f} is above the run's threshold {self.ood.threshold_:.2f}; the "
                f"image is unlike the training images in {_OOD_PARTS[int(ood[1][i])]}")

    def _ood_warning(self, ood: _OODScores | None, i: int) -> tuple[str, ...]:
        if ood is None or self.ood is None or not self.ood.flag(ood[0][i]):
            return ()
        return (f"{OOD_WARNING}: {self._ood_text(ood, i)}, so its probability may be meaningless",)

    def _ood_refusal(self, ood: _OODScores | None, i: int, source: str) -> str | None:
        """The error of an image scoring more than ``REFUSAL_FACTOR`` times the threshold: a refusal."""
        if ood is None or not ood[2][i]:
            return None
        assert self.ood is not None and self.ood.threshold_ is not None
        reason = (f"{OOD_WARNING}: the image's content (backbone features) lies over {REFUSAL_FACTOR:g} "
                  f"times the run's threshold {self.ood.threshold_:.2f} from the training images (OOD score "
                  f"{ood[0][i]:.2f}), so the model cannot judge it")
        hint = ("give the run images like those it was trained on (modality, hospital, export), or adapt "
                "it to them with `covidscan adapt`")
        return str(ImageRefusedError(source, [reason], hint))

    def aggregate(
        self, predictions: Sequence[Prediction], key: Callable[[Prediction], str | None] | None = None
    ) -> list[GroupPrediction]:
        """One prediction per group (default key: ``group_id``) from its readable images, in first-seen order.

        The group probability is the mean (or the run's ``aggregate``: max) of its images; groups of more
        than one image are labelled at the run's patient threshold, single images at the image threshold.
        """
        key = key or (lambda pred: pred.group_id)
        members: dict[str, list[float]] = defaultdict(list)
        for pred in predictions:
            group = key(pred)
            if group is not None and pred.p_covid is not None:
                members[group].append(pred.p_covid)
        cal = self.calibration
        groups = []
        for group, ps in members.items():
            p = float(np.max(ps) if cal.aggregate == "max" else np.mean(ps))
            label = str(cal.label([p], threshold=cal.group_threshold(len(ps)))[0])
            groups.append(GroupPrediction(group, len(ps), p, label))
        return groups

    # ------------------------------------------------------------------ drivers
    def predict(
        self,
        sources: Sequence[Source],
        *,
        group_ids: Sequence[str | None] | None = None,
        cam_dir: str | Path | None = None,
        cam_layers: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> list[Prediction]:
        """Predict every source, in order; one that cannot be read gets a Prediction with ``error``.

        Decoding and preprocessing run in ``workers`` threads ahead of the model (OpenCV, PIL and pydicom
        release the GIL). ``cam_dir`` writes a Grad-CAM overlay per image (``cam_png``), titled with its
        probability and label; with ``cam_layers``, a transparent heat layer without text instead, for a
        viewer that draws the image itself and shows the probability beside it. ``progress`` is called
        with the number of sources finished after each one.
        """
        if group_ids is not None and len(group_ids) != len(sources):
            raise ConfigError(f"{len(group_ids)} group ids for {len(sources)} sources; give one per source")
        cams = Path(cam_dir) if cam_dir is not None else None
        keep = cams is not None

        def decode(source: Source) -> PreparedImage | InputError:
            try:
                return self.prepare(self.load(source), keep_original=keep)
            except InputError as exc:
                return exc

        results: list[Prediction | None] = [None] * len(sources)
        batch: list[tuple[int, PreparedImage]] = []

        def flush() -> None:
            ids = [group_ids[i] if group_ids is not None else None for i, _ in batch]
            scored = self.score([p for _, p in batch], group_ids=ids)
            if cams is not None:
                scored = self._with_cams(
                    scored, [p for _, p in batch], [i for i, _ in batch], cams, cam_layers
                )
            for (i, _), pred in zip(batch, scored, strict=True):
                results[i] = replace(pred, source=_source_name(sources[i]))
            batch.clear()

        done = ordered_map(decode, sources, workers=self.workers, ahead=2 * self.batch_size + self.workers)
        for i, outcome in enumerate(done):
            if isinstance(outcome, InputError):
                group = group_ids[i] if group_ids is not None else None
                results[i] = Prediction(source=_source_name(sources[i]), error=str(outcome), group_id=group)
            else:
                batch.append((i, outcome))
                if len(batch) == self.batch_size:
                    flush()
            if progress is not None:
                progress(i + 1)
        if batch:
            flush()
        return [r for r in results if r is not None]

    def explain(
        self,
        prepared: Sequence[PreparedImage],
        out_pngs: Sequence[str | Path | None] | None = None,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        """Grad-CAM of prepared images (prepared with ``keep_original=True``); see
        :func:`covidscan.explain.explain_prepared` for the keyword arguments and the returned dicts."""
        from covidscan.explain import explain_prepared  # pytorch_grad_cam loads only when asked for

        with self._cam_lock:
            return explain_prepared(self, prepared, out_pngs, **kwargs)

    def _with_cams(
        self,
        scored: list[Prediction],
        prepared: list[PreparedImage],
        index: list[int],
        out: Path,
        layers: bool,
    ) -> list[Prediction]:
        keep = [k for k, pred in enumerate(scored) if pred.p_covid is not None]  # refused ones get no map
        names = [out / f"{index[k]:05d}_{Path(scored[k].source).stem}.png" for k in keep]
        # A layer carries no text; a figure is titled with the probability it explains.
        titles = [None if layers else f"p(covid) {scored[k].p_covid:.2f}: {scored[k].label}"
                  + (", uncertain" if scored[k].uncertain else "") for k in keep]
        explained = (
            self.explain([prepared[k] for k in keep], names, titles=titles, layers=layers) if keep else []
        )
        out_preds = list(scored)
        for k, row in zip(keep, explained, strict=True):
            out_preds[k] = replace(scored[k], cam_png=row["cam_png"])
        return out_preds


def _meta_group(prepared: PreparedImage) -> str | None:
    meta = prepared.meta
    return None if meta is None else (meta.series_uid or meta.patient_id)


def _torch_forward(
    model: Classifier, device: torch.device, fast: bool, bf16: bool, compile_batch: int | None = None
) -> Forward:
    """The torch engine: folded and channels_last (``fast``), in bf16 when asked (see ``use_bf16``); the
    compiled engine when ``compile_batch`` is given (that net compiled for this CPU at that batch size)."""
    net = FastClassifier(model, torch.bfloat16 if bf16 else torch.float32) if fast else model
    net = net.to(device)
    if compile_batch is not None:
        net = CompiledClassifier(net, compile_batch, model.input_size)

    @torch.inference_mode()
    def forward(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        logits, pooled = net.forward_pooled(x.to(device) if fast else x.to(device).contiguous())
        return (logits[:, 1] - logits[:, 0]).float().cpu().numpy(), pooled.float().cpu().numpy()

    return forward


def _onnx_forward(run_dir: Path | None, checkpoint: Checkpoint, onnx_path: str | Path | None) -> Forward:
    """The onnxruntime engine over the given file, the run's model.onnx, or a cached export."""
    from covidscan.export import OnnxModel, export_onnx  # onnxruntime loads only when asked for

    if onnx_path is not None:
        path = Path(onnx_path)
    elif run_dir is None:
        raise ConfigError("a model in memory has no ONNX file: give its onnx_path, or use the torch engine")
    elif (run_dir / "model.onnx").is_file():
        path = run_dir / "model.onnx"
    else:
        # Keyed by the weights' hash: a retrained run never meets a stale file, and export_onnx renames
        # atomically, so two processes exporting at once both end with a complete file.
        path = cache_dir("onnx") / f"{checkpoint.weights_sha256}.onnx"
        if not path.is_file():
            log.info("exporting %s to ONNX once, cached at %s", run_dir, path)
            export_onnx(run_dir, path)
    session = OnnxModel(path, threads=torch.get_num_threads())
    theirs = session.metadata.get("weights_sha256")
    other_weights = theirs is not None and theirs != checkpoint.weights_sha256
    # The uncertain band is a serving choice (--band), not part of the exported model.
    theirs_calibration = session.calibration.model_copy(update={"band": checkpoint.calibration.band})
    if other_weights or theirs_calibration != checkpoint.calibration:
        raise ConfigError(
            f"ONNX model {path} does not belong to run {run_dir} (other weights or calibration); "
            f"export it again with `covidscan export {run_dir} --onnx {path}`"
        )

    def forward(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        logits, features = session.run(x.contiguous().numpy())
        logits = np.asarray(logits, dtype=np.float32)
        return logits[:, 1] - logits[:, 0], features

    return forward


def _int8_forward(run_dir: Path | None, checkpoint: Checkpoint) -> Forward:
    """onnxruntime on the run's int8 model: only the file its int8 check measured and allowed."""
    if run_dir is None:
        raise ConfigError("a model in memory has no int8 file: save it as a run and export it with "
                          "`covidscan export RUN --int8`, or use the torch engine")
    verdict, path = checkpoint.int8, run_dir / INT8_FILE
    if verdict is None or not verdict.allowed:
        why = "int8 was never checked" if verdict is None else f"its int8 check refused it ({verdict.reason})"
        raise ConfigError(f"run {run_dir} has no allowed int8 model: {why}; create it with "
                          f"`covidscan export {run_dir} --int8`, or use --engine auto, torch or onnx")
    if not verdict.holds_here():
        raise ConfigError(
            f"run {run_dir}'s int8 check was measured with {verdict.int8_kernels or 'vnni'} int8 kernels "
            f"and this CPU has {int8_kernels()} ones, which compute other results (without VNNI, onnxruntime "
            "adds pairs of int8 products in 16 bits, which clip); check it on this machine with `covidscan "
            f"export {run_dir} --int8`, or use --engine auto, torch or onnx")
    if not path.is_file() or file_sha256(path) != verdict.sha256:
        what = "is missing" if not path.is_file() else "is not the file its int8 check measured"
        raise ConfigError(f"{path} {what}; write it again with `covidscan export {run_dir} --int8`")
    return _onnx_forward(run_dir, checkpoint, path)


__all__ = ["OOD_WARNING", "Engine", "Forward", "GroupPrediction", "Prediction", "Predictor", "Source",
           "ordered_map"]

