"""conductor — owns the job state machine.

Consumes:
  jobs.submit          JobSubmit      plan the recipe into a DAG, publish the ready steps
  jobs.stage.complete  StageComplete  apply the result (fenced on step+attempt), publish
                                      newly ready steps, settle the job
  jobs.cancel          JobCancel      cancel the job: ``cancelling`` while steps run (they hear
                                      the same message, stop and report), then ``cancelled``;
                                      remove unfinished steps' outputs
  jobs.retry           JobRetry       failed: run a failed/cancelled job again from its
                                      checkpoints; stuck: new attempts for a stuck job's tasks
                                      (a stuck cancelling job: cancelled); failed with
                                      ``changes``: re-plan, delete what the change
                                      invalidates, run from the checkpoints that hold
Emits:
  stages.<stage>       StageTask      Nats-Msg-Id <job_id>:<step>:<attempt>; to
  stages.<stage>.bulk                 instead when its tenant is over its fair share
                                      (``shared.fairshare``)
  events.<tenant>.<id> JobEvent       status changes (``shared.announce``; the first task to
                                      start announces ``running`` the same way)
  jobs.cleanup         JobCleanup     when a job succeeds (Nats-Msg-Id cleanup:<job_id>):
                                      the janitor deletes its intermediates
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from functools import partial

from shared import announce, msgids, playback
from shared.costbook import job_backlog, job_eta, task_prediction
from shared.costmodel import timeout_for
from shared.errors import ErrorCode, JetcutError, PermanentError, error_info
from shared.events import (
    ErrorInfo,
    JobCancel,
    JobCleanup,
    JobEvent,
    JobRetry,
    JobSubmit,
    RetryChanges,
    StageComplete,
    StageTask,
    StepSpec,
    TaskInput,
    part_name,
)
from shared.fairshare import Lane, bulk_subject
from shared.function import Context, Function
from shared.ids import job_id_for
from shared.jobstate import (
    JobRecord,
    JobStatus,
    StepStatus,
    already_applied,
    attempt_of,
    cancel_job,
    complete,
    diff_plan,
    input_ref_index,
    live_tasks,
    mark_running,
    part_inputs,
    redrive,
    replan_job,
    retry_job,
    start_job,
)
from shared.jobstore import JobNotFound
from shared.media import step_timeout
from shared.recipes import STAGES, resolve
from shared.stage import step_prefix
from shared.subjects import check_token
from shared.submission import job_record

function = Function(name="conductor", doc=__doc__ or "")


@function.subscribe("jobs", lambda n: n.submit, JobSubmit, durable="conductor-submit",
                    concurrency=32)
async def on_submit(event: JobSubmit, ctx: Context) -> None:
    services = ctx.services
    try:
        check_token("tenant", event.tenant)
    except ValueError as exc:
        raise PermanentError(ErrorCode.INVALID_EVENT, str(exc)) from exc
    job_id = event.job_id or job_id_for(
        event.tenant, event.idempotency_key or f"seq:{ctx.delivery.stream_seq}"
    )
    try:
        check_token("job id", job_id)
    except ValueError as exc:
        raise PermanentError(ErrorCode.INVALID_EVENT, str(exc)) from exc
    error = await _check_job(event, ctx)
    steps = None if error is not None else resolve(
        event.recipe, event.steps, event.params, len(event.inputs))
    # A submitter that made no record (ingest, a service publishing JobSubmit) gets it
    # created already planned: one write. Otherwise (the gateway made it, or this is a
    # redelivery) the existing record is planned by compare-and-set.
    record = job_record(event, job_id)
    started: bool | None = start_job(record, steps=steps, error=error)
    if await services.jobs.create(record) is None:
        record, started = await services.jobs.apply(
            job_id, partial(start_job, steps=steps, error=error))
    # Publish every ready step, not only new ones: a redelivered submit (conductor crashed
    # after the KV write) re-drives them, and the message ids make repeats no-ops.
    await _publish_ready(record, ctx)
    await _announce(record, ctx, changed=bool(started))


async def _check_job(event: JobSubmit, ctx: Context) -> ErrorInfo | None:
    """What makes the job fail before any step runs: a bad recipe or a missing input."""
    try:
        resolve(event.recipe, event.steps, event.params, len(event.inputs))
    except JetcutError as exc:
        return error_info(exc)
    for ref in event.inputs:
        if not await ctx.services.store.exists(ref.key):
            return ErrorInfo(code=str(ErrorCode.INPUT_NOT_FOUND),
                             message=f"input {ref.key!r} does not exist in the store")
    return None


@function.subscribe("jobs", lambda n: n.stage_complete, StageComplete,
                    durable="conductor-complete", concurrency=32)
async def on_complete(event: StageComplete, ctx: Context) -> None:
    services = ctx.services
    record, done = await services.jobs.apply(event.job_id, partial(complete, done=event),
                                             _known(event, ctx), fresh=False)
    if done is None:
        if already_applied(record, event):
            # A redelivered completion we already applied: we may have crashed before
            # publishing what it made ready, so publish again (ids dedup).
            await _publish_ready(record, ctx)
            await _announce(record, ctx, changed=False)
        else:
            ctx.log.info("stale completion %s:%s:%d ignored", event.job_id,
                         part_name(event.step, event.part), event.attempt)
        return
    await services.bus.emit(JobEvent(
        job_id=record.job_id, tenant=record.tenant, kind="step", step=event.step,
        step_status=record.steps[event.step].status, error=event.error,
        progress=record.progress, eta_s=await job_eta(ctx.services.costs, record, time.time()),
    ))
    await _publish(record, ctx, done.ready)
    if event.part == 0 and event.step == playback.first_step(record) and (
            at := playback.playable_at(record)) is not None:
        await services.bus.emit(JobEvent(job_id=record.job_id, tenant=record.tenant,
                                         kind="playable", step=event.step, at=at,
                                         progress=record.progress))
    if done.status_changed:
        await _remove_unfinished(record, ctx)
        await _announce(record, ctx, changed=True)


def _known(event: StageComplete, ctx: Context) -> tuple[JobRecord, int] | None:
    """The record as the worker's lease write left it, if this process knows it without a
    read: it wrote or read that revision (the task's dispatch, usually), and replays the
    worker's ``mark_running``. The write that follows is a compare-and-set on it, so a
    record changed since (progress, another step) costs one lost write and a read."""
    taken = event.taken
    if taken is None:
        return None
    return ctx.services.jobs.recent(
        event.job_id, taken.revision, base=taken.base,
        replay=partial(mark_running, step=event.step, attempt=event.attempt, part=event.part,
                       delivery=event.delivery, now=taken.at))


@function.subscribe("jobs", lambda n: n.cancel, JobCancel, durable="conductor-cancel",
                    concurrency=8)
async def on_cancel(event: JobCancel, ctx: Context) -> None:
    services = ctx.services
    try:
        record, changed = await services.jobs.apply(
            event.job_id, partial(cancel_job, reason=event.reason))
    except JobNotFound:
        ctx.log.info("cancel for unknown job %s ignored", event.job_id)
        return
    if not changed:
        return
    await _remove_unfinished(record, ctx)
    await _announce(record, ctx, changed=True)


async def _remove_unfinished(record: JobRecord, ctx: Context) -> None:
    """Once a job is cancelled, delete what its unfinished work left behind (a part
    written before the kill landed); what finished steps and parts made stays, with their
    manifests, as the job record lists it, so a retry resumes from there. Idempotent."""
    if record.status != JobStatus.CANCELLED:
        return  # cancelling: running tasks may still finish and keep their results
    store = ctx.services.store
    for name, step in record.steps.items():
        if step.status == StepStatus.DONE:
            continue
        if step.each is None or not step.parts:
            await store.delete_prefix(step_prefix(record.job_id, name))
            continue
        for index, part in enumerate(step.parts):
            if part.status != StepStatus.DONE:
                await store.delete_prefix(step_prefix(record.job_id, name, index))


@function.subscribe("jobs", lambda n: n.retry, JobRetry, durable="conductor-retry",
                    concurrency=8)
async def on_retry(event: JobRetry, ctx: Context) -> None:
    services = ctx.services
    if event.changes is not None and event.mode == "failed":
        await _replan(event, event.changes, ctx)
        return
    try:
        if event.mode == "failed":
            transition: Callable[[JobRecord], bool] = retry_job
        else:
            # A job whose submit was lost before it was planned is planned now; its recipe,
            # pipeline, params and inputs never change, so one read is enough to resolve.
            steps, error = _resolve(await services.jobs.get(event.job_id))
            transition = partial(redrive, steps=steps, error=error)
        record, changed = await services.jobs.apply(event.job_id, transition)
    except JobNotFound:
        ctx.log.info("retry for unknown job %s ignored", event.job_id)
        return
    if not changed:
        ctx.log.info("retry (%s) of job %s in status %s: nothing to do", event.mode,
                     event.job_id, record.status)
        return
    ctx.log.info("job %s %s (%s)", event.job_id,
                 "re-driven" if event.mode == "stuck" else "retried", event.reason or "on request")
    await _remove_unfinished(record, ctx)
    await _publish_ready(record, ctx)
    await _announce(record, ctx, changed=True)


async def _replan(event: JobRetry, changes: RetryChanges, ctx: Context) -> None:
    """A retry with changes: plan the job again, delete the outputs of the steps the
    change invalidates, then run it from the checkpoints that still hold.

    The deletes come before the record is written: a crash in between leaves a failed job
    whose redelivered retry deletes again (idempotent) and writes; the other order could
    leave a running job whose changed steps find an old checkpoint and skip their work.
    """
    services = ctx.services
    try:
        record, revision = await services.jobs.get_with_revision(event.job_id)
    except JobNotFound:
        ctx.log.info("retry for unknown job %s ignored", event.job_id)
        return
    replaced = changes.recipe is not None or changes.steps is not None
    recipe, pipeline = ((changes.recipe, changes.steps) if replaced
                        else (record.recipe, record.pipeline))
    params = changes.params if changes.params is not None else record.params
    try:
        steps = resolve(recipe, pipeline, params, len(record.inputs))
    except JetcutError as exc:
        raise PermanentError(ErrorCode.INVALID_RECIPE,
                             f"retry of job {event.job_id} with changes: {exc.message}",
                             details=exc.details) from None
    if record.status in (JobStatus.FAILED, JobStatus.CANCELLED) and record.planned:
        for name in diff_plan(record, steps).stale:
            await services.store.delete_prefix(step_prefix(record.job_id, name))
    record, diff = await services.jobs.apply(
        event.job_id, partial(replan_job, steps=steps, changes=changes),
        current=(record, revision))
    if diff is None:
        ctx.log.info("retry with changes of job %s in status %s: nothing to do",
                     event.job_id, record.status)
        return
    ctx.log.info("job %s re-planned (%s): kept %s, running again %s", event.job_id,
                 event.reason or "on request", diff.kept, diff.rerun)
    await _publish_ready(record, ctx)
    await _announce(record, ctx, changed=True)


def _resolve(record: JobRecord) -> tuple[dict[str, StepSpec] | None, ErrorInfo | None]:
    """The steps of a job's recipe or pipeline, or why it has none."""
    try:
        return resolve(record.recipe, record.pipeline, record.params, len(record.inputs)), None
    except JetcutError as exc:
        return None, error_info(exc)


async def _publish_ready(record: JobRecord, ctx: Context) -> None:
    """(Re-)publish every task that should exist; message ids make repeats no-ops."""
    await _publish(record, ctx, live_tasks(record))


async def _publish(record: JobRecord, ctx: Context, tasks: list[tuple[str, int | None]]) -> None:
    """Publish ``tasks`` at once, each still awaiting its own PubAck: a fan-out of N parts
    costs one round trip of wall time, not N. If any publish fails, the message is
    redelivered and all are published again (their ids make repeats no-ops)."""
    predicted = [await task_prediction(ctx.services.costs, record, step_name, part)
                 for step_name, part in tasks]
    lanes = await _lanes(record, ctx, predicted)  # also notes a finished job's end
    if record.terminal or not tasks:
        return
    bus, names = ctx.services.bus, ctx.services.names
    built = [_task(record, step_name, part, ctx, seconds)
             for (step_name, part), seconds in zip(tasks, predicted, strict=True)]
    await _all(bus.publish(_subject(names.stage(task.stage), lane), task, msg_id=task.task_id)
               for task, lane in zip(built, lanes, strict=True))


def _subject(fast: str, lane: Lane) -> str:
    return fast if lane == "fast" else bulk_subject(fast)


async def _all(publishes: Iterable[Awaitable[object]]) -> None:
    """Await every publish, and all of them even when one fails (so none is left running
    unobserved), then raise the first failure."""
    results = await asyncio.gather(*publishes, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def _lanes(record: JobRecord, ctx: Context, predicted: list[float]) -> list[Lane]:
    """Each task's lane, given its predicted compute-seconds (fair share,
    ``shared.fairshare``); notes the job's backlog in this conductor's ledger, its end
    included."""
    fair = ctx.services.fair
    if fair is None:
        return ["fast"] * len(predicted)
    backlog = await job_backlog(ctx.services.costs, record, time.time())
    return fair.lanes(record.tenant, record.job_id, backlog, predicted)


def _task(record: JobRecord, step_name: str, part: int | None, ctx: Context,
          predicted_s: float) -> StageTask:
    step = record.steps[step_name]
    inputs: list[TaskInput] = []
    for ref in step.uses:
        index = input_ref_index(ref)
        if index is not None:
            item = record.inputs[index]
            inputs.append(TaskInput(ref=ref, files={"media": item.key},
                                    meta={"filename": item.filename, "size": item.size}))
        elif ref == step.each and part is not None:
            # A part gets its files of the step it expands over (``part_inputs``).
            upstream = record.steps[ref]
            groups = part_inputs(upstream.outputs)
            names = {key: name for name, key in upstream.outputs.items()}
            inputs.append(TaskInput(ref=ref, stage=upstream.stage, files=groups[part],
                                    meta={**upstream.meta, "index": part,
                                          "name": names[groups[part]["part"]],
                                          "count": len(groups)}))
        elif record.steps[ref].status == StepStatus.DONE:  # skipped inputs of a fan-in: none
            upstream = record.steps[ref]
            inputs.append(TaskInput(ref=ref, stage=upstream.stage, files=dict(upstream.outputs),
                                    meta=dict(upstream.meta)))
    duration = _media_duration(record)
    return StageTask(
        job_id=record.job_id, tenant=record.tenant, step=step_name, stage=step.stage,
        attempt=attempt_of(record, step_name, part), part=part, params=dict(step.params),
        inputs=inputs, timeout_s=_timeout(ctx, step.stage, duration, predicted_s),
        media_duration_s=duration, predicted_s=predicted_s,
    )


def _media_duration(record: JobRecord) -> float | None:
    for step in record.steps.values():
        if step.stage == "probe" and step.status == StepStatus.DONE:
            value = step.meta.get("duration_s")
            if isinstance(value, int | float):
                return float(value)
    return None


def _timeout(ctx: Context, stage: str, duration: float | None, predicted_s: float) -> float:
    """Smart timeout: a multiple of the task's predicted compute-seconds (the calibrated
    cost model), bounded; before the probe has measured the media (nothing to predict
    from) or with the factor set to 0, proportional to the media's length instead."""
    settings = ctx.services.settings
    if duration is not None and settings.timeout_predicted_factor > 0:
        return timeout_for(predicted_s, settings.timeout_predicted_factor,
                           settings.timeout_min_s, settings.timeout_max_s)
    return step_timeout(settings, duration, STAGES[stage].cost)


async def _announce(record: JobRecord, ctx: Context, *, changed: bool) -> None:
    """Tell watchers about the job's status (durably: SSE and audit read it back).

    Repeats (a redelivered message) announce again, harmlessly; only the write that made
    the job terminal counts it, so the metric never counts a job twice.
    """
    if changed and record.terminal:
        ctx.services.telemetry.jobs.labels(record.recipe or "inline", record.status).inc()
    publishes: list[Awaitable[object]] = [announce.status(ctx.services.bus, record)]
    if record.status == JobStatus.SUCCEEDED:
        # Repeats included: a conductor that crashed after the write that made the job
        # succeed hears of it again only as a redelivery (changed=False). The message id
        # dedups, and the janitor's cleanup is idempotent anyway. Independent of the
        # announcement, so both are in flight at once.
        publishes.append(ctx.services.bus.publish(
            ctx.services.names.cleanup,
            JobCleanup(job_id=record.job_id, tenant=record.tenant, keep_outputs=True),
            msg_id=msgids.cleanup(record.job_id),
        ))
    await _all(publishes)


