"""The one retry story (shared.retry) and the message ids (shared.msgids), without I/O."""

from __future__ import annotations

import asyncio

import nats.errors
import pytest

from shared import msgids
from shared.errors import (
    ErrorCode,
    FFmpegError,
    PermanentError,
    RetryLater,
    StoreUnavailable,
    TransientError,
)
from shared.events import StageTask
from shared.jobstate import JobRecord, JobStatus
from shared.retry import RetryPolicy, policy_for, ride_out, settle
from shared.settings import load_settings
from shared.streams import stream_configs
from shared.subjects import FAMILIES, Names

POLICY = RetryPolicy(max_deliver=3, backoff_base_s=1.0, backoff_max_s=4.0)


def test_policy_takes_unset_fields_from_the_globals() -> None:
    settings = load_settings({}, max_deliver=7, backoff_base_s=2.0, backoff_max_s=30.0,
                             retry_policy={"transcode": {"max_deliver": 2}})
    assert policy_for(settings, "transcode") == RetryPolicy(
        max_deliver=2, backoff_base_s=2.0, backoff_max_s=30.0)
    assert policy_for(settings, "probe") == RetryPolicy(
        max_deliver=7, backoff_base_s=2.0, backoff_max_s=30.0)


def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    for delivery, ceiling in ((1, 1.0), (2, 2.0), (3, 4.0), (9, 4.0)):
        delays = [POLICY.delay(delivery) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (delivery, delays)
        assert len(set(delays)) > 1  # jittered, so a burst of failures spreads out


def test_non_retryable_errors_terminate_with_their_code() -> None:
    verdict = settle(PermanentError(ErrorCode.INVALID_INPUT, "bad"), delivery=1, policy=POLICY)
    assert (verdict.verb, verdict.permanent) == ("term", True)
    assert verdict.error is not None and verdict.error.code == "invalid_input"
    ffmpeg = FFmpegError(ErrorCode.NO_VIDEO_STREAM, "none", non_retryable=True)
    assert settle(ffmpeg, delivery=1, policy=POLICY).verb == "term"


def test_transient_errors_back_off_then_exhaust() -> None:
    first = settle(StoreUnavailable("down"), delivery=1, policy=POLICY)
    assert first.verb == "nak" and 0.5 <= first.delay <= 1.0 and not first.expected
    last = settle(StoreUnavailable("down"), delivery=3, policy=POLICY)
    assert (last.verb, last.permanent) == ("term", False)
    assert last.error is not None
    # A known cause keeps its code; details say the retries ran out.
    assert last.error.code == "store_unavailable"
    assert last.error.details["retries_exhausted"] is True
    assert last.error.details["attempts"] == 3
    unknown = settle(ValueError("boom"), delivery=3, policy=POLICY)
    assert unknown.error is not None and unknown.error.code == "retries_exhausted"
    assert unknown.error.details["last_error"] == "internal"


def test_an_error_can_name_its_own_retry_delay() -> None:
    exc = TransientError("rate limited upstream", next_retry_delay=17.0)
    assert settle(exc, delivery=1, policy=POLICY).delay == 17.0
    # ...but it still counts towards MaxDeliver.
    assert settle(exc, delivery=3, policy=POLICY).verb == "term"


def test_retry_later_is_an_expected_wait_that_never_exhausts() -> None:
    verdict = settle(RetryLater(0.25), delivery=3, policy=POLICY)
    assert (verdict.verb, verdict.delay, verdict.expected) == ("nak", 0.25, True)
    assert RetryLater(0.25).delay == 0.25


async def test_ride_out_retries_transient_errors_within_its_window() -> None:
    calls: list[int] = []
    retries: list[int] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise nats.errors.NoRespondersError
        return "ok"

    assert await ride_out(flaky, window_s=5.0,
                          on_retry=lambda n, exc: retries.append(n)) == "ok"
    assert (len(calls), retries) == (3, [1, 2])

    async def always() -> None:
        raise nats.errors.TimeoutError

    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(nats.errors.TimeoutError):
        await ride_out(always, window_s=0.5)
    assert 0.5 <= loop.time() - started < 2.5

    async def broken() -> None:
        calls.append(1)
        raise ValueError("not a bus error")

    calls.clear()
    with pytest.raises(ValueError):
        await ride_out(broken, window_s=5.0)
    assert len(calls) == 1  # anything else is raised at once


def test_message_ids_are_deterministic_per_fact() -> None:
    task = StageTask(job_id="j1", tenant="t", step="encode", stage="encode-part", attempt=2,
                     part=7)
    assert task.task_id == msgids.task("j1", "encode", 7, 2) == "j1:encode.p0007:2"
    assert msgids.completion(task.task_id, 3) != msgids.completion(task.task_id, 4)
    assert msgids.dlq_entry("STAGES", 12) == "dlq:STAGES:12"
    record = JobRecord(job_id="j1", tenant="t", created_at=1.0)
    queued = msgids.status(record)
    assert queued == msgids.status(record)  # a repeat announces under the same id
    record.status, record.started_at = JobStatus.RUNNING, 2.0
    assert msgids.status(record) != queued


def test_every_family_names_a_provisioned_stream() -> None:
    names = Names("ns")
    provisioned = {c.name for c in stream_configs(names, load_settings({}))}
    assert {names.stream(f) for f in FAMILIES} == provisioned
    assert names.stream("ingest") == "NS_INGEST"
