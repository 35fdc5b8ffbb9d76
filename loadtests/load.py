"""Load: 10,000 no-op jobs and 1,000 tiny real encodes through the whole system.

``python -m loadtests.load [--quick] [--noop N] [--encodes N]`` (``make load``). Everything
is real and on loopback: a nats-server (file storage, ``sync_interval: always``), the local
store, and every function as its own ``jetcut run`` process (gateway, 2 conductors, 2 noop
workers, probe, transcode, thumbnail, janitor, deadletter) with the shipped defaults,
rate limits, per-tenant cap and backpressure included (anonymous callers, as ``jetcut dev``
allows). A client uploads one tiny clip (1 s, 160x90, H.264/AAC) over HTTP and submits
jobs with ``POST /v1/jobs``, each with its own ``Idempotency-Key``, 32 in flight. A ``429``
or ``503`` is a backpressure answer: it is counted by status and error code, and the same
request (same key) is sent again after its ``Retry-After`` (capped at 2 s), as a careful
client does. Any other refusal is counted and not retried.

Three phases, one after the other: the no-op jobs (3-step no-op pipeline), the encodes
(recipe ``web``: probe, transcode with its output checks, poster), then a burst of 1,000
no-op jobs sent 256 at a time, past the per-address rate limit, so that the gateway's
backpressure answers are met rather than merely possible. A watch on the jobs KV
bucket sees every job finish; submit -> done runs from the client's first attempt to the
record's ``finished_at``. A job the gateway accepted (202) that is not terminal when its
phase's deadline passes is **lost** (must be 0).

Writes ``loadtests/reports/load-latest.md`` (``--report`` to change) and exits non-zero when
a job was lost or failed. Bounded: each phase has a deadline, and the run stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec

from loadtests.common import REPORTS, machine_info, now, say, temp_dir
from loadtests.fleet import percentile
from loadtests.procs import Workers
from shared.bus import connect
from shared.media import find_binaries
from shared.natsserver import NatsServer, free_port
from shared.settings import Settings, load_settings
from shared.subjects import Names

NOOP_STEPS = {
    "a": {"stage": "noop", "uses": [":input"]},
    "b": {"stage": "noop", "uses": ["a"]},
    "c": {"stage": "noop", "uses": ["b"]},
}
PROCESSES = (("gateway", 1), ("conductor", 2), ("noop", 2), ("probe", 1), ("transcode", 1),
             ("thumbnail", 1), ("janitor", 1), ("deadletter", 1))
IN_FLIGHT = 32
BURST_IN_FLIGHT = 256
"""The burst phase's requests in flight: well past the per-address rate limit's burst
(200), so that the backpressure answers are exercised, not only possible."""
RETRY_AFTER_CAP_S = 2.0
TERMINAL = {"succeeded", "failed", "cancelled"}


class _Status(msgspec.Struct):
    status: str
    finished_at: float | None = None
    error: Any = None


_status = msgspec.json.Decoder(_Status)


@dataclass
class Phase:
    """One phase's client-side and record-side view."""

    name: str
    jobs: int
    accepted: dict[str, float] = field(default_factory=dict)
    """job id -> time.time() of the first attempt of its request."""
    refused: Counter[str] = field(default_factory=Counter)
    backpressure: Counter[str] = field(default_factory=Counter)
    transport_errors: int = 0
    finished: dict[str, _Status] = field(default_factory=dict)
    wall_s: float = 0.0

    def _finished_at(self, job_id: str) -> float | None:
        record = self.finished.get(job_id)
        return record.finished_at if record is not None else None

    def summary(self) -> dict[str, Any]:
        done = sorted(finished_at - t for j, t in self.accepted.items()
                      if (finished_at := self._finished_at(j)) is not None)
        succeeded = sum(1 for j in self.accepted
                        if j in self.finished and self.finished[j].status == "succeeded")
        return {
            "phase": self.name, "jobs": self.jobs, "accepted": len(self.accepted),
            "succeeded": succeeded,
            "failed": sum(1 for j in self.accepted
                          if j in self.finished and self.finished[j].status != "succeeded"),
            "lost": sorted(j for j in self.accepted if j not in self.finished),
            "refused": dict(self.refused), "backpressure": dict(self.backpressure),
            "transport_errors": self.transport_errors, "wall_s": self.wall_s,
            "jobs_per_s": succeeded / self.wall_s if self.wall_s else 0.0,
            "p50_s": percentile(done, 50), "p95_s": percentile(done, 95),
            "p99_s": percentile(done, 99),
            "errors": dict(Counter(str((s.error or {}).get("code")) for s in
                                   self.finished.values() if s.status != "succeeded")),
        }


class Load:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.server = NatsServer(root / "nats", server_name="jetcut-load")
        self.workers = Workers(root / "procs")
        self.http_port = free_port()
        self.settings: Settings | None = None

    async def start(self) -> None:
        await asyncio.to_thread(self.server.start)
        self.settings = load_settings(
            {}, nats_url=self.server.url, namespace="load", store="local",
            store_dir=str(self.root / "store"), data_dir=str(self.root / "data"),
            http_port=self.http_port, fetch_timeout_s=0.5, allow_anonymous=True,
            min_free_disk_mb=256,
        )
        work = self.root / "work"
        work.mkdir(parents=True, exist_ok=True)
        for function, count in PROCESSES:
            for i in range(count):
                name = f"{function}{i + 1}"
                extra = {"work_dir": str(work), "ffmpeg_threads": "1"}
                if function == "gateway":
                    extra["http_port"] = str(self.http_port)
                await self.workers.start(function, self.settings, name=name, **extra)

    async def stop(self) -> None:
        await self.workers.stop_all()
        await asyncio.to_thread(self.server.stop)

    async def run_phase(self, client: httpx.AsyncClient, name: str, n: int,
                        body: dict[str, Any], deadline_s: float,
                        in_flight: int = IN_FLIGHT) -> Phase:
        assert self.settings is not None
        phase = Phase(name=name, jobs=n)
        nc = await connect(self.settings, name="load-watch")
        all_done = asyncio.Event()
        submitted = asyncio.Event()
        last = 0.0
        try:
            kv = await nc.jetstream().key_value(Names(self.settings.namespace).jobs_bucket)
            watcher = await kv.watchall(ignore_deletes=True)

            async def watch() -> None:
                nonlocal last
                async for entry in watcher:
                    if entry is None or entry.value is None:
                        continue
                    record = _status.decode(entry.value)
                    if record.status in TERMINAL and entry.key not in phase.finished:
                        phase.finished[entry.key] = record
                        last = time.perf_counter()
                        if submitted.is_set() and set(phase.accepted) <= set(phase.finished):
                            all_done.set()

            watching = asyncio.create_task(watch())
            gate = asyncio.Semaphore(in_flight)
            started = time.perf_counter()
            stop_at = time.monotonic() + deadline_s

            async def submit(i: int) -> None:
                async with gate:
                    await self._submit(client, phase, body, f"{name}-{i:06d}", stop_at)

            await asyncio.gather(*(submit(i) for i in range(n)))
            submitted.set()
            say(f"  {name}: {len(phase.accepted)}/{n} accepted in "
                f"{time.perf_counter() - started:.0f}s; backpressure {dict(phase.backpressure)}")
            if set(phase.accepted) <= set(phase.finished):
                all_done.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_done.wait(), max(1.0, stop_at - time.monotonic()))
            phase.wall_s = (last or time.perf_counter()) - started
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watching
            with contextlib.suppress(Exception):
                await watcher.stop()
        finally:
            await nc.close()
        return phase

    async def _submit(self, client: httpx.AsyncClient, phase: Phase, body: dict[str, Any],
                      key: str, stop_at: float) -> None:
        first = time.time()
        while time.monotonic() < stop_at:
            try:
                r = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
            except httpx.TransportError:
                phase.transport_errors += 1
                await asyncio.sleep(0.2)  # a client's backoff, not a synchronisation
                continue
            if r.status_code in (200, 202):
                phase.accepted[r.json()["job_id"]] = first
                return
            code = _code(r)
            if r.status_code in (429, 503):
                phase.backpressure[f"{r.status_code} {code}"] += 1
                wait = float(r.headers.get("Retry-After") or 0.5)
                await asyncio.sleep(min(RETRY_AFTER_CAP_S, max(0.05, wait)))
                continue
            phase.refused[f"{r.status_code} {code}"] += 1
            return
        phase.refused["client deadline"] += 1


def _code(r: httpx.Response) -> str:
    with contextlib.suppress(Exception):
        return str(r.json()["error"]["code"])
    return "?"


def make_clip(path: Path) -> Path:
    """1 s of 160x90 H.264 with AAC audio: the tiny real encode's input."""
    ffmpeg = find_binaries(load_settings({})).ffmpeg
    subprocess.run([ffmpeg, "-v", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc2=size=160x90:rate=25:duration=1", "-f", "lavfi", "-i",
                    "sine=frequency=440:duration=1", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                    "-c:a", "aac", "-shortest", str(path)], check=True)
    return path


async def run_load(root: Path, *, noop: int, encodes: int, burst: int, recipe: str,
                   deadline_s: float) -> list[dict[str, Any]]:
    load = Load(root)
    try:
        await load.start()
        clip = make_clip(root / "tiny.mp4")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{load.http_port}",
                                     timeout=30.0) as client:
            await _until_ready(client, load)
            r = await client.post("/v1/uploads", params={"filename": clip.name},
                                  content=clip.read_bytes())
            r.raise_for_status()
            upload_id = str(r.json()["upload_id"])
            phases = []
            for name, n, body, in_flight in (
                ("noop", noop, {"steps": NOOP_STEPS, "input": upload_id}, IN_FLIGHT),
                ("encode", encodes, {"recipe": recipe, "input": upload_id}, IN_FLIGHT),
                ("burst", burst, {"steps": NOOP_STEPS, "input": upload_id}, BURST_IN_FLIGHT),
            ):
                if n <= 0:
                    continue
                say(f"load: {name} phase, {n} jobs, {in_flight} in flight")
                phase = await load.run_phase(client, name, n, body, deadline_s, in_flight)
                summary = phase.summary()
                say(f"  {name}: {summary['succeeded']}/{summary['accepted']} succeeded, "
                    f"{len(summary['lost'])} lost, {summary['jobs_per_s']:.1f} jobs/s")
                phases.append(summary)
        dead = [n for n, p in load.workers.procs.items() if p.returncode is not None]
        if dead:
            phases.append({"phase": "processes", "dead": dead,
                           "logs": {n: load.workers.log(n)[-1500:] for n in dead}})
        return phases
    finally:
        await load.stop()


async def _until_ready(client: httpx.AsyncClient, load: Load, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if (await client.get("/readyz")).status_code == 200:
                return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the gateway did not become ready: {load.workers.log('gateway1')}")


def markdown(phases: list[dict[str, Any]], *, args: argparse.Namespace,
             elapsed_s: float) -> str:
    machine = machine_info()
    lines = [
        "# jetcut load report (loadtests/load.py, `make load`)",
        "",
        f"- run: {now().isoformat(timespec='seconds')} — mode **"
        f"{'quick' if args.quick else 'full'}**, {elapsed_s / 60:.1f} min in all "
        f"(run with `nice`)",
        f"- machine: {machine['nproc']} x {machine['cpu_model']}, {machine['mem_gib']} GiB, "
        f"Linux {machine['kernel']}, Python {machine['python']}, {machine['nats_server']}; "
        "shared with other work while it ran (figures under CPU contention)",
        "- every function its own `jetcut run` process ("
        + ", ".join(f"{f} x{c}" for f, c in PROCESSES)
        + "), shipped defaults (rate limits, per-tenant cap, backpressure); one nats-server, "
        "file storage, `sync_interval: always`; local store; loopback only",
        f"- client: `POST /v1/jobs`, {IN_FLIGHT} in flight ({BURST_IN_FLIGHT} in the burst "
        f"phase), an `Idempotency-Key` each; 429/503 retried after `Retry-After` (capped at "
        f"{RETRY_AFTER_CAP_S:g} s)",
        "",
        "| phase | jobs | accepted | succeeded | failed | lost | jobs/s | p50 | p95 | p99 "
        "(submit -> done) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in phases:
        if "jobs" not in p:
            continue
        lines.append(
            f"| {p['phase']} | {p['jobs']:,} | {p['accepted']:,} | {p['succeeded']:,} | "
            f"{p['failed']} | **{len(p['lost'])}** | {p['jobs_per_s']:.1f} | {_s(p['p50_s'])} "
            f"| {_s(p['p95_s'])} | {_s(p['p99_s'])} |")
    lines += ["", "Backpressure answers seen (each retried, same key):", ""]
    for p in phases:
        if "jobs" not in p:
            continue
        seen = ", ".join(f"{k}: {v:,}" for k, v in sorted(p["backpressure"].items())) or "none"
        refused = ", ".join(f"{k}: {v}" for k, v in sorted(p["refused"].items())) or "none"
        lines.append(f"- {p['phase']}: {seen}; refused (not retried): {refused}; transport "
                     f"errors: {p['transport_errors']}; failed jobs' codes: "
                     f"{p['errors'] or 'none'}")
    for p in phases:
        if p.get("dead"):
            lines += ["", f"**Processes that exited during the run:** {p['dead']}"]
    lines += [
        "",
        "`429 rate_limited` is the per-address token bucket (50/s, burst 200, anonymous "
        "callers); `429 too_many_active_jobs` the per-tenant cap (1,000 queued + running); "
        "`503 overloaded` a stage's or the conductor's backlog over "
        "`JETCUT_BACKPRESSURE_MAX_PENDING`. A lost job is one the gateway accepted (202) that "
        "never reached a terminal status before the phase's deadline.",
    ]
    return "\n".join(lines) + "\n"


def _s(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value * 1000:.0f} ms" if value < 10 else f"{value:.1f} s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.load", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="300 no-op jobs, 20 encodes, a burst of 300")
    p.add_argument("--noop", type=int, default=None, help="no-op jobs (default 10,000)")
    p.add_argument("--encodes", type=int, default=None, help="encode jobs (default 1,000)")
    p.add_argument("--burst", type=int, default=None,
                   help=f"no-op jobs sent {BURST_IN_FLIGHT} at a time after the encodes, to "
                        "meet the rate limit and the caps (default 1,000; quick 300)")
    p.add_argument("--recipe", default="web", help="recipe of the encode jobs")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds each phase may take (default 2400; quick 300)")
    p.add_argument("--report", type=Path, default=REPORTS / "load-latest.md")
    args = p.parse_args(argv)
    noop = args.noop if args.noop is not None else (300 if args.quick else 10_000)
    encodes = args.encodes if args.encodes is not None else (20 if args.quick else 1_000)
    burst = args.burst if args.burst is not None else (300 if args.quick else 1_000)
    deadline = args.deadline or (300.0 if args.quick else 2400.0)
    began = time.monotonic()
    with temp_dir("load") as root:
        phases = asyncio.run(run_load(root, noop=noop, encodes=encodes, burst=burst,
                                      recipe=args.recipe, deadline_s=deadline))
    text = markdown(phases, args=args, elapsed_s=time.monotonic() - began)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(text)
    print(text)
    say(f"report: {args.report}")
    bad = any(p.get("lost") or p.get("failed") or p.get("dead") for p in phases)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
