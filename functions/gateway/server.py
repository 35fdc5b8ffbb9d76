"""gateway — the HTTP API for people and programs.

Serves (on JETCUT_HTTP_HOST:JETCUT_HTTP_PORT):
  POST /v1/uploads?filename=   stream a file into the store (constant memory)
  POST /v1/jobs                validate and submit a job; 202 only after the PubAck
  GET  /v1/jobs/{id}           status, steps, progress, error
  DELETE /v1/jobs/{id}         cancel a queued or running job
  POST /v1/jobs/{id}:retry     re-run a failed or cancelled job from its checkpoints
  GET  /v1/jobs/{id}/outputs   output files with download links
  GET  /v1/jobs/{id}/outputs/{step}/{name}   stream one output
  GET|DELETE /v1/dlq[/{seq}], POST /v1/dlq/{seq}:replay   dead letters (admin)
  GET  /v1/jobs, POST /v1/jobs:batch, GET /v1/jobs/{id}/events (SSE), /v1/jobs/{id}/graph
  GET  /v1/queue /v1/status /v1/recipes /v1/openapi.json /v1/docs
  GET  / -> /ui/                the dashboard (static, no CDN)
  GET  /healthz /readyz /metrics
Emits: jobs.submit (Nats-Msg-Id = job id, so a retried request never makes two jobs),
       jobs.cancel, jobs.retry
Layout: server.py (this) runs the app; app.py builds it from one controller per resource
(jobs, batch, uploads, deadletters, queue, status, recipes, health); views.py holds what
they show and share; errors.py maps error codes to HTTP statuses; openapi.py completes the
document.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import uvicorn

from functions.gateway.app import build_app
from shared.function import Function, Services

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the runtime owns SIGTERM/SIGINT and drains."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(services: Services, stop: asyncio.Event) -> None:
    settings = services.settings
    app = build_app(services)
    app.state.stopping = stop  # SSE streams end when it is set (functions/gateway/events.py)
    config = uvicorn.Config(
        app, host=settings.http_host, port=settings.http_port,
        log_level="warning", lifespan="on", access_log=False,
        # Open requests (an upload mid-body, a slow download) get this long after a signal,
        # then are cut: no client can hold a stopping gateway up.
        # (Typed int, used as asyncio.wait_for's float timeout: a fraction works.)
        timeout_graceful_shutdown=settings.http_shutdown_grace_s,  # type: ignore[arg-type]
    )
    server = _Server(config)
    serving = asyncio.create_task(server.serve())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([serving, stopping], return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    stopping.cancel()
    await serving
    if not stop.is_set():
        raise RuntimeError("HTTP server stopped unexpectedly (port in use?)")


function = Function(name="gateway", doc=__doc__ or "", service=serve)
