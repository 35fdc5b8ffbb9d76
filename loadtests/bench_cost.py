"""Cost-model accuracy: predicted against measured step time, on the corpus and on repeats.

One in-process Runtime (conductor, probe, transcode, calibrate) on a real nats-server,
local store, ``JETCUT_COST_CACHE_S`` tiny so the conductor predicts with exactly what KV
holds. Each job is ``probe`` then ``transcode`` of one file, run one at a time; before a
job the benchmark snapshots the ``costs`` bucket, and after it (once ``calibrate`` has
counted it) compares each step's measured ``elapsed_s`` with what the model predicted from
the snapshot, the same figure the conductor put on the task.

* **corpus**: the video items of ``tests/support/corpus.py`` (tiny, 1-3 s, every codec and
  oddity), twice over: the first pass is what a fresh deployment predicts (priors, then
  whatever the items before taught it), the second pass the calibrated model.
* **repeats**: one 10 s 640x360 clip (``--quick``: 5 s) submitted again and again; the
  first job is cold, the rest are the figure.

The figure is the median of ``|predicted - measured| / measured`` over steps; the target
is <= 25 % (issue 12). Bounded: about 70 jobs (``--quick`` 12), a few minutes on 2 cores.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from loadtests.bench_render import make_clip
from loadtests.common import BenchResult, Row, load_functions, nats_server, say, temp_dir
from shared.costmodel import CostEntry, job_probe, predict, step_work
from shared.events import InputRef, JobSubmit, StepSpec
from shared.function import Services
from shared.ids import new_job_id
from shared.jobstate import JobRecord, JobStatus
from shared.media import find_binaries
from shared.runtime import Runtime
from shared.settings import load_settings

NAME = "cost"
JOB_LIMIT_S = 300.0
STEPS = {"probe": StepSpec(stage="probe", uses=[":input"]),
         "encode": StepSpec(stage="transcode", uses=[":input", "probe"])}
LONG_S = 0.5
"""Steps at least this long are also reported apart: a probe's ~0.1 s is mostly noise."""
QUICK_ITEMS = ("h264-aac", "vp9-opus", "rotate-90", "hevc-8bit")


def run(*, quick: bool = False) -> BenchResult:
    return asyncio.run(_run(quick))


async def _run(quick: bool) -> BenchResult:
    from tests.support.corpus import ITEMS, build_corpus

    binaries = find_binaries(load_settings({}))
    names = [i.name for i in ITEMS if i.kind == "video" and (not quick or i.name in QUICK_ITEMS)]
    corpus = build_corpus(binaries, names=names)
    clip = make_clip(binaries, duration=5 if quick else 10, width=640, height=360)
    repeats = 4 if quick else 8
    with temp_dir("cost") as work, nats_server(work / "nats") as server:
        (work / "work").mkdir()
        settings = load_settings(
            {}, nats_url=server.url, namespace="benchcost", data_dir=str(work / "data"),
            store="local", store_dir=str(work / "store"), work_dir=str(work / "work"),
            fetch_timeout_s=0.5, cost_cache_s=0.001,
        )
        runtime = Runtime(settings, load_functions(["conductor", "probe", "transcode",
                                                    "calibrate"]), service_name="bench-cost")
        services = await runtime.start()
        try:
            # One job first, not counted: the first ffmpeg of a process pays for loading
            # the binary and its libraries, which no later step does.
            await _job(services, clip, "warm-up")
            passes: list[list[dict[str, Any]]] = []
            for n in (1, 2):
                say(f"corpus pass {n}: {len(corpus)} items")
                passes.append([await _job(services, built.path, name)
                               for name, built in sorted(corpus.items())])
            say(f"repeats: {repeats} jobs of {clip.name}")
            repeated = [await _job(services, clip, "repeat") for _ in range(repeats)]
        finally:
            await runtime.stop()
    cold, warm = _errors(passes[0]), _errors(passes[1])
    rep = _errors(repeated[1:])
    warm_long = _errors(passes[1], LONG_S)
    result = BenchResult(name=NAME, raw={"corpus": passes, "repeats": repeated})
    result.rows += [
        Row(NAME, "median |pred-meas|/meas, corpus, calibrated (2nd pass)", "%",
            _pct(warm), target_op="<=", target=25, target_on="value",
            note=f"{len(warm)} steps"),
        Row(NAME, "median |pred-meas|/meas, repeated jobs (after the 1st)", "%",
            _pct(rep), target_op="<=", target=25, target_on="value", note=f"{len(rep)} steps"),
        Row(NAME, f"median |pred-meas|/meas, corpus, calibrated, steps >= {LONG_S:g} s", "%",
            _pct(warm_long), note=f"{len(warm_long)} steps (without the probes' ~0.1 s)"),
        Row(NAME, "noise floor: median |median-meas|/meas of the repeated encodes", "%",
            _pct(_spread(repeated[1:])),
            note="the best any prediction could do on this machine now (same work each time)"),
        Row(NAME, "median |pred-meas|/meas, corpus, fresh deployment (1st pass)", "%",
            _pct(cold), note="priors, then what earlier items taught"),
    ]
    failed = [r["item"] for r in passes[0] + passes[1] + repeated if r["status"] != "succeeded"]
    if failed:
        result.notes.append(f"jobs that did not succeed (not counted): {sorted(set(failed))}")
    return result


def _pct(values: list[float]) -> float | None:
    return round(100 * statistics.median(values), 1) if values else None


def _spread(jobs: list[dict[str, Any]]) -> list[float]:
    """How far each measurement of one step is from their median: the error of an oracle
    that knows the median in advance, so what the machine's noise alone costs."""
    measured = [s["measured_s"] for job in jobs for s in job["steps"]
                if s["step"] == "encode" and s["measured_s"] > 0]
    if not measured:
        return []
    middle = statistics.median(measured)
    return [abs(middle - m) / m for m in measured]


def _errors(jobs: list[dict[str, Any]], at_least_s: float = 0.0) -> list[float]:
    return [abs(s["predicted_s"] - s["measured_s"]) / s["measured_s"]
            for job in jobs for s in job["steps"]
            if s["measured_s"] > 0 and s["measured_s"] >= at_least_s]


async def _job(services: Services, path: Path, item: str) -> dict[str, Any]:
    assert services.costs is not None
    book = services.costs.fresh()
    before = await book.entries()
    job_id = new_job_id()
    key = f"uploads/default/{job_id}/{path.name}"
    info = await services.store.put_file(key, path)
    await services.bus.publish(services.names.submit, JobSubmit(
        job_id=job_id, tenant="default", inputs=[InputRef(key=key, filename=path.name,
                                                          size=info.size)],
        steps=STEPS), msg_id=job_id)
    record = await _settled(services, job_id)
    steps = []
    if record.status == JobStatus.SUCCEEDED:
        probe = job_probe(record)
        for name in STEPS:
            step = record.steps[name]
            work = step_work(record, name, None, probe)
            measured = await _measured(book, work.key, before.get(work.key))
            steps.append({"step": name, "key": work.key, "units": work.units,
                          "predicted_s": predict(work, before.get(work.key)),
                          "measured_s": measured,
                          "wall_s": (step.finished_at or 0) - (step.started_at or 0)})
    return {"item": item, "job_id": job_id, "status": str(record.status), "steps": steps}


async def _measured(book: Any, key: str, before: CostEntry | None) -> float:
    """The sample ``calibrate`` added for this job's step (waits for it to be counted)."""
    deadline = time.monotonic() + 30
    count = before.count if before is not None else 0
    while time.monotonic() < deadline:
        entry = await book.entry(key)
        if entry is not None and entry.count > count:
            return float(entry.samples[-1][1])
        await asyncio.sleep(0.05)
    raise RuntimeError(f"calibrate did not count a sample of {key} within 30 s")


async def _settled(services: Services, job_id: str) -> JobRecord:
    deadline = time.monotonic() + JOB_LIMIT_S
    while time.monotonic() < deadline:
        try:
            record = await services.jobs.get(job_id)
        except Exception:
            record = None
        if record is not None and record.terminal:
            return record
        await asyncio.sleep(0.05)
    raise RuntimeError(f"job {job_id} did not finish within {JOB_LIMIT_S:g}s")
