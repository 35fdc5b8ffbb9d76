"""A stage declared without files (``noop``) skips the work dir, the downloads, the manifest
and the lease read before reporting; the lease fence still refuses a superseded delivery.

Real conductor and stage functions on a real nats-server and a local store.
"""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from functions.registry import FUNCTIONS
from shared.events import StageTask
from shared.jobstate import JobStatus, StepStatus, mark_running
from shared.params.core import NoopParams
from shared.stage import StageContext, StageResult, stage
from tests.support.nats import consumer_settled, running, submit_job, wait_for_job

pytestmark = pytest.mark.timeout(60)

NOOP_CHAIN = {"a": {"stage": "noop", "uses": [":input"]}, "b": {"stage": "noop", "uses": ["a"]}}


async def test_a_noop_job_writes_no_manifest_and_no_work_dir(
    make_settings: Any, tmp_path: Path
) -> None:
    settings = make_settings()
    source = tmp_path / "in.bin"
    source.write_bytes(b"jetcut")
    async with running(settings, [FUNCTIONS["conductor"], FUNCTIONS["noop"]]) as runtime:
        services = runtime.services
        assert services is not None
        job_id = await submit_job(runtime, [source], steps=NOOP_CHAIN)
        record = await wait_for_job(services, job_id)
        assert record.status == JobStatus.SUCCEEDED, record.error
        assert [record.steps[s].meta for s in ("a", "b")] == [{"noop": True}] * 2
        assert [record.steps[s].lease for s in ("a", "b")] == [1, 1]
        assert await services.store.list(f"jobs/{job_id}/") == []
        assert list(Path(settings.work_dir).iterdir()) == []


async def test_a_superseded_fileless_delivery_has_its_result_refused(
    make_settings: Any, tmp_path: Path
) -> None:
    """Delivery 1 of a file-less task loses its lease while it runs (a later delivery takes
    it, as after an AckWait): its completion reaches the conductor, which refuses it."""
    settings = make_settings()
    source = tmp_path / "in.bin"
    source.write_bytes(b"jetcut")
    reported = asyncio.Event()

    async def taken_over(task: StageTask, ctx: StageContext[NoopParams]) -> StageResult:
        # What a second worker does when it takes the redelivered task: record its lease.
        await ctx.services.jobs.apply(task.job_id, partial(
            mark_running, step=task.step, attempt=task.attempt, part=task.part, delivery=2))
        reported.set()
        return StageResult(meta={"stale": True})

    noop = stage("noop", taken_over, concurrency=1, files=False)
    async with running(settings, [FUNCTIONS["conductor"], noop]) as runtime:
        services = runtime.services
        assert services is not None
        job_id = await submit_job(runtime, [source], steps={"a": NOOP_CHAIN["a"]})
        await asyncio.wait_for(reported.wait(), 30)
        # The stale completion is consumed (and refused) once the conductor settles it.
        assert await consumer_settled(services, services.names.jobs_stream,
                                      "conductor-complete", timeout=30) == (0, 0)
        assert await consumer_settled(services, services.names.stages_stream,
                                      "stage-noop", timeout=30) == (0, 0)
        record = await services.jobs.get(job_id)
        step = record.steps["a"]
        assert record.status == JobStatus.RUNNING
        assert (step.status, step.lease, step.meta) == (StepStatus.RUNNING, 2, {})
