"""GET /v1/jobs/{id}/events: history, live, resume with Last-Event-ID, terminal close, and a
disconnect that releases the NATS consumer — all through the real gateway and EVENTS."""

from __future__ import annotations

from typing import Any

import httpx
import msgspec
import pytest

from functions.registry import FUNCTIONS
from tests.support.nats import running, until_http_up, wait_for_job
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(90)

NOOP = {"n": {"stage": "noop", "uses": [":input"]}}
OPEN = {"allow_anonymous": True, "rate_limit_key_per_s": 0, "rate_limit_address_per_s": 0}


class Sse(msgspec.Struct):
    id: int | None
    event: str | None
    data: dict[str, Any] | None
    comment: str | None = None


async def read_events(response: httpx.Response, *, until: int | None = None) -> list[Sse]:
    """Parse an SSE body until the server ends it (or ``until`` events arrived)."""
    events: list[Sse] = []
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line == "":
            if fields:
                events.append(Sse(id=int(fields["id"]) if "id" in fields else None,
                                  event=fields.get("event"),
                                  data=msgspec.json.decode(fields["data"])
                                  if "data" in fields else None,
                                  comment=fields.get("comment")))
                fields = {}
                if until is not None and len([e for e in events if e.data]) >= until:
                    break
            continue
        if line.startswith(":"):
            fields["comment"] = line[1:].strip()
            continue
        name, _, value = line.partition(":")
        fields[name] = value.removeprefix(" ")
    return events


async def _job(client: httpx.AsyncClient) -> str:
    up = await client.post("/v1/uploads", params={"filename": "a.bin"}, content=b"x" * 10)
    r = await client.post("/v1/jobs", json={"steps": NOOP, "input": up.json()["upload_id"]})
    assert r.status_code == 202, r.text
    return str(r.json()["job_id"])


async def _consumers(runtime: Any) -> int:
    info = await runtime.services.bus.js.stream_info(runtime.names.events_stream)
    return int(info.state.consumer_count)


async def test_history_then_close_and_resume_after_a_given_event(  # type: ignore[no-untyped-def]
    make_settings, http_port
):
    settings = make_settings(http_port=http_port, **OPEN)
    functions = [FUNCTIONS[n] for n in ("gateway", "conductor", "noop")]
    async with running(settings, functions) as runtime:
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=30) as client:
            await until_http_up(client)
            job_id = await _job(client)
            await wait_for_job(runtime.services, job_id)
            async with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/event-stream")
                history = [e for e in await read_events(r) if e.data]
            ids = [e.id for e in history]
            assert all(i is not None for i in ids) and ids == sorted(ids)
            assert history[-1].event == "status"
            assert history[-1].data is not None and history[-1].data["status"] == "succeeded"
            assert {e.data["job_id"] for e in history if e.data} == {job_id}

            # Resume after the first event: exactly the rest, same ids.
            async with client.stream("GET", f"/v1/jobs/{job_id}/events",
                                     headers={"Last-Event-ID": str(ids[0])}) as r:
                rest = [e for e in await read_events(r) if e.data]
            assert [e.id for e in rest] == ids[1:]
            # ... and past the end: 204, which tells EventSource to stop reconnecting.
            r = await client.get(f"/v1/jobs/{job_id}/events",
                                 headers={"Last-Event-ID": str(ids[-1])})
            assert r.status_code == 204
            bad = await client.get(f"/v1/jobs/{job_id}/events",
                                   headers={"Last-Event-ID": "yesterday"})
            assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"
            missing = await client.get("/v1/jobs/jnope/events")
            assert missing.status_code == 404
            assert missing.json()["error"]["code"] == "not_found"

            async def released() -> bool:
                return await _consumers(runtime) == 0

            await eventually(released, timeout=5, what="every SSE consumer to be deleted")


async def test_live_events_follow_the_job_until_it_ends(make_settings, http_port):  # type: ignore[no-untyped-def]
    settings = make_settings(http_port=http_port, sse_heartbeat_s=0.5, **OPEN)
    async with running(settings, [FUNCTIONS["gateway"], FUNCTIONS["conductor"]]) as runtime:
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=30) as client:
            await until_http_up(client)
            job_id = await _job(client)
            async with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
                # Nothing can run yet (no noop worker): the stream idles with heartbeats.
                lines = r.aiter_lines()
                async for line in lines:
                    if line.startswith(": keep-alive"):
                        break
                # The worker starts only now: what follows arrives live.
                async with running(settings, [FUNCTIONS["noop"]], name="worker"):
                    events: list[Sse] = []
                    fields: dict[str, str] = {}
                    async for line in lines:
                        if line == "" and "data" in fields:
                            events.append(Sse(id=int(fields["id"]) if "id" in fields else None,
                                              event=fields["event"],
                                              data=msgspec.json.decode(fields["data"])))
                            fields = {}
                        elif line and not line.startswith(":"):
                            name, _, value = line.partition(":")
                            fields[name] = value.strip()
            assert events, "no live event arrived"
            assert all(e.id is not None for e in events)
            assert events[-1].event == "status"
            assert events[-1].data is not None and events[-1].data["status"] == "succeeded"
            assert any(e.event == "step" and e.data and e.data["step_status"] == "running"
                       for e in events)
            record = await runtime.services.jobs.get(job_id)
            assert record.status == "succeeded"


async def test_disconnect_releases_the_consumer(make_settings, http_port):  # type: ignore[no-untyped-def]
    settings = make_settings(http_port=http_port, sse_heartbeat_s=0.3, **OPEN)
    async with running(settings, [FUNCTIONS["gateway"]]) as runtime:
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=30) as client:
            await until_http_up(client)
            job_id = await _job(client)  # stays queued: no conductor
            assert await _consumers(runtime) == 0
            async with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
                async for line in r.aiter_lines():
                    if line.startswith(": keep-alive"):
                        break
                assert await _consumers(runtime) == 1

            async def released() -> bool:
                return await _consumers(runtime) == 0

            await eventually(released, timeout=5, what="the SSE consumer to be deleted")


async def test_a_finished_job_without_events_gets_its_final_status(  # type: ignore[no-untyped-def]
    make_settings, http_port
):
    """The record is the truth: with no events in the stream (expired, or never stored),
    the stream still ends with the job's terminal status."""
    settings = make_settings(http_port=http_port, **OPEN)
    async with running(settings, [FUNCTIONS["gateway"]]) as runtime:
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=30) as client:
            await until_http_up(client)
            job_id = await _job(client)
            r = await client.delete(f"/v1/jobs/{job_id}")  # nobody consumes it: mark it here
            assert r.status_code == 202

            def cancel(rec: Any) -> None:
                from shared.jobstate import cancel_job
                cancel_job(rec, "test")

            await runtime.services.jobs.update(job_id, cancel)
            async with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
                events = [e for e in await read_events(r) if e.data]
    assert len(events) == 1 and events[0].id is None
    assert events[0].data is not None and events[0].data["status"] == "cancelled"
