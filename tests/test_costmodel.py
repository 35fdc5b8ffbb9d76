"""The cost model: its maths (pure), calibration on real jobs, and what the prediction
drives (a task's deadline, the job view's ETA)."""

from __future__ import annotations

import random
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import pytest

from functions.registry import FUNCTIONS
from shared.costbook import CostBook, job_backlog, job_eta
from shared.costmodel import (
    PRIORS,
    Coefficients,
    CostEntry,
    Work,
    fit,
    job_probe,
    observe,
    pooled,
    predict,
    remaining_s,
    step_work,
    timeout_for,
    work_of,
)
from shared.events import JobEvent, StageTask
from shared.jobstate import JobRecord, JobStatus, StepState, StepStatus
from shared.media.probe import MediaInfo
from tests.support.nats import running, serving_http, submit_job, upload, wait_for_job
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(120)

PROBE_720P = {"format_name": "mov,mp4", "duration_s": 60.0, "streams": [
    {"codec_type": "video", "codec_name": "h264", "width": 1280, "height": 720, "fps": 30.0},
    {"codec_type": "audio", "codec_name": "aac"}]}


def info() -> MediaInfo:
    return msgspec.convert(PROBE_720P, MediaInfo)


# --- pure maths ---------------------------------------------------------------------

def test_work_grows_with_duration_pixels_and_fps_and_parts_split_it() -> None:
    whole = work_of("transcode", {"max_height": 720}, info())
    smaller = work_of("transcode", {"max_height": 360}, info())
    part = work_of("encode-part", {"height": 720}, info(), (0, 15))
    assert whole.units == pytest.approx(60 * 1280 * 720 / 1e6)
    assert smaller.units == pytest.approx(whole.units / 4)
    assert part.units == pytest.approx(whole.units / 15)
    assert work_of("segment", {}, info()).units == 60.0  # not pixel-bound: media seconds
    # A probe runs before anything is known but the input's size (it downloads it).
    assert work_of("probe", {}, None, input_mb=50.0).units == 50.0
    assert predict(work_of("probe", {}, None, input_mb=500.0), None) \
        > predict(work_of("probe", {}, None, input_mb=5.0), None)
    assert whole.key == "transcode.h264-none"
    assert work_of("encode-part", {"height": 720, "preset": "slow"}, info()).key \
        == "encode-part.h264-slow"


def test_cold_start_uses_the_stage_prior_and_a_slower_preset_costs_more() -> None:
    fast = work_of("encode-part", {"height": 720, "preset": "veryfast"}, info())
    slow = work_of("encode-part", {"height": 720, "preset": "slow"}, info())
    prior = PRIORS["encode-part"]
    assert predict(fast, None) == pytest.approx(prior.overhead_s + prior.rate_s * fast.units,
                                                abs=1e-3)
    assert predict(slow, None) > 2 * predict(fast, None)


def test_fit_recovers_a_linear_law_despite_outliers() -> None:
    rng = random.Random(7)
    truth = Coefficients(overhead_s=1.5, rate_s=0.4)
    samples = [(u, truth.seconds(u) * rng.uniform(0.95, 1.05))
               for u in (rng.uniform(1, 100) for _ in range(24))]
    samples += [(50.0, 400.0), (10.0, 300.0)]  # two steps stalled by a noisy neighbour
    got = fit(samples, Coefficients(overhead_s=0.1, rate_s=5.0))
    assert got.rate_s == pytest.approx(0.4, rel=0.1)
    for units in (5.0, 50.0, 90.0):
        assert got.seconds(units) == pytest.approx(truth.seconds(units), rel=0.1)


def test_repeated_work_of_one_size_converges_on_its_median_time() -> None:
    work = Work(stage="transcode", cls="h264-none", units=10.0)
    entry: CostEntry | None = None
    measured = [4.1, 3.9, 4.0, 9.0, 4.2]  # one outlier
    for i, seconds in enumerate(measured):
        entry = observe(entry, work, seconds, f"t{i}")
    assert predict(work, entry) == pytest.approx(statistics.median(measured), rel=1e-3)
    assert entry is not None and entry.count == 5 and len(entry.errors) == 5
    assert observe(entry, work, 100.0, "t4") is entry  # a redelivered sample counts once


def test_a_class_never_seen_starts_from_what_its_stage_measured() -> None:
    h264 = work_of("transcode", {"max_height": 720}, info())
    av1_info = msgspec.convert({**PROBE_720P, "streams": [
        {"codec_type": "video", "codec_name": "av1", "width": 1280, "height": 720,
         "fps": 30.0}]}, MediaInfo)
    av1 = work_of("transcode", {"max_height": 720}, av1_info)
    assert av1.key != h264.key and pooled(av1).key == pooled(h264).key == "transcode._all"
    entry: CostEntry | None = None
    pool: CostEntry | None = None
    for i in range(3):  # h264 measured at 10x the prior, three times
        seconds = 10 * predict(h264, None)
        entry = observe(entry, h264, seconds, f"t{i}", pool)
        pool = observe(pool, pooled(h264), seconds, f"t{i}")
    assert predict(av1, None, pool) == pytest.approx(10 * predict(av1, None), rel=0.01)
    # A slower preset of the same stage: the pooled slope, times the preset's prior factor.
    slow = work_of("transcode", {"max_height": 720, "preset": "slow"}, info())
    assert predict(slow, None, pool) > 2 * predict(h264, entry, pool)


def test_timeout_is_a_multiple_of_the_prediction_within_the_bounds() -> None:
    assert timeout_for(10.0, 6.0, 60.0, 3600.0) == 60.0
    assert timeout_for(100.0, 6.0, 60.0, 3600.0) == 600.0
    assert timeout_for(1000.0, 6.0, 60.0, 3600.0) == 3600.0


def test_eta_follows_the_longest_chain_and_counts_what_is_left() -> None:
    now = time.time()
    record = JobRecord(job_id="j", tenant="t", status=JobStatus.RUNNING, steps={
        "probe": StepState(stage="probe", status=StepStatus.DONE, meta=PROBE_720P),
        "a": StepState(stage="transcode", uses=["probe"], status=StepStatus.RUNNING,
                       started_at=now - 4.0),
        "b": StepState(stage="thumbnail", uses=["probe"], status=StepStatus.READY),
        "c": StepState(stage="concat", uses=["a", "b"]),
    })
    seconds = {"transcode": 10.0, "thumbnail": 2.0, "concat": 3.0, "probe": 1.0}
    eta = remaining_s(record, lambda w: seconds[w.stage], now)
    assert eta == pytest.approx((10.0 - 4.0) + 3.0, abs=0.2)
    record.status = JobStatus.SUCCEEDED
    assert remaining_s(record, lambda w: seconds[w.stage], now) == 0.0
    assert job_probe(record) == info()
    assert step_work(record, "a", None, info()).units > 0


# --- with a real server and real ffmpeg ---------------------------------------------

async def test_calibration_converges_on_real_jobs(make_settings: Any, clip_3s: Path) -> None:
    settings = make_settings(ffmpeg_threads=1, output_checks=False)
    fns = [FUNCTIONS[f] for f in ("conductor", "probe", "transcode", "calibrate")]
    async with running(settings, fns) as runtime:
        services = runtime.services
        assert services is not None and services.costs is not None
        steps = {"probe": {"stage": "probe", "uses": [":input"]},
                 "encode": {"stage": "transcode", "uses": [":input", "probe"]}}
        measured: list[float] = []
        work: Work | None = None
        for n in range(1, 4):
            job_id = await submit_job(runtime, [clip_3s], steps=steps)
            record = await wait_for_job(services, job_id)
            assert record.status == JobStatus.SUCCEEDED, record.error
            encode = record.steps["encode"]
            assert encode.started_at is not None and encode.finished_at is not None
            work = step_work(record, "encode", None, job_probe(record))
            book = services.costs
            await eventually(partial(_counted, book, work, n), timeout=30,
                             what=f"calibration to count job {n}")
            entry = await book.entry(work.key)
            assert entry is not None
            measured.append(entry.samples[-1][1])
        assert work is not None
        entry = await services.costs.fresh().entry(work.key)
        assert entry is not None and [s for _, s in entry.samples] == measured
        # One size of work, measured three times: the model predicts their median.
        assert predict(work, entry) == pytest.approx(statistics.median(measured), rel=0.01)
        # The sample is the step's measured time as the stage reported it.
        assert all(0 < s < 60 for s in measured)


async def _counted(book: CostBook, work: Work, n: int) -> bool:
    entry = await book.fresh().entry(work.key)
    return entry is not None and entry.count >= n


async def test_the_prediction_sets_the_task_deadline(make_settings: Any, clip_3s: Path) -> None:
    # Only the conductor and probe run: the transcode task stays in its stream to be read.
    settings = make_settings(timeout_predicted_factor=6.0, timeout_min_s=1.0,
                             timeout_max_s=10_000.0)
    async with running(settings, [FUNCTIONS[f] for f in ("conductor", "probe")]) as runtime:
        services = runtime.services
        assert services is not None and services.costs is not None
        steps = {"probe": {"stage": "probe", "uses": [":input"]},
                 "encode": {"stage": "transcode", "uses": [":input", "probe"]}}
        first = await submit_job(runtime, [clip_3s], steps=steps)
        record = await wait_for_job(services, first, until=_encode_ready)
        work = step_work(record, "encode", None, job_probe(record))
        # Calibrated: this class of work has measured 100 s each time (far from the prior).
        for i in range(3):
            await services.costs.observe(work, 100.0, f"seed{i}")
        second = await submit_job(runtime, [clip_3s], steps=steps)
        await wait_for_job(services, second, until=_encode_ready)
        tasks = await _stage_tasks(services, "transcode", 2)
        by_job = {t.job_id: t for t in tasks}
        assert by_job[second].predicted_s == pytest.approx(100.0, rel=0.01)
        assert by_job[second].timeout_s == pytest.approx(600.0, rel=0.01)
        prior = predict(work, None)
        assert by_job[first].predicted_s == pytest.approx(prior, rel=0.01)
        assert by_job[first].timeout_s == pytest.approx(max(1.0, 6 * prior), rel=0.01)
        # SSE and the CLI read the same ETA off the job's events: the probe's step event
        # says how long the encode still waiting will take.
        probe_done = await _step_event(services, second, "probe")
        assert probe_done.eta_s == pytest.approx(100.0, abs=0.5)


async def _step_event(services: Any, job_id: str, step: str) -> JobEvent:
    """The job's event announcing ``step`` finished (AssertionError if none comes)."""
    sub = await services.bus.js.subscribe(services.names.events("default", job_id),
                                          ordered_consumer=True)
    try:
        while True:
            msg = await sub.next_msg(timeout=30)
            event = msgspec.json.decode(msg.data, type=JobEvent)
            if event.kind == "step" and event.step == step and event.step_status == "done":
                return event
    finally:
        await sub.unsubscribe()


def _encode_ready(record: JobRecord) -> bool:
    step = record.steps.get("encode")
    return step is not None and step.status == StepStatus.READY


async def _stage_tasks(services: Any, stage: str, n: int) -> list[StageTask]:
    # A work-queue stream allows only explicit-ack pull consumers; these tasks are never
    # acked, so they stay where they are.
    sub = await services.bus.js.pull_subscribe(services.names.stage(stage), durable=None,
                                               stream=services.names.stages_stream)
    try:
        found: list[StageTask] = []
        while len(found) < n:
            for msg in await sub.fetch(n - len(found), timeout=10):
                found.append(msgspec.json.decode(msg.data, type=StageTask))
        return found
    finally:
        await sub.unsubscribe()


async def test_the_job_view_gives_an_eta_while_the_job_runs(
        make_settings: Any, http_port: int, clip_3s: Path) -> None:
    settings = make_settings(http_port=http_port)
    fns = [FUNCTIONS[f] for f in ("gateway", "conductor", "probe")]
    async with serving_http(settings, fns) as (runtime, client):
        services = runtime.services
        assert services is not None
        steps = {"probe": {"stage": "probe", "uses": [":input"]},
                 "encode": {"stage": "transcode", "uses": [":input", "probe"]}}
        job_id = await submit_job(runtime, [clip_3s], steps=steps)
        record = await wait_for_job(services, job_id, until=_encode_ready)
        body = (await client.get(f"/v1/jobs/{job_id}")).json()
        expected = await job_eta(services.costs, record, time.time())
        assert expected is not None and expected > 0
        assert body["eta_s"] == pytest.approx(expected, abs=1.0)


async def test_admission_refuses_a_tenant_over_its_compute_budget(
        make_settings: Any, http_port: int) -> None:
    # No stage workers: what is admitted stays queued, so the tenant's backlog only grows.
    settings = make_settings(http_port=http_port, cost_budget_s=1.0)
    steps = {"probe": {"stage": "probe", "uses": [":input"]},
             "encode": {"stage": "transcode", "uses": [":input", "probe"]}}
    async with serving_http(settings, [FUNCTIONS[f] for f in ("gateway", "conductor")]) \
            as (runtime, client):
        services = runtime.services
        assert services is not None
        upload_id = await upload(client)
        first = await client.post("/v1/jobs", json={"steps": steps, "input": upload_id})
        assert first.status_code == 202, first.text
        record = await services.jobs.get(first.json()["job_id"])
        backlog = await job_backlog(services.costs, record, time.time())
        assert backlog > settings.cost_budget_s  # its steps' priors alone: over the budget
        second = await client.post("/v1/jobs", json={"steps": steps, "input": upload_id})
        assert second.status_code == 429, second.text
        error = second.json()["error"]
        assert error["code"] == "over_budget"
        assert error["details"]["backlog_s"] == pytest.approx(backlog, abs=0.2)
        assert int(second.headers["Retry-After"]) >= 1
        # Once the queued job is gone (cancelled), the tenant is under budget again.
        assert (await client.delete(f"/v1/jobs/{first.json()['job_id']}")).status_code == 202
        await wait_for_job(services, first.json()["job_id"])
        third = await client.post("/v1/jobs", json={"steps": steps, "input": upload_id})
        assert third.status_code == 202, third.text


async def test_an_unreadable_costs_bucket_falls_back_to_the_prior() -> None:
    # The bucket cannot be opened (a deployment whose NATS user may not read it): the
    # prediction is the prior, and no error reaches the caller (a job is never held up).
    async def refuse() -> Any:
        raise PermissionError("not permitted to read the costs bucket")

    book = CostBook(refuse, cache_s=30.0)
    work = work_of("transcode", {"max_height": 720}, info())
    assert await book.predict(work) == predict(work, None)
