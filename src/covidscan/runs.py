"""Run directories: what a trained model needs to be reloaded, re-evaluated or re-created.

A run directory holds::

    config.yaml          the fully resolved experiment config
    model.safetensors    the weights
    checkpoint.json      class order, preprocessing, input size, normalisation, threshold, temperature
    splits.csv           the manifest with the split every image was in
    history.json         per-epoch loss and accuracy
    metrics.json         test metrics (schema in the README)
    figures/*.png, report.md
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from covidscan import CLASSES, __version__
from covidscan.config import ExperimentConfig, dump_config, load_config
from covidscan.errors import CovidscanError
from covidscan.models import Classifier, build_model

CHECKPOINT_FORMAT = 1


@dataclass
class LoadedRun:
    """A trained model with everything needed to use it as it was validated."""

    path: Path
    config: ExperimentConfig
    model: Classifier
    threshold: float
    temperature: float
    meta: dict[str, Any]


def save_run(
    out: Path,
    cfg: ExperimentConfig,
    model: Classifier,
    *,
    threshold: float,
    temperature: float,
    patient_threshold: float | None = None,
) -> Path:
    """Write config.yaml, model.safetensors and checkpoint.json into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    # contiguous() because safetensors refuses views (e.g. channels_last or sliced tensors).
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    meta = {
        "format": CHECKPOINT_FORMAT,
        "covidscan_version": __version__,
        "classes": list(CLASSES),
        "modality": cfg.modality,
        "preprocess": cfg.preprocess.model_dump(mode="json"),
        "input_size": list(model.input_size),
        "mean": list(model.mean),
        "std": list(model.std),
        "threshold": threshold,
        "temperature": temperature,
        "patient_threshold": patient_threshold,
    }
    (out / "checkpoint.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return out


def load_run(path: str | Path) -> LoadedRun:
    """Load a run directory written by ``covidscan train``; the model is returned in eval mode."""
    run = Path(path)
    missing = [n for n in ("config.yaml", "model.safetensors", "checkpoint.json") if not (run / n).is_file()]
    if missing:
        raise CovidscanError(
            f"{run} is not a covidscan run directory (missing {', '.join(missing)}); "
            "pass the --out folder of `covidscan train`"
        )
    try:
        meta = json.loads((run / "checkpoint.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CovidscanError(f"cannot read {run / 'checkpoint.json'}: {exc}") from None
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("classes") != list(CLASSES):
        raise CovidscanError(
            f"{run / 'checkpoint.json'} has format {meta.get('format')} / classes {meta.get('classes')}; "
            f"this covidscan reads format {CHECKPOINT_FORMAT} with classes {list(CLASSES)}"
        )
    cfg = load_config(run / "config.yaml")
    # The saved weights replace any pretrained ones, so never look for ImageNet files when loading.
    model = build_model(cfg.model.model_copy(update={"weights": "none"}))
    try:
        state = load_file(str(run / "model.safetensors"))
        model.load_state_dict(state)
    except (OSError, RuntimeError) as exc:
        raise CovidscanError(f"cannot load weights {run / 'model.safetensors'}: {exc}") from None
    model.eval()
    return LoadedRun(run, cfg, model, float(meta["threshold"]), float(meta["temperature"]), meta)


def probabilities(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """Calibrated P(covid) from the binary logit z = logit_covid - logit_non_covid."""
    return torch.sigmoid(z / temperature)
