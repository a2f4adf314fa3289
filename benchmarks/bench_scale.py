"""Images per second of ``covidscan predict --engine ray`` (1 and 2 workers) beside in-process ``predict``.

All three predict the same folder with the same run, in one process run, one after the other; each Ray job
writes to a fresh folder (nothing resumed), and its time includes starting the actors and loading the model
in each, as a real job's does (Ray itself is started once, before, and timed on its own). Each is also
timed on the first quarter of the images: the whole job's time less that one gives the steady rate, what
an image costs once the actors run, and that rate says what N machines would take for a million images.

    python benchmarks/bench_scale.py --json benchmarks/bench_scale.json            # a run trained here
    python benchmarks/bench_scale.py --run RUN --images FOLDER --json OUT.json

Without ``--run`` it trains the ``covidscan-ct`` preset with EfficientNet-Lite0 at 224 px (after CLAHE and the
lung crop) for one epoch on generated CT phantoms with random weights: the cost per image is the
architecture's, whatever the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from covidscan.inference import predict
from covidscan.inference.ray_predict import predict_on_ray
from covidscan.io import list_images
from covidscan.models.fast import bf16_supported


def train_run(work: Path, n: int) -> tuple[Path, Path]:
    """covidscan-ct with EfficientNet-Lite0, one epoch on ``n`` phantoms; returns (run, images folder)."""
    from covidscan.config import load_config
    from covidscan.data.synthetic import write_phantom_dataset
    from covidscan.training import train_experiment

    manifest = write_phantom_dataset(work / "phantoms", n=n, modality="ct", seed=3, slices_per_patient=2)
    cfg = load_config(
        "covidscan-ct",
        [
            "model.backbone=timm:tf_efficientnet_lite0",
            "model.weights=none",
            "train.epochs=1",
            "train.views=1",
            "evaluation.n_bootstrap=0",
        ],
    )
    train_experiment(cfg, manifest, work / "run", progress=False)
    return work / "run", manifest.parent / "images"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run", type=Path, help="run directory (default: train the covidscan-ct architecture)"
    )
    parser.add_argument("--images", type=Path, help="folder of images (default: the generated phantoms)")
    parser.add_argument("--n", type=int, default=256, help="phantoms to generate without --images")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    args = parser.parse_args()
    import ray

    with tempfile.TemporaryDirectory(prefix="covidscan-scale-") as tmp:
        work = Path(tmp)
        run, images = (args.run, args.images) if args.run else train_run(work, args.n)
        load_before = os.getloadavg()
        start = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray_start_s = time.perf_counter() - start
        paths = [str(p) for p in list_images(images)]
        n, quarter = len(paths), len(paths) // 4

        def job(engine: str, items: list[str], tag: str) -> None:
            if engine == "in_process":
                assert len(predict(run, items, progress=False)) == len(items)
            else:
                workers = int(engine.split("_")[1])
                done = predict_on_ray(run, items, work / f"{engine}-{tag}", num_workers=workers,
                                      progress=False)
                assert done.predicted == len(items), done

        timings: dict[str, float] = {}
        part: dict[str, float] = {}
        for engine in ("in_process", "ray_1_workers", "ray_2_workers"):
            for items, tag, into in ((paths, "all", timings), (paths[:quarter], "quarter", part)):
                start = time.perf_counter()
                job(engine, items, tag)
                into[engine] = time.perf_counter() - start
        ray.shutdown()
    per_s = {k: n / v for k, v in timings.items()}
    # The last three quarters cost the whole job's time less the first quarter's: what one image costs once
    # the actors have started and loaded the model, as in a job of millions.
    steady = {k: (n - quarter) / (timings[k] - part[k]) for k in timings}
    figures = {
        "images": n,
        "seconds": timings,
        "images_per_s": per_s,
        "ratio": {k: per_s[k] / per_s["in_process"] for k in per_s},
        "quarter_images": quarter,
        "quarter_seconds": part,
        "steady_images_per_s": steady,
        "steady_ratio": {k: steady[k] / steady["in_process"] for k in steady},
        "ray_start_s": ray_start_s,
        "one_million_images_hours": {
            f"{nodes}_nodes": 1e6 / (steady["ray_2_workers"] * nodes) / 3600 for nodes in (1, 10, 100)
        },
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": bf16_supported(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
        },
        "command": "python benchmarks/bench_scale.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None and k != "n"),
    }
    for k in timings:
        print(f"{k:>16}: whole job {per_s[k]:6.1f} images/s ({figures['ratio'][k]:.2f}x in-process), "
              f"steady {steady[k]:6.1f} images/s ({figures['steady_ratio'][k]:.2f}x)")
    after = figures["machine"]["load_after"]
    print(f"Ray started in {ray_start_s:.1f} s; load average {load_before} -> {after}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
