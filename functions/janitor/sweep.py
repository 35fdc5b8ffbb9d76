"""One janitor sweep: re-drive stuck jobs, expire old ones, drop stale uploads and temp dirs,
make the jobs of ingest objects whose notification was lost (``ingestsweep``).

JetStream is the transport, not the record: a task message can be lost (a purged stream, a
replica lost with its data) while the job record still says the step is ready. The sweep
reads every job record and asks the conductor to re-drive a job whose record has not changed
for ``stuck_after_s``; the conductor gives its ready and running tasks new attempts and the
fence discards whatever the old ones still report. A running step's worker touches the
record every ``stuck_after_s / 4`` (its lease), so a long step is never taken for stuck.

A job that merely waits behind a backlog is not stuck either: it is re-driven only when its
tasks cannot be in the stream any more, i.e. when the work-queue stream holds no message at
all on the subject of a stage it waits on (or, for a job never planned, when the conductor
has no submit pending). On a busy stage a lost task therefore waits for the backlog to
drain before it is re-driven; nothing is re-run while it might still arrive.

Every action is a message with a deterministic id or an idempotent delete, so several
janitors (or a janitor restarted mid-sweep) do no harm. Each sweep reads all job records
(the KV bucket's keys, then each record) and lists all uploads: fine at this scale (a
record is a few KB; a sweep a minute); a bucket of millions of jobs would want an index.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial

import msgspec
from nats.js.errors import NotFoundError

from functions.janitor.ingestsweep import make_missing_jobs
from functions.janitor.tempdirs import remove_orphan_dirs
from shared import msgids
from shared.events import JobCleanup, JobRetry
from shared.fairshare import bulk_subject
from shared.function import Services
from shared.jobstate import LIVE_STEP, JobRecord, JobStatus
from shared.jobstore import JobNotFound
from shared.store import ObjectInfo

log = logging.getLogger("jetcut.janitor")

UPLOADS = "uploads/"
STUCK_STATUSES = frozenset({JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING})


class SweepReport(msgspec.Struct, kw_only=True):
    """What one sweep did; ``errors`` names the parts that failed (and were skipped)."""

    jobs_seen: int = 0
    redriven: list[str] = []
    expired: list[str] = []
    uploads_deleted: list[str] = []
    temp_dirs_removed: list[str] = []
    ingest_jobs: list[str] = []
    """Jobs made for objects under the ingest prefix that had none (``ingestsweep``)."""
    errors: list[str] = []

    @property
    def acted(self) -> bool:
        return bool(self.redriven or self.expired or self.uploads_deleted
                    or self.temp_dirs_removed or self.ingest_jobs or self.errors)


def is_stuck(record: JobRecord, now: float, after: float) -> bool:
    """Queued, running or cancelling, and the record has not changed for ``after`` seconds
    (a stuck cancelling job's workers died without reporting their stop)."""
    return record.status in STUCK_STATUSES and now - record.updated_at > after


def is_expired(record: JobRecord, now: float, after: float) -> bool:
    """Finished more than ``after`` seconds ago (retention)."""
    finished = record.finished_at if record.finished_at is not None else record.updated_at
    return record.terminal and now - finished > after


def stale_uploads(objects: list[ObjectInfo], referenced: set[str], now: float,
                  after: float) -> list[str]:
    """Uploads older than ``after`` seconds that no job record names as an input."""
    return [o.key for o in objects
            if o.key not in referenced and now - o.last_modified > after]


async def load_records(services: Services) -> list[JobRecord]:
    """Every job record in the bucket; records deleted (or unreadable) meanwhile are skipped."""
    records = []
    for job_id in await services.jobs.job_ids():
        try:
            records.append(await services.jobs.get(job_id))
        except JobNotFound:
            continue
        except msgspec.DecodeError as exc:  # ValidationError included: a foreign record
            log.warning("job record %s unreadable, skipped: %s", job_id, exc)
    return records


async def sweep(services: Services, *, now: float | None = None) -> SweepReport:
    """Run every part of one sweep once; ``now`` (unix seconds) is explicit for tests.

    A part that fails (the store is down, the bus refuses a publish) is logged and named
    in ``errors``; the other parts still run, and the next sweep tries again.
    """
    now = time.time() if now is None else now
    settings = services.settings
    report = SweepReport()
    count = services.telemetry.janitor_actions
    # Uploads are listed before the records are read: an upload that a job submitted
    # during this sweep references is then at worst seen unreferenced by the *next* sweep.
    uploads: list[ObjectInfo] | None = None
    try:
        uploads = await services.store.list(UPLOADS)
    except Exception:
        log.exception("janitor: listing uploads failed")
        report.errors.append("uploads")
    records: list[JobRecord] | None = None
    try:
        records = await load_records(services)
        report.jobs_seen = len(records)
        drained = DrainedQueues(services)
        for record in records:
            if is_stuck(record, now, settings.stuck_after_s) and await drained.all_of(record):
                await _redrive(services, record, now)
                report.redriven.append(record.job_id)
                count.labels("redrive_stuck").inc()
            elif is_expired(record, now, settings.retention_s):
                await services.bus.publish(
                    services.names.cleanup,
                    JobCleanup(job_id=record.job_id, tenant=record.tenant, keep_outputs=False),
                    msg_id=msgids.expire(record.job_id))
                report.expired.append(record.job_id)
                count.labels("expire_job").inc()
    except Exception:
        log.exception("janitor: sweeping job records failed")
        report.errors.append("jobs")
    if uploads is not None and records is not None:
        referenced = {ref.key for record in records for ref in record.inputs}
        try:
            for key in stale_uploads(uploads, referenced, now, settings.upload_retention_s):
                await services.store.delete(key)
                report.uploads_deleted.append(key)
                count.labels("delete_upload").inc()
        except Exception:
            log.exception("janitor: deleting stale uploads failed")
            report.errors.append("uploads")
    if records is not None:
        try:
            report.ingest_jobs = await make_missing_jobs(
                services, {record.job_id for record in records}, now)
            count.labels("ingest_missing").inc(len(report.ingest_jobs))
        except Exception:
            log.exception("janitor: making the jobs of unannounced ingest objects failed")
            report.errors.append("ingest")
    try:
        removed = await asyncio.to_thread(
            remove_orphan_dirs, settings.work_dir or tempfile.gettempdir(), now=now,
            older_than=settings.orphan_after_s)
        report.temp_dirs_removed = [str(path) for path in removed]
        count.labels("remove_temp_dir").inc(len(removed))
    except Exception:
        log.exception("janitor: removing orphaned temp dirs failed")
        report.errors.append("temp_dirs")
    return report


class DrainedQueues:
    """Which queues a stuck job waits on are empty, so its task cannot still arrive.

    Looked up once per queue per sweep: a STREAM.INFO filtered on each of the stage's two
    subjects (its fast and bulk lanes)
    (a work-queue stream keeps a message until it is acked, delivered or not), or the
    conductor's submit consumer for a job that was never planned.
    """

    def __init__(self, services: Services) -> None:
        self.services = services
        self.known: dict[str, bool] = {}

    async def all_of(self, record: JobRecord) -> bool:
        names = self.services.names
        if not record.planned:
            return await self._cached("submit", self._submit_drained)
        stages = {step.stage for step in record.steps.values() if step.status in LIVE_STEP}
        for stage in sorted(stages):
            if not await self._cached(stage, partial(self._stage_drained, names.stage(stage))):
                return False
        return True

    async def _cached(self, key: str, look: Callable[[], Awaitable[bool]]) -> bool:
        if key not in self.known:
            self.known[key] = await look()
        return self.known[key]

    async def _stage_drained(self, subject: str) -> bool:
        # Both lanes of the stage (fair share): a task may wait in the bulk one.
        for lane in (subject, bulk_subject(subject)):
            info = await self.services.bus.js.stream_info(self.services.names.stages_stream,
                                                          subjects_filter=lane)
            if (info.state.subjects or {}).get(lane):
                return False
        return True

    async def _submit_drained(self) -> bool:
        try:
            info = await self.services.bus.js.consumer_info(self.services.names.jobs_stream,
                                                            "conductor-submit")
        except NotFoundError:
            return True  # no conductor ever ran: nothing is pending for one
        return not (info.num_pending or info.num_ack_pending)


async def _redrive(services: Services, record: JobRecord, now: float) -> None:
    # One message per stale state: the id names the record's updated_at, so sweeps that
    # see the same state again publish duplicates that JOBS drops (its duplicate window is
    # an hour); a re-drive changes the record, and a later stall gets a new id.
    await services.bus.publish(
        services.names.retry,
        JobRetry(job_id=record.job_id, tenant=record.tenant, mode="stuck",
                 reason=f"no change for {now - record.updated_at:.0f}s"),
        msg_id=msgids.redrive(record.job_id, record.updated_at))
