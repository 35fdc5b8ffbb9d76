"""Fairness: token-bucket rate limits, the per-tenant active-job cap, queue backpressure and
bounded streams, through the real gateway, conductor and stage consumers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from functions.gateway.ratelimit import TokenBuckets, tighter
from functions.registry import FUNCTIONS
from shared.keys import KeyStore
from tests.support.nats import running, until_http_up, upload, wait_for_job
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(90)

NOOP_JOB: dict[str, Any] = {"steps": {"a": {"stage": "noop", "uses": [":input"]}}}
PROBE_JOB: dict[str, Any] = {"steps": {"p": {"stage": "probe", "uses": [":input"]}}}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_refills_at_its_rate_and_says_when() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate=2.0, burst=3, clock=clock)
    taken = [buckets.take("k") for _ in range(4)]
    assert [d.allowed for d in taken] == [True, True, True, False]
    assert [d.remaining for d in taken] == [2, 1, 0, 0]
    refused = taken[-1]
    assert refused.retry_after_s == 1 and refused.reset_s == 2  # 3 tokens at 2/s
    assert refused.headers() == {"RateLimit-Limit": "3", "RateLimit-Remaining": "0",
                                 "RateLimit-Reset": "2", "RateLimit-Policy": "3;w=2",
                                 "Retry-After": "1"}
    assert "Retry-After" not in taken[0].headers()
    assert buckets.take("other").allowed  # buckets are per key
    clock.now += 0.5  # one token back
    assert buckets.take("k").allowed and not buckets.take("k").allowed
    clock.now += 60  # never more than the burst
    assert [buckets.take("k").allowed for _ in range(4)] == [True, True, True, False]
    assert tighter(taken[0], refused) is refused and tighter(None, taken[1]) is taken[1]


def test_full_buckets_are_forgotten_so_memory_stays_bounded() -> None:
    from functions.gateway import ratelimit

    clock = Clock()
    buckets = TokenBuckets(rate=1000.0, burst=1, clock=clock)
    for n in range(ratelimit.FORGET_ABOVE):
        buckets.take(f"addr{n}")
    clock.now += 1.0  # every bucket has refilled: indistinguishable from a new one
    buckets.take("one more")
    assert len(buckets) == 1


@pytest.fixture
async def limited(make_settings, http_port) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:  # type: ignore[no-untyped-def]
    settings = make_settings(http_port=http_port, allow_anonymous=False,
                             rate_limit_key_per_s=5.0, rate_limit_key_burst=3,
                             rate_limit_address_per_s=5.0, rate_limit_address_burst=8)
    async with running(settings, [FUNCTIONS["gateway"]]) as runtime:
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=30) as client:
            await until_http_up(client)
            store = await KeyStore.open(runtime.services.bus.js, runtime.names, settings)

            async def key(tenant: str) -> dict[str, str]:
                return {"X-API-Key": (await store.create(tenant))[0]}

            yield client, key


async def test_a_key_over_its_rate_gets_429_with_headers_then_recovers(limited) -> None:  # type: ignore[no-untyped-def]
    client, key = limited
    acme, globex = await key("acme"), await key("globex")
    answers = [await client.get("/v1/jobs/jnope", headers=acme) for _ in range(4)]
    assert [r.status_code for r in answers] == [404, 404, 404, 429]
    assert [r.headers["ratelimit-remaining"] for r in answers[:3]] == ["2", "1", "0"]
    refused = answers[-1]
    assert refused.json()["error"]["code"] == "rate_limited"
    assert refused.json()["error"]["details"]["scope"] == "API key"
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["ratelimit-limit"] == "3"
    assert refused.headers["ratelimit-policy"] == "3;w=1"
    assert int(refused.headers["ratelimit-reset"]) >= 1
    # another key of the same address has its own bucket
    assert (await client.get("/v1/jobs/jnope", headers=globex)).status_code == 404

    async def served() -> bool:
        return (await client.get("/v1/jobs/jnope", headers=acme)).status_code == 404

    await eventually(served, timeout=5, what="the key's bucket to refill")


async def test_an_address_is_limited_with_or_without_a_key(limited) -> None:  # type: ignore[no-untyped-def]
    client, _ = limited
    # no key: 401 while the address has tokens, then 429 (bad keys cannot be tried freely)
    codes = [(await client.get("/v1/jobs/jnope")).status_code for _ in range(9)]
    assert codes == [401] * 8 + [429]
    r = await client.get("/v1/jobs/jnope")
    assert r.json()["error"]["details"]["scope"] == "client address"
    assert "retry-after" in r.headers
    # probes are never limited
    assert all([(await client.get("/healthz")).status_code == 200 for _ in range(20)])




async def test_per_tenant_cap_on_active_jobs(make_settings, http_port) -> None:  # type: ignore[no-untyped-def]
    """Two active jobs allowed: the third is 429 until one finishes; a repeat of an accepted
    request is never refused; other tenants are not affected."""
    settings = make_settings(http_port=http_port, max_active_jobs_per_tenant=2)
    fns = [FUNCTIONS["gateway"], FUNCTIONS["conductor"]]  # no noop worker: jobs stay running
    async with running(settings, fns) as runtime:
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=30) as client:
            await until_http_up(client)
            body = {**NOOP_JOB, "input": await upload(client, b"x" * 10)}
            first = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "a"})
            second = await client.post("/v1/jobs", json=body)
            assert first.status_code == second.status_code == 202
            third = await client.post("/v1/jobs", json=body)
            assert third.status_code == 429, third.text
            error = third.json()["error"]
            assert error["code"] == "too_many_active_jobs"
            assert error["details"] == {"active": 2, "limit": 2, "retry_after_s": 5}
            assert third.headers["retry-after"] == "5"
            repeat = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "a"})
            assert repeat.status_code in (200, 202)
            assert repeat.json()["job_id"] == first.json()["job_id"]
            # the refused job left nothing behind
            assert len(await runtime.services.jobs.job_ids()) == 2

            store = await KeyStore.open(runtime.services.bus.js, runtime.names, settings)
            other = {"X-API-Key": (await store.create("globex"))[0]}
            r = await client.post("/v1/uploads", params={"filename": "b"}, content=b"y",
                                  headers=other)
            r = await client.post("/v1/jobs", json={**NOOP_JOB, "input": r.json()["upload_id"]},
                                  headers=other)
            assert r.status_code == 202, r.text

            async with running(settings, [FUNCTIONS["noop"]], name="noop"):
                async def admitted() -> bool:
                    r = await client.post("/v1/jobs", json=body)
                    assert r.status_code in (202, 429), r.text
                    return r.status_code == 202

                await eventually(admitted, timeout=20, what="a slot once jobs finished")


async def test_backpressure_refuses_submissions_while_a_stage_is_behind(
    make_settings, http_port,  # type: ignore[no-untyped-def]
) -> None:
    settings = make_settings(http_port=http_port, backpressure_max_pending=2)
    fns = [FUNCTIONS["gateway"], FUNCTIONS["conductor"]]  # nothing consumes stages.noop
    async with running(settings, fns) as runtime:
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=30) as client:
            await until_http_up(client)
            body = {**NOOP_JOB, "input": await upload(client, b"x" * 10)}
            for _ in range(2):
                assert (await client.post("/v1/jobs", json=body)).status_code == 202
            accepted, refused = 2, []

            async def overloaded() -> bool:
                nonlocal accepted
                r = await client.post("/v1/jobs", json=body)
                assert r.status_code in (202, 503), r.text
                if r.status_code == 503:
                    refused.append(r)
                accepted += r.status_code == 202
                return r.status_code == 503

            await eventually(overloaded, timeout=10, what="503 once stages.noop backs up")
            error = refused[0].json()["error"]
            assert error["code"] == "overloaded"
            assert error["details"]["queue"] == "noop" and error["details"]["limit"] == 2
            assert error["details"]["pending"] >= 2
            assert refused[0].headers["retry-after"] == "5"
            # a refused submission leaves no job behind
            assert len(await runtime.services.jobs.job_ids()) == accepted
            # a job that needs only other stages is still welcome
            r = await client.post("/v1/jobs", json={**PROBE_JOB, "input": body["input"]})
            assert r.status_code == 202, r.text

            async with running(settings, [FUNCTIONS["noop"]], name="noop"):
                async def drained() -> bool:
                    return (await client.post("/v1/jobs", json=body)).status_code == 202

                await eventually(drained, timeout=20, what="submissions once noop drained")


async def test_a_full_stream_refuses_a_submit_at_once(make_settings, http_port) -> None:  # type: ignore[no-untyped-def]
    """Streams are bounded with ``discard: new``: the publisher sees the refusal (503
    ``overloaded``) instead of the stream silently dropping its oldest messages."""
    settings = make_settings(http_port=http_port, stream_max_msgs=2)
    async with running(settings, [FUNCTIONS["gateway"]]) as runtime:
        info = await runtime.services.bus.js.stream_info(runtime.names.jobs_stream)
        assert info.config.max_msgs == 2 and info.config.discard == "new"
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=30) as client:
            await until_http_up(client)
            body = {**NOOP_JOB, "input": await upload(client, b"x" * 10)}
            assert [(await client.post("/v1/jobs", json=body)).status_code
                    for _ in range(2)] == [202, 202]
            r = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "late"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded", r.text
            assert r.headers["retry-after"] == "5"
            assert r.elapsed.total_seconds() < 5  # refused, not retried for the publish window
            info = await runtime.services.bus.js.stream_info(runtime.names.jobs_stream)
            assert info.state.messages == 2  # the first two are still there


async def test_a_retried_job_counts_against_the_cap_again(make_settings, http_port) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(http_port=http_port, max_active_jobs_per_tenant=1)
    fns = [FUNCTIONS["gateway"], FUNCTIONS["conductor"]]  # no noop worker: jobs stay running
    async with running(settings, fns) as runtime:
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=30) as client:
            await until_http_up(client)
            body = {**NOOP_JOB, "input": await upload(client, b"x" * 10)}
            first = (await client.post("/v1/jobs", json=body)).json()["job_id"]
            await wait_for_job(runtime.services, first, until=lambda r: r.planned)
            assert (await client.delete(f"/v1/jobs/{first}")).status_code == 202
            await wait_for_job(runtime.services, first)  # cancelled: its slot is free
            second = await client.post("/v1/jobs", json=body)
            assert second.status_code == 202, second.text
            again = await client.post(f"/v1/jobs/{first}:retry")
            assert again.status_code == 429, again.text
            assert again.json()["error"]["code"] == "too_many_active_jobs"
            assert (await runtime.services.jobs.get(first)).status == "cancelled"
