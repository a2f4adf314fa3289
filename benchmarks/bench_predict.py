"""Prediction speed on this CPU, each optimised path next to a plain baseline measured in the same run.

    (a) decode + CLAHE + lung crop (prepare_paths, threads)              images/s
    (b) backbone forward, batch 1 and N: eager fp32 (no_grad, NCHW) vs BatchNorm folded + channels_last +
        inference_mode, in fp32 and (where the CPU has native bf16) bf16
    (c) end to end: covidscan.inference.predict on a folder (torch engine and onnxruntime) vs a
        sequential eager fp32 loop (read -> preprocess -> eval_transform -> one image at a time through
        the model)
    (d) a loaded Predictor: Predictor.from_run (load, fold, engine choice), its first call, and the
        per-image time of later calls (one image, and a batch)

Usage::

    python benchmarks/bench_predict.py                       # ucsd-ct covid folder from ../shared
    python benchmarks/bench_predict.py --run /tmp/runs/ucsd-a-mnv2 --e2e-images 128 --iters 3

Without ``--run`` a paper-B MobileNet (v1) run with random weights (``weights: none``) is built on the fly;
without ../shared, CT phantoms are written to a temporary folder. Other processes on the machine make the
numbers noisy: check ``uptime`` first. ``--json OUT`` also writes every figure, each with its ``ratio`` to
the plain baseline, and the CPU's model and instruction sets (AVX2, AVX-512, VNNI, bf16, AMX).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from covidscan.config import load_config
from covidscan.evaluation import Calibration
from covidscan.export import export_onnx
from covidscan.inference import Predictor, predict
from covidscan.io import list_images, read_image
from covidscan.models import FastClassifier, bf16_supported, build_model
from covidscan.preprocess import PreprocessConfig, eval_transform, prepare_image, prepare_paths
from covidscan.runs import LoadedRun, load_run, save_run
from covidscan.system import keep_freed_memory

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "ucsd-ct" / "covid"


Job = Callable[[], object]


def rate(fn: Job, images: int, iters: int, warm: Job | None = None) -> float:
    """Images per second of ``fn``: a warm-up call (``warm``, default ``fn``), then the best of ``iters``."""
    (warm or fn)()
    best = float("inf")
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return images / best


def images_folder(args: argparse.Namespace, tmp: Path) -> Path:
    if args.data is not None:
        return args.data
    if SHARED.is_dir():
        return SHARED
    from covidscan.data.synthetic import write_phantom_dataset

    return write_phantom_dataset(tmp / "phantoms", n=max(args.e2e_images, 64), slices_per_patient=2).parent


def bench_prepare(paths: list[str], workers: int, iters: int) -> list[tuple[str, float, float]]:
    """One thread (the baseline) and ``workers`` threads."""
    cfg = PreprocessConfig(modality="ct")
    rows = []
    for w in sorted({1, workers}):
        job = partial(prepare_paths, paths, cfg, (224, 224), workers=w, progress=False)
        label = f"decode+CLAHE+lung crop, {w} thread{'s' if w > 1 else ''}"
        r = rate(job, len(paths), iters)
        rows.append((label, r, r / rows[0][1] if rows else 1.0))
    return rows


def bench_backbone(name: str, size: int, batch: int, iters: int) -> list[tuple[str, float, float]]:
    model = build_model({"backbone": name, "weights": "none", "head": "paper_a", "input_size": size}).eval()
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        eager = rate(lambda: model(x), batch, iters)
    rows = [(f"{name} b{batch} eager fp32", eager, 1.0)]
    dtypes = [torch.float32] + ([torch.bfloat16] if bf16_supported() else [])
    xc = x.contiguous(memory_format=torch.channels_last)
    for dtype in dtypes:
        fast = FastClassifier(model, dtype)
        with torch.inference_mode():
            r = rate(lambda fast=fast: fast(xc), batch, iters)
        rows.append((f"{name} b{batch} folded+CL {str(dtype).removeprefix('torch.')}", r, r / eager))
    return rows


def sequential_eager(run: LoadedRun, paths: list[str]) -> None:
    """The plain pipeline: one file at a time, read, preprocess, transform, forward in fp32."""
    model = run.model
    transform = eval_transform(model.input_size, mean=model.mean, std=model.std)
    with torch.no_grad():
        for path in paths:
            prepared = prepare_image(read_image(path), run.config.preprocess, model.input_size)
            # contiguous(): v2.RGB expands the gray channel (stride 0), which sends oneDNN down a slow path
            model(transform(prepared.pixels).unsqueeze(0).contiguous())


def on_the_fly_run(tmp: Path) -> Path:
    cfg = load_config("paper-b-mobilenet", ["model.weights=none", "model.input_size=224"])
    model = build_model(cfg.model).eval()
    save_run(tmp / "run", cfg, model, Calibration())
    return tmp / "run"


def bench_predictor(run_dir: Path, paths: list[str], batch: int) -> list[tuple[str, float]]:
    """Seconds: loading a Predictor, its first call, then per image on later calls (1 image, a batch)."""
    start = time.perf_counter()
    predictor = Predictor.from_run(run_dir)
    loaded = time.perf_counter()
    predictor.predict(paths[:1])
    first = time.perf_counter()
    single = min(timed(lambda: predictor.predict(paths[:1])) for _ in range(5))
    many = min(timed(lambda: predictor.predict(paths[:batch])) for _ in range(2)) / batch
    return [("Predictor.from_run", loaded - start), ("first predict call, 1 image", first - loaded),
            ("later call, 1 image", single), (f"later call, per image in a call of {batch}", many)]


def timed(fn: Job) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="trained run directory (default: random paper-B MobileNet)")
    parser.add_argument("--data", type=Path, help="folder of images (default: ucsd-ct/covid or phantoms)")
    parser.add_argument("--decode-images", type=int, default=200)
    parser.add_argument("--e2e-images", type=int, default=192)
    parser.add_argument("--backbones", nargs="+", default=["resnet50", "mobilenet_v2"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=2, help="timed repetitions (best is kept)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own, one per core)")
    parser.add_argument("--json", type=Path, help="also write every figure (ratios, CPU) here")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's default allocator settings (the covidscan CLI changes them)")
    args = parser.parse_args()
    kept = False if args.default_malloc else keep_freed_memory()
    if args.threads:
        # On a busy machine a second OpenMP thread waits for a free core at every layer, which can make
        # small eager batches 100x slower than with one thread; --threads 1 shows that.
        torch.set_num_threads(args.threads)

    begin = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {bf16_supported()}, "
          f"load average {os.getloadavg()[0]:.2f}, freed memory kept (covidscan.system): {kept}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder = images_folder(args, tmp)
        paths = [str(p) for p in list_images(folder)]
        print(f"images: {folder} ({len(paths)} files)\n")
        table: list[tuple[str, str, float, float]] = []
        decode = [str(p) for p in np.resize(paths, args.decode_images)]
        table += [("a", *row) for row in bench_prepare(decode, args.workers, args.iters)]
        for name in args.backbones:
            for batch in (1, args.batch):
                iters = args.iters if batch > 1 else 5 * args.iters
                table += [("b", *row) for row in bench_backbone(name, args.size, batch, iters)]

        run_dir = args.run or on_the_fly_run(tmp)
        latencies = bench_predictor(run_dir, paths, args.batch)
        run = load_run(run_dir)
        e2e = [str(p) for p in np.resize(paths, args.e2e_images)]
        arch = run.config.model.backbone
        base = rate(lambda: sequential_eager(run, e2e), len(e2e), 1, lambda: sequential_eager(run, e2e[:4]))
        table.append(("c", f"{arch}: sequential eager fp32", base, 1.0))
        settings: dict = {}

        torch_engine = Predictor.from_run(run.path, engine="torch", workers=args.workers)

        def fast_predict(files: list[str]) -> None:
            settings.update(predict(torch_engine, files, progress=False).attrs["predict"])

        fast = rate(lambda: fast_predict(e2e), len(e2e), 1, lambda: fast_predict(e2e[:4]))
        table.append(("c", f"{arch}: predict ({settings['precision']})", fast, fast / base))
        onnx = export_onnx(run.path, tmp / "model.onnx")
        onnx_engine = Predictor.from_run(run.path, engine="onnx", onnx_path=onnx, workers=args.workers)
        job = partial(predict, onnx_engine, progress=False)
        r = rate(partial(job, e2e), len(e2e), 1, partial(job, e2e[:4]))
        table.append(("c", f"{arch}: predict, onnxruntime (fp32)", r, r / base))

    print(f"{'':2} {'what':48} {'images/s':>10} {'vs baseline':>12}")
    for part, name, r, ratio in table:
        print(f"{part:2} {name:48} {r:10.1f} {ratio:11.2f}x")
    print(f"\n{'':2} {'a loaded Predictor':48} {'ms':>10}")
    for name, seconds in latencies:
        print(f"{'d':2} {name:48} {1000 * seconds:10.1f}")
    print(f"\ntotal {time.perf_counter() - begin:.0f} s, load average {os.getloadavg()[0]:.2f}")
    if args.json:
        figures = {
            "throughput": [{"part": part, "what": name, "images_per_s": r, "ratio": ratio}
                           for part, name, r, ratio in table],
            "predictor_ms": {name: 1000 * seconds for name, seconds in latencies},
            "cpu": cpu_description(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_average_end": os.getloadavg(),
            "command": " ".join(["python", "benchmarks/bench_predict.py", *sys.argv[1:]]),
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")


def cpu_description() -> dict:
    """The CPU's model and the instruction sets that decide the engines (Linux /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.MULTILINE)
    flags = set(" ".join(re.findall(r"^(?:flags|Features)\s*:(.*)$", text, re.MULTILINE)).split())
    wanted = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI",
              "avx512_bf16": "AVX-512 bf16", "amx_bf16": "AMX bf16", "amx_int8": "AMX int8"}
    return {
        "model": model.group(1).strip() if model else platform.processor(),
        "cores": os.cpu_count(),
        "features": [name for flag, name in wanted.items() if flag in flags],
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": bf16_supported(),
    }


if __name__ == "__main__":
    main()
