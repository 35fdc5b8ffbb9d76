"""deadletter — a message whose last delivery was lost still ends somewhere.

Consumes (from the ADVISORIES stream, so none is missed while no deadletter runs):
  $JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<STAGES>.*  MaxDeliveries
  $JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<JOBS>.*    MaxDeliveries
      JetStream gave up on a message: its last delivery was never settled (the worker was
      SIGKILLed, OOM-killed, lost with its node, or hung past AckWait). The consumer loop
      dead-letters what it sees fail; this is the case where nobody was left to see it.
Does:
  copies the original message to the DLQ with ``retries_exhausted``; for a stage task, also
  reports the task failed, so its job fails with that code instead of waiting forever (the
  conductor's fence drops the report if the attempt is no longer current); then deletes the
  task from the STAGES work queue, where it would otherwise stay for good. A message already
  gone (settled in the meantime) needs nothing.
Emits:
  dlq.<function>       DeadLetter     Nats-Msg-Id dlq:<stream>:<seq>, as the consumer loop's
                                      own entries, so a message both paths see is kept once
  jobs.stage.complete  StageComplete  error retries_exhausted
"""

from __future__ import annotations

import msgspec

from shared import msgids
from shared.dlq import load_original, remove_original
from shared.errors import ErrorCode, PermanentError
from shared.events import DeadLetter, ErrorInfo, Event, StageTask, decode
from shared.function import Context, Function
from shared.stage import report
from shared.subjects import TOKEN_RE, Names

function = Function(name="deadletter", doc=__doc__ or "")


class MaxDeliveries(Event, tag="io.nats.jetstream.advisory.v1.max_deliver", kw_only=True,
                    frozen=True):
    """JetStream's advisory (its ``type`` is the tag); other fields it carries are ignored."""

    stream: str
    consumer: str
    stream_seq: int
    deliveries: int



def function_of(consumer: str, *, stage: bool) -> str:
    """The function behind a consumer: ``stage-<function>`` (or its bulk lane,
    ``stage-<function>-bulk``: ``shared.fairshare``) on STAGES, ``<function>-<handler>``
    on JOBS (``shared.function.Function.subscribe``'s naming)."""
    name = (consumer.removeprefix("stage-").removesuffix("-bulk") if stage
            else consumer.split("-", 1)[0])
    return name if TOKEN_RE.match(name) else "unknown"


@function.subscribe("advisories", lambda n: Names.max_deliveries(n.stages_stream),
                    MaxDeliveries, durable="deadletter-stages", concurrency=4)
@function.subscribe("advisories", lambda n: Names.max_deliveries(n.jobs_stream),
                    MaxDeliveries, durable="deadletter-jobs", concurrency=4)
async def on_max_deliveries(advisory: MaxDeliveries, ctx: Context) -> None:
    services = ctx.services
    names = services.names
    if advisory.stream not in (names.stages_stream, names.jobs_stream):
        raise PermanentError(ErrorCode.INVALID_EVENT,
                             f"advisory for stream {advisory.stream!r}, not one of ours")
    original = await load_original(services, advisory.stream, advisory.stream_seq)
    if original is None:
        ctx.log.info("%s seq %d is gone already; nothing to do", advisory.stream,
                     advisory.stream_seq)
        return
    stage = advisory.stream == names.stages_stream
    error = ErrorInfo(
        code=str(ErrorCode.RETRIES_EXHAUSTED),
        message=f"the worker was lost on the last delivery ({advisory.deliveries} of "
                f"{advisory.deliveries}): no result came back (killed, out of memory, or "
                "hung past its AckWait)",
        details={"consumer": advisory.consumer, "last_error": "worker_lost"},
    )
    name = function_of(advisory.consumer, stage=stage)
    letter = DeadLetter(
        function=name, subject=names.strip(original.subject), data=original.data,
        headers=original.headers, error=error, num_delivered=advisory.deliveries,
        stream_seq=advisory.stream_seq,
    )
    await services.bus.publish(names.dlq(name), letter,
                               msg_id=msgids.dlq_entry(advisory.stream, advisory.stream_seq))
    ctx.log.warning("%s seq %d (%s) dead-lettered: %s", advisory.stream, advisory.stream_seq,
                    advisory.consumer, error.message)
    if not stage:
        return  # JOBS keeps its messages (limits retention): nothing is stuck there
    try:
        task = decode(StageTask, original.data)
    except (msgspec.ValidationError, msgspec.DecodeError):
        task = None
    if task is not None:
        await report(services, task, error=error, delivery=advisory.deliveries)
    await remove_original(services, advisory.stream, advisory.stream_seq)
