"""Liveness, readiness and Prometheus metrics: public (probes and scrapers hold no key), so
they say only a status. Why a check failed goes to the log and to the authenticated
``/v1/status``."""

from __future__ import annotations

import logging

import msgspec
from litestar import Controller, Response, get
from litestar.openapi.datastructures import ResponseSpec

from functions.gateway.deps import ServicesDep
from shared.function import Services

log = logging.getLogger("jetcut.gateway")


class Readiness(msgspec.Struct):
    ready: bool
    checks: dict[str, str]
    """``nats``: ``ok`` or ``disconnected``; ``store``: ``ok`` or ``failed``."""


class HealthController(Controller):
    """Probes and the scrape endpoint, outside ``/v1`` (where orchestrators look)."""

    path = "/"
    tags = ["operations"]

    @get("/healthz", sync_to_thread=False)
    def healthz(self) -> dict[str, str]:
        """The process answers."""
        return {"status": "ok"}

    @get("/readyz", responses={503: ResponseSpec(Readiness, generate_examples=False,
                                                 description="Not ready")})
    async def readyz(self, services: ServicesDep) -> Response[Readiness]:
        """NATS connected and the object store reachable (503 otherwise)."""
        return await _readiness(services)

    @get("/metrics", media_type="text/plain; version=0.0.4", sync_to_thread=False)
    def metrics(self, services: ServicesDep) -> bytes:
        """Prometheus text exposition of this process's metrics."""
        return services.telemetry.metrics_text()


async def _readiness(services: Services) -> Response[Readiness]:
    checks: dict[str, str] = {}
    checks["nats"] = "ok" if services.bus.nc.is_connected else "disconnected"
    try:
        await services.store.check()
        checks["store"] = "ok"
    except Exception as exc:  # a public probe never echoes why (paths, hosts, credentials)
        log.warning("readiness: the object store check failed: %r", exc)
        checks["store"] = "failed"
    ready = all(v == "ok" for v in checks.values())
    return Response(Readiness(ready=ready, checks=checks), status_code=200 if ready else 503)
