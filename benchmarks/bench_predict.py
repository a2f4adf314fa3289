# ruff: noqa: E402 - short_spin_waits() must run before torch is imported
"""Prediction speed on this CPU, each optimised path next to a plain baseline measured in the same run.

    (a) decode + CLAHE + lung crop (prepare_paths, threads)              images/s
    (b) backbone forward, batch 1 and N: eager fp32 (no_grad, NCHW) vs BatchNorm folded + channels_last +
        inference_mode, in fp32 and (where the CPU has native bf16) bf16, the same compiled by
        torch.compile (the compiled engine), and onnxruntime in fp32 and in int8 (static QDQ, calibrated on
        random batches: random weights, so speed only)
    (c) end to end, best of ``--iters`` passes: covidscan.inference.predict on a folder (torch engine,
        compiled, onnxruntime fp32, int8 and engine auto) vs a sequential eager fp32 loop (read ->
        preprocess -> eval_transform -> one image at a time through the model); int8 is the run's own
        (``export_int8`` on a copy of the run, limits loosened so that its speed is measured even where the
        run's check refuses it: the check's figures are printed and written beside it)
    (d) a loaded Predictor: Predictor.from_run (load, fold, engine choice; and with the compiled engine,
        which compiles there, from caches that part (b) has warmed), its first call, and the per-image time
        of later calls (one image, a batch)

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
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from covidscan.system import keep_freed_memory, short_spin_waits

short_spin_waits()  # as the covidscan command does, before torch loads OpenMP

import numpy as np
import torch

from covidscan.config import load_config
from covidscan.evaluation import Calibration
from covidscan.export import MAX_AUC_DELTA, export_int8, export_onnx, quantize_onnx
from covidscan.export.runtime import OnnxModel
from covidscan.inference import Predictor, predict
from covidscan.inference.engines import cpu_features
from covidscan.io import list_images, read_image
from covidscan.models import CompiledClassifier, FastClassifier, bf16_supported, build_model
from covidscan.models.fast import MAX_LABEL_CHANGE
from covidscan.preprocess import PreprocessConfig, eval_transform, prepare_image, prepare_paths
from covidscan.runs import LoadedRun, load_run, save_run

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


def random_run(tmp: Path, name: str, size: int) -> tuple[Path, Path]:
    """A random-weight run of ``name`` with its fp32 ONNX export and an int8 one (speed only)."""
    cfg = load_config("paper-b-mobilenet", [f"model.backbone={name}", "model.weights=none",
                                            "model.head=paper_a", f"model.input_size={size}"])
    run_dir = tmp / f"random-{name}"
    save_run(run_dir, cfg, build_model(cfg.model).eval(), Calibration())
    fp32 = export_onnx(run_dir, run_dir / "model.onnx")
    calibration = [torch.randn(8, 3, size, size).numpy() for _ in range(4)]
    quantize_onnx(fp32, run_dir / "int8.onnx", calibration)
    return fp32, run_dir / "int8.onnx"


def bench_backbone(name: str, size: int, batch: int, iters: int, onnx: tuple[Path, Path]
                   ) -> list[tuple[str, float, float]]:
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
        compiled = CompiledClassifier(fast, batch, (size, size))
        r = rate(lambda compiled=compiled: compiled.forward_pooled(xc), batch, iters)
        rows.append((f"{name} b{batch} compiled {str(dtype).removeprefix('torch.')}", r, r / eager))
    for kind, path in zip(("fp32", "int8"), onnx, strict=True):
        session = OnnxModel(path, threads=torch.get_num_threads())
        r = rate(lambda session=session: session(x), batch, iters)
        rows.append((f"{name} b{batch} onnxruntime {kind}", r, r / eager))
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
            onnx_files = random_run(tmp, name, args.size)
            for batch in (1, args.batch):
                iters = args.iters if batch > 1 else 5 * args.iters
                table += [("b", *row) for row in bench_backbone(name, args.size, batch, iters, onnx_files)]

        run_dir = args.run or on_the_fly_run(tmp)
        latencies = bench_predictor(run_dir, paths, args.batch)
        run = load_run(run_dir)
        e2e = [str(p) for p in np.resize(paths, args.e2e_images)]
        arch = run.config.model.backbone
        base = rate(lambda: sequential_eager(run, e2e), len(e2e), args.iters,
                    lambda: sequential_eager(run, e2e[:4]))
        table.append(("c", f"{arch}: sequential eager fp32", base, 1.0))
        settings: dict = {}

        torch_engine = Predictor.from_run(run.path, engine="torch", workers=args.workers)

        def fast_predict(files: list[str]) -> None:
            settings.update(predict(torch_engine, files, progress=False).attrs["predict"])

        fast = rate(lambda: fast_predict(e2e), len(e2e), args.iters, lambda: fast_predict(e2e[:4]))
        table.append(("c", f"{arch}: predict ({settings['precision']})", fast, fast / base))
        # A copy of the run holding model.onnx and model.int8.onnx: what auto chooses among.
        copy = tmp / "run-copy"
        shutil.copytree(run.path, copy)
        export_onnx(copy, copy / "model.onnx")
        verdict = export_int8(copy, max_label_change=1.0, max_auc_delta=1.0)
        passes = (verdict.labels_changed <= MAX_LABEL_CHANGE * verdict.images
                  and verdict.auc_delta is not None and verdict.auc_delta <= MAX_AUC_DELTA)
        check = {"allowed": passes, "figures": verdict.reason.split(" (")[0] + f", ROC AUC change "
                 f"{verdict.auc_delta}", "images": verdict.images, "labels_changed": verdict.labels_changed,
                 "auc_delta": verdict.auc_delta}
        print(f"the run's int8 check: {'allowed' if passes else 'REFUSED'} ({check['figures']})")
        engines = (("compiled", "compiled"), ("onnx", "onnxruntime (fp32)"), ("int8", "int8 (onnxruntime)"),
                   ("auto", "auto"))
        for engine, what in engines:
            start = time.perf_counter()
            loaded = Predictor.from_run(copy, engine=engine, workers=args.workers, batch_size=args.batch)
            if engine == "compiled":
                # part (b) compiled the same architecture in this process: Inductor's caches are warm
                latencies.append(("Predictor.from_run, compiled engine (warm)", time.perf_counter() - start))
                what += f" ({loaded.precision})"
            job = partial(predict, loaded, progress=False)
            r = rate(partial(job, e2e), len(e2e), args.iters, partial(job, e2e[:4]))
            chose = f" -> {loaded.engine} {loaded.precision}" if engine == "auto" else ""
            table.append(("c", f"{arch}: predict, {what}{chose}", r, r / base))

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
            "cpu": cpu_features(),
            "int8_check": check,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_average_end": os.getloadavg(),
            "command": " ".join(["python", "benchmarks/bench_predict.py", *sys.argv[1:]]),
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
