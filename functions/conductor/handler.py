"""conductor — owns the job state machine.

Consumes:
  jobs.submit          JobSubmit      plan the recipe into a DAG, publish the ready steps
  jobs.stage.complete  StageComplete  apply the result (fenced on step+attempt), publish
                                      newly ready steps, settle the job
Emits:
  stages.<stage>       StageTask      Nats-Msg-Id <job_id>:<step>:<attempt>
  events.<tenant>.<id> JobEvent       status changes
"""

from __future__ import annotations

from shared.errors import ErrorCode, JetcutError, PermanentError
from shared.events import ErrorInfo, JobEvent, JobSubmit, StageComplete, StageTask, TaskInput
from shared.function import Context, Function, error_info
from shared.ids import job_id_for
from shared.jobstate import (
    JobRecord,
    StepStatus,
    advance,
    apply_complete,
    fail_job,
    input_ref_index,
    plan,
)
from shared.jobstore import NoChange
from shared.recipes import STAGES, resolve
from shared.subjects import check_token

function = Function(name="conductor", doc=__doc__ or "")


@function.subscribe("jobs", lambda n: n.submit, JobSubmit, durable="conductor-submit",
                    concurrency=32, batch=32)
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
    await services.jobs.create(JobRecord(
        job_id=job_id, tenant=event.tenant, recipe=event.recipe, inputs=list(event.inputs),
        params=dict(event.params), idempotency_key=event.idempotency_key,
        created_at=event.submitted_at,
    ))
    error = await _check_job(event, ctx)

    def start(record: JobRecord) -> bool:
        if record.planned or record.terminal:
            raise NoChange
        if error is not None:
            fail_job(record, error)
            return True
        steps = resolve(event.recipe, event.steps, event.params, len(event.inputs))
        plan(record, steps)
        return True

    record, _ = await services.jobs.update(job_id, start)
    # Publish every ready step, not only new ones: a redelivered submit (conductor crashed
    # after the KV write) re-drives them, and the message ids make repeats no-ops.
    await _publish_ready(record, ctx)
    await _announce(record, ctx)


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
                    durable="conductor-complete", concurrency=32, batch=32)
async def on_complete(event: StageComplete, ctx: Context) -> None:
    services = ctx.services
    newly_ready: list[str] = []
    before: list[str] = []

    def apply(record: JobRecord) -> bool:
        before[:] = [record.status]
        if not apply_complete(record, event):
            raise NoChange
        newly_ready.clear()
        newly_ready.extend(advance(record))
        return True

    record, applied = await services.jobs.update(event.job_id, apply)
    if not applied:
        step = record.steps.get(event.step)
        if step is not None and step.attempt == event.attempt and step.status in (
            StepStatus.DONE, StepStatus.FAILED
        ):
            # A redelivered completion we already applied: we may have crashed before
            # publishing what it made ready, so publish again (ids dedup).
            await _publish_ready(record, ctx)
            await _announce(record, ctx)
        else:
            ctx.log.info("stale completion %s:%s:%d ignored", event.job_id, event.step,
                         event.attempt)
        return
    await services.bus.emit(JobEvent(
        job_id=record.job_id, tenant=record.tenant, kind="step", step=event.step,
        step_status=record.steps[event.step].status, error=event.error,
        progress=record.progress,
    ), durable=True)
    await _publish_ready(record, ctx, only=newly_ready)
    if before != [record.status]:
        await _announce(record, ctx)


async def _publish_ready(record: JobRecord, ctx: Context, only: list[str] | None = None) -> None:
    if record.terminal:
        return
    names = ctx.services.names
    for step_name, step in record.steps.items():
        if step.status != StepStatus.READY or (only is not None and step_name not in only):
            continue
        task = _task(record, step_name, ctx)
        await ctx.services.bus.publish(
            names.stage(step.stage), task, msg_id=f"{record.job_id}:{step_name}:{step.attempt}"
        )


def _task(record: JobRecord, step_name: str, ctx: Context) -> StageTask:
    step = record.steps[step_name]
    inputs: list[TaskInput] = []
    for ref in step.uses:
        index = input_ref_index(ref)
        if index is not None:
            item = record.inputs[index]
            inputs.append(TaskInput(ref=ref, files={"media": item.key},
                                    meta={"filename": item.filename, "size": item.size}))
        else:
            upstream = record.steps[ref]
            inputs.append(TaskInput(ref=ref, files=dict(upstream.outputs),
                                    meta=dict(upstream.meta)))
    duration = _media_duration(record)
    return StageTask(
        job_id=record.job_id, tenant=record.tenant, step=step_name, stage=step.stage,
        attempt=step.attempt, params=dict(step.params), inputs=inputs,
        timeout_s=_timeout(ctx, step.stage, duration), media_duration_s=duration,
    )


def _media_duration(record: JobRecord) -> float | None:
    for step in record.steps.values():
        if step.stage == "probe" and step.status == StepStatus.DONE:
            value = step.meta.get("duration_s")
            if isinstance(value, int | float):
                return float(value)
    return None


def _timeout(ctx: Context, stage: str, duration: float | None) -> float:
    """Smart timeout: proportional to the media's length and the stage's cost, bounded."""
    s = ctx.services.settings
    if duration is None:
        return s.timeout_min_s * 5
    wanted = duration * s.timeout_per_media_s * STAGES[stage].cost
    return max(s.timeout_min_s, min(s.timeout_max_s, wanted))


async def _announce(record: JobRecord, ctx: Context) -> None:
    """Tell watchers about the job's status (durably: SSE and audit read it back)."""
    await ctx.services.bus.emit(JobEvent(
        job_id=record.job_id, tenant=record.tenant, kind="status", status=record.status,
        error=record.error, progress=record.progress,
    ), durable=True)
    if record.terminal:
        ctx.services.telemetry.jobs.labels(record.recipe or "inline", record.status).inc()


