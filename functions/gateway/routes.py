"""Every route of the gateway, assembled into one Litestar app."""

from __future__ import annotations

from importlib.metadata import version

from litestar import Litestar

from functions.gateway.auth import Auth, authenticate, ratelimit_headers
from functions.gateway.batch import submit_batch
from functions.gateway.dashboard import DASHBOARD_ROUTES
from functions.gateway.dlq_routes import DLQ_ROUTES
from functions.gateway.errors import on_error
from functions.gateway.events import job_events
from functions.gateway.health import healthz, metrics, readyz
from functions.gateway.jobs import (
    cancel,
    download,
    get_job,
    job_action,
    list_outputs,
    submit,
)
from functions.gateway.listing import list_jobs
from functions.gateway.openapi import DOCS_ROUTES, document_body, openapi_config
from functions.gateway.queue import get_queue
from functions.gateway.quotas import ActiveJobs, Backlog
from functions.gateway.recipes_route import list_recipes
from functions.gateway.status import get_status
from functions.gateway.uploads import presign_upload, upload
from shared.function import Services
from shared.jobrequest import JobRequest

# Handlers that read their body themselves (to answer bad input with specific errors)
# declare it for the OpenAPI document here.
document_body("/v1/jobs", "post", JobRequest)
document_body("/v1/uploads", "post", None, "application/octet-stream")


def build_app(services: Services) -> Litestar:
    app = Litestar(
        route_handlers=[upload, submit, get_job, cancel, job_action, list_outputs, download,
                        *DLQ_ROUTES, healthz, readyz, metrics,
                        presign_upload, submit_batch, list_jobs, job_events, get_queue,
                        get_status, *DOCS_ROUTES, list_recipes, *DASHBOARD_ROUTES],
        exception_handlers={Exception: on_error},
        openapi_config=openapi_config(version("jetcut")),
        guards=[authenticate],  # every route: API key -> tenant, rate limits (auth.py)
        middleware=[ratelimit_headers],
        debug=False,
    )
    app.state.services = services
    app.state.auth = Auth(services)
    app.state.active_jobs = ActiveJobs(services)
    app.state.backlog = Backlog(services)
    return app
