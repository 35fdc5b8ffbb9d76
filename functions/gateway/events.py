"""``GET /v1/jobs/{id}/events``: a job's lifecycle and progress as server-sent events.

The source is the EVENTS stream (``events.<tenant>.<job_id>``), read by an ordered
consumer: it replays the job's history, then follows it live. Each SSE ``id`` is the
event's stream sequence, so a client that reconnects with ``Last-Event-ID`` (browsers do it
by themselves) resumes exactly after the last event it saw. The stream ends after the
job's terminal status event; a resume past the end answers ``204`` (which tells a browser's
EventSource to stop reconnecting).

The record in KV, not this stream, is the truth: events are published fire-and-forget and
expire after a day. So when the history holds no terminal event but the record is
terminal, a final ``status`` event (without an ``id``) is made from the record and the
stream ends; an idle stream re-reads the record at every heartbeat for the same reason.
Heartbeat comments (``JETCUT_SSE_HEARTBEAT_S``) keep proxies from closing an idle stream.
A client that disconnects releases the consumer at once (it is deleted, not left to time
out). A gateway that is shutting down ends every stream at once (a browser reconnects to
the next gateway with ``Last-Event-ID``), so open streams never hold up a Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import Any

import anyio
import msgspec
import nats.errors
from litestar import Response
from litestar.response import ServerSentEvent, ServerSentEventMessage
from nats.aio.msg import Msg
from nats.js import api

from functions.gateway.views import load_job, stream_seq
from shared.events import JobEvent
from shared.function import Services
from shared.jobstate import TERMINAL_JOB, JobRecord

_decoder = msgspec.json.Decoder(JobEvent)
TERMINAL = frozenset(str(s) for s in TERMINAL_JOB)


def _resume_after(header: str | None, query: int | None) -> int:
    """The sequence to resume after (0: from the start)."""
    if query is not None:
        value = str(query)
    elif header is not None:
        value = header.strip()
    else:
        return 0
    return stream_seq(value, "Last-Event-ID (an event id, a stream sequence)", minimum=0)


def _message(seq: int | None, event: JobEvent) -> ServerSentEventMessage:
    data = msgspec.json.encode(event).decode()
    return ServerSentEventMessage(data=data, event=event.kind, id=seq)


def _final(record: JobRecord) -> ServerSentEventMessage:
    """The terminal status, from the record, for a history that lacks it."""
    return _message(None, JobEvent(job_id=record.job_id, tenant=record.tenant, kind="status",
                                   status=str(record.status), error=record.error,
                                   progress=record.progress,
                                   at=record.finished_at or record.updated_at))


def _is_terminal(event: JobEvent) -> bool:
    return event.kind == "status" and event.status in TERMINAL


async def _subscribe(services: Services, record: JobRecord, after: int) -> Any:
    config = api.ConsumerConfig(
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE if after else api.DeliverPolicy.ALL,
        opt_start_seq=after + 1 if after else None,
    )
    return await services.bus.js.subscribe(
        services.names.events(record.tenant, record.job_id),
        stream=services.names.events_stream, ordered_consumer=True, config=config,
        # A backstop only: the consumer is deleted when the client goes away.
        inactive_threshold=max(30.0, 2 * services.settings.sse_heartbeat_s),
    )


async def _release(services: Services, sub: Any) -> None:
    """Delete the consumer now, even while the request is being cancelled."""
    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
        info = await sub.consumer_info()
        await sub.unsubscribe()
        await services.bus.js.delete_consumer(services.names.events_stream, info.name)


SETTLE_S = 1.0
"""How long to wait for a terminal event the record already shows (the conductor emits it
just after writing the record) before making it from the record."""


async def _next(sub: Any, wait_s: float, stopping: asyncio.Event | None) -> Msg | None:
    """The subscription's next message; None once the gateway is shutting down."""
    if stopping is None:
        msg: Msg = await sub.next_msg(timeout=wait_s)
        return msg
    if stopping.is_set():
        return None
    nxt = asyncio.ensure_future(sub.next_msg(timeout=wait_s))
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait([nxt, stop], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not nxt.done():
            nxt.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await nxt
    if nxt.cancelled():
        return None
    return nxt.result()


async def _stream(services: Services, record: JobRecord, sub: Any, history: int,
                  stopping: asyncio.Event | None) -> AsyncGenerator[ServerSentEventMessage, None]:
    heartbeat = services.settings.sse_heartbeat_s
    caught_up, settling = history == 0, False
    try:
        if caught_up and record.terminal:
            yield _final(record)
            return
        while True:
            try:
                msg = await _next(sub, SETTLE_S if settling else heartbeat, stopping)
            except nats.errors.TimeoutError:
                record = await services.jobs.get(record.job_id)
                if record.terminal and settling:
                    yield _final(record)
                    return
                settling = record.terminal  # its own event may be a moment behind
                yield ServerSentEventMessage(data=None, comment="keep-alive")
                continue
            if msg is None:
                return  # shutting down
            try:
                event = _decoder.decode(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue  # not ours to interpret; the next event still comes
            yield _message(msg.metadata.sequence.stream, event)
            if _is_terminal(event):
                return
            if not caught_up and msg.metadata.num_pending == 0:
                caught_up = True  # history replayed: is the job over without saying so?
                settling = (await services.jobs.get(record.job_id)).terminal
    finally:
        await _release(services, sub)


async def respond(services: Services, tenant: str, job_id: str, *, header: str | None,
                  query: int | None, stopping: asyncio.Event | None = None) -> Response[Any]:
    """The job's event stream, resumed after ``Last-Event-ID`` (``header``) or
    ``?last_event_id=`` (``query``); ``204`` when resumed past the job's end. The stream
    ends when ``stopping`` is set (the gateway is shutting down).

    Raises:
        MalformedRequest: a resume point that is no event id.
        PermanentError: ``not_found`` for no such job of ``tenant``.
    """
    after = _resume_after(header, query)
    record = await load_job(services, tenant, job_id)
    sub = await _subscribe(services, record, after)
    try:
        info = await sub.consumer_info()
        history = (info.num_pending or 0) + (info.delivered.consumer_seq or 0)
        record = await load_job(services, record.tenant, job_id)  # after subscribing: no gap
    except BaseException:
        await _release(services, sub)
        raise
    if after and history == 0 and record.terminal:
        await _release(services, sub)
        return Response(None, status_code=204)
    return ServerSentEvent(_stream(services, record, sub, history, stopping))
