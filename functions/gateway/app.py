"""The gateway's Litestar app: one controller per resource under one ``/v1`` router.

Handlers get what they use by dependency injection (``services``: the process's clients;
``admission``: backpressure and the active-job cap), never from ``app.state``. Every error
is answered by ``errors.on_error``; every route passes the ``auth.authenticate`` guard
(public routes say so in their ``opt``).
"""

from __future__ import annotations

import re
from importlib.metadata import version
from typing import Any

from litestar import Litestar, Request, Response, Router

from functions.gateway.auth import Auth, authenticate, ratelimit_headers
from functions.gateway.batch import BatchController
from functions.gateway.dashboard import DASHBOARD_ROUTES
from functions.gateway.deadletters import DeadLetterController
from functions.gateway.deps import dependencies
from functions.gateway.errors import on_error
from functions.gateway.health import HealthController
from functions.gateway.jobs import JobController
from functions.gateway.openapi import DOCS_ROUTES, openapi_config
from functions.gateway.playback import PlaybackController
from functions.gateway.queue import QueueController
from functions.gateway.quotas import Admission
from functions.gateway.recipes import RecipeController
from functions.gateway.status import StatusController
from functions.gateway.uploads import PresignController, UploadController
from shared.function import Services

API = [JobController, BatchController, UploadController, PresignController,
       DeadLetterController, QueueController, StatusController, RecipeController,
       PlaybackController]
"""The ``/v1`` resources."""


def _untyped(path: str) -> str:
    """``/v1/jobs/{job_id:str}`` -> ``/v1/jobs/{job_id}``."""
    return re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", path)


def allow_header(request: Request[Any, Any, Any]) -> Response[None] | None:
    """Answer ``OPTIONS`` with every method the path serves.

    Litestar's own OPTIONS handler lists the methods of the handlers registered with it,
    which, when a controller's handlers are merged into one route, is only some of them.
    """
    if request.method != "OPTIONS":
        return None
    template = _untyped(str(request.scope.get("path_template", "")))
    methods = {m for route in request.app.routes if _untyped(route.path) == template
               for m in getattr(route, "methods", ())}
    return Response(None, status_code=204,
                    headers={"Allow": ", ".join(sorted(methods | {"OPTIONS"}))})


def build_app(services: Services) -> Litestar:
    app = Litestar(
        route_handlers=[Router("/v1", route_handlers=API), HealthController, *DOCS_ROUTES,
                        *DASHBOARD_ROUTES],
        dependencies=dependencies(),
        exception_handlers={Exception: on_error},
        openapi_config=openapi_config(version("jetcut")),
        before_request=allow_header,
        guards=[authenticate],  # every route: API key -> tenant, rate limits (auth.py)
        middleware=[ratelimit_headers],
        debug=False,
    )
    app.state.services = services
    app.state.auth = Auth(services)
    app.state.admission = Admission(services)
    return app
