"""A worker paused past its AckWait loses its task, and its late result is refused.

The transcode worker is a real process, paused with SIGSTOP while it runs the step (the
record says it took delivery 1). JetStream redelivers the task after one AckWait to a second
worker, whose delivery 2 takes the step's lease and finishes the job. Then the first worker
is resumed: its ffmpeg finished long ago, but before uploading anything it checks its lease,
finds it lost, and drops its work. The job's outputs are the second worker's, byte for byte
as its manifest records them, and nothing the first worker made is left anywhere.
"""

from __future__ import annotations

import signal
from typing import Any

import msgspec
import pytest

from functions.registry import FUNCTIONS
from loadtests.procs import Workers
from shared.jobstate import JobRecord, JobStatus
from shared.stage import Manifest, manifest_key
from tests.support.media import MakeClip
from tests.support.nats import consumer_settled, running, submit_job, wait_for_job
from tests.support.waiting import eventually

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

STEPS = {"probe": {"stage": "probe", "uses": [":input"]},
         "encode": {"stage": "transcode", "uses": [":input", "probe"],
                    "params": {"max_height": 360}}}


def encode_taken_by(delivery: int) -> Any:
    def check(record: JobRecord) -> bool:
        step = record.steps.get("encode")
        return record.terminal or (step is not None and step.status == "running"
                                   and step.lease == delivery)
    return check


async def test_a_paused_workers_late_result_is_refused_by_the_fence(
    make_settings: Any, make_clip: MakeClip, workers: Workers
) -> None:
    settings = make_settings()
    clip = make_clip("late_10s", duration=10.0, width=640, height=360)
    worker = {"ack_wait_s": "2", "ffmpeg_threads": "1"}
    async with running(settings, [FUNCTIONS["conductor"], FUNCTIONS["probe"]]) as runtime:
        services = runtime.services
        assert services is not None
        paused = await workers.start("transcode", settings, name="paused", **worker)
        job_id = await submit_job(runtime, [clip], steps=STEPS)

        record = await wait_for_job(services, job_id, until=encode_taken_by(1))
        paused.send_signal(signal.SIGSTOP)
        assert not record.terminal, record.error

        await workers.start("transcode", settings, name="second", **worker)
        await wait_for_job(services, job_id, until=encode_taken_by(2))
        record = await wait_for_job(services, job_id)
        assert record.status == JobStatus.SUCCEEDED, record.error
        encode = record.steps["encode"]
        assert (encode.attempt, encode.lease) == (1, 2)

        paused.send_signal(signal.SIGCONT)
        await eventually(lambda: "lease_lost" in workers.log("paused"), timeout=30,
                         what="the resumed worker to find its lease lost")
        assert paused.returncode is None  # it dropped the task and went on serving

        after = await services.jobs.get(job_id)
        assert after.status == JobStatus.SUCCEEDED
        assert after.steps["encode"].outputs == encode.outputs
        manifest = msgspec.json.decode(
            await services.store.get_bytes(manifest_key(job_id, "encode")), type=Manifest)
        for logical, key in manifest.outputs.items():
            assert (await services.store.stat(key)).etag == manifest.etags[logical]
        assert not list(workers.work_dir("paused").glob("jetcut-*"))
        assert await consumer_settled(services, services.names.stages_stream,
                                      "stage-transcode") == (0, 0)
