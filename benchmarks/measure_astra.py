"""Frozen Astra chest-CT features (``astra_ct``) against ImageNet MobileNetV2 under covidscan's heads.

    nice -n 10 python benchmarks/measure_astra.py --shared ../shared --cache /tmp/astra-work \
        --mobilenet-weights ../shared/weights/mobilenet_v2_imagenet_coral_dequant.pth
    nice -n 10 python benchmarks/measure_astra.py --speed

``--speed`` times one 224 px slice through the 3-D encoder (a one-slice volume) and through its 2-D form
(eager fp32, and as covidscan serves it: BatchNorm folded, channels_last, fp32 and bf16), batch 8.

Both backbones see the same inputs (paper A's preprocessing: CLAHE + contour lung crop, 224 px, no
augmentation); their pooled features are cached in ``--cache``. For each backbone and head (``linear``,
``paper_a``) and learning rate, patient-grouped 5-fold cross-validation on ucsd-ct's official train+val
gives a ROC AUC; the best setting is then trained on train (early stopping on val), its threshold chosen on
val (Youden), and scored once on the official test split (patient-bootstrap 95% CI) and on ct-ext-luna16
(specificity at that threshold, Wilson interval). Astra's features are also computed in bf16 (BatchNorm
folded, as covidscan serves bf16) to count non-finite values and label changes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold

from covidscan.config import TrainConfig, load_config
from covidscan.data.manifest import read_manifest
from covidscan.evaluation.metrics import bootstrap_ci, choose_threshold, wilson_interval
from covidscan.models import Classifier, FastClassifier, astra, build_backbone, linear_head, paper_a_head
from covidscan.preprocess import prepare_manifest
from covidscan.preprocess.prepare import to_model_batch
from covidscan.training.engine import CachedFeatures, fit

HEADS = {"linear": lambda c: linear_head(c), "paper_a": lambda c: paper_a_head(c)}
LRS = (1e-3, 1e-4)


@torch.inference_mode()
def pooled(backbone: torch.nn.Module, images: np.ndarray, batch: int = 16) -> np.ndarray:
    """Global-average-pooled feature maps of prepared images (N, H, W) in [0, 1]."""
    out = []
    for start in range(0, len(images), batch):
        x = to_model_batch(images[start : start + batch], backbone.mean, backbone.std)
        out.append(backbone(x).float().mean(dim=(2, 3)))
    return torch.cat(out).numpy()


def features(name: str, weights: str, data: Path, cache: Path, split_column: str | None) -> dict:
    """Cached pooled features (and labels, patients, splits) of one backbone on one manifest."""
    file = cache / f"{name.replace(':', '_')}-{data.parent.name}.npz"
    if file.is_file():
        return dict(np.load(file, allow_pickle=True))
    cfg = load_config("paper-a-resnet50")
    df = read_manifest(data, split_column=split_column)
    prepared = prepare_manifest(df, cfg.preprocess, (224, 224), progress=False)
    backbone = build_backbone(name, weights).eval()
    start = time.perf_counter()
    x = pooled(backbone, prepared.images)
    seconds = time.perf_counter() - start
    result = {
        "x": x,
        "y": prepared.labels,
        "patients": np.array(prepared.patient_ids, dtype=object),
        "split": (df["split"].to_numpy()[prepared.rows] if "split" in df else np.array([""] * len(x))),
        "seconds_per_image": seconds / len(x),
    }
    np.savez(file, **result)
    print(f"{name} on {data.parent.name}: {len(x)} images, {seconds / len(x):.3f} s per image", flush=True)
    if name == "astra_ct":  # bf16 as covidscan serves it: BatchNorm folded, channels_last
        fast = FastClassifier(Classifier(backbone, linear_head(backbone.out_channels)), torch.bfloat16)
        result["x_bf16"] = pooled(_Features(fast, backbone), prepared.images)
        np.savez(file, **result)
    return result


class _Features(torch.nn.Module):
    """A FastClassifier's bf16 feature map under the interface ``pooled`` needs."""

    def __init__(self, fast: FastClassifier, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.fast, self.mean, self.std = fast, backbone.mean, backbone.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fast.features(x.to(torch.bfloat16, memory_format=torch.channels_last))


def train_head(
    head: str,
    lr: float,
    x: np.ndarray,
    y: np.ndarray,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
) -> torch.nn.Module:
    """covidscan's head trained on pooled features (as (N, C, 1, 1) maps) by covidscan's ``fit``."""
    module = HEADS[head](x.shape[1])

    def data(f: np.ndarray, labels: np.ndarray) -> CachedFeatures:
        return CachedFeatures(torch.from_numpy(f).float()[:, None, :, None, None], labels.astype(np.int64))

    cfg = TrainConfig(epochs=20, batch_size=32, lr=lr, early_stopping=5 if x_val is not None else None)
    fit(module, data(x, y), None if x_val is None else data(x_val, y_val), cfg, progress=False)
    return module.eval()


@torch.inference_mode()
def covid_proba(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """p(covid) of pooled features."""
    return module(torch.from_numpy(x).float()[:, :, None, None]).softmax(1)[:, 1].numpy()


def cv_auc(head: str, lr: float, x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    """Patient-grouped 5-fold out-of-fold ROC AUC."""
    p = np.zeros(len(y))
    for train, test in StratifiedGroupKFold(5, shuffle=True, random_state=0).split(x, y, groups):
        p[test] = covid_proba(train_head(head, lr, x[train], y[train]), x[test])
    return float(roc_auc_score(y, p))


def speed(batch: int = 8, repeats: int = 3) -> None:
    """Seconds per image of the 3-D encoder on a one-slice volume against its 2-D form."""
    torch.manual_seed(0)
    x = torch.rand(batch, 1, 224, 224)
    backbone = build_backbone("astra_ct", "astra").eval()
    classifier = Classifier(backbone, linear_head(backbone.out_channels))
    ways = {
        "3-D encoder, one-slice volume (eager fp32)": (astra.load_encoder_3d("astra"), x[:, :, None]),
        "2-D form (eager fp32)": (backbone, x.expand(-1, 3, -1, -1)),
        "2-D form, folded + channels_last, fp32": (
            FastClassifier(classifier).features,
            x.expand(-1, 3, -1, -1),
        ),
        "2-D form, folded + channels_last, bf16": (
            FastClassifier(classifier, torch.bfloat16).features,
            x.expand(-1, 3, -1, -1).to(torch.bfloat16),
        ),
    }
    print(f"| {torch.get_num_threads()} threads, batch {batch} | s per image |\n|---|---|")
    for label, (module, inputs) in ways.items():
        with torch.inference_mode():
            module(inputs)  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                module(inputs.contiguous(memory_format=torch.channels_last) if inputs.ndim == 4 else inputs)
                times.append((time.perf_counter() - start) / batch)
        print(f"| {label} | {min(times):.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shared", type=Path)
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--mobilenet-weights")
    parser.add_argument("--speed", action="store_true", help="only time the 3-D and 2-D encoders")
    args = parser.parse_args()
    if args.speed:
        return speed()
    if not (args.shared and args.cache and args.mobilenet_weights):
        parser.error("--shared, --cache and --mobilenet-weights are needed (or --speed)")
    args.cache.mkdir(parents=True, exist_ok=True)
    ucsd, luna = args.shared / "data/ucsd-ct/labels.csv", args.shared / "data/ct-ext-luna16/labels.csv"
    print(
        "| backbone | s/image | CV AUC per setting (train+val) | chosen | test ROC AUC | LUNA16 specificity |"
    )
    print("|---|---|---|---|---|---|")
    for name, weights in (("mobilenet_v2", args.mobilenet_weights), ("astra_ct", "astra")):
        dev, ext = (
            features(name, weights, d, args.cache, c) for d, c in ((ucsd, "official_split"), (luna, None))
        )
        x, y, split, pids = dev["x"], dev["y"], dev["split"], dev["patients"].astype(str)
        seen = np.isin(split, ("train", "val"))
        scores = {(h, lr): cv_auc(h, lr, x[seen], y[seen], pids[seen]) for h in HEADS for lr in LRS}
        head, lr = max(scores, key=scores.get)
        tr, va, te = (split == s for s in ("train", "val", "test"))
        model = train_head(head, lr, x[tr], y[tr], x[va], y[va])
        threshold = choose_threshold(y[va], covid_proba(model, x[va]))
        p_test = covid_proba(model, x[te])
        ci = bootstrap_ci(y[te], p_test, threshold=threshold, groups=pids[te])["roc_auc"]
        negative = covid_proba(model, ext["x"]) < threshold
        low, high = wilson_interval(negative.mean(), len(negative))
        settings = ", ".join(f"{h} lr {lr:g}: {s:.3f}" for (h, lr), s in scores.items())
        print(
            f"| {name} | {float(dev['seconds_per_image']):.3f} | {settings} | {head}, lr {lr:g} | "
            f"{roc_auc_score(y[te], p_test):.3f} ({ci.low:.3f}-{ci.high:.3f}) | "
            f"{negative.mean():.3f} ({low:.3f}-{high:.3f}) |",
            flush=True,
        )
        if "x_bf16" in dev:
            for label, d in (("ucsd-ct", dev), ("ct-ext-luna16", ext)):
                bad = ~np.isfinite(d["x_bf16"]).all(axis=1)
                p32 = covid_proba(model, d["x"]) >= threshold
                p16 = covid_proba(model, np.nan_to_num(d["x_bf16"], nan=0.0)) >= threshold
                print(
                    f"bf16 {label}: {int(bad.sum())} of {len(bad)} images with non-finite features; "
                    f"{int((p32 != p16)[~bad].sum())} labels changed among the finite ones"
                )


if __name__ == "__main__":
    main()
