"""``/v1/dlq``: dead letters over HTTP (admin-scoped: entries belong to every tenant).

Every route takes an admin API key (``jetcut keys create --admin``); any other key is 403
``forbidden``. An anonymous caller (``JETCUT_ALLOW_ANONYMOUS``, development) is admin.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Controller, delete, get, post
from litestar.params import PathParameter, QueryParameter

from functions.gateway.auth import require_admin
from functions.gateway.deps import ServicesDep
from functions.gateway.openapi import errors
from functions.gateway.views import MAX_SEQ, SEQ_PATTERN, stream_seq
from shared import dlq, dlqgroups
from shared.errors import ErrorCode, MalformedRequest, PermanentError
from shared.subjects import TOKEN_RE

SEQ = PathParameter(description="The entry's sequence in the DLQ stream (a positive integer).",
                    pattern=SEQ_PATTERN)
ACTION = PathParameter(description="``<seq>:replay``: the entry's sequence and the action.",
                       pattern=SEQ_PATTERN.removesuffix("$") + ":[a-z]+$")
GROUP_ACTION = PathParameter(
    description="``<group>:replay``: a group id as ``GET /v1/dlq/groups`` lists it "
                "(``<function>.<error code>.<12 hex digits>``) and the action.",
    pattern=r"^[A-Za-z0-9_.-]{1,160}:[a-z]+$")
FUNCTION = QueryParameter(description="Only this function's entries.",
                          pattern=TOKEN_RE.pattern)


class PurgeView(msgspec.Struct):
    purged: int
    """Entries deleted."""
    function: str | None = None
    """Whose entries (``null``: every function's, or one entry by its sequence)."""


def _dlq_seq(value: str) -> int:
    return stream_seq(value, "a DLQ entry's sequence")


class DeadLetterController(Controller):
    """Dead letters: list, show, replay, purge (``shared/dlq.py`` does the work)."""

    path = "/dlq"
    tags = ["dead letters"]
    guards = [require_admin]

    @get("/", responses=errors(400, 403, 503))
    async def dlq_list(self, services: ServicesDep,
                       function: Annotated[str | None, FUNCTION] = None,
                       after: Annotated[int, QueryParameter(ge=0, le=MAX_SEQ)] = 0,
                       limit: Annotated[int, QueryParameter(ge=1, le=dlq.MAX_PAGE)] = 50,
                       ) -> dlq.Page:
        """Dead letters, oldest first, ``limit`` at a time after sequence ``after``."""
        try:
            return await dlq.list_entries(services, function=function or None, after=after,
                                          limit=limit)
        except ValueError as exc:
            raise MalformedRequest(str(exc)) from exc

    @get("/groups", responses=errors(403, 503))
    async def dlq_groups(self, services: ServicesDep) -> dlqgroups.GroupList:
        """Dead letters grouped by function (stage), error code and the shape of the
        message (ids, numbers, paths made uniform): one group per cause, largest first,
        each with its count, first and last time seen, and its newest entry."""
        return await dlqgroups.list_groups(services)

    @post("/groups/{group:str}", status_code=200, responses=errors(400, 403, 404, 503))
    async def dlq_replay_group(self, services: ServicesDep,
                               group: Annotated[str, GROUP_ACTION],
                               ) -> dlqgroups.GroupReplayResult:
        """``POST /v1/dlq/groups/{group}:replay``: replay every entry of the group once
        (the stage tasks of one job: one retry of it) and remove them from the DLQ; an
        entry whose job is not failed or cancelled is kept (``kept``). Repeating the call
        finds the group gone (404) unless the same cause dead-lettered more since."""
        target, _, action = group.rpartition(":")
        if action != "replay" or not target:
            raise PermanentError(ErrorCode.NOT_FOUND, "no such resource; did you mean "
                                 "POST /v1/dlq/groups/{group}:replay?")
        return await dlqgroups.replay_group(services, target)

    @get("/{seq:str}", responses=errors(400, 403, 404, 503))
    async def dlq_show(self, services: ServicesDep, seq: Annotated[str, SEQ]) -> dlq.Entry:
        """One entry with its original headers and payload."""
        return await dlq.get_entry(services, _dlq_seq(seq))

    @post("/{seq:str}", status_code=200, responses=errors(400, 403, 404, 409, 503))
    async def dlq_replay(self, services: ServicesDep,
                         seq: Annotated[str, ACTION]) -> dlq.ReplayResult:
        """``POST /v1/dlq/{seq}:replay`` (see ``JobController.retry_job`` for the path
        shape): act on the entry again and remove it from the DLQ."""
        target, _, action = seq.rpartition(":")
        if action != "replay":
            raise PermanentError(ErrorCode.NOT_FOUND, "no such resource; did you mean "
                                 "POST /v1/dlq/{seq}:replay?")
        return await dlq.replay(services, _dlq_seq(target))

    @delete("/{seq:str}", status_code=200, responses=errors(400, 403, 404, 503))
    async def dlq_delete(self, services: ServicesDep, seq: Annotated[str, SEQ]) -> PurgeView:
        """Delete one entry."""
        return PurgeView(purged=await dlq.purge_entry(services, _dlq_seq(seq)))

    @delete("/", status_code=200, responses=errors(400, 403, 503))
    async def dlq_purge(self, services: ServicesDep,
                        function: Annotated[str | None, FUNCTION] = None,
                        purge_all: Annotated[bool, QueryParameter(name="all")] = False,
                        ) -> PurgeView:
        """Purge one function's entries (``?function=``) or, only when asked with
        ``?all=true``, every entry: an empty query must never wipe the DLQ."""
        if not function and not purge_all:
            raise MalformedRequest("say what to purge: ?function=<name>, or ?all=true for "
                                   "every entry")
        try:
            purged = await dlq.purge(services, function=function or None)
        except ValueError as exc:
            raise MalformedRequest(str(exc)) from exc
        return PurgeView(purged=purged, function=function or None)
