"""Fast CPU inference: BatchNorm folded into the convolutions, channels_last memory, bf16 where it is safe.

bf16 policy: bf16 runs only when (1) the CPU has native bf16 instructions (AVX512_BF16 or AMX on x86,
BF16 on Arm) and (2) the run's own verdict (:func:`check_bf16`) says bf16 changed at most 0.5% of the
fp32 labels on the run's test split. The verdict is computed once and cached in ``bf16_check.json`` in the
run directory, keyed by the weights' SHA-256 and the torch version. Runs whose test images are gone, and
runs whose calibrated probabilities crowd the threshold (where bf16 rounding flips labels), stay in fp32.
The backbone runs in bf16 but the head in fp32, so the logits themselves are not rounded to bf16.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.fx.experimental.optimization as fx_opt
from torch import nn

from covidscan.models import Classifier
from covidscan.runs import LoadedRun, load_run, probabilities
from covidscan.training.prepare import prepare_paths

log = logging.getLogger(__name__)

BF16_CHECK_FILE = "bf16_check.json"
MAX_LABEL_CHANGE = 0.005
"""bf16 is allowed when it changes at most this share of the fp32 labels on the run's test split."""
MAX_CHECK_IMAGES = 1000
"""The check uses at most this many test images (the first ones of splits.csv), to stay cheap."""


@cache
def bf16_supported() -> bool:
    """True when oneDNN is built in and the CPU runs bf16 natively (emulated bf16 is slower than fp32)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:  # not Linux: no cheap way to tell, so stay with fp32
        return False
    flags = set(" ".join(re.findall(r"^(?:flags|Features)\s*:(.*)$", text, re.MULTILINE)).split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def to_batch(pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (N, H, W) at model size -> normalised float (N, 3, H, W), channels_last.

    Equals ``eval_transform`` image by image (no resize at model size, gray to 3 channels, normalise) but
    in a few vectorised ops instead of one torchvision pipeline per image.
    """
    x = torch.from_numpy(np.ascontiguousarray(pixels)).unsqueeze(1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous(memory_format=torch.channels_last)


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


def _weights_digest(run_dir: Path) -> str:
    digest = hashlib.sha256()
    with open(run_dir / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _test_paths(run: LoadedRun) -> tuple[list[str], str]:
    """The run's test images (splits.csv), or none and why."""
    splits = run.path / "splits.csv"
    try:
        df = pd.read_csv(splits, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        return [], f"cannot read {splits}: {exc}"
    if not {"path", "split"} <= set(df.columns) or not (df["split"] == "test").any():
        return [], f"{splits} lists no test images"
    return df.loc[df["split"] == "test", "path"].tolist()[:MAX_CHECK_IMAGES], ""


def _measure(run: LoadedRun, paths: list[str], *, workers: int, batch_size: int) -> dict[str, Any]:
    prepared, errors = prepare_paths(paths, run.config.preprocess, run.model.input_size, workers=workers,
                                     progress=False)
    if errors:
        why = f"{len(errors)} of {len(paths)} test images unreadable (first: {errors[0]})"
        return {"allowed": False, "reason": why}
    pixels = np.stack([p.pixels for p in prepared if p is not None])
    fp32, bf16 = run.model, FastClassifier(run.model, torch.bfloat16)
    p32, p16 = [], []
    for start in range(0, len(pixels), batch_size):
        x = to_batch(pixels[start : start + batch_size], run.model.mean, run.model.std)
        p32.append(probabilities(binary_logits(fp32, x.contiguous()), run.temperature))
        p16.append(probabilities(binary_logits(bf16, x), run.temperature))
    a, b = torch.cat(p32).numpy(), torch.cat(p16).numpy()
    changed = int(((a >= run.threshold) != (b >= run.threshold)).sum())
    share = changed / len(a)
    return {
        "allowed": share <= MAX_LABEL_CHANGE,
        "reason": f"{changed} of {len(a)} test labels changed ({share:.2%}; at most {MAX_LABEL_CHANGE:.1%} "
        "allowed)",
        "images": len(a),
        "labels_changed": changed,
        "agreement": 1.0 - share,
        "max_abs_dp": float(np.abs(a - b).max()),
    }


def check_bf16(
    run: str | Path | LoadedRun, *, refresh: bool = False, workers: int = 2, batch_size: int = 32
) -> dict[str, Any]:
    """Whether bf16 may serve this run: fp32 vs bf16 labels on its test split, cached in bf16_check.json.

    Returns ``{"allowed", "reason", "images", "labels_changed", "agreement", "max_abs_dp", "weights_sha256",
    "torch"}``. The cached verdict is reused while the weights and the torch version are unchanged;
    ``refresh=True`` measures again. A run whose test images are gone gets ``allowed: False`` (fp32).
    """
    run = run if isinstance(run, LoadedRun) else load_run(run)
    cache_file = run.path / BF16_CHECK_FILE
    key = {"weights_sha256": _weights_digest(run.path), "torch": torch.__version__}
    if not refresh and cache_file.is_file():
        try:
            cached = json.loads(cache_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            cached = {}
        if all(cached.get(k) == v for k, v in key.items()):
            return cached
    paths, why_not = _test_paths(run)
    verdict = {"allowed": False, "reason": why_not} if why_not else _measure(
        run, paths, workers=workers, batch_size=batch_size
    )
    verdict.update(key)
    try:
        cache_file.write_text(json.dumps(verdict, indent=2), encoding="utf-8")
    except OSError as exc:  # a read-only run directory: measure again next time
        log.info("cannot cache the bf16 verdict in %s: %s", cache_file, exc)
    return verdict
