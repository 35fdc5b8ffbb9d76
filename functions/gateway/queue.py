"""GET /v1/queue — how deep each queue is — and a queued job's place in its queue.

Everything comes from JetStream's own bookkeeping, nothing from worker memory: a stage's
durable consumer knows how many tasks it has not delivered yet (``pending``), how many are
delivered and unacknowledged (``in_flight``), how many fetch requests wait for work
(``waiting_pulls``: idle worker slots), and the first undelivered task's publish time gives
the oldest pending age.

A queued job's position is counted, not estimated: starting at the stage consumer's first
undelivered sequence, the tasks on ``stages.<stage>`` are read in order until the job's
own (at most ``JETCUT_QUEUE_POSITION_SCAN`` reads; beyond that it is reported ``capped``).
A task in the stage's bulk lane (``stages.<stage>.bulk``, fair share) waits behind every
task of the fast lane too, so those are counted first. The bulk lane also shows up in the
queue view as its own row, ``<stage>.bulk``.
A job the conductor has not planned yet waits the same way in ``jobs.submit``.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from litestar import Controller, get
from nats.js.errors import NotFoundError

from functions.gateway.deps import ServicesDep
from functions.gateway.openapi import errors
from functions.gateway.views import QueueSpot
from shared.fairshare import bulk_subject
from shared.function import Services
from shared.jobstate import JobRecord, JobStatus, StepStatus

CONDUCTOR_SUBMIT = "conductor-submit"
"""The conductor's durable on ``jobs.submit`` (functions/conductor)."""


class StageQueue(msgspec.Struct):
    stage: str
    """The stage (``stages.<stage>``), or ``submit`` for the conductor's ``jobs.submit``."""
    consumer: str | None
    """Its durable consumer; ``null`` while no worker of the stage has ever started."""
    pending: int
    """Tasks waiting to be delivered."""
    in_flight: int
    """Delivered to a worker and not yet acknowledged (running, or awaiting redelivery)."""
    waiting_pulls: int
    """Fetch requests waiting for work: idle worker slots."""
    redelivered: int
    oldest_pending_age_s: float | None
    """Seconds since the first waiting task was published; ``null`` when none waits."""


class DlqSize(msgspec.Struct):
    entries: int
    by_function: dict[str, int]


class QueueView(msgspec.Struct):
    stages: list[StageQueue]
    submit: StageQueue | None
    """The conductor's backlog of submitted, not yet planned jobs."""
    dlq: DlqSize
    at: float


class _JobRef(msgspec.Struct):
    job_id: str | None = None


_job_ref = msgspec.json.Decoder(_JobRef)


async def _consumer(services: Services, stream: str, durable: str) -> Any | None:
    try:
        return await services.bus.js.consumer_info(stream, durable)
    except NotFoundError:
        return None


async def _next(services: Services, stream: str, subject: str, seq: int) -> Any | None:
    """The first message on ``subject`` at or after ``seq`` (None: there is none)."""
    try:
        return await services.bus.js.get_msg(stream, seq=seq, subject=subject, next=True)
    except NotFoundError:
        return None


def _first_undelivered(info: Any | None) -> int:
    return (info.delivered.stream_seq or 0) + 1 if info is not None else 1


async def stage_queue(services: Services, stream: str, stage: str, subject: str,
                      info: Any | None, subject_count: int | None = None) -> StageQueue:
    oldest = await _next(services, stream, subject, _first_undelivered(info))
    age = (max(0.0, time.time() - oldest.time.timestamp())
           if oldest is not None and oldest.time is not None else None)
    if info is None:
        return StageQueue(stage=stage, consumer=None, pending=subject_count or 0, in_flight=0,
                          waiting_pulls=0, redelivered=0, oldest_pending_age_s=age)
    return StageQueue(stage=stage, consumer=info.name, pending=info.num_pending or 0,
                      in_flight=info.num_ack_pending or 0,
                      waiting_pulls=info.num_waiting or 0,
                      redelivered=info.num_redelivered or 0,
                      oldest_pending_age_s=age if info.num_pending else None)


async def queue_view(services: Services) -> QueueView:
    """Every stage's queue (each consumer of ``STAGES``, and stages with tasks but no
    consumer yet), the conductor's submit backlog and the DLQ's size."""
    names, js = services.names, services.bus.js
    stream = names.stages_stream
    counts = (await js.stream_info(stream, subjects_filter=names.all("stages"))).state.subjects
    by_stage = {names.strip(s).removeprefix("stages."): n for s, n in (counts or {}).items()}
    consumers = {}
    for info in await js.consumers_info(stream):
        subject = info.config.filter_subject or ""
        consumers[names.strip(subject).removeprefix("stages.")] = info
    stages = [
        # A stage's bulk lane (fair share) is its own row, ``<stage>.bulk``.
        await stage_queue(services, stream, stage, names.qualify(f"stages.{stage}"),
                          consumers.get(stage),
                          by_stage.get(stage))
        for stage in sorted(set(consumers) | set(by_stage))
    ]
    submit_info = await _consumer(services, names.jobs_stream, CONDUCTOR_SUBMIT)
    submit = await stage_queue(services, names.jobs_stream, "submit", names.submit,
                               submit_info) if submit_info is not None else None
    dlq = await js.stream_info(names.dlq_stream, subjects_filter=names.all("dlq"))
    by_function = {names.strip(s).removeprefix("dlq."): n
                   for s, n in (dlq.state.subjects or {}).items()}
    return QueueView(stages=stages, submit=submit,
                     dlq=DlqSize(entries=dlq.state.messages, by_function=by_function),
                     at=time.time())


class QueueController(Controller):
    path = "/queue"
    tags = ["operations"]

    @get("/", responses=errors(503))
    async def get_queue(self, services: ServicesDep) -> QueueView:
        """Per stage: tasks waiting, in flight, idle worker slots, oldest waiting age; the
        conductor's submit backlog; dead letters per function."""
        return await queue_view(services)


async def _walk(services: Services, stream: str, subject: str, start: int, job_id: str,
                stage: str, *, ahead: int = 0, missing: QueueSpot | None = None) -> QueueSpot:
    """Count the messages on ``subject`` from ``start`` until the job's own, after ``ahead``
    counted already; ``missing`` (default: next in line) when the job's is not there."""
    cap = services.settings.queue_position_scan
    seq = start
    while ahead < cap:
        msg = await _next(services, stream, subject, seq)
        if msg is None:
            # Delivered meanwhile, unless the caller looks elsewhere next.
            return missing or QueueSpot(stage=stage, ahead=0, capped=False)
        try:
            if _job_ref.decode(msg.data or b"").job_id == job_id:
                return QueueSpot(stage=stage, ahead=ahead, capped=False)
        except (msgspec.DecodeError, msgspec.ValidationError):
            pass
        ahead, seq = ahead + 1, msg.seq + 1
    return QueueSpot(stage=stage, ahead=cap, capped=True)


async def queue_spot(services: Services, record: JobRecord) -> QueueSpot | None:
    """Where a queued job waits: tasks ahead of its first ready step in that stage's queue
    (or submits ahead of it, while the conductor has not planned it). ``None`` once the
    job runs."""
    if record.status != JobStatus.QUEUED:
        return None
    names = services.names
    if not record.planned:
        info = await _consumer(services, names.jobs_stream, CONDUCTOR_SUBMIT)
        return await _walk(services, names.jobs_stream, names.submit, _first_undelivered(info),
                           record.job_id, "submit")
    ready = [s for s in record.steps.values() if s.status == StepStatus.READY]
    if not ready:
        return None
    stage = min(ready, key=lambda s: s.ready_at or 0.0).stage
    subject, bulk = names.stage(stage), bulk_subject(names.stage(stage))
    # No consumer yet (no worker of the stage ever started): every task on it is ahead.
    consumers = {i.config.filter_subject: i
                 for i in await services.bus.js.consumers_info(names.stages_stream)}
    start = _first_undelivered(consumers.get(subject))
    not_fast = QueueSpot(stage=stage, ahead=-1)
    spot = await _walk(services, names.stages_stream, subject, start, record.job_id, stage,
                       missing=not_fast)
    if spot is not not_fast:
        return spot
    # In the bulk lane: behind every undelivered task of the fast lane.
    fast = consumers.get(subject)
    if fast is not None:
        before = fast.num_pending or 0
    else:  # nothing delivered yet: every task on it
        info = await services.bus.js.stream_info(names.stages_stream, subjects_filter=subject)
        before = (info.state.subjects or {}).get(subject, 0)
    return await _walk(services, names.stages_stream, bulk, _first_undelivered(
        consumers.get(bulk)), record.job_id, stage, ahead=before)
