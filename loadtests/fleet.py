"""A fleet of ``jetcut run`` processes racing on one pipeline, and the audit of what it did.

Shared by ``tests/test_scale_out.py`` (the correctness proof: several conductor and noop
worker processes, 0 lost, 0 duplicate step commits) and ``loadtests/bench_scale.py`` (the
throughput of 1 and 2 conductors x 1 and 2 workers) and ``loadtests/partitions.py``. The
controlling process only provisions, submits and watches; every conductor and stage worker
is its own OS process (``loadtests.procs.Workers``) sharing nothing but NATS and the store.

The audit reads three independent sources and reports named sets (empty means correct):

* the job records (KV): every submitted job must exist and be terminal (``lost`` otherwise);
* the ``JOBS`` stream's ``jobs.stage.complete`` messages: a (job, step, attempt, delivery)
  stored twice is a deduplication failure, a (job, step, attempt) with results from two
  deliveries is a step that ran twice (``reruns``);
* the ``EVENTS`` stream's step events: a step announced ``done`` twice was committed twice
  by the conductors (``duplicate_commits``), and each finished step of a record must match
  exactly one stored completion of its (attempt, delivery) (``unmatched``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats.errors
from nats.aio.client import Client as NATS

from loadtests.procs import Workers
from shared.events import InputRef, JobEvent, JobSubmit, StageComplete, StepSpec, decode
from shared.function import Services
from shared.ids import new_job_id
from shared.jobstate import JobRecord, StepStatus
from shared.jobstore import JobNotFound
from shared.natsserver import free_port
from shared.runtime import Runtime
from shared.settings import Settings
from shared.subjects import Names

PIPELINE = {
    "a": StepSpec(stage="noop", uses=[":input"]),
    "b": StepSpec(stage="noop", uses=["a"]),
    "c": StepSpec(stage="noop", uses=["b"]),
}
"""The 3-step no-op pipeline of the bus benchmark: nothing but jetcut's machinery."""
PUBLISH_CONCURRENCY = 64
TERMINAL = {"succeeded", "failed", "cancelled"}
INPUT_KEY = "uploads/default/uscaleinput/input.bin"


class _Status(msgspec.Struct):
    """Just enough of a JobRecord to tell whether it is finished (decoding is the cost)."""

    status: str
    created_at: float = 0.0
    finished_at: float | None = None


_status_decoder = msgspec.json.Decoder(_Status)
_MESSAGES = re.compile(r"^jetcut_messages_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$", re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


@dataclass
class Batch:
    """One batch of jobs pushed through the fleet, as the client saw it."""

    job_ids: list[str]
    terminal: int
    succeeded: int
    wall_s: float
    latencies_s: list[float] = field(default_factory=list)

    @property
    def jobs_per_s(self) -> float:
        return self.succeeded / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class Audit:
    """What the records and streams say happened; every list must be empty."""

    jobs: int = 0
    terminal: int = 0
    succeeded: int = 0
    completions: int = 0
    lost: list[str] = field(default_factory=list)
    not_succeeded: list[str] = field(default_factory=list)
    duplicate_stored: list[str] = field(default_factory=list)
    reruns: list[str] = field(default_factory=list)
    duplicate_commits: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)

    def problems(self) -> dict[str, list[str]]:
        """The non-empty sets, by name (for an assertion message)."""
        names = ("lost", "not_succeeded", "duplicate_stored", "reruns", "duplicate_commits",
                 "unmatched")
        return {name: getattr(self, name)[:10] for name in names if getattr(self, name)}


class Fleet:
    """A client runtime (provisions, submits, watches) and ``jetcut run`` processes."""

    def __init__(self, settings: Settings, root: Path) -> None:
        self.settings = settings
        self.workers = Workers(root / "procs")
        self.client = Runtime(settings, [], service_name="scale-client")
        self.services: Services | None = None
        self.inputs: list[InputRef] = []
        self.metrics_ports: dict[str, int] = {}

    async def __aenter__(self) -> Fleet:
        self.services = await self.client.start()
        await self.services.store.put_bytes(INPUT_KEY, b"jetcut", "application/octet-stream")
        self.inputs = [InputRef(key=INPUT_KEY, filename="input.bin", size=6)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.workers.stop_all()
        finally:
            await self.client.stop()

    async def start(self, conductors: int, workers: int, **overrides: str) -> None:
        """``conductors`` x ``jetcut run conductor`` and ``workers`` x ``jetcut run noop``,
        each serving ``/metrics`` on its own loopback port (:meth:`messages_handled`)."""
        names = [("conductor", f"conductor{i + 1}") for i in range(conductors)]
        names += [("noop", f"noop{i + 1}") for i in range(workers)]
        for function, name in names:
            port = free_port()
            self.metrics_ports[name] = port
            await self.workers.start(function, self.settings, name=name,
                                     metrics_port=str(port), **overrides)

    async def messages_handled(self, name: str) -> dict[tuple[str, str], float]:
        """``jetcut_messages_total`` of one process, by (subject kind, outcome): how many
        messages it settled, read from its own ``/metrics``."""
        url = f"http://127.0.0.1:{self.metrics_ports[name]}/metrics"
        async with httpx.AsyncClient(timeout=5.0) as client:
            text = (await client.get(url)).text
        out: dict[tuple[str, str], float] = {}
        for match in _MESSAGES.finditer(text):
            labels = dict(_LABEL.findall(match["labels"]))
            key = (labels.get("subject_kind", ""), labels.get("outcome", ""))
            out[key] = out.get(key, 0.0) + float(match["value"])
        return out

    @property
    def names(self) -> Names:
        return self._services().names

    @property
    def nc(self) -> NATS:
        """The client's own NATS connection (for admin requests such as leader moves)."""
        assert self.client.nc is not None
        return self.client.nc

    def dead(self) -> list[str]:
        """Processes of the fleet that exited (they should serve until stopped)."""
        return [n for n, p in self.workers.procs.items() if p.returncode is not None]

    def logs(self, limit: int = 2000) -> str:
        return "\n".join(f"--- {name}\n{self.workers.log(name)[-limit:]}"
                         for name in self.workers.procs)

    def cpu_seconds(self) -> dict[str, float]:
        """User + system CPU seconds of each live fleet process so far (``/proc``)."""
        ticks = _clock_ticks()
        out: dict[str, float] = {}
        for name, proc in self.workers.procs.items():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                out[name] = (int(stat[11]) + int(stat[12])) / ticks
        return out

    async def run_batch(self, n: int, *, timeout_s: float,
                        job_ids: list[str] | None = None) -> Batch:
        """Submit ``n`` jobs of :data:`PIPELINE` (64 in flight; ``job_ids`` if given) and
        wait until every one is terminal or ``timeout_s`` passes; the clock runs from the
        first submit to the last terminal record, as a KV watch sees them."""
        return await submit_and_watch(self._services(), self.inputs, n, timeout_s=timeout_s,
                                      job_ids=job_ids)

    async def audit(self, job_ids: Iterable[str]) -> Audit:
        return await audit(self._services(), job_ids)

    def _services(self) -> Services:
        assert self.services is not None, "use Fleet as an async context manager"
        return self.services


async def submit_and_watch(services: Services, inputs: list[InputRef], n: int, *,
                           timeout_s: float, job_ids: list[str] | None = None) -> Batch:
    """Publish ``n`` ``JobSubmit`` events and watch the jobs bucket until all are terminal."""
    job_ids = job_ids if job_ids is not None else [new_job_id() for _ in range(n)]
    n = len(job_ids)
    wanted = set(job_ids)
    finished: dict[str, _Status] = {}
    all_done = asyncio.Event()
    last_terminal = 0.0
    # One watch over the whole bucket, opened before the first submit so that no
    # transition is missed; only this batch's jobs count.
    watcher = await services.jobs.kv.watchall(ignore_deletes=True)

    async def watch() -> None:
        nonlocal last_terminal
        async for entry in watcher:
            if entry is None or entry.value is None or entry.key not in wanted:
                continue
            record = _status_decoder.decode(entry.value)
            if record.status in TERMINAL and entry.key not in finished:
                finished[entry.key] = record
                last_terminal = time.perf_counter()
                if len(finished) == n:
                    all_done.set()
                    return

    watching = asyncio.create_task(watch())
    gate = asyncio.Semaphore(PUBLISH_CONCURRENCY)

    async def submit(job_id: str) -> None:
        async with gate:
            event = JobSubmit(job_id=job_id, tenant="default", steps=PIPELINE, inputs=inputs)
            await services.bus.publish(services.names.submit, event, msg_id=job_id)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(submit(job_id) for job_id in job_ids))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_done.wait(), timeout_s)
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watching
        with contextlib.suppress(Exception):
            await watcher.stop()
    wall = (last_terminal or time.perf_counter()) - started
    return Batch(
        job_ids=job_ids, terminal=len(finished),
        succeeded=sum(1 for r in finished.values() if r.status == "succeeded"), wall_s=wall,
        latencies_s=sorted(r.finished_at - r.created_at for r in finished.values()
                           if r.finished_at is not None),
    )


async def audit(services: Services, job_ids: Iterable[str]) -> Audit:
    """Read the records, the stored completions and the step events of ``job_ids``."""
    wanted = list(job_ids)
    names = services.names
    result = Audit(jobs=len(wanted))
    records: dict[str, JobRecord] = {}
    for job_id in wanted:
        with contextlib.suppress(JobNotFound):
            records[job_id] = await services.jobs.get(job_id)
    result.lost = sorted(i for i in wanted if i not in records or not records[i].terminal)
    result.terminal = sum(1 for r in records.values() if r.terminal)
    result.not_succeeded = sorted(i for i, r in records.items() if r.status != "succeeded")
    result.succeeded = len(records) - len(result.not_succeeded)

    mine = set(wanted)
    stored: Counter[tuple[str, str, int, int]] = Counter()
    for data in await read_subject(services, names.jobs_stream, names.stage_complete):
        done = decode(StageComplete, data)
        if done.job_id in mine:
            stored[(done.job_id, done.step, done.attempt, done.delivery)] += 1
    result.completions = sum(stored.values())
    result.duplicate_stored = sorted(f"{j}/{s}#{a}.{d}" for (j, s, a, d), n in stored.items()
                                     if n > 1)
    deliveries: dict[tuple[str, str, int], set[int]] = {}
    for job_id, step, attempt, delivery in stored:
        deliveries.setdefault((job_id, step, attempt), set()).add(delivery)
    result.reruns = sorted(f"{j}/{s}#{a}" for (j, s, a), d in deliveries.items() if len(d) > 1)

    announced: Counter[tuple[str, str]] = Counter()
    for data in await read_subject(services, names.events_stream, names.all("events")):
        with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
            event = decode(JobEvent, data)
            if (event.job_id in mine and event.kind == "step" and event.step is not None
                    and event.step_status == "done"):
                announced[(event.job_id, event.step)] += 1
    result.duplicate_commits = sorted(f"{j}/{s}" for (j, s), n in announced.items() if n > 1)

    for job_id, record in records.items():
        for step_name, state in record.steps.items():
            if state.status == StepStatus.DONE and stored[(job_id, step_name, state.attempt,
                                                           state.lease)] != 1:
                result.unmatched.append(f"{job_id}/{step_name}#{state.attempt}.{state.lease}")
    return result


async def read_subject(services: Services, stream: str, subject: str,
                       *, batch: int = 512) -> list[bytes]:
    """Every stored message of ``subject`` in ``stream``, through an ephemeral pull consumer
    (a few fetches, not one request per message)."""
    js = services.bus.js
    info = await js.stream_info(stream)
    if info.state.messages == 0:
        return []
    sub = await js.pull_subscribe(subject, stream=stream)
    out: list[bytes] = []
    try:
        while True:
            pending = (await sub.consumer_info()).num_pending or 0
            if pending == 0:
                break
            try:
                msgs = await sub.fetch(min(batch, pending), timeout=2.0)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                out.append(msg.data)
                await msg.ack()
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return out


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of sorted ``values`` (None when empty)."""
    if not values:
        return None
    index = min(len(values) - 1, max(0, round(pct / 100 * len(values)) - 1))
    return values[index]


def _clock_ticks() -> int:
    import os

    return os.sysconf("SC_CLK_TCK")


def summary(audit: Audit) -> dict[str, Any]:
    """The audit as counts (for reports)."""
    return {
        "jobs": audit.jobs, "terminal": audit.terminal, "succeeded": audit.succeeded,
        "completions": audit.completions, "lost": len(audit.lost),
        "duplicate_stored": len(audit.duplicate_stored), "reruns": len(audit.reruns),
        "duplicate_commits": len(audit.duplicate_commits), "unmatched": len(audit.unmatched),
    }
