"""Dead letters over HTTP (admin-scoped: entries belong to every tenant).

Every route takes an admin API key (``jetcut keys create --admin``); any other key is 403
``forbidden``. An anonymous caller (``JETCUT_ALLOW_ANONYMOUS``, development) is admin.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.params import FromPath, FromQuery, Parameter, QueryParameter

from functions.gateway.api import MAX_SEQ, stream_seq
from functions.gateway.auth import require_admin
from shared import dlq
from shared.errors import ErrorCode, MalformedRequest, PermanentError
from shared.function import Services


def _dlq_seq(value: str) -> int:
    return stream_seq(value, "a DLQ entry's sequence")


@get("/v1/dlq", guards=[require_admin])
async def dlq_list(request: Request[Any, Any, Any], function: FromQuery[str | None] = None,
                   after: Annotated[int, Parameter(ge=0, le=MAX_SEQ)] = 0,
                   limit: Annotated[int, Parameter(ge=1, le=dlq.MAX_PAGE)] = 50) -> Response[Any]:
    """Dead letters, oldest first, ``limit`` at a time after sequence ``after``."""
    services: Services = request.app.state.services
    try:
        page = await dlq.list_entries(services, function=function or None, after=after,
                                      limit=limit)
    except ValueError as exc:
        raise MalformedRequest(str(exc)) from exc
    return Response(msgspec.to_builtins(page))


@get("/v1/dlq/{seq:str}", guards=[require_admin])
async def dlq_show(request: Request[Any, Any, Any], seq: FromPath[str]) -> Response[Any]:
    services: Services = request.app.state.services
    entry = await dlq.get_entry(services, _dlq_seq(seq))
    return Response(msgspec.to_builtins(entry))


@post("/v1/dlq/{seq:str}", status_code=200, guards=[require_admin])
async def dlq_action(request: Request[Any, Any, Any], seq: FromPath[str]) -> Response[Any]:
    """``POST /v1/dlq/{seq}:replay`` (see ``job_action`` for the path shape)."""
    services: Services = request.app.state.services
    target, _, action = seq.rpartition(":")
    if action != "replay":
        raise PermanentError(ErrorCode.NOT_FOUND, "no such resource; did you mean "
                             "POST /v1/dlq/{seq}:replay?")
    result = await dlq.replay(services, _dlq_seq(target))
    return Response(msgspec.to_builtins(result))


@delete("/v1/dlq/{seq:str}", status_code=200, guards=[require_admin])
async def dlq_delete(request: Request[Any, Any, Any], seq: FromPath[str]) -> Response[Any]:
    services: Services = request.app.state.services
    purged = await dlq.purge_entry(services, _dlq_seq(seq))
    return Response({"purged": purged})


@delete("/v1/dlq", status_code=200, guards=[require_admin])
async def dlq_purge(
    request: Request[Any, Any, Any], function: FromQuery[str | None] = None,
    purge_all: Annotated[bool, QueryParameter(name="all")] = False,
) -> Response[Any]:
    """Purge one function's entries (``?function=``) or, only when asked with ``?all=true``,
    every entry: an empty query must never wipe the DLQ."""
    services: Services = request.app.state.services
    if not function and not purge_all:
        raise MalformedRequest("say what to purge: ?function=<name>, or ?all=true for "
                               "every entry")
    try:
        purged = await dlq.purge(services, function=function or None)
    except ValueError as exc:
        raise MalformedRequest(str(exc)) from exc
    return Response({"purged": purged, "function": function or None})


DLQ_ROUTES = [dlq_list, dlq_show, dlq_action, dlq_delete, dlq_purge]
