"""Frozen-base training: head on cached backbone features vs re-running the backbone every epoch.

Both runs train the same preset (same head, epochs, batch size, augmentation) on the same images; the only
difference is ``train.cache_features``. The cached path embeds ``views`` augmented copies of each training
image once; the other path augments and runs the backbone on every image in every epoch. Wall time covers
the whole ``train_experiment`` (preprocessing and evaluation included, which both paths share), so the
printed ratio understates the speed-up of the training loop itself; the "train stage" columns separate it.
The head's own fit on the cached features (``FitResult.seconds``: the epochs, without the embedding) is
printed as a share of the whole cached run (issue 18's goal: at most 5%).

Usage::

    python benchmarks/bench_feature_cache.py                 # 200 CT phantoms, paper-a preset, mobilenet_v2
    python benchmarks/bench_feature_cache.py --data ../shared/data/ucsd-ct/labels.csv --epochs 20
    python benchmarks/bench_feature_cache.py --preset covidscan-ct --epochs 50 --json OUT.json
    python benchmarks/bench_feature_cache.py --preset covidscan-ct --epochs 50 --cached-only \
        --data ../shared/data/ucsd-ct/labels.csv \
        --weights ../shared/weights/mobilenet_v2_imagenet_coral_dequant.pth
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from covidscan.config import load_config
from covidscan.data.synthetic import write_phantom_dataset
from covidscan.training import train_experiment


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="manifest or folder (default: CT phantoms written to a temp folder)")
    parser.add_argument("--preset", default="paper-a-resnet50")
    parser.add_argument("--backbone", default="mobilenet_v2", help="speed does not depend on the weights")
    parser.add_argument("--weights", default="none",
                        help="the backbone's weights (none: random; early stopping may end the head sooner "
                             "with real ones)")
    parser.add_argument("--n", type=int, default=200, help="phantoms to generate when --data is not given")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--views", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--cached-only", action="store_true",
                        help="train only the cached path: the head's share, without the slow comparison")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or write_phantom_dataset(Path(tmp) / "data", n=args.n, modality="ct", seed=0)
        timings = {}
        for cached in (True,) if args.cached_only else (True, False):
            cfg = load_config(
                args.preset,
                [
                    f"model.backbone={args.backbone}",
                    f"model.weights={args.weights}",
                    f"train.epochs={args.epochs}",
                    f"train.views={args.views}",
                    f"train.cache_features={str(cached).lower()}",
                    "evaluation.n_bootstrap=0",
                ],
            )
            start = time.perf_counter()
            result = train_experiment(cfg, data, Path(tmp) / f"run-{cached}", progress=False)
            timings[cached] = (time.perf_counter() - start, result.fit.seconds)
    cached_total, head = timings[True]
    print(f"data {data}; preset {args.preset}, backbone {args.backbone}, {args.epochs} epochs, "
          f"{args.views} cached views")
    figures = {
        "data": str(data), "preset": args.preset, "backbone": args.backbone, "epochs": args.epochs,
        "views": args.views, "cached_whole_s": cached_total, "cached_head_fit_s": head,
        "head_share_of_cached_run": head / cached_total,
    }
    if False in timings:
        full_total, full_loop = timings[False]
        # Preprocessing and evaluation are the same for both paths; the rest is the training stage
        # (for the cached path: embedding the views once, then the head's loop).
        cached_stage = cached_total - (full_total - full_loop)
        print(f"{'path':<24}{'whole run s':>12}{'training stage s':>18}")
        print(f"{'cached features':<24}{cached_total:>12.1f}{cached_stage:>18.1f}")
        print(f"{'backbone every epoch':<24}{full_total:>12.1f}{full_loop:>18.1f}")
        print(
            f"speed-up: whole run {full_total / cached_total:.1f}x, "
            f"training stage {full_loop / cached_stage:.1f}x"
        )
        figures |= {
            "cached_training_stage_s": cached_stage, "uncached_whole_s": full_total,
            "uncached_training_stage_s": full_loop, "speedup_whole": full_total / cached_total,
            "speedup_training_stage": full_loop / cached_stage,
        }
    print(f"head's fit on cached features: {head:.2f} s, {head / cached_total:.1%} of the whole cached run "
          f"({cached_total:.1f} s)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2), encoding="utf-8")

if __name__ == "__main__":
    main()
