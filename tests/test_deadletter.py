"""A task whose worker dies on its last delivery ends in the DLQ, and its job fails.

The transcode worker is a real ``jetcut run transcode`` process with ``MaxDeliver`` 2 and a
2 s AckWait. It is SIGKILLed while it runs the task; a fresh worker takes the redelivery and
is SIGKILLed too. Nothing settled that last delivery, so JetStream gives up and announces
it with a max-deliveries advisory; the deadletter function (in-process, with the conductor
and probe) turns it into a DLQ entry and a failed step, and removes the task from STAGES.
"""

from __future__ import annotations

import asyncio
import base64
import signal
from collections.abc import Callable
from typing import Any

import pytest

from functions.registry import FUNCTIONS
from loadtests.procs import Workers
from shared.dlq import get_entry, list_entries
from shared.events import StageTask, decode
from shared.jobstate import JobRecord
from tests.support.nats import consumer_settled, running, submit_job, wait_for_job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

STEP = "slow"
WORKER = {"max_deliver": "2", "ack_wait_s": "2",  # a killed worker's task is back in 2 s
          "ffmpeg_threads": "1"}  # slow enough that every kill lands mid-task


def step_of(record: JobRecord) -> Any:
    return record.steps.get(STEP)


def held_by(delivery: int) -> Callable[[JobRecord], bool]:
    """The record shows the step running under this delivery's lease (or the job ended)."""
    def check(record: JobRecord) -> bool:
        step = step_of(record)
        return record.terminal or (step is not None and step.status == "running"
                                   and step.lease == delivery)
    return check


async def kill(proc: asyncio.subprocess.Process) -> None:
    proc.send_signal(signal.SIGKILL)
    await proc.wait()


async def test_a_worker_lost_on_the_last_delivery_fails_the_job_and_dead_letters_the_task(
    make_settings, workers: Workers, make_clip  # type: ignore[no-untyped-def]
) -> None:
    clip = make_clip("deadletter_30s", duration=30.0, width=640, height=360)
    settings = make_settings()

    async def spawn(name: str) -> asyncio.subprocess.Process:
        return await workers.start("transcode", settings, name=name, **WORKER)

    in_process = [FUNCTIONS[n] for n in ("conductor", "probe", "deadletter")]
    async with running(settings, in_process) as rt:
        services = rt.services
        assert services is not None
        first = await spawn("worker1")
        job_id = await submit_job(rt, [clip], steps={
            "probe": {"stage": "probe", "uses": [":input"]},
            STEP: {"stage": "transcode", "uses": [":input", "probe"],
                   "params": {"preset": "slow", "max_height": 360}},
        })

        # Delivery 1 runs (its ffmpeg reports progress); a second worker boots meanwhile.
        record = await wait_for_job(services, job_id, timeout=30, until=lambda r: r.terminal or (
            held_by(1)(r) and step_of(r).progress > 0))
        assert not record.terminal, record.error
        second = await spawn("worker2")
        await kill(first)

        # The second worker takes delivery 2 (the last): the record shows its lease.
        record = await wait_for_job(services, job_id, timeout=30, until=held_by(2))
        assert not record.terminal, record.error
        await spawn("worker3")  # a live puller, as a supervisor would restart
        await kill(second)

        record = await wait_for_job(services, job_id, timeout=30)
        assert record.status == "failed"
        assert record.error is not None and record.error.code == "retries_exhausted"
        assert "lost on the last delivery" in record.error.message
        step = step_of(record)
        assert step.status == "failed" and step.attempt == 1

        page = await list_entries(services, function="transcode")
        (entry,) = page.entries
        assert entry.subject == "stages.transcode" and entry.num_delivered == 2
        assert entry.error.code == "retries_exhausted" and entry.job_id == job_id
        full = await get_entry(services, entry.seq)
        task = decode(StageTask, base64.b64decode(full.data))
        assert (task.job_id, task.step, task.attempt) == (job_id, STEP, 1)
        assert full.headers["Nats-Msg-Id"] == task.task_id

        info = await services.bus.js.stream_info(rt.names.stages_stream)
        assert info.state.messages == 0, "the exhausted task is still in STAGES"
        assert await consumer_settled(services, rt.names.stages_stream,
                                      "stage-transcode") == (0, 0)
        assert await consumer_settled(services, rt.names.advisories_stream,
                                      "deadletter-stages") == (0, 0)


async def test_advisories_for_settled_messages_are_ignored_and_malformed_ones_dead_lettered(  # type: ignore[no-untyped-def]
    make_settings,
) -> None:
    """An advisory can arrive for a message settled (acked) in the meantime: nothing to do.
    A malformed advisory is poison like any other message: DLQ, never retried."""
    import json

    from shared.subjects import Names

    settings = make_settings()
    async with running(settings, [FUNCTIONS["deadletter"]]) as rt:
        services = rt.services
        assert services is not None
        names, js = services.names, services.bus.js
        subject = Names.max_deliveries(names.stages_stream).replace("*", "stage-noop")
        advisory = {"type": "io.nats.jetstream.advisory.v1.max_deliver", "id": "x",
                    "stream": names.stages_stream, "consumer": "stage-noop",
                    "stream_seq": 4242, "deliveries": 5}
        await js.publish(subject, json.dumps(advisory).encode())
        await js.publish(subject, json.dumps({**advisory, "stream_seq": "four"}).encode())
        await js.publish(subject, json.dumps({**advisory, "stream": "SOMEONE_ELSES"}).encode())
        assert await consumer_settled(services, names.advisories_stream,
                                      "deadletter-stages") == (0, 0)

        page = await list_entries(services)
        assert [(e.function, e.error.code) for e in page.entries] == [
            ("deadletter", "invalid_event"), ("deadletter", "invalid_event")]
        assert "Expected `int`, got `str`" in page.entries[0].error.message
        assert "not one of ours" in page.entries[1].error.message
        assert all(e.num_delivered == 1 for e in page.entries)  # never retried
