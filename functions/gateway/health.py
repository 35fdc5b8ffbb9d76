"""Liveness, readiness and Prometheus metrics: public (probes and scrapers hold no key), so
they say only a status. Why a check failed goes to the log and to the authenticated
``/v1/status``."""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response, get

from shared.function import Services

log = logging.getLogger("jetcut.gateway")


@get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz")
async def readyz(request: Request[Any, Any, Any]) -> Response[Any]:
    services: Services = request.app.state.services
    checks: dict[str, str] = {}
    checks["nats"] = "ok" if services.bus.nc.is_connected else "disconnected"
    try:
        await services.store.check()
        checks["store"] = "ok"
    except Exception as exc:  # a public probe never echoes why (paths, hosts, credentials)
        log.warning("readiness: the object store check failed: %r", exc)
        checks["store"] = "failed"
    ready = all(v == "ok" for v in checks.values())
    return Response({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


@get("/metrics", media_type="text/plain; version=0.0.4")
async def metrics(request: Request[Any, Any, Any]) -> bytes:
    services: Services = request.app.state.services
    return services.telemetry.metrics_text()
