"""Every route of the gateway, assembled into one Litestar app."""

from __future__ import annotations

from litestar import Litestar

from functions.gateway.api import on_error
from functions.gateway.dlq_routes import DLQ_ROUTES
from functions.gateway.health import healthz, metrics, readyz
from functions.gateway.jobs import cancel, download, get_job, job_action, list_outputs, submit
from functions.gateway.uploads import upload
from shared.function import Services


def build_app(services: Services) -> Litestar:
    app = Litestar(
        route_handlers=[upload, submit, get_job, cancel, job_action, list_outputs, download,
                        *DLQ_ROUTES, healthz, readyz, metrics],
        exception_handlers={Exception: on_error},
        debug=False,
    )
    app.state.services = services
    return app
