"""GET /v1/queue and GET /v1/status against a real backlog in JetStream."""

from __future__ import annotations

import httpx
import pytest

from functions.registry import FUNCTIONS
from tests.support.nats import running, until_http_up
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(90)

NOOP = {"n": {"stage": "noop", "uses": [":input"]}}
OPEN = {"allow_anonymous": True, "rate_limit_key_per_s": 0, "rate_limit_address_per_s": 0}


async def _backlog(client: httpx.AsyncClient, runtime, count: int) -> list[str]:  # type: ignore[no-untyped-def]
    up = await client.post("/v1/uploads", params={"filename": "a.bin"}, content=b"x" * 10)
    ids = [(await client.post("/v1/jobs", json={"steps": NOOP, "input": up.json()["upload_id"]}
                              )).json()["job_id"] for _ in range(count)]

    async def planned() -> bool:
        return all([(await runtime.services.jobs.get(i)).planned for i in ids])

    await eventually(planned, what="the conductor planned every job")
    return ids


async def test_queue_and_status_report_a_backlog_and_its_drain(make_settings, http_port):  # type: ignore[no-untyped-def]
    settings = make_settings(http_port=http_port, status_max_backlog=2, **OPEN)
    async with running(settings, [FUNCTIONS["gateway"], FUNCTIONS["conductor"]]) as runtime:
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=30) as client:
            await until_http_up(client)
            await _backlog(client, runtime, 3)

            queue = (await client.get("/v1/queue")).json()
            noop = {q["stage"]: q for q in queue["stages"]}["noop"]
            # No noop worker has ever started: tasks wait on the subject, no consumer yet.
            assert noop["consumer"] is None and noop["pending"] == 3
            assert noop["oldest_pending_age_s"] is not None and noop["oldest_pending_age_s"] >= 0
            assert queue["submit"]["consumer"] == "conductor-submit"
            assert queue["submit"]["pending"] == 0
            assert queue["dlq"] == {"entries": 0, "by_function": {}}

            r = await client.get("/v1/status")
            assert r.status_code == 200
            status = r.json()
            assert status["status"] == "degraded"
            checks = status["checks"]
            assert checks["queues"]["status"] == "degraded"
            assert "noop: 3 waiting" in checks["queues"]["detail"]
            assert {checks[n]["status"] for n in ("nats", "store", "ffmpeg")} == {"ok"}
            assert checks["disk"]["data"]["free_mb"] > 0

            # A worker starts: the backlog drains and the system is healthy again.
            async with running(settings, [FUNCTIONS["noop"]], name="worker"):
                async def drained() -> bool:
                    q = (await client.get("/v1/queue")).json()
                    stage = {s["stage"]: s for s in q["stages"]}["noop"]
                    return stage["consumer"] is not None and stage["pending"] == 0 \
                        and stage["in_flight"] == 0

                await eventually(drained, what="the noop queue to drain")
                status = (await client.get("/v1/status")).json()
                assert status["status"] == "healthy", status
                noop = {q["stage"]: q for q in (await client.get("/v1/queue")).json()["stages"]
                        }["noop"]
                assert noop["oldest_pending_age_s"] is None
                assert "noop" in noop["consumer"]


async def test_status_is_unhealthy_when_the_store_fails(make_settings, http_port, tmp_path):  # type: ignore[no-untyped-def]
    settings = make_settings(http_port=http_port, **OPEN)
    async with running(settings, [FUNCTIONS["gateway"]]):
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=30) as client:
            await until_http_up(client)
            assert (await client.get("/v1/status")).json()["status"] == "healthy"
            # The local store's root vanishes (a lost volume): its check fails.
            import shutil

            shutil.rmtree(settings.store_root)
            r = await client.get("/v1/status")
            assert r.status_code == 503
            body = r.json()
            assert body["status"] == "unhealthy"
            assert body["checks"]["store"]["status"] == "failed"
            assert body["checks"]["nats"]["status"] == "ok"
            # /readyz keeps its own meaning and shape.
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["ready"] is False
            # It is public: a status only, never the exception's text (here: the path).
            assert ready.json()["checks"] == {"nats": "ok", "store": "failed"}
            assert str(settings.store_root) not in ready.text


async def test_status_degrades_when_disk_is_below_the_floor(make_settings, http_port):  # type: ignore[no-untyped-def]
    settings = make_settings(http_port=http_port, min_free_disk_mb=10**9, **OPEN)
    async with running(settings, [FUNCTIONS["gateway"]]):
        async with httpx.AsyncClient(base_url=settings.base_url, timeout=30) as client:
            await until_http_up(client)
            body = (await client.get("/v1/status")).json()
    assert body["status"] == "degraded"
    assert body["checks"]["disk"]["status"] == "degraded"
    assert "below" in body["checks"]["disk"]["detail"]
