"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get

from shared.function import Services


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
    except Exception as exc:
        checks["store"] = f"error: {exc}"
    ready = all(v == "ok" for v in checks.values())
    return Response({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


@get("/metrics", media_type="text/plain; version=0.0.4")
async def metrics(request: Request[Any, Any, Any]) -> bytes:
    services: Services = request.app.state.services
    return services.telemetry.metrics_text()
