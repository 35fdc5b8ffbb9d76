"""janitor — cleanup, retention, temp files, and the sweep that re-drives stuck jobs.

Consumes:
  jobs.cleanup   JobCleanup   keep_outputs=True (the conductor, when a job succeeds): delete
                              the job's intermediates, the steps another step uses (unless
                              JETCUT_KEEP_INTERMEDIATES), and stop listing them in the record.
                              keep_outputs=False (retention): delete jobs/<job>/ and the
                              record. Both idempotent (see cleanup.py).
Does, every JETCUT_SWEEP_INTERVAL_S (sweep.py):
  - a queued/running job whose record has not changed for JETCUT_STUCK_AFTER_S:
    JobRetry(mode="stuck") on jobs.retry, Nats-Msg-Id redrive:<job>:<updated_at>;
  - a finished job older than JETCUT_RETENTION_S: JobCleanup(keep_outputs=False) on
    jobs.cleanup, Nats-Msg-Id expire:<job>;
  - uploads older than JETCUT_UPLOAD_RETENTION_S that no job record references: deleted;
  - jetcut-<pid>-* step dirs in this host's work dir whose process is gone and that are
    older than JETCUT_ORPHAN_AFTER_S: removed (tempdirs.py).
  - objects under JETCUT_INGEST_PREFIX that a rule matches and that have no job (their
    notification was lost): their job, under the id the notification would have given it,
    so exactly one per object version (ingestsweep.py).
Emits:
  jobs.submit    JobSubmit    an unannounced ingest object's job (Nats-Msg-Id = job id)
  jobs.retry     JobRetry     mode="stuck"
  jobs.cleanup   JobCleanup   keep_outputs=False
Counts every action in jetcut_janitor_actions_total{action}.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from functions.janitor.cleanup import CleanupResult, delete_intermediates, delete_job
from functions.janitor.sweep import sweep
from shared.errors import ErrorCode, PermanentError
from shared.events import JobCleanup
from shared.function import Context, Function, Services
from shared.subjects import check_token

log = logging.getLogger("jetcut.janitor")


async def run_sweeps(services: Services, stop: asyncio.Event) -> None:
    """Sweep now and every ``sweep_interval_s`` until ``stop``; a failed sweep is logged,
    never fatal (the next one tries again)."""
    while not stop.is_set():
        try:
            report = await sweep(services)
        except Exception:
            log.exception("janitor: sweep failed")
        else:
            if report.acted:
                log.info("janitor sweep: %s", report)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), services.settings.sweep_interval_s)


function = Function(name="janitor", doc=__doc__ or "", service=run_sweeps)


@function.subscribe("jobs", lambda n: n.cleanup, JobCleanup, durable="janitor-cleanup",
                    concurrency=4)
async def on_cleanup(event: JobCleanup, ctx: Context) -> None:
    try:
        check_token("job id", event.job_id)
    except ValueError as exc:
        raise PermanentError(ErrorCode.INVALID_EVENT, str(exc)) from exc
    services = ctx.services
    result: CleanupResult
    if event.keep_outputs:
        result = await delete_intermediates(services, event.job_id, time.time())
        services.telemetry.janitor_actions.labels("delete_intermediates").inc(result.objects)
    else:
        result = await delete_job(services, event.job_id)
        if result.record_deleted:
            services.telemetry.janitor_actions.labels("delete_job").inc()
    ctx.log.info("cleanup of %s: %s", event.job_id, result)
