"""The review service under load: a real `covidscan serve` process on 127.0.0.1, driven over HTTP.

1. latency: one CT slice at a time, upload to predicted result (the client polls every 20 ms), p50/p95;
2. throughput: ``--clients`` concurrent clients, each sending ``--cases`` one-slice cases and waiting for
   every result: cases per minute from the first upload to the last result;
3. burst: 50 concurrent uploads, then every one of the 50 cases predicted, none lost or duplicated.

Prediction includes the Grad-CAM overlay of every image. The server runs one worker thread (the default).

Usage::

    python benchmarks/bench_service.py --run runs/demo/run
    python benchmarks/bench_service.py --run runs/demo/run --latency 30 --clients 10 --cases 6 --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests/service"))
from service_helpers import start_server

from covidscan.data.synthetic import write_phantom_dataset
from covidscan.service.auth import add_user, new_token
from covidscan.service.settings import ServiceSettings, open_service


def _one_case(http: httpx.Client, image: tuple[str, bytes]) -> float:
    """Upload one slice, poll until predicted; seconds from upload to result."""
    start = time.perf_counter()
    r = http.post("/api/v1/cases", files=[("files", image)])
    r.raise_for_status()
    case_id = r.json()["id"]
    while True:
        status = http.get(f"/api/v1/cases/{case_id}").json()["status"]
        if status == "ready":
            return time.perf_counter() - start
        if status == "failed":
            raise SystemExit(f"case {case_id} failed")
        time.sleep(0.02)


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, required=True, help="run directory to serve")
    parser.add_argument("--latency", type=int, default=20, help="sequential one-slice cases to time")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--cases", type=int, default=5, help="cases per client in the throughput phase")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--out", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        manifest = write_phantom_dataset(Path(tmp) / "phantoms", n=8, modality="ct", seed=3)
        images = [(p.name, p.read_bytes()) for p in sorted(manifest.parent.glob("images/**/*.png"))]
        data_dir = Path(tmp) / "service"
        db, _ = open_service(ServiceSettings(data_dir=data_dir))
        with db.session() as s:
            token = new_token(s, add_user(s, "bench", "submitter", None))
        db.dispose()
        server = start_server(args.run, data_dir, args.port, data_dir / "server.log")
        base = f"http://127.0.0.1:{args.port}"
        headers = {"Authorization": f"Bearer {token}"}
        try:
            with httpx.Client(base_url=base, headers=headers, timeout=300) as http:
                _one_case(http, images[0])  # warm-up: first request, first Grad-CAM
                latencies = [_one_case(http, images[i % len(images)]) for i in range(args.latency)]

            def client_cases(k: int) -> list[float]:
                with httpx.Client(base_url=base, headers=headers, timeout=300) as http:
                    return [_one_case(http, images[(k + i) % len(images)]) for i in range(args.cases)]

            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=args.clients) as pool:
                per_client = list(pool.map(client_cases, range(args.clients)))
            wall = time.perf_counter() - start
            n_cases = sum(len(c) for c in per_client)
            loaded = [t for c in per_client for t in c]

            def burst_upload(i: int) -> int:
                r = httpx.post(
                    f"{base}/api/v1/cases",
                    headers=headers,
                    timeout=300,
                    files=[("files", images[i % len(images)])],
                )
                r.raise_for_status()
                return r.json()["id"]

            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=50) as pool:
                ids = list(pool.map(burst_upload, range(50)))
            uploaded = time.perf_counter() - start
            with httpx.Client(base_url=base, headers=headers, timeout=300) as http:
                while http.get("/healthz").json()["queued"]:
                    time.sleep(0.2)
                statuses = [http.get(f"/api/v1/cases/{i}").json()["status"] for i in ids]
            burst_wall = time.perf_counter() - start
        finally:
            server.terminate()
            server.wait(timeout=60)

    figures = {
        "run": str(args.run),
        "cpus": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "latency_one_slice_s": {
            "n": len(latencies),
            "p50": statistics.median(latencies),
            "p95": _percentile(latencies, 95),
        },
        "throughput": {
            "clients": args.clients,
            "cases": n_cases,
            "wall_s": wall,
            "cases_per_minute": 60 * n_cases / wall,
            "latency_p50_s": statistics.median(loaded),
            "latency_p95_s": _percentile(loaded, 95),
        },
        "burst_50": {
            "distinct_cases": len(set(ids)),
            "ready": statuses.count("ready"),
            "upload_s": uploaded,
            "all_predicted_s": burst_wall,
        },
    }
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
