"""The API described: OpenAPI at ``/v1/openapi.json`` and Swagger UI at ``/v1/docs``.

Litestar builds the schema from the handlers' types. Two things are added here, once per
app: request bodies of the handlers that decode their body themselves (so a
bad item gets a specific error, not a framework one), and the error shape on every
operation. The docs page loads Swagger UI from the ``swagger-ui-bundle-v2`` wheel, served
by the gateway itself: an offline deployment never reaches a CDN, so Litestar's default
pages (CDN-hosted assets) would be blank there.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get
from litestar.handlers import HTTPRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin
from litestar.router import Router
from litestar.static_files import create_static_files_router
from swagger_ui_bundle import swagger_ui_path

from functions.gateway.errors import ErrorBody

ASSETS = "/v1/docs/assets"

STATUS_TEXT = {
    400: "Malformed request (invalid_request)",
    401: "No or an unknown API key (unauthorized)",
    403: "The API key lacks the admin scope this needs (forbidden)",
    404: "No such job or resource, or another tenant's (not_found)",
    409: "Conflicts with the resource's state or an earlier request (conflict)",
    413: "Body or upload over its limit (payload_too_large)",
    422: "Well-formed but invalid (invalid_request, invalid_recipe, input_not_found, ...)",
    429: "Rate limit or active-job cap reached (rate_limited, too_many_active_jobs)",
    500: "Unexpected error; it was logged (internal)",
    501: "Not possible with the configured object store (not_supported)",
    503: "NATS or the object store is unavailable; retry (bus_unavailable, store_unavailable)",
}


def errors(*statuses: int) -> dict[int, ResponseSpec]:
    """The error responses an operation documents (each in the one error shape)."""
    return {s: ResponseSpec(data_container=ErrorBody, description=STATUS_TEXT[s],
                            generate_examples=False) for s in statuses}


def openapi_config(version: str) -> OpenAPIConfig:
    """Litestar's own schema routes live under ``/v1/openapi`` (it adds a catch-all HTML 404
    beside them, which must not shadow ``/v1/*``); ``/v1/openapi.json`` is served below."""
    return OpenAPIConfig(
        title="jetcut", version=version,
        description="Media render jobs on NATS JetStream. Errors: `{error: {code, message, "
                    "details}}`; see docs/api.md for every code.",
        openapi_router=Router("/v1/openapi", route_handlers=[], include_in_schema=False,
                              opt={"public": True}),
        render_plugins=[JsonRenderPlugin(path="/openapi.json")],
        operation_id_creator=operation_id,
    )


def operation_id(handler: HTTPRouteHandler, method: Any, components: Any) -> str:
    """The handler's name (``submit``, ``get_job``, ``retry_job``, ``dlq_replay``...): what
    a generated client calls the operation. Names are unique across the gateway (Litestar
    refuses a duplicate operation id)."""
    return handler.handler_name


BODY_OPT = "jetcut_request_body"
"""Where a handler that reads its body itself (to answer each mistake with a specific
error) declares that body for the document (see ``request_body``)."""


def request_body(body: Any, media_type: str = "application/json", *,
                 required: bool = True) -> dict[str, Any]:
    """A handler's ``opt`` declaring its request body (``None``: raw bytes)."""
    return {BODY_OPT: (media_type, body, required)}


RESPONSE_OPT = "jetcut_response_media"
"""Where a handler whose 200 body is raw bytes of some media type declares it."""


def response_media(media_type: str, description: str) -> dict[str, Any]:
    """A handler's ``opt`` declaring its ``200`` body as bytes of ``media_type`` (a range such
    as ``*/*`` when the type is the stored object's own)."""
    return {RESPONSE_OPT: (media_type, description)}


def _openapi_path(path: str) -> str:
    return re.sub(r"\{(\w+):\w+\}", r"{\1}", path)


def _declared(app: Litestar, opt: str) -> dict[tuple[str, str], tuple[Any, ...]]:
    """(path, method) -> what every handler declares under ``opt``."""
    found: dict[tuple[str, str], tuple[Any, ...]] = {}
    for route in app.routes:
        for handler in getattr(route, "route_handlers", ()):
            declared = handler.opt.get(opt)
            if declared is not None:
                for method in handler.http_methods:
                    found[(_openapi_path(route.path), method.lower())] = declared
    return found


def _complete(schema: dict[str, Any], app: Litestar) -> dict[str, Any]:
    """Add the hand-decoded request bodies and the error shape to Litestar's schema: every
    error response (Litestar's own 400 included) has jetcut's one error body."""
    bodies = _declared(app, BODY_OPT)
    media = _declared(app, RESPONSE_OPT)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    types = [*{b for _, b, _ in bodies.values() if b is not None}, ErrorBody]
    refs, defs = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    for name, definition in defs.items():
        components[name] = definition
    body_refs = dict(zip(types, refs, strict=True))
    error_content = {"application/json": {"schema": body_refs[ErrorBody]}}
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            found = bodies.get((path, method))
            if found is not None:
                media_type, body, required = found
                content = ({"schema": body_refs[body]} if body is not None
                           else {"schema": {"type": "string", "format": "binary",
                                            "minLength": 1}})  # an empty upload is a 400
                operation["requestBody"] = {"required": required,
                                            "content": {media_type: content}}
            for parameter in operation.get("parameters", ()):
                parameter["schema"] = _not_null(parameter.get("schema", {}))
            responses = operation["responses"]
            if (path, method) in media:
                media_type, description = media[(path, method)]
                responses["200"] = {"description": description, "content": {
                    media_type: {"schema": {"type": "string", "format": "binary"}}}}
            responses.setdefault("500", {"description": STATUS_TEXT[500]})
            for status, response in responses.items():
                if int(status) >= 400 and not _documents_a_body(response):
                    response["content"] = error_content
                    response["description"] = STATUS_TEXT.get(int(status),
                                                               response.get("description", ""))
    return schema


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A parameter's schema without the ``null`` Litestar adds for ``T | None``: a query,
    header or path parameter is absent or a string, never JSON ``null`` (the constraints
    Litestar hangs beside the ``oneOf`` go onto the one remaining type)."""
    branches = schema.get("oneOf")
    if not isinstance(branches, list):
        return schema
    kept = [b for b in branches if b != {"type": "null"}]
    if len(kept) != 1 or len(kept) == len(branches):
        return schema
    rest = {k: v for k, v in schema.items() if k != "oneOf"}
    return {**kept[0], **rest}


def _documents_a_body(response: dict[str, Any]) -> bool:
    """A handler's own (non-error) body for an error status, e.g. /v1/status's 503."""
    schema = response.get("content", {}).get("application/json", {}).get("schema", {})
    ref = schema.get("$ref", "")
    return bool(ref) and not ref.endswith("/ErrorBody")


def api_schema(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """The completed document, built once per app."""
    state = request.app.state
    if "openapi_document" not in state:
        state.openapi_document = _complete(request.app.openapi_schema.to_schema(),
                                           request.app)
    document: dict[str, Any] = state.openapi_document
    return document


@get("/v1/openapi.json", include_in_schema=False, media_type="application/json",
     sync_to_thread=False, opt={"public": True})
def openapi_json(request: Request[Any, Any, Any]) -> Response[Any]:
    """The OpenAPI 3.1 document of this API."""
    return Response(api_schema(request))


_swagger = SwaggerRenderPlugin(
    js_url=f"{ASSETS}/swagger-ui-bundle.js", css_url=f"{ASSETS}/swagger-ui.css",
    standalone_preset_js_url=f"{ASSETS}/swagger-ui-standalone-preset.js",
    favicon=f"<link rel='icon' type='image/png' href='{ASSETS}/favicon-32x32.png'>",
    path="/v1/docs",
)


@get("/v1/docs", include_in_schema=False, media_type="text/html", sync_to_thread=False,
     opt={"public": True})
def docs(request: Request[Any, Any, Any]) -> bytes:
    """Interactive API docs (Swagger UI, served from the gateway: works offline)."""
    return _swagger.render(request, api_schema(request))


DOCS_ROUTES: list[Any] = [
    openapi_json, docs,
    create_static_files_router(path=ASSETS, directories=[Path(str(swagger_ui_path))],
                               include_in_schema=False, name="docs-assets",
                               opt={"public": True}),
]
