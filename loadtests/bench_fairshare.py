"""Fair share by predicted compute-seconds (issue 12, item 3; docs/design.md amendment 17).

A real nats-server, local store, one in-process planner (conductor + probe) and one
transcode worker process-alike (a second Runtime, ``JETCUT_CONCURRENCY=1``: one task at a
time, so the order the queue hands out is the whole story). Every job is ``probe`` then
``transcode`` to 180p: the heavy tenant's of a 4 s 640x360 clip (preset veryfast, about a
second each), the light tenant's of a 2 s 320x180 one (ultrafast, a fraction of that).

Phases, each in its own namespace:

* **idle**: the light tenant's jobs alone: its wait to start (submit to the encode's start).
* **heavy alone**: the heavy tenant's backlog of ``H`` jobs alone: its throughput.
* **heavy + light, fair share on**: the same backlog queued first, then the light tenant
  submits a job each time two more heavy encodes have started: the light wait, and the
  heavy throughput.
* **heavy + light, fair share off**: the same, FIFO across tenants (the old behaviour).

Targets (issue 12): the light tenant's wait with the backlog present <= 2x its idle wait;
the heavy tenant's throughput drops by no more than its fair share (two tenants of equal
weight: the light one may take up to half the worker). The worker does not pre-empt: the
light task starts at once only because a worker whose every slot holds bulk work takes it
in an extra slot (``JETCUT_FAIR_EXTRA_SLOTS``, 1); with 0 it waits out the heavy task in
hand (measured at about 6x the idle wait with ~1 s heavy encodes).
Bounded: ``H`` = 16 (``--quick`` 6) plus 3 light jobs per phase, well under 2 minutes.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from loadtests.bench_render import make_clip
from loadtests.common import BenchResult, Row, load_functions, nats_server, say, temp_dir
from shared.events import InputRef, JobSubmit, StepSpec
from shared.function import Services
from shared.ids import new_job_id
from shared.jobstate import JobRecord, JobStatus, StepStatus
from shared.media import find_binaries
from shared.runtime import Runtime
from shared.settings import Settings, load_settings

NAME = "fairshare"
JOB_LIMIT_S = 120.0
STEPS = {tenant: {"probe": StepSpec(stage="probe", uses=[":input"]),
                  "encode": StepSpec(stage="transcode", uses=[":input", "probe"],
                                     params={"preset": preset, "max_height": 180})}
         for tenant, preset in (("heavy", "veryfast"), ("light", "ultrafast"))}
LIGHT_JOBS = 3
HEAVY_BETWEEN = 2
"""Heavy encodes that start between one light job's end and the next light submit."""


def run(*, quick: bool = False) -> BenchResult:
    return asyncio.run(_run(quick))


async def _run(quick: bool) -> BenchResult:
    binaries = find_binaries(load_settings({}))
    clips = {"heavy": make_clip(binaries, duration=4, width=640, height=360),
             "light": make_clip(binaries, duration=2, width=320, height=180)}
    heavy_n = 6 if quick else 16
    with temp_dir("fairshare") as work, nats_server(work / "nats") as server:
        (work / "work").mkdir()

        def settings(namespace: str, **extra: Any) -> Settings:
            return load_settings(
                {}, nats_url=server.url, namespace=namespace, data_dir=str(work / "data"),
                store="local", store_dir=str(work / "store"), work_dir=str(work / "work"),
                fetch_timeout_s=0.5, output_checks=False, ffmpeg_threads=1, **extra)

        say("fairshare: idle (light jobs alone)")
        idle = await _phase(settings, "fsidle", clips, heavy_n=0, fair=True)
        say(f"fairshare: heavy alone ({heavy_n} jobs)")
        alone = await _phase(settings, "fsalone", clips, heavy_n=heavy_n, fair=True, light=0)
        say("fairshare: heavy + light, fair share on")
        fair = await _phase(settings, "fsfair", clips, heavy_n=heavy_n, fair=True)
        say("fairshare: heavy + light, fair share off (FIFO)")
        fifo = await _phase(settings, "fsfifo", clips, heavy_n=heavy_n, fair=False)
    idle_wait = _median(idle["light_waits"])
    fair_wait, fifo_wait = _median(fair["light_waits"]), _median(fifo["light_waits"])
    drop = (1 - fair["heavy_rate"] / alone["heavy_rate"]) * 100 \
        if fair["heavy_rate"] and alone["heavy_rate"] else None
    light_share = fair["light_busy_share"] * 100 if fair["light_busy_share"] else None
    heavy_task = _median(alone["heavy_encode_s"])
    result = BenchResult(name=NAME, raw={"idle": idle, "heavy_alone": alone, "fair": fair,
                                         "fifo": fifo})
    result.rows += [
        Row(NAME, "light tenant's wait to start, heavy backlog present (fair share)", "s",
            fair_wait, "idle system", idle_wait, target_op="<=", target=2,
            note=f"median of {LIGHT_JOBS}; a heavy encode takes ~{_f(heavy_task)} s; the "
                 "light task takes the worker's extra slot (JETCUT_FAIR_EXTRA_SLOTS)"),
        Row(NAME, "light tenant's wait to start, heavy backlog present (FIFO, old)", "s",
            fifo_wait, "idle system", idle_wait,
            note=f"behind what is left of the backlog of {heavy_n} encodes"),
        Row(NAME, "heavy tenant's throughput drop with the light tenant (fair share)", "%",
            round(drop, 1) if drop is not None else None, target_op="<=", target=50,
            target_on="value",
            note=f"its fair share with 2 equal tenants is 50 %; the light jobs took "
                 f"{_f(light_share, 1)} % of the worker's busy time"),
    ]
    return result


def _f(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


async def _phase(settings: Any, namespace: str, clips: dict[str, Path], *, heavy_n: int,
                 fair: bool,
                 light: int = LIGHT_JOBS) -> dict[str, Any]:
    common = {"fair_share": fair, "fair_burst_s": 0.0}
    planner = Runtime(settings(namespace, **common),
                      load_functions(["conductor", "probe"]), service_name="fs-planner")
    services = await planner.start()
    worker: Runtime | None = None
    try:
        heavy = [await _submit(services, clips["heavy"], "heavy") for _ in range(heavy_n)]
        for job_id, _ in heavy:  # the whole backlog is queued before the worker starts
            await _until(services, job_id, _encode_queued)
        worker = Runtime(settings(namespace, concurrency=1, **common),
                         load_functions(["transcode"]), service_name="fs-worker")
        await worker.start()
        submitted: list[tuple[str, float]] = []
        for n in range(light):
            await _heavy_started(services, [j for j, _ in heavy],
                                 min(heavy_n, (n + 1) * HEAVY_BETWEEN))
            submitted.append(await _submit(services, clips["light"], "light"))
            if not heavy:  # idle: one light job at a time, nothing else running
                await _until(services, submitted[-1][0], lambda r: r.terminal)
        lights = [await _until(services, j, lambda r: r.terminal) for j, _ in submitted]
        waits = [r.steps["encode"].started_at - at for r, (_, at) in zip(lights, submitted,
                                                                         strict=True)
                 if r.status == JobStatus.SUCCEEDED and r.steps["encode"].started_at]
        heavies = [await _until(services, j, lambda r: r.terminal) for j, _ in heavy]
    finally:
        if worker is not None:
            await worker.stop()
        await planner.stop()
    encodes = [r.steps["encode"] for r in heavies if r.status == JobStatus.SUCCEEDED]
    rate = None
    if len(encodes) >= 2:
        span = max(s.finished_at or 0 for s in encodes) - min(s.started_at or 0 for s in encodes)
        rate = len(encodes) / span if span > 0 else None
    busy = [(s.finished_at or 0) - (s.started_at or 0) for s in encodes]
    light_busy = [(r.steps["encode"].finished_at or 0) - (r.steps["encode"].started_at or 0)
                  for r in lights if r.status == JobStatus.SUCCEEDED]
    total = sum(busy) + sum(light_busy)
    return {"light_waits": waits, "heavy_rate": rate, "heavy_encode_s": busy,
            "light_busy_share": sum(light_busy) / total if total and heavies else None,
            "failed": [r.job_id for r in [*heavies, *lights] if r.status != JobStatus.SUCCEEDED]}


def _encode_queued(record: JobRecord) -> bool:
    step = record.steps.get("encode")
    return record.terminal or (step is not None and step.status != StepStatus.PENDING)


async def _submit(services: Services, path: Path, tenant: str) -> tuple[str, float]:
    job_id = new_job_id()
    key = f"uploads/{tenant}/{job_id}/{path.name}"
    info = await services.store.put_file(key, path)
    submitted = time.time()
    await services.bus.publish(services.names.submit, JobSubmit(
        job_id=job_id, tenant=tenant,
        inputs=[InputRef(key=key, filename=path.name, size=info.size)], steps=STEPS[tenant]),
        msg_id=job_id)
    return job_id, submitted


async def _heavy_started(services: Services, job_ids: list[str], n: int) -> None:
    deadline = time.monotonic() + JOB_LIMIT_S
    while time.monotonic() < deadline:
        started = 0
        for job_id in job_ids:
            record = await services.jobs.get(job_id)
            started += record.steps["encode"].started_at is not None
        if started >= n:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{n} heavy encodes did not start within {JOB_LIMIT_S:g}s")


async def _until(services: Services, job_id: str, done: Any) -> JobRecord:
    deadline = time.monotonic() + JOB_LIMIT_S
    while time.monotonic() < deadline:
        try:
            record = await services.jobs.get(job_id)
        except Exception:
            record = None
        if record is not None and done(record):
            return record
        await asyncio.sleep(0.05)
    raise RuntimeError(f"job {job_id} did not get there within {JOB_LIMIT_S:g}s")
