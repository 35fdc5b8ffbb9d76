"""The DLQ stream as operators use it: list, show, replay and purge dead letters.

Entries are ``DeadLetter`` events on ``dlq.<function>`` (``Names.dlq``), written by the
consumer loop (poison messages, retries exhausted) and by the ``deadletter`` function (a
worker lost on a message's last delivery), both with ``Nats-Msg-Id`` ``dlq:<stream>:<seq>``
(``shared.msgids.dlq_entry``), so a message that both paths see is kept once. An entry is
addressed by its sequence in the DLQ stream, which is also the cursor for paging.

Replaying a dead ``StageTask`` asks the conductor to retry its job (``JobRetry(mode=
"failed")``): re-publishing the old attempt would only be dropped by the fence. Anything
else is re-published to its original subject under ``replay:<seq>``. A replayed or purged
entry leaves the DLQ.

This is admin tooling: it sees every tenant's entries (API keys and tenant scopes come with
issue 5; the gateway's DLQ endpoints are admin-only by then).
"""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any, Literal

import msgspec
import nats.errors
import nats.js.errors
from nats.js import api

from shared import msgids
from shared.errors import ErrorCode, JetcutError, TransientError
from shared.events import DeadLetter, ErrorInfo, JobRetry, StageTask, decode
from shared.function import Services
from shared.jobstore import JobNotFound

MAX_PAGE = 500
REPLAYABLE_JOB_STATES = ("failed", "cancelled")
_HEADERS_NOT_REPLAYED = ("Nats-Msg-Id", "Nats-Expected-Stream", "Nats-Expected-Last-Sequence",
                         "Nats-Expected-Last-Subject-Sequence", "Nats-Expected-Last-Msg-Id")


class EntryNotFound(JetcutError):
    """No DLQ entry at that sequence (never written, purged, replayed or expired)."""

    code = ErrorCode.NOT_FOUND
    non_retryable = True

    def __init__(self, seq: int) -> None:
        super().__init__(f"no DLQ entry {seq}", details={"seq": seq})


class ReplayConflict(JetcutError):
    """The entry's job is not in a state a retry applies to; the entry is kept."""

    code = ErrorCode.CONFLICT
    non_retryable = True


class Summary(msgspec.Struct, kw_only=True):
    """One entry in a listing: what failed, where, why."""

    seq: int
    function: str
    subject: str
    error: ErrorInfo
    num_delivered: int
    stream_seq: int | None
    at: float
    job_id: str | None = None
    """The job the message belonged to, when its payload names one."""


class Entry(Summary, kw_only=True):
    """One entry in full: the original message, ready to inspect or replay."""

    headers: dict[str, str] = {}
    data: str = ""
    """The original payload, base64-encoded (exact bytes)."""
    payload: Any = None
    """The original payload decoded as JSON, when it is JSON (``null`` otherwise)."""


class Page(msgspec.Struct, kw_only=True):
    entries: list[Summary]
    next_after: int | None
    """Pass as ``after`` for the next page; ``null`` on the last page."""


class ReplayResult(msgspec.Struct, kw_only=True):
    seq: int
    action: Literal["job_retry", "republished"]
    subject: str
    """Where the replay was published (without the namespace prefix)."""
    msg_id: str
    job_id: str | None = None
    message: str


class Original(msgspec.Struct, kw_only=True):
    """A message as it sits in a stream (what the DLQ entry is made from)."""

    subject: str
    data: bytes
    headers: dict[str, str]


def _payload(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None


def _summary(seq: int, letter: DeadLetter, payload: Any) -> Summary:
    job_id = payload.get("job_id") if isinstance(payload, dict) else None
    return Summary(seq=seq, function=letter.function, subject=letter.subject,
                   error=letter.error, num_delivered=letter.num_delivered,
                   stream_seq=letter.stream_seq, at=letter.at,
                   job_id=job_id if isinstance(job_id, str) else None)


async def _load(services: Services, seq: int) -> DeadLetter:
    try:
        raw = await services.bus.js.get_msg(services.names.dlq_stream, seq)
    except nats.js.errors.NotFoundError:
        raise EntryNotFound(seq) from None
    try:
        return decode(DeadLetter, raw.data or b"")
    except (msgspec.ValidationError, msgspec.DecodeError):
        # Someone published on dlq.* by hand: not an entry we can act on.
        raise EntryNotFound(seq) from None


async def get_entry(services: Services, seq: int) -> Entry:
    """One entry with its original headers and payload.

    Raises:
        EntryNotFound: no entry at ``seq``.
    """
    letter = await _load(services, seq)
    payload = _payload(letter.data)
    summary = _summary(seq, letter, payload)
    return Entry(**msgspec.structs.asdict(summary), headers=dict(letter.headers),
                 data=base64.b64encode(letter.data).decode(), payload=payload)


async def list_entries(services: Services, *, function: str | None = None, after: int = 0,
                       limit: int = 50) -> Page:
    """Entries with a sequence above ``after``, oldest first, optionally one function's.

    Raises:
        ValueError: ``limit`` outside 1..500, a negative ``after`` or a bad function name.
    """
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be within 1..{MAX_PAGE}")
    if after < 0:
        raise ValueError("after must be >= 0")
    names = services.names
    subject = names.dlq(function) if function else names.all("dlq")
    entries: list[Summary] = []
    seq = after + 1
    while len(entries) < limit:
        try:
            raw = await services.bus.js.get_msg(names.dlq_stream, seq=seq, subject=subject,
                                                next=True)
        except nats.js.errors.NotFoundError:
            break
        assert raw.seq is not None
        seq = raw.seq + 1
        try:
            letter = decode(DeadLetter, raw.data or b"")
        except (msgspec.ValidationError, msgspec.DecodeError):
            continue
        entries.append(_summary(raw.seq, letter, _payload(letter.data)))
    more = len(entries) == limit
    return Page(entries=entries, next_after=entries[-1].seq if more else None)


SCAN_STALL_S = 10.0
"""How long a scan waits for the next entry the server said is there before giving up."""


async def scan(services: Services, *, function: str | None = None) -> list[Summary]:
    """Every entry (or one function's), oldest first, in one pass.

    An ephemeral ordered consumer streams the entries: one round trip per entry
    (``list_entries``' pages) took seconds for a few thousand entries; a stream takes a
    fraction of that. The consumer is deleted afterwards.

    Raises:
        TransientError: ``bus_unavailable`` when the entries stop coming.
    """
    names = services.names
    subject = names.dlq(function) if function else names.all("dlq")
    js = services.bus.js
    if not await _count(services, subject):
        return []
    sub = await js.subscribe(subject, stream=names.dlq_stream, ordered_consumer=True,
                             config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL),
                             inactive_threshold=30.0)
    entries: list[Summary] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=SCAN_STALL_S)
            except nats.errors.TimeoutError:
                if not await _count(services, subject):
                    return entries  # the last ones were replayed or purged meanwhile
                raise TransientError("the DLQ stopped streaming its entries",
                                     code=ErrorCode.BUS_UNAVAILABLE) from None
            meta = msg.metadata
            try:
                letter = decode(DeadLetter, msg.data or b"")
            except (msgspec.ValidationError, msgspec.DecodeError):
                letter = None
            if letter is not None:
                entries.append(_summary(meta.sequence.stream, letter, _payload(letter.data)))
            if not meta.num_pending:
                return entries
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def _count(services: Services, subject: str) -> int:
    info = await services.bus.js.stream_info(services.names.dlq_stream,
                                             subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def replay(services: Services, seq: int) -> ReplayResult:
    """Act on an entry again and remove it from the DLQ.

    Raises:
        EntryNotFound: no entry at ``seq``.
        ReplayConflict: a stage task whose job is gone or not failed/cancelled (kept).
        TransientError: the bus did not acknowledge the replay (the entry is kept).
    """
    letter = await _load(services, seq)
    msg_id = msgids.replay(seq)
    task = _stage_task(letter)
    if task is not None:
        result = await _retry_job(services, seq, task, msg_id)
    else:
        result = await _republish(services, seq, letter, msg_id)
    await remove_original(services, services.names.dlq_stream, seq)  # a double click: gone
    return result


def _stage_task(letter: DeadLetter) -> StageTask | None:
    if not letter.subject.startswith("stages."):
        return None
    try:
        return decode(StageTask, letter.data)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None


async def _retry_job(services: Services, seq: int, task: StageTask,
                     msg_id: str) -> ReplayResult:
    try:
        record = await services.jobs.get(task.job_id)
    except JobNotFound:
        raise ReplayConflict(f"job {task.job_id} no longer exists; purge the entry instead",
                             details={"job_id": task.job_id}) from None
    if record.status not in REPLAYABLE_JOB_STATES:
        raise ReplayConflict(
            f"job {task.job_id} is {record.status}: only a failed or cancelled job is retried",
            details={"job_id": task.job_id, "status": str(record.status)})
    retry = JobRetry(job_id=task.job_id, tenant=task.tenant, mode="failed",
                     reason=f"replay of DLQ entry {seq} ({task.task_id})")
    await _publish(services, services.names.retry, retry, msg_id)
    return ReplayResult(
        seq=seq, action="job_retry", subject=services.names.strip(services.names.retry),
        msg_id=msg_id, job_id=task.job_id,
        message=f"job {task.job_id} retried from its checkpoints (a new attempt of step "
                f"{task.step!r}); the dead task itself was not re-published",
    )


async def _publish(services: Services, subject: str, event: JobRetry, msg_id: str) -> None:
    from shared.bus import PublishFailed

    try:
        await services.bus.publish(subject, event, msg_id=msg_id)
    except PublishFailed as exc:
        raise TransientError(str(exc), code=ErrorCode.BUS_UNAVAILABLE) from exc


async def _republish(services: Services, seq: int, letter: DeadLetter,
                     msg_id: str) -> ReplayResult:
    headers = {k: v for k, v in letter.headers.items() if k not in _HEADERS_NOT_REPLAYED}
    headers["Nats-Msg-Id"] = msg_id
    headers["jetcut-replay-of"] = str(seq)
    try:
        await services.bus.js.publish(services.names.qualify(letter.subject), letter.data,
                                      headers=headers)
    except nats.errors.Error as exc:
        raise TransientError(f"replay of DLQ entry {seq} was not acknowledged: {exc!r}",
                             code=ErrorCode.BUS_UNAVAILABLE) from exc
    payload = _payload(letter.data)
    job_id = payload.get("job_id") if isinstance(payload, dict) else None
    return ReplayResult(
        seq=seq, action="republished", subject=letter.subject, msg_id=msg_id,
        job_id=job_id if isinstance(job_id, str) else None,
        message=f"the original message was published again on {letter.subject}",
    )


async def purge_entry(services: Services, seq: int) -> int:
    """Delete one entry; 1.

    Raises:
        EntryNotFound: no entry at ``seq``.
    """
    await _load(services, seq)
    try:
        await services.bus.js.delete_msg(services.names.dlq_stream, seq)
    except nats.js.errors.NotFoundError:
        raise EntryNotFound(seq) from None
    return 1


async def purge(services: Services, *, function: str | None) -> int:
    """Delete one function's entries, or every entry (``function=None``); how many went."""
    names = services.names
    subject = names.dlq(function) if function else names.all("dlq")
    # nats-py's purge_stream drops the server's count; ask the API directly for it.
    reply = await services.bus.nc.request(
        f"$JS.API.STREAM.PURGE.{names.dlq_stream}", json.dumps({"filter": subject}).encode(),
        timeout=services.bus.publish_timeout_s,
    )
    answer = json.loads(reply.data)
    if "error" in answer:
        raise JetcutError(f"purge failed: {answer['error']}", code=ErrorCode.INTERNAL)
    return int(answer.get("purged", 0))


async def load_original(services: Services, stream: str, seq: int) -> Original | None:
    """Message ``seq`` of ``stream``, or None when it is gone (acked, deleted, expired)."""
    try:
        raw = await services.bus.js.get_msg(stream, seq)
    except nats.js.errors.NotFoundError:
        return None
    return Original(subject=raw.subject or "", data=raw.data or b"",
                    headers={str(k): str(v) for k, v in (raw.headers or {}).items()})


async def remove_original(services: Services, stream: str, seq: int) -> None:
    """Delete message ``seq`` from ``stream``; a message already gone is fine."""
    try:
        await services.bus.js.delete_msg(stream, seq)
    except nats.js.errors.NotFoundError:
        return
