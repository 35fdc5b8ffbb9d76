"""calibrate — keeps the cost model true: every finished step's measured time updates it.

Consumes: jobs.stage.complete  StageComplete  (JOBS stream, its own durable ``calibrate``,
          so the conductor's consumer is untouched and calibration can lag or be down
          without slowing a job)
Does:     for a step (or part) that really ran — not failed, skipped or resumed from a
          checkpoint — reads the job record for the probe and the step's params, works out
          the step's work (``shared.costmodel.work_of``) and adds ``(units, elapsed_s)`` to
          its (stage, class) entry, with the error the prediction made before it.
Emits:    nothing on the bus; writes the ``costs`` KV bucket (``shared.costbook``).
"""

from __future__ import annotations

from shared import msgids
from shared.costmodel import job_probe, step_work
from shared.events import StageComplete
from shared.function import Context, Function
from shared.jobstore import JobNotFound

function = Function(name="calibrate", doc=__doc__ or "")


@function.subscribe("jobs", lambda n: n.stage_complete, StageComplete, durable="calibrate",
                    concurrency=8)
async def on_complete(event: StageComplete, ctx: Context) -> None:
    book = ctx.services.costs
    if book is None or event.error is not None or event.skipped or event.from_checkpoint \
            or event.elapsed_s <= 0:
        return
    try:
        record = await ctx.services.jobs.get(event.job_id)
    except JobNotFound:
        return  # deleted by retention before we got to it: nothing to learn from
    step = record.steps.get(event.step)
    if step is None or (event.part is not None and event.part >= len(step.parts)):
        return
    work = step_work(record, event.step, event.part, job_probe(record))
    sample = f"{msgids.task(event.job_id, event.step, event.part, event.attempt)}" \
             f":{event.delivery}"
    await book.observe(work, event.elapsed_s, sample)
