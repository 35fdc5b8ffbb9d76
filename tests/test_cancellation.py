"""Cancelling queued and running jobs, for real: a running ffmpeg is stopped."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import nats.errors
import pytest

from functions.registry import FUNCTIONS
from shared.events import JobEvent, decode
from shared.function import Services
from tests.support.nats import (
    consumer_settled,
    running,
    submit_job,
    until_http_up,
    wait_for_job,
)
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(120)


async def announced(services: Services, job_id: str) -> list[str]:
    """The job's status announcements, as the EVENTS stream keeps them."""
    subject = services.names.events("default", job_id)
    sub = await services.bus.js.subscribe(subject, ordered_consumer=True)
    statuses: list[str] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1)
            except nats.errors.TimeoutError:
                return statuses
            event = decode(JobEvent, msg.data)
            if event.kind == "status" and event.status is not None:
                statuses.append(event.status)
    finally:
        await sub.unsubscribe()


async def test_cancelling_a_running_job_stops_its_ffmpeg(  # type: ignore[no-untyped-def]
    make_settings, http_port, make_clip, tmp_path
):
    clip = make_clip("long-for-cancel", duration=30.0, width=640, height=360)
    settings = make_settings(http_port=http_port)
    async with running(settings, list(FUNCTIONS.values())) as rt:
        services = rt.services
        assert services is not None
        _, runner = services.media()
        job_id = await submit_job(rt, [clip], steps={
            "probe": {"stage": "probe", "uses": [":input"]},
            "slow": {"stage": "transcode", "uses": [":input", "probe"],
                     "params": {"preset": "slow", "max_height": 360}},
        })
        await wait_for_job(services, job_id,
                           until=lambda r: "slow" in r.steps and r.steps["slow"].progress > 0)
        assert runner.pids, "ffmpeg should be running"
        pids = set(runner.pids)

        async with httpx.AsyncClient(base_url=settings.base_url, timeout=10) as client:
            await until_http_up(client)
            r = await client.delete(f"/v1/jobs/{job_id}")
            assert r.status_code == 202, r.text
            record = await wait_for_job(services, job_id, timeout=5)  # within 5 seconds
            assert record.status == "cancelled"
            assert record.error is not None and record.error.code == "cancelled"
            assert record.steps["slow"].status == "cancelled"
            # The job was cancelling while its ffmpeg stopped; the worker's stop report
            # settled it. Each status was announced once, in order.
            assert await announced(services, job_id) == [
                "queued", "running", "cancelling", "cancelled"]

            await eventually(lambda: not runner.pids, timeout=5, what="ffmpeg to be gone")
            for pid in pids:
                with pytest.raises(ProcessLookupError):
                    os.kill(pid, 0)
            work = Path(settings.work_dir or "")
            await eventually(lambda: not [p for p in work.iterdir()
                                          if p.name.startswith("jetcut-")])
            assert await services.store.list(f"jobs/{job_id}/slow/") == []
            assert await consumer_settled(services, rt.names.stages_stream,
                                          "stage-transcode") == (0, 0)

            again = await client.delete(f"/v1/jobs/{job_id}")
            assert again.status_code == 409
            assert again.json()["error"]["details"]["status"] == "cancelled"
            assert (await client.delete("/v1/jobs/jnosuchjob")).status_code == 404


async def test_a_cancelled_queued_jobs_tasks_are_dropped(make_settings, clip_3s):  # type: ignore[no-untyped-def]
    settings = make_settings()
    planners = [FUNCTIONS["conductor"]]
    async with running(settings, planners) as rt:
        services = rt.services
        assert services is not None
        job_id = await submit_job(rt, [clip_3s], recipe="web")
        await wait_for_job(services, job_id, until=lambda r: r.planned)
        from shared.events import JobCancel

        await services.bus.publish(services.names.cancel, JobCancel(job_id=job_id))
        record = await wait_for_job(services, job_id)
        assert record.status == "cancelled"
        assert {s.status for s in record.steps.values()} == {"cancelled"}
        # The probe task was already queued: a worker that starts now acks and drops it.
        async with running(settings, [FUNCTIONS["probe"]]) as workers:
            assert workers.services is not None
            assert await consumer_settled(workers.services, rt.names.stages_stream,
                                          "stage-probe") == (0, 0)
        assert (await services.jobs.get(job_id)).status == "cancelled"
        assert await services.store.list(f"jobs/{job_id}/") == []
