"""shared/submission.py, the one way in for jobs, against a real NATS server and store.

The gateway and ingest tests drive it through their own edges; these pin what both rely on:
which inputs resolve, what makes two requests the same job, and what a failed publish
leaves behind (really failed: the JOBS stream is full and refuses the message).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import pytest

from shared import submission
from shared.errors import ErrorCode, JetcutError
from shared.function import Services
from shared.jobrequest import JobRequest
from shared.jobstore import JobNotFound
from tests.support.nats import running

pytestmark = pytest.mark.timeout(60)

NOOP = {"n": {"stage": "noop", "uses": [":input"]}}
UPLOAD_ID = "u" + "a" * 26


@pytest.fixture
async def services(make_settings) -> AsyncIterator[Services]:  # type: ignore[no-untyped-def]
    """Clients only (no function consumes jobs.submit); the JOBS stream holds two messages."""
    settings = make_settings(stream_max_msgs=2, max_upload_bytes=1000,
                             ingest_prefix="incoming/")
    async with running(settings, []) as runtime:
        assert runtime.services is not None
        await runtime.services.store.put_bytes(f"uploads/acme/{UPLOAD_ID}/a.mp4", b"x" * 10)
        await runtime.services.store.put_bytes("incoming/b.mp4", b"x" * 2000)
        yield runtime.services


def _request(**fields: object) -> JobRequest:
    """A request as the gateway decodes one."""
    return msgspec.convert({"steps": NOOP, "input": UPLOAD_ID, **fields}, JobRequest)


async def test_inputs_resolve_by_upload_id_or_allowed_key(services: Services) -> None:
    ref = await submission.resolve_input(services, "acme", UPLOAD_ID)
    assert (ref.key, ref.size) == (f"uploads/acme/{UPLOAD_ID}/a.mp4", 10)
    # The ingest prefix only for ingest, and no upload cap on it (it is not an upload).
    assert (await submission.resolve_input(services, "acme", "incoming/b.mp4",
                                           ingest=True)).size == 2000
    refusals = [
        ("incoming/b.mp4", False, ErrorCode.INVALID_REQUEST),
        ("uploads/other/x/a.mp4", False, ErrorCode.INVALID_REQUEST),  # another tenant's
        ("uploads/acme/../x", False, ErrorCode.INVALID_REQUEST),
        ("u" + "b" * 26, False, ErrorCode.INPUT_NOT_FOUND),
        ("uploads/acme/x/missing.mp4", True, ErrorCode.INPUT_NOT_FOUND),
    ]
    for ref_text, ingest, code in refusals:
        with pytest.raises(JetcutError) as caught:
            await submission.resolve_input(services, "acme", ref_text, ingest=ingest)
        assert caught.value.code == code, ref_text


async def test_a_too_large_upload_is_refused_wherever_it_is_named(services: Services) -> None:
    await services.store.put_bytes(f"uploads/acme/{'u' + 'c' * 26}/big.mp4", b"x" * 1001)
    for ingest in (False, True):
        with pytest.raises(JetcutError) as caught:
            await submission.prepare(services, "acme", _request(input="u" + "c" * 26),
                                     ingest=ingest)
        assert caught.value.code == ErrorCode.PAYLOAD_TOO_LARGE


def test_the_fingerprint_ignores_field_order_but_not_content() -> None:
    from shared.events import InputRef

    inputs = [InputRef(key="uploads/acme/u/a.mp4")]
    one = submission.fingerprint("web", None, inputs, {"a": 1, "b": 2}, None)
    assert one == submission.fingerprint("web", None, inputs, {"b": 2, "a": 1}, None)
    assert one != submission.fingerprint("web", None, inputs, {"a": 1, "b": 3}, None)
    assert one != submission.fingerprint("web", None, inputs, {"a": 1, "b": 2},
                                         "https://example.com/hook")


async def test_a_key_names_one_job_and_a_different_request_under_it_conflicts(
        services: Services) -> None:
    first = await submission.commit(services, await submission.prepare(
        services, "acme", _request(), idempotency_key="k1"))
    assert first.created and first.event is not None
    again = await submission.commit(services, await submission.prepare(
        services, "acme", _request(), idempotency_key="k1"))
    assert again.job.job_id == first.job.job_id and not again.created
    other = await submission.prepare(services, "acme", _request(params={"x": 1}),
                                     idempotency_key="k1")
    with pytest.raises(JetcutError) as caught:
        await submission.commit(services, other)
    assert caught.value.code == ErrorCode.CONFLICT


async def test_a_failed_publish_forgets_only_jobs_nobody_can_name(services: Services) -> None:
    # Fill the two-message stream, then publish a named and an unnamed job into it.
    for key in ("a", "b"):
        await submission.commit(services, await submission.prepare(
            services, "acme", _request(), idempotency_key=key))
    named = await submission.prepare(services, "acme", _request(), idempotency_key="c")
    unnamed = await submission.prepare(services, "acme", _request())
    for job in (named, unnamed):
        with pytest.raises(JetcutError) as caught:
            await submission.commit(services, job)
        assert caught.value.code == ErrorCode.OVERLOADED
        assert caught.value.details["retry_after_s"] == submission.OVERLOADED_RETRY_S
    # The named one stays (a repeat of the request finishes it); the unnamed one is gone.
    assert (await services.jobs.get(named.job_id)).status == "queued"
    with pytest.raises(JobNotFound):
        await services.jobs.get(unnamed.job_id)
    # Room again: the repeat publishes the job it had already claimed.
    await services.bus.js.purge_stream(services.names.jobs_stream)
    repeat = await submission.commit(services, await submission.prepare(
        services, "acme", _request(), idempotency_key="c"))
    assert not repeat.created and repeat.event is not None


async def test_a_batch_that_fails_part_way_says_which_jobs_were_queued(
        services: Services) -> None:
    await submission.commit(services, await submission.prepare(
        services, "acme", _request(), idempotency_key="a"))
    jobs = [await submission.prepare(services, "acme", _request()) for _ in range(2)]
    claims = [await submission.claim(services, job) for job in jobs]
    with pytest.raises(JetcutError) as caught:
        await submission.publish(services, claims)
    assert caught.value.code == ErrorCode.BUS_UNAVAILABLE
    assert caught.value.details["queued"] == [jobs[0].job_id]
    assert (await services.jobs.get(jobs[0].job_id)).status == "queued"
    with pytest.raises(JobNotFound):
        await services.jobs.get(jobs[1].job_id)
