"""Unsupervised alignment of a site's pooled backbone features to the training features (no labels needed).

:class:`FeatureAlignment` is an affine map ``x -> x @ A + c`` fitted in the scikit-learn manner:
``fit(site, source)`` on a site's unlabelled pooled features and the run's training features, then
``transform``. Two methods:

- ``standardize``: per feature, the site's mean and standard deviation are mapped onto the training
  ones (``A`` diagonal);
- ``coral``: CORAL (Sun, Feng & Saenko, 2016) with the means matched too: the site's features are
  whitened with the site covariance and re-coloured with the training covariance, ``A = Cs^-1/2 Ct^1/2``.
  Both covariances are Ledoit-Wolf shrunk: a site gives a few dozen images for 1,280 features, and an
  unshrunk covariance of rank N - 1 cannot be inverted.

The map is affine and the heads it serves start with a linear layer on the pooled features, so
:meth:`fold_into` writes it into that layer's weights: every engine (torch, ONNX, Grad-CAM) then applies
it without knowing it exists. :func:`standardizer` is the same kind of map, fitted on one set of features
alone: each feature to zero mean and unit variance (a head then learns on well-scaled inputs, as a
scikit-learn ``StandardScaler`` gives them, and still takes the raw features once the map is folded in).
``save``/``load`` keep a map beside the run as a record (safetensors, no pickle).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import safetensors.numpy
import torch
from sklearn.covariance import LedoitWolf
from torch import nn

from covidscan.errors import ConfigError, StorageError
from covidscan.models.ensemble import EnsembleTail

AlignMethod = Literal["standardize", "coral"]
ALIGN_METHODS: tuple[AlignMethod, ...] = ("standardize", "coral")
"""Simplest first (ties go to the simpler)."""
_FORMAT = "covidscan-alignment/1"
_MIN_ROWS = 3


def _matrix(x: Any, name: str, dims: int | None = None) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or len(arr) < _MIN_ROWS:
        raise ConfigError(
            f"{name} must be a 2-D array of at least {_MIN_ROWS} images (images, features); "
            f"got shape {arr.shape}"
        )
    if dims is not None and arr.shape[1] != dims:
        raise ConfigError(
            f"{name} has {arr.shape[1]} features per image but the alignment {dims}; "
            "compute both with the same run's backbone"
        )
    if not np.isfinite(arr).all():
        raise ConfigError(f"{name} contains NaN or infinite values")
    return arr


def _stretch(sd_from: np.ndarray, sd_to: np.ndarray | float) -> np.ndarray:
    """Per feature ``sd_to / sd_from``; a feature constant in ``sd_from`` (a dead channel) is moved, not
    stretched from nothing (factor 1)."""
    floor = 1e-6 * max(float(sd_from.max()), 1e-12)
    return np.where(sd_from > floor, sd_to / np.maximum(sd_from, floor), 1.0)


def _sqrt_pair(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The symmetric square root of a covariance and its inverse (eigenvalues floored for stability)."""
    values, vectors = np.linalg.eigh(cov)
    values = np.maximum(values, 1e-12 * max(values.max(), 1e-300))
    root = np.sqrt(values)
    return (vectors * root) @ vectors.T, (vectors / root) @ vectors.T


class FeatureAlignment:
    """An affine map of pooled features fitted without labels: the site's statistics onto the training ones.

    After :meth:`fit`, ``linear_`` is ``A`` ((D,) for ``standardize``: a diagonal; (D, D) for ``coral``) and
    ``offset_`` is ``c`` (D,), with ``transform(x) = x @ A + c``.
    """

    def __init__(self, method: AlignMethod = "coral") -> None:
        if method not in ALIGN_METHODS:
            raise ConfigError(f"alignment method must be one of {', '.join(ALIGN_METHODS)}, got {method!r}")
        self.method: AlignMethod = method
        self.linear_: np.ndarray | None = None
        self.offset_: np.ndarray | None = None

    def fit(self, site: Any, source: Any) -> FeatureAlignment:
        """Fit on the site's features (N, D) and the training features (M, D); no labels."""
        xs = _matrix(site, "the site's features")
        xt = _matrix(source, "the training features", xs.shape[1])
        mu_s, mu_t = xs.mean(axis=0), xt.mean(axis=0)
        if self.method == "standardize":
            linear = _stretch(xs.std(axis=0), xt.std(axis=0))
            offset = mu_t - mu_s * linear
        else:
            _, site_inv_root = _sqrt_pair(LedoitWolf().fit(xs).covariance_)
            source_root, _ = _sqrt_pair(LedoitWolf().fit(xt).covariance_)
            linear = site_inv_root @ source_root
            offset = mu_t - mu_s @ linear
        self.linear_, self.offset_ = linear, offset
        return self

    @property
    def dims(self) -> int:
        """Features per image the alignment was fitted on."""
        return len(self._fitted()[1])

    def _fitted(self) -> tuple[np.ndarray, np.ndarray]:
        if self.linear_ is None or self.offset_ is None:
            raise ConfigError("FeatureAlignment is not fitted yet; call .fit(site, source) first")
        return self.linear_, self.offset_

    def transform(self, x: Any) -> np.ndarray:
        """The aligned features ``x @ A + c`` (float64)."""
        linear, offset = self._fitted()
        arr = _matrix(x, "the features to align", len(offset))
        return (arr * linear if linear.ndim == 1 else arr @ linear) + offset

    def fold_into(self, head: nn.Module) -> None:
        """Rewrite ``head`` in place so that ``head(x)`` computes ``old_head(transform(x))``.

        ``head`` is a linear layer, a head's trainable part (the map goes into its first linear layer) or an
        ensemble's (each member's part of a per-feature map goes into that member's first linear layer).
        """
        linear, offset = self._fitted()
        if isinstance(head, EnsembleTail):
            if linear.ndim != 1:
                raise ConfigError(f"a {self.method} alignment mixes the members' features; only a "
                                  "per-feature map (standardize) can be split across an ensemble's heads")
            bounds = np.cumsum([0, *head.sizes])
            if bounds[-1] != len(offset):
                raise ConfigError(f"the alignment maps {len(offset)} features; the ensemble's heads take "
                                  f"{bounds[-1]}")
            for member, start, stop in zip(head.heads, bounds[:-1], bounds[1:], strict=True):
                part = FeatureAlignment(self.method)
                part.linear_, part.offset_ = linear[start:stop], offset[start:stop]
                part.fold_into(member)
            return
        layer = next((m for m in head.modules() if isinstance(m, nn.Linear)), None)
        if layer is None or layer.in_features != len(offset):
            raise ConfigError(
                f"the alignment maps {len(offset)} features; it folds into a linear layer with "
                f"as many inputs, got {head}"
            )
        with torch.no_grad():
            weight = layer.weight.double()
            a = torch.from_numpy(linear)
            new_weight = weight * a if a.ndim == 1 else weight @ a.T
            new_bias = weight @ torch.from_numpy(offset)
            if layer.bias is not None:
                new_bias = new_bias + layer.bias.double()
            else:
                layer.bias = nn.Parameter(torch.zeros(layer.out_features, dtype=layer.weight.dtype))
            layer.weight.copy_(new_weight.to(layer.weight.dtype))
            layer.bias.copy_(new_bias.to(layer.bias.dtype))

    def save(self, path: str | Path) -> Path:
        """Write the fitted map to one safetensors file (arrays plus JSON metadata)."""
        linear, offset = self._fitted()
        path = Path(path)
        meta = {"format": _FORMAT, "method": self.method}
        try:
            safetensors.numpy.save_file(
                {"linear": np.ascontiguousarray(linear), "offset": np.ascontiguousarray(offset)},
                str(path),
                metadata={"covidscan": json.dumps(meta)},
            )
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc.strerror or exc}; check the folder") from None
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureAlignment:
        """Read a map written by :meth:`save` (a damaged or foreign file is a StorageError naming it)."""
        path = Path(path)
        try:
            with safetensors.safe_open(str(path), framework="numpy") as f:
                meta = json.loads((f.metadata() or {}).get("covidscan", "{}"))
                arrays = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no iter)
        except (OSError, KeyError, ValueError, safetensors.SafetensorError) as exc:
            raise StorageError(f"cannot read the feature alignment {path}: {exc}") from None
        if meta.get("format") != _FORMAT or set(arrays) != {"linear", "offset"}:
            raise StorageError(f"{path} is not a covidscan feature alignment ({_FORMAT})")
        alignment = cls(meta["method"])
        alignment.linear_, alignment.offset_ = arrays["linear"], arrays["offset"]
        return alignment


def standardizer(features: Any, only: np.ndarray | None = None) -> FeatureAlignment:
    """The per-feature map of ``features`` (N, D) to zero mean and unit variance: ``(x - mean) / sd``.

    ``only`` (a boolean mask of D) standardises the features it marks and leaves the others as they are.
    """
    x = _matrix(features, "the features to standardise")
    keep = np.ones(x.shape[1], bool) if only is None else np.asarray(only, bool)
    scaler = FeatureAlignment("standardize")
    scaler.linear_ = np.where(keep, _stretch(x.std(axis=0), 1.0), 1.0)
    scaler.offset_ = np.where(keep, -x.mean(axis=0) * scaler.linear_, 0.0)
    return scaler


__all__ = ["ALIGN_METHODS", "AlignMethod", "FeatureAlignment", "standardizer"]
