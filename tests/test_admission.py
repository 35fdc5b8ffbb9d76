"""Admission and resource limits, done for real: a worker without headroom waits, a full
disk is a transient error that uploads nothing, and a store outage opens the breaker.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from functions.registry import FUNCTIONS
from shared.events import InputRef, JobSubmit
from shared.ids import new_job_id
from shared.jobstate import JobStatus
from shared.runtime import Runtime
from tests.support.nats import consumer_settled, running, submit_job, wait_for_job
from tests.support.s3 import S3Endpoint, unique_bucket
from tests.support.tcpproxy import TcpProxy
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(120)

TRANSCODE_BIG = {"probe": {"stage": "probe", "uses": [":input"]},
                 "encode": {"stage": "transcode", "uses": [":input", "probe"],
                            "params": {"crf": 1, "audio_codec": "aac"}}}
"""A near-lossless encode: about 1 MB out of a 3 s 640x360 clip of about 270 KB."""


def metric(runtime: Runtime, name: str, **labels: str) -> float:
    return runtime.telemetry.registry.get_sample_value(name, labels) or 0.0


async def test_a_worker_without_disk_headroom_leaves_the_task_in_the_stream(
    make_settings: Any, clip_3s: Path
) -> None:
    starved = make_settings(min_free_disk_mb=10**9, admission_poll_s=0.1)
    async with running(starved, [FUNCTIONS["conductor"]], name="conductor") as conductor, \
            running(starved, [FUNCTIONS["probe"]], name="starved") as worker:
        services = conductor.services
        assert services is not None
        job_id = await submit_job(conductor, [clip_3s], steps={
            "probe": {"stage": "probe", "uses": [":input"]}})
        await eventually(lambda: metric(worker, "jetcut_admission_waits_total",
                                        function="probe", reason="disk") >= 1,
                         what="the starved worker to report it waits for disk")

        async def probe_task_published() -> bool:
            info = await services.bus.js.consumer_info(services.names.stages_stream,
                                                       "stage-probe")
            assert info.num_ack_pending == 0  # never taken by the starved worker
            return info.num_pending == 1

        await eventually(probe_task_published, what="the probe task in the stream")
        assert (await services.jobs.get(job_id)).status == JobStatus.QUEUED
    # A worker with room takes the same task and the job finishes.
    roomy = make_settings(min_free_disk_mb=1)
    async with running(roomy, [FUNCTIONS["conductor"], FUNCTIONS["probe"]]) as runtime:
        assert runtime.services is not None
        record = await wait_for_job(runtime.services, job_id)
        assert record.status == JobStatus.SUCCEEDED


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 768 KiB tmpfs: room for the input, not for the output."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=768k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_disk_full_while_encoding_is_retried_and_uploads_nothing(
    make_settings: Any, clip_3s: Path, tiny_disk: Path
) -> None:
    settings = make_settings(work_dir=str(tiny_disk), min_free_disk_mb=0, max_deliver=2)
    async with running(settings, [FUNCTIONS[f] for f in ("conductor", "probe", "transcode")]) \
            as runtime:
        services = runtime.services
        assert services is not None
        job_id = await submit_job(runtime, [clip_3s], steps=TRANSCODE_BIG)
        record = await wait_for_job(services, job_id)
        step = record.steps["encode"]
        assert record.status == JobStatus.FAILED
        # Out of retries, the job says why: disk_full, after both attempts.
        assert record.error is not None and record.error.code == "disk_full"
        assert record.error.details["attempts"] == 2
        # Both deliveries ran and the job shows why each one failed.
        assert step.lease == 2
        assert step.last_error is not None and step.last_error.code == "disk_full"
        assert await services.store.list(f"jobs/{job_id}/encode/") == []
        assert list(tiny_disk.iterdir()) == []  # no temp dir, no partial file left behind


async def test_a_store_outage_opens_the_breaker_and_the_queue_holds_the_work(
    make_settings: Any, clip_3s: Path, s3_server: S3Endpoint
) -> None:
    host, port = s3_server.endpoint.split(":")
    proxy = TcpProxy(host, int(port))
    await proxy.open()
    settings = make_settings(
        store="s3", s3_endpoint=proxy.endpoint, s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key, s3_region=s3_server.region,
        bucket=unique_bucket(), store_breaker_failures=2, store_probe_interval_s=0.2,
        max_deliver=5,  # > failures + 1: a pull already waiting may still take one delivery
    )
    try:
        async with running(settings, [FUNCTIONS["conductor"], FUNCTIONS["probe"]]) as runtime:
            services = runtime.services
            assert services is not None
            key = "uploads/default/u1/clip.mp4"
            info = await services.store.put_file(key, clip_3s)
            await proxy.close()  # the store goes down before the job arrives

            job_id = new_job_id()
            await services.bus.publish(services.names.submit, JobSubmit(
                job_id=job_id, inputs=[InputRef(key=key, filename="clip.mp4", size=info.size)],
                steps=msgspec.convert({"probe": {"stage": "probe", "uses": [":input"]}},
                                      dict[str, Any]),
            ), msg_id=job_id)
            await eventually(lambda: metric(runtime, "jetcut_store_breaker_open") == 1,
                             what="the breaker to open")
            breaker = runtime.loops[0].breaker
            assert breaker is not None
            # A pull already waiting when the breaker opened may still deliver once; after
            # that (fetch_timeout_s = 0.5 s, so by the 5th probe 0.2 s apart) nothing is.
            await eventually(lambda: breaker.failed_probes >= 5, what="five failed probes")
            delivered = (await services.bus.js.consumer_info(
                services.names.jobs_stream, "conductor-submit")).delivered.consumer_seq
            await eventually(lambda: breaker.failed_probes >= 10, what="ten failed probes")
            # Meanwhile nothing was fetched: no delivery burnt, nothing dead-lettered.
            info_now = await services.bus.js.consumer_info(services.names.jobs_stream,
                                                           "conductor-submit")
            assert info_now.delivered.consumer_seq == delivered
            dlq = await services.bus.js.stream_info(services.names.dlq_stream)
            assert dlq.state.messages == 0

            await proxy.open()  # the store is back
            record = await wait_for_job(services, job_id, timeout=30)
            assert record.status == JobStatus.SUCCEEDED
            assert metric(runtime, "jetcut_store_breaker_open") == 0
            assert await consumer_settled(services, services.names.jobs_stream,
                                          "conductor-submit") == (0, 0)
    finally:
        await proxy.close()


async def test_a_stages_own_retry_policy_bounds_its_deliveries(
    make_settings: Any, clip_3s: Path, tmp_path: Path
) -> None:
    # A probe worker whose ffprobe is missing fails every delivery transiently.
    settings = make_settings(retry_policy={"probe": {"max_deliver": 2}},
                             ffprobe=str(tmp_path / "no-ffprobe"))
    async with running(settings, [FUNCTIONS["conductor"], FUNCTIONS["probe"]]) as runtime:
        services = runtime.services
        assert services is not None
        job_id = await submit_job(runtime, [clip_3s], steps={
            "probe": {"stage": "probe", "uses": [":input"]}})
        record = await wait_for_job(services, job_id)
        assert record.error is not None and record.error.code == "retries_exhausted"
        assert "after 2 attempts" in record.error.message
        assert record.steps["probe"].lease == 2
        js = services.bus.js
        stage = await js.consumer_info(services.names.stages_stream, "stage-probe")
        conductor = await js.consumer_info(services.names.jobs_stream, "conductor-submit")
        assert (stage.config.max_deliver, conductor.config.max_deliver) == (2, 5)
