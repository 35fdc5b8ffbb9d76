"""GET /v1/status — is jetcut healthy, degraded or unhealthy, and why.

``/readyz`` answers a load balancer (can this process serve?); this answers a person or a
monitor (is the system doing its work?). Each check reports ``ok``, ``degraded`` or
``failed`` with a detail:

- ``nats``: connected, and JetStream answers an account-info request.   failed -> unhealthy
- ``store``: the object store's own health probe.                        failed -> unhealthy
- ``disk``: free space under the work dir vs ``JETCUT_MIN_FREE_DISK_MB``.  low -> degraded
- ``ffmpeg``: ffmpeg and ffprobe can be found.                        missing -> degraded
- ``queues``: a stage with more than ``JETCUT_STATUS_MAX_BACKLOG`` tasks waiting, or whose
  oldest waiting task is older than ``JETCUT_STATUS_MAX_PENDING_AGE_S``, is degraded.

The answer is 200 while healthy or degraded (the API works) and 503 when unhealthy.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from typing import Any, Literal

import msgspec
from litestar import Controller, Response, get
from litestar.openapi.datastructures import ResponseSpec

from functions.gateway.deps import ServicesDep
from functions.gateway.queue import queue_view
from shared.function import Services

CheckStatus = Literal["ok", "degraded", "failed"]
Overall = Literal["healthy", "degraded", "unhealthy"]
CHECK_TIMEOUT_S = 5.0


class Check(msgspec.Struct):
    status: CheckStatus
    detail: str
    data: dict[str, Any] = {}


class StatusView(msgspec.Struct):
    status: Overall
    checks: dict[str, Check]
    at: float


async def _nats(services: Services) -> Check:
    if not services.bus.nc.is_connected:
        return Check(status="failed", detail="disconnected")
    started = time.perf_counter()
    info = await services.bus.js.account_info()
    ms = round((time.perf_counter() - started) * 1000, 1)
    return Check(status="ok", detail=f"connected; JetStream answered in {ms} ms",
                 data={"rtt_ms": ms, "streams": info.streams, "consumers": info.consumers,
                       "server": services.bus.nc.connected_url.netloc
                       if services.bus.nc.connected_url else None})


async def _store(services: Services) -> Check:
    await services.store.check()
    return Check(status="ok", detail=repr(services.store))


async def _disk(services: Services) -> Check:
    path = services.settings.work_dir or tempfile.gettempdir()
    usage = await asyncio.to_thread(shutil.disk_usage, path)
    free_mb = usage.free // (1024 * 1024)
    need = services.settings.min_free_disk_mb
    data = {"path": path, "free_mb": free_mb, "min_free_mb": need}
    if free_mb < need:
        return Check(status="degraded", detail=f"{free_mb} MB free under {path}, below "
                     f"{need} MB: workers there stop taking work", data=data)
    return Check(status="ok", detail=f"{free_mb} MB free under {path}", data=data)


async def _ffmpeg(services: Services) -> Check:
    binaries, _ = await asyncio.to_thread(services.media)
    return Check(status="ok", detail=binaries.ffmpeg,
                 data={"ffmpeg": binaries.ffmpeg, "ffprobe": binaries.ffprobe})


async def _queues(services: Services) -> Check:
    queues = await queue_view(services)
    limit = services.settings.status_max_backlog
    max_age = services.settings.status_max_pending_age_s
    behind = [q for q in queues.stages
              if q.pending > limit or (q.oldest_pending_age_s or 0.0) > max_age]
    data = {"backlog": {q.stage: q.pending for q in queues.stages},
            "oldest_pending_age_s": {q.stage: q.oldest_pending_age_s for q in queues.stages},
            "dlq_entries": queues.dlq.entries}
    if behind:
        detail = "; ".join(f"{q.stage}: {q.pending} waiting, oldest "
                           f"{q.oldest_pending_age_s or 0:.0f}s" for q in behind)
        return Check(status="degraded", detail=f"behind (over {limit} waiting or "
                     f"{max_age:.0f}s old): {detail}", data=data)
    return Check(status="ok", detail=f"{sum(q.pending for q in queues.stages)} tasks waiting",
                 data=data)


CHECKS = {"nats": _nats, "store": _store, "disk": _disk, "ffmpeg": _ffmpeg, "queues": _queues}
CRITICAL = frozenset({"nats", "store"})
"""A failed critical check makes jetcut unhealthy; any other failure, degraded."""


async def _run(name: str, services: Services) -> Check:
    try:
        return await asyncio.wait_for(CHECKS[name](services), CHECK_TIMEOUT_S)
    except TimeoutError:
        return Check(status="failed", detail=f"no answer within {CHECK_TIMEOUT_S:.0f}s")
    except Exception as exc:
        return Check(status="failed", detail=f"{type(exc).__name__}: {exc}")


async def system_status(services: Services) -> StatusView:
    results = await asyncio.gather(*(_run(name, services) for name in CHECKS))
    checks = dict(zip(CHECKS, results, strict=True))
    overall: Overall = "healthy"
    if any(c.status == "failed" for n, c in checks.items() if n in CRITICAL):
        overall = "unhealthy"
    elif any(c.status != "ok" for c in checks.values()):
        overall = "degraded"
    return StatusView(status=overall, checks=checks, at=time.time())


class StatusController(Controller):
    path = "/status"
    tags = ["operations"]

    @get("/", responses={503: ResponseSpec(StatusView, generate_examples=False,
                                           description="Unhealthy: a critical check failed")})
    async def get_status(self, services: ServicesDep) -> Response[StatusView]:
        """healthy / degraded / unhealthy with every check's detail (503 when unhealthy)."""
        status = await system_status(services)
        return Response(status, status_code=503 if status.status == "unhealthy" else 200)
