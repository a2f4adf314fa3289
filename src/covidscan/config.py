"""Experiments as data: a preset (YAML) is validated into an :class:`ExperimentConfig`.

A preset names everything a run needs — preprocessing, model, training schedule, split protocol and how
the evaluation picks its threshold — so a run directory's ``config.yaml`` re-creates the result.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from covidscan.errors import ConfigError
from covidscan.models import ModelConfig
from covidscan.preprocess import PreprocessConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    """How a manifest is split when it carries no ``split`` column."""

    split_by: Literal["patient", "image"] = "patient"
    ratios: tuple[float, ...] = (0.7, 0.15, 0.15)
    seed: int = 0
    patient_column: str | None = None
    split_column: str | None = None
    resplit: bool = Field(False, description="ignore a split column already in the manifest")


class TrainConfig(_Strict):
    """Optimiser and schedule. Loss is cross-entropy on the 2-way softmax (one-hot labels)."""

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    augment: Literal["paper_a", "paper_b", "strong"] | None = None
    views: int = Field(
        5, ge=1, description="augmented views per training image cached by the frozen-base fast path"
    )
    cache_features: bool = True
    early_stopping: int | None = Field(
        None, ge=1, description="patience in epochs on validation loss (the best weights are always kept)"
    )
    seed: int = 0
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="where to train (auto: CUDA if any)")


class EvalConfig(_Strict):
    """How the operating point and calibration are chosen (always on validation, never on test)."""

    threshold: Literal["youden", "f1", "fixed"] = "youden"
    fixed_threshold: float = Field(0.5, gt=0, lt=1)
    calibrate: bool = True
    n_bootstrap: int = Field(1000, ge=0)
    aggregate: Literal["mean", "max"] = "mean"
    band: float = Field(0.1, ge=0, lt=1, description="width of the 'uncertain' zone around the threshold")


class ExperimentConfig(_Strict):
    """One experiment: everything needed to train, evaluate and re-create a result."""

    name: str
    description: str = ""
    modality: Literal["ct", "cxr"]
    preprocess: PreprocessConfig
    model: ModelConfig
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    evaluation: EvalConfig = EvalConfig()
    published: dict[str, float] | None = Field(
        None, description="figures the paper reports for this row, shown beside ours in reproduce tables"
    )

    @model_validator(mode="before")
    @classmethod
    def _one_modality(cls, data: Any) -> Any:
        """``modality`` is stated once, at the top; the preprocessing (lung finder) takes it from there."""
        if not isinstance(data, dict) or not isinstance(data.get("preprocess", {}), dict):
            return data
        modality, pre = data.get("modality"), dict(data.get("preprocess") or {})
        if modality is not None and pre.get("modality", modality) != modality:
            raise ValueError(
                f"preprocess.modality is {pre['modality']!r} but the experiment is {modality!r}; "
                "set the top-level modality only"
            )
        if modality is not None:
            pre["modality"] = modality
        return {**data, "preprocess": pre}


def preset_dir() -> Path:
    """The folder holding the packaged presets."""
    return Path(str(resources.files("covidscan") / "presets"))


def list_presets() -> list[str]:
    """Names of the packaged presets (usable wherever a config path is accepted)."""
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a YAML mapping, got {type(data).__name__}")
    return data


def _apply_override(data: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} must look like key.sub=value, e.g. train.epochs=5")
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
        node = child
    # YAML parsing turns "5" into 5, "null" into None and "[0.8, 0.2]" into a list.
    node[leaf] = yaml.safe_load(raw)


def load_config(preset_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load a preset by name (``paper-a-resnet50``) or a YAML file, then apply ``key=value`` overrides."""
    path = Path(preset_or_path)
    if not path.suffix and not path.exists():
        path = preset_dir() / f"{preset_or_path}.yaml"
        if not path.exists():
            raise ConfigError(
                f"no preset or config file named {preset_or_path!r}; presets: {', '.join(list_presets())}"
            )
    elif not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = _read_yaml(path)
    for override in overrides:
        _apply_override(data, override)
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid config {path}: {problems}") from None


def dump_config(cfg: ExperimentConfig, path: Path) -> Path:
    """Write the fully resolved config (every default spelled out) as YAML."""
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    return path
