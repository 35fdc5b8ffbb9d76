"""Chaos: jobs through real processes while workers are SIGKILLed and nats-server restarts.

``python -m loadtests.chaos [--jobs N --kills K --restarts R --seed S]`` (``make chaos``),
and ``tests/test_chaos.py`` at a smaller scale. Everything is real and on loopback: a
nats-server with file storage (``sync_interval: always``), the local store, and every
function as its own ``jetcut run`` process: gateway, conductor, janitor, probe, two
transcode workers. A client submits jobs over HTTP with an ``Idempotency-Key`` each and
retries (same key) on 503 or a dropped connection, as a careful client does. Meanwhile a
chaos loop SIGKILLs a random function process (and starts a new one), or SIGKILLs
nats-server and starts it again on the same files.

Then a checker reads what happened and reports the sets the way Jepsen's queue checker
does:

* attempted: idempotency keys the client tried; acknowledged: keys that got a 200/202;
  terminal: acknowledged jobs whose record reached succeeded, failed or cancelled;
* lost: acknowledged but never terminal; unexpected: job records no attempted key explains;
* duplicate jobs: keys with more than one job; duplicate step commits: a step whose result
  was applied more than once (two ``done`` step events on the job's events subject);
* lost outputs: a succeeded job whose step manifest is missing, or whose output object is
  missing or fails the checksum (etag) the manifest recorded;
* DLQ entries against failed steps; orphaned temp dirs left on disk after the janitor ran.

A run passes when lost, unexpected, duplicates, duplicate commits, lost outputs and orphans
are all empty, and every acknowledged job succeeded (the input is valid: nothing should fail).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec

from loadtests.procs import Workers
from shared.bus import connect
from shared.events import DeadLetter, JobEvent, decode
from shared.jobstate import JobRecord, JobStatus, StepStatus
from shared.jobstore import JobNotFound, JobStore
from shared.media import find_binaries
from shared.natsserver import NatsServer, free_port
from shared.settings import Settings, load_settings
from shared.stage import Manifest, manifest_key
from shared.store import LocalStore
from shared.subjects import Names

STEPS = {
    "probe": {"stage": "probe", "uses": [":input"]},
    "encode": {"stage": "transcode", "uses": [":input", "probe"],
               "params": {"max_height": 180, "preset": "veryfast"}},
}
"""Every job: probe, then a small transcode that really moves media through the store."""

STAGE_WORKERS = ("probe", "transcode-1", "transcode-2")
KILLABLE = ("conductor", "janitor", *STAGE_WORKERS)


@dataclass(frozen=True)
class ChaosConfig:
    jobs: int = 50
    kills: int = 4
    restarts: int = 2
    """nats-server SIGKILLed and started again on the same store dir."""
    submit_concurrency: int = 4
    """Requests in flight at once; submissions are paced over the fault window."""
    chaos_interval_s: float = 1.0
    deadline_s: float = 240.0
    seed: int | None = None


@dataclass
class ChaosReport:
    config: dict[str, Any]
    seed: int
    attempted: int = 0
    acknowledged: int = 0
    terminal: int = 0
    succeeded: int = 0
    failed: int = 0
    lost: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    duplicate_jobs: dict[str, list[str]] = field(default_factory=dict)
    duplicate_step_commits: list[str] = field(default_factory=list)
    lost_outputs: list[str] = field(default_factory=list)
    deliveries: dict[int, int] = field(default_factory=dict)
    """How many steps took 1, 2, ... deliveries of their last attempt (more than 1: a
    worker died holding the task)."""
    attempts: dict[int, int] = field(default_factory=dict)
    """How many steps took 1, 2, ... attempts (more than 1: the janitor re-drove them)."""
    dlq_entries: int = 0
    failed_steps: int = 0
    orphaned_temp_dirs: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    client_retries: int = 0
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.lost or self.unexpected or self.duplicate_jobs
                    or self.duplicate_step_commits or self.lost_outputs
                    or self.orphaned_temp_dirs) and self.succeeded == self.acknowledged

    def markdown(self) -> str:
        rows = [
            ("attempted", self.attempted), ("acknowledged (202)", self.acknowledged),
            ("terminal", self.terminal), ("succeeded", self.succeeded),
            ("failed", self.failed), ("lost", len(self.lost)),
            ("unexpected", len(self.unexpected)),
            ("duplicate jobs per idempotency key", len(self.duplicate_jobs)),
            ("duplicate step commits", len(self.duplicate_step_commits)),
            ("lost outputs", len(self.lost_outputs)),
            ("DLQ entries / failed steps", f"{self.dlq_entries} / {self.failed_steps}"),
            ("steps by deliveries (a kill costs a redelivery, not a failure)",
             ", ".join(f"{n}: {c}" for n, c in sorted(self.deliveries.items()))),
            ("steps by attempts (more than 1: re-driven by the janitor)",
             ", ".join(f"{n}: {c}" for n, c in sorted(self.attempts.items()))),
            ("orphaned temp dirs", len(self.orphaned_temp_dirs)),
            ("client retries (503 or dropped connection)", self.client_retries),
        ]
        lines = [f"# Chaos run: {'PASS' if self.ok else 'FAIL'}", "",
                 f"{self.config['jobs']} jobs, {self.elapsed_s:.1f} s, seed {self.seed}", "",
                 "| set | count |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in rows]
        lines += ["", "Faults injected, in order:", ""]
        lines += [f"- {action}" for action in self.actions]
        for name in ("lost", "unexpected", "duplicate_step_commits", "lost_outputs",
                     "orphaned_temp_dirs"):
            items = getattr(self, name)
            if items:
                lines += ["", f"{name}: {', '.join(items[:20])}"]
        return "\n".join(lines) + "\n"


class Chaos:
    """One chaos run: the deployment, the client, the faults and the checker."""

    def __init__(self, config: ChaosConfig, root: Path) -> None:
        self.config = config
        self.root = root
        self.rng = random.Random(config.seed)
        self.seed = config.seed if config.seed is not None else 0
        self.server = NatsServer(root / "nats", server_name="jetcut-chaos")
        self.workers = Workers(root / "procs")
        self.acked: dict[str, str] = {}
        self.attempted: set[str] = set()
        self.client_retries = 0
        self.actions: list[str] = []
        self.http_port = free_port()
        self.work_dir = root / "work"
        self.settings: Settings | None = None

    def _settings(self) -> Settings:
        return load_settings(
            {}, nats_url=self.server.url, namespace="chaos", store="local",
            store_dir=str(self.root / "store"), data_dir=str(self.root / "data"),
            http_port=self.http_port, ack_wait_s=2.0, fetch_timeout_s=0.5,
            backoff_base_s=0.2, backoff_max_s=1.0, drain_grace_s=5.0, min_free_disk_mb=0,
            allow_anonymous=True,
        )

    async def _start(self, name: str) -> None:
        assert self.settings is not None
        function = name.split("-", 1)[0]
        # One host: every process shares the work dir, and the janitor sweeps it.
        extra: dict[str, str] = {"ffmpeg_threads": "1", "work_dir": str(self.work_dir)}
        if function == "gateway":
            extra["http_port"] = str(self.http_port)
        if function == "janitor":
            extra.update(sweep_interval_s="0.5", orphan_after_s="0.5", stuck_after_s="20")
        await self.workers.start(function, self.settings, name=name, **extra)

    async def run(self) -> ChaosReport:
        started = time.monotonic()
        await asyncio.to_thread(self.server.start)
        self.settings = self._settings()
        clip = _make_clip(self.root / "clip.mp4")
        for name in ("gateway", *KILLABLE):
            await self._start(name)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.http_port}",
                                     timeout=10.0) as client:
            await _until_ready(client)
            upload_id = await self._upload(client, clip)
            chaos = asyncio.create_task(self._faults())
            try:
                await self._submit_all(client, upload_id)
                await chaos
            finally:
                # On failure too: a fault loop left running would restart processes after
                # the cleanup stopped them, and leak them.
                chaos.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await chaos
        report = await self._check(started)
        return report

    async def _upload(self, client: httpx.AsyncClient, clip: Path) -> str:
        r = await client.post("/v1/uploads", params={"filename": clip.name},
                              content=clip.read_bytes())
        r.raise_for_status()
        return str(r.json()["upload_id"])

    async def _submit_all(self, client: httpx.AsyncClient, upload_id: str) -> None:
        # Submissions are spread over the whole fault window, so faults hit the gateway's
        # publishes as well as the work in flight.
        window = (self.config.kills + self.config.restarts) * self.config.chaos_interval_s
        gap = window / max(1, self.config.jobs)
        loop = asyncio.get_running_loop()
        start = loop.time()
        limit = asyncio.Semaphore(self.config.submit_concurrency)

        async def submit(i: int) -> None:
            await asyncio.sleep(max(0.0, start + i * gap - loop.time()))  # pacing
            async with limit:
                await self._submit(client, upload_id, f"chaos-{i:05d}")

        await asyncio.gather(*(submit(i) for i in range(self.config.jobs)))

    async def _submit(self, client: httpx.AsyncClient, upload_id: str, key: str) -> None:
        """Submit until acknowledged; a 503 or a dropped connection is retried, same key."""
        self.attempted.add(key)
        deadline = time.monotonic() + self.config.deadline_s / 2
        body = {"steps": STEPS, "input": upload_id}
        while time.monotonic() < deadline:
            try:
                r = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
            except httpx.TransportError:
                r = None
            if r is not None and r.status_code in (200, 202):
                self.acked[key] = r.json()["job_id"]
                return
            if r is not None and r.status_code not in (502, 503, 504):
                raise AssertionError(f"{key}: unexpected {r.status_code} {r.text[:300]}")
            self.client_retries += 1
            await asyncio.sleep(0.2)  # a client's backoff, not a synchronisation

    async def _faults(self) -> None:
        plan = ["kill"] * self.config.kills + ["restart"] * self.config.restarts
        self.rng.shuffle(plan)
        for action in plan:
            await asyncio.sleep(self.rng.uniform(0.5, 1.5) * self.config.chaos_interval_s)
            if action == "restart":
                self.actions.append("nats-server SIGKILLed and restarted")
                await asyncio.to_thread(self.server.kill)
                await asyncio.to_thread(self.server.start)
            else:
                victim, busy = self._victim()
                self.actions.append(f"{victim} SIGKILLed{' mid-encode' if busy else ''} "
                                    "and started again")
                await self.workers.kill(victim)
                await self._start(victim)

    def _victim(self) -> tuple[str, bool]:
        """Where a kill hurts most: a stage worker running ffmpeg right now, if there is
        one; otherwise any function process (the conductor and janitor included)."""
        busy = [name for name in STAGE_WORKERS
                if _has_children(self.workers.procs[name].pid)]
        if busy and self.rng.random() < 0.8:
            return self.rng.choice(busy), True
        return self.rng.choice(KILLABLE), False

    async def _check(self, started: float) -> ChaosReport:
        assert self.settings is not None
        names = Names(self.settings.namespace)
        nc = await connect(self.settings, name="chaos-checker")
        try:
            js = nc.jetstream()
            jobs = JobStore(await js.key_value(names.jobs_bucket))
            records = await self._await_terminal(jobs)
            report = ChaosReport(config=asdict(self.config), seed=self.seed,
                                 attempted=len(self.attempted), acknowledged=len(self.acked),
                                 actions=self.actions, client_retries=self.client_retries)
            acked_ids = set(self.acked.values())
            report.terminal = sum(1 for i in acked_ids if i in records and records[i].terminal)
            report.succeeded = sum(1 for r in records.values()
                                   if r.job_id in acked_ids and r.status == JobStatus.SUCCEEDED)
            report.failed = sum(1 for r in records.values() if r.status == JobStatus.FAILED)
            report.lost = sorted(i for i in acked_ids
                                 if i not in records or not records[i].terminal)
            report.unexpected = sorted(r.job_id for r in records.values()
                                       if r.idempotency_key not in self.attempted)
            by_key: dict[str, set[str]] = {}
            for r in records.values():
                by_key.setdefault(r.idempotency_key or "", set()).add(r.job_id)
            report.duplicate_jobs = {k: sorted(v) for k, v in by_key.items() if len(v) > 1}
            report.duplicate_step_commits = await _duplicate_commits(js, names)
            report.lost_outputs = await _lost_outputs(
                LocalStore(self.settings.store_root), records)
            report.dlq_entries = await _count(js, names.dlq_stream, DeadLetter)
            steps = [s for r in records.values() for s in r.steps.values()]
            report.deliveries = dict(Counter(s.lease for s in steps))
            report.attempts = dict(Counter(s.attempt for s in steps))
            report.failed_steps = sum(1 for r in records.values() for s in r.steps.values()
                                      if s.status == StepStatus.FAILED)
            report.orphaned_temp_dirs = await self._orphans_after_sweep()
            report.elapsed_s = round(time.monotonic() - started, 1)
            return report
        finally:
            await nc.close()

    async def _await_terminal(self, jobs: JobStore) -> dict[str, JobRecord]:
        """Every job record, once every acknowledged job is terminal (or the deadline)."""
        deadline = time.monotonic() + self.config.deadline_s
        while True:
            records: dict[str, JobRecord] = {}
            for job_id in await jobs.job_ids():
                with contextlib.suppress(JobNotFound):
                    records[job_id] = await jobs.get(job_id)
            pending = [i for i in self.acked.values()
                       if i not in records or not records[i].terminal]
            if not pending or time.monotonic() > deadline:
                return records
            await asyncio.sleep(0.5)  # polling the record, which is the truth

    async def _orphans_after_sweep(self) -> list[str]:
        """Temp dirs left once the workers have stopped and the janitor has had time to
        sweep what the SIGKILLed ones left (a few sweep intervals)."""
        for name in ("gateway", "conductor", *STAGE_WORKERS):
            proc = self.workers.procs[name]
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()
        deadline = time.monotonic() + 15.0
        while True:
            leftovers = sorted(str(p) for p in self.work_dir.glob("jetcut-*"))
            if not leftovers or time.monotonic() > deadline:
                return leftovers
            await asyncio.sleep(0.25)  # the janitor sweeps every 0.5 s


async def _duplicate_commits(js: Any, names: Names) -> list[str]:
    """Steps whose result the conductor applied twice: two ``done`` step events."""
    done: Counter[str] = Counter()
    for event in await _read_all(js, names.events_stream, JobEvent):
        if event.kind == "step" and event.step_status in ("done", "failed", "skipped"):
            done[f"{event.job_id}/{event.step}"] += 1
    return sorted(k for k, n in done.items() if n > 1)


async def _lost_outputs(store: LocalStore, records: dict[str, JobRecord]) -> list[str]:
    lost: list[str] = []
    for record in records.values():
        if record.status != JobStatus.SUCCEEDED:
            continue
        for name, step in record.steps.items():
            if step.status != StepStatus.DONE:
                continue
            if step.cleaned_at is not None:
                # An intermediate the janitor deleted on success: the record must not
                # list what is gone.
                if step.outputs or any(p.outputs for p in step.parts):
                    lost.append(f"{record.job_id}/{name} (cleaned but still listed)")
                continue
            try:
                manifest = msgspec.json.decode(
                    await store.get_bytes(manifest_key(record.job_id, name)), type=Manifest)
            except Exception:
                lost.append(f"{record.job_id}/{name}/manifest.json")
                continue
            for logical, key in manifest.outputs.items():
                try:
                    info = await store.stat(key)
                except Exception:
                    lost.append(key)
                    continue
                if info.etag != manifest.etags.get(logical):
                    lost.append(f"{key} (checksum)")
    return lost


async def _read_all(js: Any, stream: str, cls: Any) -> list[Any]:
    """Every message of ``stream`` decoded as ``cls`` (undecodable ones skipped)."""
    out: list[Any] = []
    info = await js.stream_info(stream)
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await js.get_msg(stream, seq)
            out.append(decode(cls, msg.data))
        except Exception:
            continue
    return out


async def _count(js: Any, stream: str, cls: Any) -> int:
    return len(await _read_all(js, stream, cls))


async def _until_ready(client: httpx.AsyncClient, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if (await client.get("/readyz")).status_code == 200:
                return
        await asyncio.sleep(0.1)
    raise AssertionError("the gateway did not become ready")


def _has_children(pid: int) -> bool:
    """Does ``pid`` have a child process (a stage worker's ffmpeg)? Linux /proc only."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                return True
    return False


def _make_clip(path: Path) -> Path:
    ffmpeg = find_binaries(load_settings({})).ffmpeg
    subprocess.run([ffmpeg, "-v", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc2=size=320x180:rate=25:duration=2", "-f", "lavfi", "-i",
                    "sine=frequency=440:duration=2", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                    "-c:a", "aac", "-shortest", str(path)], check=True)
    return path


async def run_chaos(config: ChaosConfig, root: Path | None = None) -> ChaosReport:
    """Run one chaos scenario in ``root`` (a fresh temp dir when None) and check it."""
    seed = config.seed if config.seed is not None else random.randrange(1 << 30)
    config = ChaosConfig(**{**asdict(config), "seed": seed})
    own = root is None
    root = root or Path(tempfile.mkdtemp(prefix="jetcut-chaos-"))
    chaos = Chaos(config, root)
    try:
        return await chaos.run()
    finally:
        await chaos.workers.stop_all()
        with contextlib.suppress(Exception):
            chaos.server.stop()
        if own:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=300)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--restarts", type=int, default=5)
    p.add_argument("--seed", type=int)
    p.add_argument("--out", default=str(Path(__file__).parent / "reports"))
    args = p.parse_args(argv)
    config = ChaosConfig(jobs=args.jobs, kills=args.kills, restarts=args.restarts,
                         seed=args.seed, deadline_s=max(240.0, args.jobs * 2.0))
    report = asyncio.run(run_chaos(config))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos-latest.md").write_text(report.markdown())
    (out / "chaos-latest.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    print(report.markdown())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
