"""Fair share by predicted compute-seconds: the lane choice (pure), and with a real server,
real ffmpeg and one worker, that a light tenant's job starts ahead of a heavy tenant's
backlog, where without fair share it waits behind all of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from functions.registry import FUNCTIONS
from shared.fairshare import FairShare, Ledger, bulk_durable, bulk_subject, choose_lane, share_s
from shared.jobstate import JobRecord, JobStatus, StepStatus
from shared.lanes import overtaking_slots
from shared.settings import SettingsError, load_settings
from tests.support.nats import running, submit_job, wait_for_job

pytestmark = pytest.mark.timeout(120)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the lane choice (pure) ---------------------------------------------------------

def test_a_tenant_within_its_share_goes_fast_and_beyond_it_bulk() -> None:
    assert choose_lane(0.0, 60.0) == "fast"
    assert choose_lane(60.0, 60.0) == "fast"
    assert choose_lane(60.5, 60.0) == "bulk"
    assert choose_lane(0.0, 0.0) == "fast"  # a tenant's first work always goes fast


def test_weights_scale_the_share_and_come_from_json() -> None:
    settings = load_settings({"JETCUT_TENANT_WEIGHTS": '{"acme": 2, "beta": 0.5}',
                              "JETCUT_FAIR_BURST_S": "30"})
    assert share_s(settings, "acme") == 60.0
    assert share_s(settings, "beta") == 15.0
    assert share_s(settings, "other") == 30.0
    with pytest.raises(SettingsError, match="JETCUT_TENANT_WEIGHTS"):
        load_settings({"JETCUT_TENANT_WEIGHTS": '{"acme": 0}'})


def test_the_heavier_weight_keeps_more_work_in_the_fast_lane() -> None:
    settings = load_settings({"JETCUT_TENANT_WEIGHTS": '{"acme": 2}',
                              "JETCUT_FAIR_BURST_S": "10"})
    fair = FairShare(settings)
    # Each tenant already has 15 s queued in another job; a new job of four 5-s tasks.
    fair.ledger.note("acme", "a0", 15.0)
    fair.ledger.note("beta", "b0", 15.0)
    # acme's share is 20 s, beta's 10 s: ahead of each task 15, 20, 25, 30 s.
    assert fair.lanes("acme", "a1", 20.0, [5.0] * 4) == ["fast", "fast", "bulk", "bulk"]
    assert fair.lanes("beta", "b1", 20.0, [5.0] * 4) == ["bulk"] * 4
    # A tenant with nothing else queued: its tasks go fast up to its share, then bulk.
    assert fair.lanes("gamma", "c1", 20.0, [5.0] * 4) == ["fast", "fast", "fast", "bulk"]


def test_fair_share_off_sends_everything_fast() -> None:
    fair = FairShare(load_settings({"JETCUT_FAIR_SHARE": "false", "JETCUT_FAIR_BURST_S": "0"}))
    fair.ledger.note("acme", "a0", 1000.0)
    assert fair.lanes("acme", "a1", 50.0, [25.0, 25.0]) == ["fast", "fast"]


def test_the_ledger_forgets_finished_and_stale_jobs() -> None:
    clock = Clock()
    ledger = Ledger(ttl_s=100.0, clock=clock)
    ledger.note("acme", "j1", 30.0)
    ledger.note("acme", "j2", 20.0)
    ledger.note("beta", "j3", 5.0)
    assert ledger.queued("acme") == 50.0
    assert ledger.queued("acme", besides="j1") == 20.0
    ledger.note("acme", "j2", 0.0)  # finished
    assert ledger.queued("acme") == 30.0
    clock.now += 60
    ledger.note("acme", "j4", 10.0)
    clock.now += 50  # j1 last heard of 110 s ago, j4 50 s ago
    assert ledger.queued("acme") == 10.0
    assert ledger.queued("beta") == 0.0
    assert ledger.queued("nobody") == 0.0


def test_a_worker_full_of_bulk_work_may_take_fast_tasks_beyond_its_slots() -> None:
    bulk, fast = "t1.stages.transcode.bulk", "t1.stages.transcode"
    assert overtaking_slots([bulk], 1, 1) == 1
    assert overtaking_slots([bulk, fast], 1, 1) == 0  # the extra slot is taken
    assert overtaking_slots([bulk, bulk], 2, 2) == 2
    assert overtaking_slots([bulk, fast], 2, 1) == 0  # a slot holds fast work: no extra
    assert overtaking_slots([bulk], 2, 1) == 0  # a slot is free: the usual fetch
    assert overtaking_slots([bulk], 1, 0) == 0  # turned off
    assert overtaking_slots([fast], 1, 1) == 0


def test_lane_names() -> None:
    assert bulk_subject("t1.stages.transcode") == "t1.stages.transcode.bulk"
    assert bulk_durable("stage-transcode") == "stage-transcode-bulk"


# --- real server, real ffmpeg, one worker -------------------------------------------

HEAVY_JOBS = 6
STEPS = {"probe": {"stage": "probe", "uses": [":input"]},
         "encode": {"stage": "transcode", "uses": [":input", "probe"],
                    "params": {"preset": "ultrafast", "max_height": 180}}}


def _encode_ready(record: JobRecord) -> bool:
    step = record.steps.get("encode")
    return step is not None and step.status in (StepStatus.READY, StepStatus.RUNNING,
                                                StepStatus.DONE)


async def _order(make_settings: Any, clip: Path, *, fair: bool) -> tuple[list[str], str]:
    """The heavy tenant queues HEAVY_JOBS encodes, then the light tenant one, then a single
    worker (concurrency 1) starts: the order in which it started the encodes (job ids), and
    the light job's id. The order is read off the steps' start times: one worker taking one
    task at a time starts them strictly one after another."""
    settings = make_settings(fair_share=fair, fair_burst_s=0.0, output_checks=False,
                             ffmpeg_threads=1)
    planner = [FUNCTIONS[f] for f in ("conductor", "probe")]
    async with running(settings, planner, name="planner") as runtime:
        services = runtime.services
        assert services is not None
        heavy = [await submit_job(runtime, [clip], steps=STEPS, tenant="heavy")
                 for _ in range(HEAVY_JOBS)]
        for job_id in heavy:  # the whole backlog is queued before the light job comes
            await wait_for_job(services, job_id, until=_encode_ready)
        light = await submit_job(runtime, [clip], steps=STEPS, tenant="light")
        await wait_for_job(services, light, until=_encode_ready)
        worker_settings = make_settings(fair_share=fair, fair_burst_s=0.0, concurrency=1,
                                        output_checks=False, ffmpeg_threads=1)
        async with running(worker_settings, [FUNCTIONS["transcode"]], name="worker"):
            records = [await wait_for_job(services, j, timeout=90) for j in [*heavy, light]]
    assert all(r.status == JobStatus.SUCCEEDED for r in records), [r.error for r in records]
    starts = sorted((r.steps["encode"].started_at or 0.0, r.job_id) for r in records)
    return [job_id for _, job_id in starts], light


async def test_a_light_job_starts_ahead_of_a_heavy_backlog_only_with_fair_share(
        make_settings: Any, make_clip: Any) -> None:
    clip = make_clip("fair", duration=1.0, width=320, height=180, audio=False)
    order, light = await _order(make_settings, clip, fair=True)
    # Queued last, started first: at most the one heavy encode that stayed in the fast lane
    # (its job was the heavy tenant's only queued work when it was published) goes before.
    assert order.index(light) <= 1, order
    # Without fair share the same scenario is FIFO: the light encode starts last.
    order, light = await _order(make_settings, clip, fair=False)
    assert order.index(light) == HEAVY_JOBS, order


async def test_a_queued_job_in_the_bulk_lane_counts_the_fast_lane_ahead(
        make_settings: Any, clip_3s: Path) -> None:
    from functions.gateway.queue import queue_spot, queue_view
    from functions.gateway.quotas import Backlog
    from functions.janitor.sweep import DrainedQueues

    # The conductor alone (no probe worker): the tasks stay where it put them. (A probe,
    # not a noop: a noop's ~0.02 predicted seconds round to a backlog of nothing.)
    settings = make_settings(fair_burst_s=0.0)
    steps = {"p": {"stage": "probe", "uses": [":input"]}}
    async with running(settings, [FUNCTIONS["conductor"]]) as runtime:
        services = runtime.services
        assert services is not None
        heavy = []
        for _ in range(3):
            heavy.append(await submit_job(runtime, [clip_3s], steps=steps, tenant="heavy"))
            await wait_for_job(services, heavy[-1], until=lambda r: r.planned)
        light = await submit_job(runtime, [clip_3s], steps=steps, tenant="light")
        await wait_for_job(services, light, until=lambda r: r.planned)
        # A stage whose only task waits in its bulk lane.
        thumbs = await submit_job(runtime, [clip_3s], tenant="heavy",
                                  steps={"t": {"stage": "thumbnail", "uses": [":input"]}})
        await wait_for_job(services, thumbs, until=lambda r: r.planned)
        spots = {job_id: await queue_spot(services, await services.jobs.get(job_id))
                 for job_id in [*heavy, light]}
        view = {q.stage: q.pending for q in (await queue_view(services)).stages}
        depth = await Backlog(services).depth()
        # The janitor must not take a job waiting in the bulk lane for stuck.
        waiting = await DrainedQueues(services).all_of(await services.jobs.get(thumbs))
    assert view == {"probe": 2, "probe.bulk": 2, "thumbnail.bulk": 1}
    assert depth["probe"] == 4 and depth["thumbnail"] == 1  # backpressure: both lanes
    assert waiting is False
    # Fast lane: the heavy tenant's first job, then the light one; bulk: the other two.
    assert [(s.stage, s.ahead) for s in (spots[heavy[0]], spots[light], spots[heavy[1]],
                                         spots[heavy[2]]) if s is not None] == [
        ("probe", 0), ("probe", 1), ("probe", 2), ("probe", 3)]


def _steps(preset: str) -> dict[str, Any]:
    return {"probe": {"stage": "probe", "uses": [":input"]},
            "encode": {"stage": "transcode", "uses": [":input", "probe"],
                       "params": {"preset": preset, "max_height": 360}}}


async def _light_during_bulk(make_settings: Any, short: Path, long: Path,
                             extra_slots: int) -> tuple[JobRecord, JobRecord]:
    """One worker (concurrency 1) busy with a long bulk-lane encode when a light job comes:
    the bulk job's record and the light job's, once both are done."""
    settings = make_settings(fair_burst_s=0.0, output_checks=False, ffmpeg_threads=1,
                             concurrency=1, fair_extra_slots=extra_slots)
    fns = [FUNCTIONS[f] for f in ("conductor", "probe", "transcode")]
    async with running(settings, fns) as runtime:
        services = runtime.services
        assert services is not None
        # The heavy tenant's first job takes the fast lane, its second (long) one bulk.
        first = await submit_job(runtime, [short], steps=_steps("ultrafast"), tenant="heavy")
        # Slow enough to outlast the light job's probe many times over, even under load.
        bulk = await submit_job(runtime, [long], steps=_steps("slow"), tenant="heavy")
        await wait_for_job(services, first)
        await wait_for_job(services, bulk, until=lambda r: r.steps["encode"].started_at
                           is not None)
        light = await submit_job(runtime, [short], steps=_steps("ultrafast"), tenant="light")
        records = [await wait_for_job(services, j, timeout=90) for j in (bulk, light)]
    assert all(r.status == JobStatus.SUCCEEDED for r in records), [r.error for r in records]
    return records[0], records[1]


async def test_a_worker_busy_with_bulk_work_starts_a_light_task_beside_it(
        make_settings: Any, make_clip: Any) -> None:
    short = make_clip("fair", duration=1.0, width=320, height=180, audio=False)
    long = make_clip("fair-long", duration=40.0, width=640, height=360, audio=False)
    bulk, light = await _light_during_bulk(make_settings, short, long, extra_slots=1)
    # The light encode started while the bulk one still ran (the extra slot) ...
    assert (light.steps["encode"].started_at or 0) < (bulk.steps["encode"].finished_at or 0)
    # ... and without the extra slot it waits until the bulk one is done.
    bulk, light = await _light_during_bulk(make_settings, short, long, extra_slots=0)
    assert (light.steps["encode"].started_at or 0) >= (bulk.steps["encode"].finished_at or 0)
