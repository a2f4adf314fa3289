"""Fast CPU inference: BatchNorm folded into the convolutions, channels_last memory, bf16 where it is safe.

bf16 policy (:func:`use_bf16`): with precision ``auto``, bf16 runs only when (1) the CPU has native bf16
instructions (AVX512_BF16 or AMX on x86, BF16 on Arm) and (2) the run's own verdict (:func:`bf16_verdict`,
measured at training time on the run's test split by :func:`compare_precision`) says bf16 changed at most
0.5% of the fp32 labels and the ROC AUC by at most 0.005. Runs without a verdict stay in fp32. ``fp32``
always gives the fp32 numbers (the same on every CPU: tests and comparisons across machines ask for it);
``bf16`` asks for bf16 where the run's verdict allows it, emulated (same numbers, slower) on a CPU without
native bf16. The backbone runs in bf16 but the head in fp32, so the logits themselves are not rounded to bf16.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from functools import cache
from typing import Any, Literal

import numpy as np
import torch
import torch.fx.experimental.optimization as fx_opt
from pydantic import BaseModel, ConfigDict
from sklearn.metrics import roc_auc_score
from torch import nn
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from covidscan.errors import ConfigError
from covidscan.models.classifier import Classifier, pool_features
from covidscan.system import cache_dir, cpu_info

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
MAX_LABEL_CHANGE = 0.005
"""bf16 (or int8) is allowed where it changes at most this share of the fp32 test labels..."""
MAX_AUC_DELTA = 0.005
"""...and moves its ROC AUC by at most this much."""


class PrecisionVerdict(BaseModel):
    """Whether bf16 may serve a model: fp32 vs bf16 labels on the run's own test split."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allowed: bool
    reason: str
    images: int = 0
    labels_changed: int = 0
    max_abs_dp: float | None = None
    auc_delta: float | None = None
    """None where it was not measured (a test split of one class, or a run checked before covidscan did)."""
    torch: str = ""


@cache
def bf16_supported() -> bool:
    """True when oneDNN is built in and the CPU runs bf16 natively (emulated bf16 is slower than fp32)."""
    if not torch.backends.mkldnn.is_available():
        return False
    # Off Linux there are no flags to read, so fp32 stays (no cheap way to tell).
    return bool(cpu_info()[1] & {"avx512_bf16", "amx_bf16", "bf16"})


def use_bf16(precision: str, verdict: PrecisionVerdict | None, device: torch.device) -> bool:
    """Whether a run serves in bf16 under the asked ``precision`` (see the module's bf16 policy).

    Raises ConfigError for an unknown precision, and for ``bf16`` where the run's verdict does not allow
    it (refused, or never measured) or on a GPU.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return False
    if precision == "auto":
        return device.type == "cpu" and bf16_supported() and verdict is not None and verdict.allowed
    if device.type != "cpu":
        raise ConfigError("precision bf16 is for the CPU; on a GPU use precision auto or fp32")
    if verdict is None:
        raise ConfigError("this run's bf16 check was never measured (it was trained on a CPU without native "
                          "bf16), so bf16 is not allowed for it; use precision auto or fp32")
    if not verdict.allowed:
        raise ConfigError(f"this run's bf16 check refused bf16 ({verdict.reason}); "
                          "use precision auto or fp32")
    if not bf16_supported():
        log.warning("this CPU has no native bf16: bf16 is emulated (the same numbers as native, but slower)")
    return True


class FastClassifier(nn.Module):
    """A Classifier's backbone with BatchNorm folded, in channels_last and ``dtype``; the head stays fp32.

    Keeping the small head in fp32 means only the backbone's features carry bf16 rounding, not the logits.
    """

    def __init__(self, model: Classifier, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.features = _fold_batchnorm(model.backbone).to(dtype=dtype, memory_format=torch.channels_last)
        self.head = model.head
        self.dtype = dtype
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, 2) in fp32 of a normalised (N, 3, H, W) batch."""
        x = x.to(dtype=self.dtype, memory_format=torch.channels_last)
        return self.head(self.features(x).float())

    def forward_pooled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(N, 2)`` and pooled backbone features ``(N, C)``, both fp32, from one backbone pass."""
        fmap = self.features(x.to(dtype=self.dtype, memory_format=torch.channels_last)).float()
        return self.head(fmap), pool_features(fmap)


class CompiledClassifier:
    """A :class:`FastClassifier` compiled by ``torch.compile`` (Inductor, weights frozen in), one batch shape.

    Inductor writes C++ for this CPU's instruction sets and hands the convolutions, their weights packed
    once, to oneDNN (AMX tiles for bf16 where the CPU has them). Compiling costs seconds once per process
    (less when Inductor's on-disk cache holds the graph), so it pays off on long jobs and servers. There is
    one graph, for ``batch`` images: a smaller batch is padded with zeros, so nothing recompiles.
    """

    def __init__(self, net: FastClassifier, batch: int, input_size: tuple[int, int]) -> None:
        compiler = shutil.which(os.environ.get("CXX", "g++"))
        if compiler is None:
            raise ConfigError("the compiled engine needs a C++ compiler for torch.compile (g++, or the one "
                              "named by $CXX; on Debian: apt-get install g++ python3-dev); use the torch "
                              "engine meanwhile")
        self.batch = batch
        _inductor_cache_of_this_cpu()
        # freezing: the weights become constants, packed once for oneDNN, instead of inputs of every call
        self._compiled = torch.compile(_Pooled(net), dynamic=False, options={"freezing": True})
        log.info("compiling the model for this CPU with torch.compile (batch %d, %s): once per process",
                 batch, net.dtype)
        try:
            # Dynamo files every model compiled from _Pooled.forward under that one function, as if each were
            # a recompilation of it, and past `recompile_limit` (8) silently runs the rest eagerly: a process
            # compiling many models (a benchmark, a test session) would lose the engine without a word. Each
            # model compiles exactly once, here, so the limit is lifted for this call alone.
            with torch._dynamo.config.patch(recompile_limit=sys.maxsize):
                self.forward_pooled(torch.zeros(batch, 3, *input_size))  # compiling happens at the first call
        except Exception as exc:  # Inductor's errors are many and internal: name it and give the way out
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ConfigError(f"torch.compile could not compile this model for this CPU "
                              f"({type(exc).__name__}: {first[:300]}); use the torch engine") from None

    @torch.inference_mode()
    def forward_pooled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(N, 2)`` and pooled features ``(N, C)`` of a normalised batch, ``batch`` at a time."""
        logits, pooled = [], []
        for chunk in x.split(self.batch):
            n = len(chunk)
            if n < self.batch:
                chunk = torch.cat([chunk, chunk.new_zeros((self.batch - n, *chunk.shape[1:]))])
            chunk = chunk.contiguous(memory_format=torch.channels_last)
            if not chunk.is_inference():
                # The graph's guards tell a tensor made outside inference mode from one made in it and
                # would compile a second graph for it: every batch is made an inference tensor (one copy).
                chunk = chunk.clone()
            out = self._compiled(chunk)
            logits.append(out[0][:n])
            pooled.append(out[1][:n])
        return torch.cat(logits), torch.cat(pooled)


@cache
def _inductor_cache_of_this_cpu() -> None:
    """Point Inductor's on-disk cache at a folder of this CPU kind's own, once per process, unless
    ``TORCHINDUCTOR_CACHE_DIR`` names a folder of the user's (Inductor itself sets it to its default).

    Inductor keys its cached graphs by the GPU and library versions, not by the CPU: a graph cached under
    another CPU kind or ``ATEN_CPU_CAPABILITY`` is reused as it is, and then gave NaN and 1e19 logits here
    (`tests/test_compiled.py`). CPUs change under a VM, and a cache folder may be shared.
    """
    named = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if named and os.path.abspath(named) != os.path.abspath(default_cache_dir()):
        return
    model, flags = cpu_info()
    kind = json.dumps([model, sorted(flags), torch.backends.cpu.get_cpu_capability(),
                       os.environ.get("ONEDNN_MAX_CPU_ISA")])
    folder = cache_dir("inductor", hashlib.sha256(kind.encode()).hexdigest()[:16])
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)


class _Pooled(nn.Module):
    """``forward_pooled`` as a module's forward, which is what Inductor freezes the weights of."""

    def __init__(self, net: FastClassifier) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.forward_pooled(x)


def _fold_batchnorm(backbone: nn.Module) -> nn.Module:
    """A copy of ``backbone`` with every conv + BatchNorm pair folded into one conv (torch.fx)."""
    try:
        return fx_opt.fuse(backbone.eval())
    except Exception as exc:  # some timm models cannot be traced: run them unfolded, just as correct
        log.info("BatchNorm folding skipped (%s: %s)", type(exc).__name__, exc)
        return copy.deepcopy(backbone)


def binary_logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """z = logit_covid - logit_non_covid of a batch, without autograd."""
    with torch.inference_mode():
        logits = model(batch)
    return logits[:, 1] - logits[:, 0]


def bf16_verdict(
    model: Classifier,
    batches: Iterable[torch.Tensor],
    proba: Callable[[torch.Tensor], np.ndarray],
    threshold: float,
    labels: np.ndarray | None = None,
) -> PrecisionVerdict:
    """Run normalised test batches through fp32 and bf16 and compare them (:func:`compare_precision`).

    ``proba`` turns binary logits into calibrated probabilities (a run's ``Calibration.proba``); ``labels``
    are the images' true labels (0/1), for the ROC AUC part of the check.
    """
    fp32, bf16 = model.eval(), FastClassifier(model, torch.bfloat16)
    p32, p16 = [], []
    for x in batches:
        p32.append(proba(binary_logits(fp32, x.contiguous())))
        p16.append(proba(binary_logits(bf16, x)))
    if not p32:
        return PrecisionVerdict(allowed=False, reason="no test images to check bf16 on",
                                torch=torch.__version__)
    return PrecisionVerdict(**compare_precision(np.concatenate(p32), np.concatenate(p16), threshold, labels),
                            torch=torch.__version__)


def compare_precision(
    a: np.ndarray,
    b: np.ndarray,
    threshold: float,
    labels: np.ndarray | None = None,
    *,
    max_label_change: float = MAX_LABEL_CHANGE,
    max_auc_delta: float = MAX_AUC_DELTA,
) -> dict[str, Any]:
    """The one per-run check of a faster precision (bf16, int8): fp32 probabilities ``a`` vs its ``b`` on the
    run's test split. Allowed when at most ``max_label_change`` of the labels at ``threshold`` change and,
    where ``labels`` of both classes are given, the ROC AUC moves by at most ``max_auc_delta``. Returns the
    verdict's fields (allowed, reason, images, labels_changed, max_abs_dp, auc_delta)."""
    # A NaN probability compares False with any threshold: count it as a changed label whatever fp32 said.
    finite = np.isfinite(b)
    changed = int((((a >= threshold) != (b >= threshold)) | ~finite).sum())
    share = changed / len(a)
    reason = (f"{changed} of {len(a)} test labels changed ({share:.2%}; at most {max_label_change:.1%} "
              "allowed)")
    if not finite.all():
        reason += f", {int((~finite).sum())} of them not finite"
    auc_delta = None
    if labels is not None and len(np.unique(labels)) == 2:
        before, after = roc_auc_score(labels, a), roc_auc_score(labels, np.where(finite, b, 0.5))
        auc_delta = abs(float(after) - float(before))
        reason += (f", ROC AUC {before:.4f} -> {after:.4f} (change {auc_delta:.4f}; at most "
                   f"{max_auc_delta:g})")
    elif labels is not None:
        reason += ", ROC AUC not measurable (the test split has one class only)"
    return {
        "allowed": share <= max_label_change and (auc_delta is None or auc_delta <= max_auc_delta),
        "reason": reason,
        "images": len(a),
        "labels_changed": changed,
        "max_abs_dp": float(np.abs(a - b)[finite].max()) if finite.any() else None,
        "auc_delta": auc_delta,
    }
