"""Experiments as data: a preset (YAML) is validated into an :class:`ExperimentConfig`.

A preset names everything a run needs — preprocessing, model, training schedule, split protocol and how
the evaluation picks its threshold — so a run directory's ``config.yaml`` re-creates the result.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from covidscan.errors import ConfigError
from covidscan.models import EnsembleConfig, ModelConfig
from covidscan.preprocess import PreprocessConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # lr: inf would pass gt=0


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
    ensemble: EnsembleConfig | None = Field(
        None, description="set by `covidscan ensemble` only: the members (``model`` is then the first's)"
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

    @model_validator(mode="after")
    def _standardize_on_cached_features(self) -> ExperimentConfig:
        """``model.standardize`` fits its map on cached frozen features; other modes have none to fit on."""
        if self.model.standardize and not (self.model.train_mode == "frozen" and self.train.cache_features):
            raise ValueError(
                "model.standardize needs fixed features to standardise: set model.train_mode=frozen and "
                "train.cache_features=true, or model.standardize=false"
            )
        return self


def preset_dir() -> Path:
    """The folder holding the packaged presets."""
    return Path(str(resources.files("covidscan") / "presets"))


def list_presets() -> list[str]:
    """Names of the packaged presets (usable wherever a config path is accepted)."""
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:  # a file saved as Latin-1 / Windows-1252 from an old editor
        raise ConfigError(
            f"config {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at position {exc.start}); "
            "save it as UTF-8"
        ) from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a YAML mapping, got {type(data).__name__}")
    return data


def _apply_override(data: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {override!r} must look like key.sub=value, e.g. train.epochs=5")
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {override!r}: {part!r} is not a section")
        node = child
    # YAML parsing turns "5" into 5, "null" into None and "[0.8, 0.2]" into a list.
    node[leaf] = yaml.safe_load(raw)


def setting_names(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every dotted setting of an experiment (``train.epochs``, ``model.backbone``, ...) and its sections."""
    names: list[str] = []
    for name, field in (model or ExperimentConfig).model_fields.items():
        names.append(prefix + name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            names += setting_names(field.annotation, f"{prefix}{name}.")
    return names


def _non_finite(values: Any, key: str = "") -> Iterator[str]:
    """Dotted keys of the infinite or NaN numbers in a config dump (``lr: inf`` passes ``gt=0``)."""
    if isinstance(values, dict):
        for name, value in values.items():
            yield from _non_finite(value, f"{key}.{name}" if key else str(name))
    elif isinstance(values, (list, tuple)):
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            yield key
    elif isinstance(values, float) and not math.isfinite(values):
        yield key


def _blame(
    path: Path, overrides: Sequence[str], problems: list[tuple[str, str, str]], grid: Sequence[str] = ()
) -> str:
    """One message for ``(key, type, message)`` problems, each blamed on its --set (or --grid) or else on
    the file."""
    given = {o.partition("=")[0].strip(): f"--set {o}" for o in overrides}
    given |= {o.partition("=")[0].strip(): f"--grid {o}" for o in grid}
    from_file, from_set = [], []
    for key, kind, msg in problems:
        override = next((o for k, o in given.items() if k == key or key.startswith(k + ".")
                         or k.startswith(key + ".")), None)
        if kind == "extra_forbidden":  # a typo: name the key as typed, and the setting it resembles
            typo = override.split(" ", 1)[1].partition("=")[0].strip() if override else key
            close = difflib.get_close_matches(typo, setting_names(), n=1)
            text = f"{typo} is not a setting" + (f"; did you mean {close[0]}?" if close else "")
        else:
            text = f"{key}: {msg}" if key else msg
        if override is None:
            from_file.append(text)
        else:
            from_set.append(f"{override}: {text}")
    if from_file:
        from_set.insert(0, f"invalid config {path}: {'; '.join(from_file)}")
    return "; ".join(from_set)


def _config_path(preset_or_path: str | Path) -> Path:
    """The YAML file of a preset name or a config path, with an error that says what is wrong with it."""
    path = Path(preset_or_path)
    if not path.suffix and not path.exists():
        path = preset_dir() / f"{preset_or_path}.yaml"
        if not path.exists():
            raise ConfigError(
                f"no preset or config file named {preset_or_path!r}; presets: {', '.join(list_presets())}"
            )
    elif path.is_dir():
        inside = path / "config.yaml"
        hint = f"give {inside} (a run's config)" if inside.is_file() else "give a YAML file or a preset name"
        raise ConfigError(f"config {path} is a folder; {hint}")
    elif not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    return path


def load_config(
    preset_or_path: str | Path, overrides: Sequence[str] = (), *, grid: Sequence[str] = ()
) -> ExperimentConfig:
    """Load a preset by name (``paper-a-resnet50``) or a YAML file, then apply ``key=value`` overrides.

    Errors name the setting, and the ``--set`` that gave it when one did (with a close match for a typo).
    ``grid`` holds more overrides, applied last and blamed as ``--grid`` (one point of ``covidscan tune``).
    """
    path = _config_path(preset_or_path)
    data = _read_yaml(path)
    for override in [*overrides, *grid]:
        _apply_override(data, override)
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        problems = [(".".join(map(str, err["loc"])), err["type"], err["msg"].removeprefix("Value error, "))
                    for err in exc.errors()]
    else:
        problems = [(key, "finite_number", "must be a finite number, not inf or nan")
                    for key in _non_finite(cfg.model_dump(mode="python"))]
    if problems:
        raise ConfigError(_blame(path, overrides, problems, grid))
    return cfg


def dump_config(cfg: ExperimentConfig, path: Path) -> Path:
    """Write the fully resolved config (every default spelled out) as YAML."""
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    return path
