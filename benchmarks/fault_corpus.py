"""Run the held-out bad-input and fault corpus (tests/faults.py) against the ``covidscan`` command line.

    python benchmarks/fault_corpus.py                  # every scenario, 2 at a time
    python benchmarks/fault_corpus.py -k predict --jobs 2 --json faults.json

Prints one line per scenario as it ends, then a table of verdicts per class of defect and the totals, then
every scenario that is not a clear error or handled. Exits 1 when any verdict is one the corpus must never
give (tests/faults.py ``FAILING``: wrong refusal, traceback, silent wrong, data lost, hang, setup failed).
The tiny run is trained by the source tree under test (``--source``, default this checkout's src/), so a run
that fixes change the format of is always fresh.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="pattern", help="only scenarios whose id contains this text")
    parser.add_argument("--jobs", type=int, default=2, help="scenarios run at once (default 2)")
    parser.add_argument("--json", type=Path, help="write every scenario's result to this file")
    parser.add_argument("--source", type=Path, default=REPO / "src", help="source tree under test")
    parser.add_argument("--work", type=Path, help="folder for the scenarios' files (default: temporary)")
    parser.add_argument("--keep", action="store_true", help="keep every scenario's folder (with --work)")
    args = parser.parse_args(argv)
    sys.path[:0] = [str(args.source.resolve()), str(REPO / "tests")]
    from faults import FAILING, GROUPS, VERDICTS, run_corpus, select, tally

    scenarios = select(args.pattern)
    if not scenarios:
        parser.error(f"no scenario id contains {args.pattern!r}")
    print(f"{len(scenarios)} scenarios, {args.jobs} at a time, source {args.source}", flush=True)
    start = time.monotonic()

    def show(r) -> None:
        detail = f": {r.detail}" if r.detail else ""
        print(f"{r.seconds:6.1f}s  {r.verdict:<13} {r.id}{detail}", flush=True)

    results = run_corpus(scenarios, jobs=args.jobs, work=args.work, source=args.source.resolve(),
                         keep=args.keep, progress=show)
    table = tally(results)
    shown = [v for v in VERDICTS if table["total"][v]]
    print(f"\n{'class':<14}" + "".join(f"{v:>14}" for v in shown))
    for group in [*GROUPS, "total"]:
        if any(table[group].values()):
            print(f"{group:<14}" + "".join(f"{table[group][v]:>14}" for v in shown))
    bad = [r for r in results if r.verdict not in ("clear error", "handled")]
    if bad:
        print(f"\n{len(bad)} scenarios not a clear error or handled:")
        for r in sorted(bad, key=lambda r: (r.verdict, r.id)):
            print(f"  [{r.verdict}] {r.id}: {r.detail}")
    print(f"\n{time.monotonic() - start:.0f} s for {len(results)} scenarios")
    if args.json:
        args.json.write_text(json.dumps({"totals": table["total"], "per_class": table,
                                         "results": [asdict(r) for r in results]}, indent=2))
    return int(any(table["total"][v] for v in FAILING))


if __name__ == "__main__":
    sys.exit(main())
