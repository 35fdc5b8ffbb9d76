"""``python -m loadtests [--only NAME ...] [--quick]``: run the benchmarks and write the report.

Each benchmark runs on loopback only, bounded in count and time, and stops by itself. A
benchmark that fails is reported as failed; the others still run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from collections.abc import Callable

from loadtests import (
    bench_bus,
    bench_cost,
    bench_fairshare,
    bench_hls,
    bench_memory,
    bench_render,
    bench_scale,
    bench_segment,
    bench_triage,
)
from loadtests.common import (
    BenchResult,
    machine_info,
    now,
    one_line,
    say,
    table,
    write_reports,
)

BENCHMARKS: dict[str, Callable[..., BenchResult]] = {
    bench_bus.NAME: bench_bus.run,
    bench_render.NAME: bench_render.run,
    bench_memory.NAME: bench_memory.run,
    bench_segment.NAME: bench_segment.run,
    bench_cost.NAME: bench_cost.run,
    bench_triage.NAME: bench_triage.run,
    bench_scale.NAME: bench_scale.run,
    bench_hls.NAME: bench_hls.run,
    bench_fairshare.NAME: bench_fairshare.run,
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__)
    p.add_argument("--only", action="append", choices=sorted(BENCHMARKS), metavar="NAME",
                   help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    p.add_argument("--quick", action="store_true",
                   help="smaller counts and files: a smoke run, not figures to quote")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Per-request INFO lines from the HTTP client would drown the progress lines.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    names = args.only or list(BENCHMARKS)
    started = now()
    machine = machine_info()
    results: list[BenchResult] = []
    for name in names:
        say(f"=== {name} ({'quick' if args.quick else 'full'}) ===")
        began = time.perf_counter()
        try:
            result = BENCHMARKS[name](quick=args.quick)
        except Exception as exc:
            traceback.print_exc()
            result = BenchResult(name=name, error=f"{type(exc).__name__}: {exc}")
        result.elapsed_s = time.perf_counter() - began
        say(f"=== {name} done in {result.elapsed_s:.1f}s ===")
        results.append(result)
    md_path, json_path = write_reports(results, quick=args.quick, only=args.only or [],
                                       started=started, machine=machine)
    print()
    print(table(results))
    print()
    for result in results:
        for note in ([f"error: {one_line(result.error)}"] if result.error else []) + result.notes:
            print(f"- [{result.name}] {note}")
    print(f"\nreport: {md_path.relative_to(md_path.parents[2])}  raw: "
          f"{json_path.relative_to(json_path.parents[2])}")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
