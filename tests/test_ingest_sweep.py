"""Uploads never missed: the janitor's sweep makes the job of an object whose notification
was lost, exactly once per object version.

Notifications are dropped on purpose: objects are written straight to a real S3 API (moto)
under the ingest prefix and no event is published for them (one gets its notification, as
MinIO would send it). The sweep runs against the real bus, conductor and probe; the results
are named sets that must be empty (objects without a job, objects with more than one).
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import pytest

from functions.conductor import function as conductor
from functions.ingest import function as ingest
from functions.ingest.handler import counter
from functions.janitor.sweep import sweep
from functions.probe import function as probe
from shared.function import Services
from shared.ingestrules import idempotency_key
from tests.support.nats import consumer_settled, running, wait_for_job
from tests.support.s3 import S3Endpoint, unique_bucket
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(120)

FIXTURE = Path(__file__).parent / "fixtures" / "minio_put_event.json"
RULES = [{"prefix": "incoming/", "steps": {"probe": {"stage": "probe", "uses": [":input"]}}}]
GRACE_S = 5.0
MAX_AGE_S = 3600.0


def notification(bucket: str, key: str, etag: str, size: int, sequencer: str) -> bytes:
    """MinIO's event for ``key`` (the fixture's shape, this object's fields)."""
    event: dict[str, Any] = copy.deepcopy(json.loads(FIXTURE.read_text()))
    record = event["Records"][0]
    record["s3"]["bucket"]["name"] = bucket
    record["s3"]["object"].update(key=quote_plus(key), eTag=etag, size=size,
                                  sequencer=sequencer)
    event["Key"] = f"{bucket}/{key}"
    return json.dumps(event).encode()


async def jobs_by_input(services: Services) -> dict[str, list[str]]:
    """Object key -> the jobs that have it as input."""
    found: dict[str, list[str]] = {}
    for job_id in await services.jobs.job_ids():
        record = await services.jobs.get(job_id)
        for ref in record.inputs:
            found.setdefault(ref.key, []).append(job_id)
    return found


async def test_objects_whose_notification_was_lost_get_exactly_one_job(  # type: ignore[no-untyped-def]
    make_settings, s3_server: S3Endpoint, clip_3s
) -> None:
    bucket = unique_bucket()
    settings = make_settings(
        store="s3", s3_endpoint=s3_server.endpoint, s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key, s3_region=s3_server.region, bucket=bucket,
        ingest_rules=RULES, ingest_sweep_grace_s=GRACE_S, ingest_sweep_max_age_s=MAX_AGE_S)
    async with running(settings, [ingest, conductor, probe]) as rt:
        services = rt.services
        assert services is not None
        store, names = services.store, services.names
        keys = [f"incoming/cam{i}/take {i}.mp4" for i in range(4)]
        data = clip_3s.read_bytes()
        for key in keys:
            await store.put_bytes(key, data + key.encode())  # each its own bytes and ETag
        await store.put_bytes("elsewhere/not-ingest.mp4", data)  # outside the prefix
        infos = {info.key: info for info in await store.list("incoming/")}  # as swept
        assert sorted(infos) == sorted(keys)
        t0 = max(info.last_modified for info in infos.values())

        # One upload's notification arrives; the other three are lost.
        announced = keys[0]
        await services.bus.js.publish(names.minio_notifications, notification(
            bucket, announced, infos[announced].etag, len(data) + 1, "18669D4C3D6A2F40"))

        async def announced_has_a_job() -> bool:
            return announced in await jobs_by_input(services)

        await eventually(announced_has_a_job, what="the announced upload's job")

        # Too young (its notification may be on the way) or too old: not the sweep's.
        assert (await sweep(services, now=t0 + 1)).ingest_jobs == []
        assert (await sweep(services, now=t0 + MAX_AGE_S + GRACE_S + 60)).ingest_jobs == []
        assert set(await jobs_by_input(services)) == {announced}

        report = await sweep(services, now=t0 + GRACE_S + 1)
        assert report.errors == []
        assert len(report.ingest_jobs) == 3
        by_input = await jobs_by_input(services)
        without_job = {k for k in keys if k not in by_input}
        duplicated = {k for k, jobs in by_input.items() if len(jobs) > 1}
        assert without_job == set() and duplicated == set()
        assert set(by_input) == set(keys)  # nothing outside the prefix
        # The job id is the one a notification for that object version gives.
        for key in keys[1:]:
            (job_id,) = by_input[key]
            record = await services.jobs.get(job_id)
            assert record.idempotency_key == idempotency_key(bucket, key, infos[key].etag)

        # A second sweep makes nothing new.
        assert (await sweep(services, now=t0 + GRACE_S + 2)).ingest_jobs == []
        assert len(await services.jobs.job_ids()) == 4

        # A notification arriving after the sweep (MinIO caught up) is the same job.
        late = keys[1]
        handled = counter(services.telemetry).labels("minio", "job")._value.get()
        await services.bus.js.publish(names.minio_notifications, notification(
            bucket, late, infos[late].etag, len(data) + 1, "18669D4C3D6A2F99"))
        await eventually(
            lambda: counter(services.telemetry).labels("minio", "job")._value.get()
            == handled + 1, what="the late notification handled")
        assert await consumer_settled(services, names.ingest_stream, "ingest-minio") == (0, 0)
        by_input = await jobs_by_input(services)
        assert Counter(len(jobs) for jobs in by_input.values()) == Counter({1: 4})

        for jobs in by_input.values():
            record = await wait_for_job(services, jobs[0], timeout=60)
            assert record.status == "succeeded", record.error
        # The sweep's jobs ran once each, too: every probe is at its first attempt.
        for jobs in by_input.values():
            assert (await services.jobs.get(jobs[0])).steps["probe"].attempt == 1
