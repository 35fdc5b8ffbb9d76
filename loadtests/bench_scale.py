"""Scale out: jobs/s with 1 and 2 conductor processes x 1 and 2 noop worker processes.

Every conductor and noop worker is its own ``jetcut run`` OS process (``loadtests/fleet.py``)
on one real nats-server (file storage, ``sync_interval: always``); the 3-step no-op pipeline
of the bus benchmark. Each of the four shapes gets its own namespace, a warm-up batch, then
one timed batch (first submit to last terminal record, as a KV watch sees it), and the
audit: every job succeeded, none lost, no step committed twice. CPU seconds per job of the
conductor and worker processes come from ``/proc``.

The rows compare each shape with 1 conductor x 1 worker (ratio > 1: the extra processes
added throughput). On a 2-core machine the processes share two cores with nats-server and
the client, so the ratio says as much about spare CPU as about jetcut.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from loadtests.common import BenchResult, Row, nats_server, say, temp_dir
from loadtests.fleet import Fleet, percentile, summary
from shared.natsserver import NatsServer
from shared.settings import load_settings

NAME = "scale"
SHAPES = ((1, 1), (1, 2), (2, 1), (2, 2))
"""(conductor processes, noop worker processes)."""
WAIT_LIMIT_S = 120.0


async def run_shape(server: NatsServer, work: Path, conductors: int, workers: int, *,
                    n: int, warmup: int) -> dict[str, Any]:
    """One fleet shape: start it, warm it up, time ``n`` jobs, audit them."""
    namespace = f"scale{conductors}x{workers}"
    root = work / namespace
    settings = load_settings(
        {}, nats_url=server.url, namespace=namespace, data_dir=str(root / "data"),
        store="local", store_dir=str(root / "store"), work_dir=str(root / "work"),
        http_port=0, fetch_timeout_s=0.5,
    )
    (root / "work").mkdir(parents=True, exist_ok=True)
    async with Fleet(settings, root) as fleet:
        await fleet.start(conductors, workers)
        await fleet.run_batch(warmup, timeout_s=WAIT_LIMIT_S)  # also waits for start-up
        cpu_before = fleet.cpu_seconds()
        batch = await fleet.run_batch(n, timeout_s=WAIT_LIMIT_S)
        cpu_after = fleet.cpu_seconds()
        audit = await fleet.audit(batch.job_ids)
        dead = fleet.dead()
    cpu = {name: cpu_after[name] - cpu_before.get(name, 0.0) for name in cpu_after}
    conductor_cpu = sum(v for k, v in cpu.items() if k.startswith("conductor"))
    worker_cpu = sum(v for k, v in cpu.items() if k.startswith("noop"))
    return {
        "conductors": conductors, "workers": workers, "jobs": n,
        "succeeded": batch.succeeded, "wall_s": batch.wall_s, "jobs_per_s": batch.jobs_per_s,
        "latency_p50_s": percentile(batch.latencies_s, 50),
        "latency_p99_s": percentile(batch.latencies_s, 99),
        "cpu_ms_per_job": {"conductors": 1000 * conductor_cpu / n,
                           "workers": 1000 * worker_cpu / n},
        "audit": summary(audit), "problems": audit.problems(), "dead": dead,
    }


async def run_all(server: NatsServer, work: Path, *, n: int, warmup: int) -> list[dict[str, Any]]:
    out = []
    for conductors, workers in SHAPES:
        shape = await run_shape(server, work, conductors, workers, n=n, warmup=warmup)
        say(f"  {conductors} conductor(s) x {workers} worker(s): "
            f"{shape['jobs_per_s']:.1f} jobs/s ({shape['succeeded']}/{n} in "
            f"{shape['wall_s']:.2f}s; cpu/job conductors "
            f"{shape['cpu_ms_per_job']['conductors']:.1f} ms, workers "
            f"{shape['cpu_ms_per_job']['workers']:.1f} ms)")
        out.append(shape)
    return out


def run(*, quick: bool) -> BenchResult:
    n = 60 if quick else 300
    warmup = 10 if quick else 30
    result = BenchResult(name=NAME)
    with temp_dir("scale") as work, nats_server(work / "nats") as server:
        say(f"scale: {len(SHAPES)} fleet shapes x {n} jobs, each process a `jetcut run`")
        shapes = asyncio.run(run_all(server, work, n=n, warmup=warmup))
    result.raw["shapes"] = shapes
    base = shapes[0]
    for shape in shapes:
        label = f"{shape['conductors']} conductor x {shape['workers']} noop processes"
        problems = shape["problems"] or shape["dead"]
        result.rows.append(Row(
            benchmark=NAME, metric=f"3-step no-op pipeline, {n} jobs, {label}",
            unit="jobs/s", jetcut=shape["jobs_per_s"],
            peer_name="1 conductor x 1 noop (same run)" if shape is not base else "",
            peer=base["jobs_per_s"] if shape is not base else None,
            note="audit failed" if problems else "",
        ))
        if problems:
            result.error = (result.error or "") + f"{label}: {problems}\n"
    result.notes += [
        "CPU per job (user+system, /proc) — " + "; ".join(
            f"{s['conductors']}x{s['workers']}: conductors "
            f"{s['cpu_ms_per_job']['conductors']:.1f} ms, workers "
            f"{s['cpu_ms_per_job']['workers']:.1f} ms" for s in shapes) + ".",
        "Latency submit -> succeeded (p50 / p99) — " + "; ".join(
            f"{s['conductors']}x{s['workers']}: {_ms(s['latency_p50_s'])} / "
            f"{_ms(s['latency_p99_s'])}" for s in shapes) + ".",
        "Every shape's audit (loadtests/fleet.py): 0 lost, 0 duplicate step commits, every "
        "job succeeded, unless an error says otherwise.",
        "The processes, nats-server and the client share this machine's cores: a ratio "
        "near 1 on 2 cores means the CPU, not jetcut's design, is the limit "
        "(docs/scaling.md).",
    ]
    return result


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value * 1000:.0f} ms"
