"""Every ``Nats-Msg-Id`` jetcut publishes with, built in one place.

A stream drops a message whose id it saw within its duplicate window, so an id says what
counts as "the same message": a re-drive, a redelivered handler or a second path that
publishes the same fact must build the same id, and a genuinely new fact a new one. Two
places that must agree (the consumer loop and the deadletter function both write DLQ
entries) therefore call the same builder here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.events import part_name

if TYPE_CHECKING:
    from shared.jobstate import JobRecord

def submit(job_id: str) -> str:
    """``jobs.submit``: the job id, so a retried request or notification is one job."""
    return job_id


def task(job_id: str, step: str, part: int | None, attempt: int) -> str:
    """``stages.<stage>``: ``<job>:<step>[.p<part>]:<attempt>``, so re-publishing the ready
    tasks of a job (a redelivered submit or completion) never doubles work, while a new
    attempt is a new message."""
    return f"{job_id}:{part_name(step, part)}:{attempt}"


def completion(task_id: str, delivery: int) -> str:
    """``jobs.stage.complete``: per delivery, so a superseded delivery's (refused) result
    can never shadow the current one's through deduplication."""
    return f"{task_id}:complete:{delivery}"


def status(record: JobRecord) -> str:
    """``events.<tenant>.<job>`` status announcement: the same for every repeat of one
    status change (a redelivered message announces again), new for a later one (a job
    retried after it failed announces ``running`` and its next outcome afresh)."""
    from shared.jobstate import JobStatus

    since = {JobStatus.QUEUED: record.created_at, JobStatus.RUNNING: record.started_at,
             JobStatus.CANCELLING: record.cancel_requested_at}.get(
        record.status, record.finished_at if record.terminal else record.updated_at)
    return f"status:{record.job_id}:{record.status}:{since!r}"


def cleanup(job_id: str) -> str:
    """``jobs.cleanup`` when a job succeeds (intermediates go): once per job."""
    return f"cleanup:{job_id}"


def expire(job_id: str) -> str:
    """``jobs.cleanup`` when a finished job's retention ends (everything goes)."""
    return f"expire:{job_id}"


def redrive(job_id: str, updated_at: float) -> str:
    """``jobs.retry`` (stuck) from the janitor: once per stuck state of the record."""
    return f"redrive:{job_id}:{updated_at!r}"


def cancel(job_id: str) -> str:
    """``jobs.cancel`` on request: a double click is one cancel."""
    return f"{job_id}:cancel"


def retry(job_id: str, revision: int) -> str:
    """``jobs.retry`` (failed) on request: one per revision of the record it was asked on."""
    return f"retry:{job_id}:{revision}"


def dlq_entry(stream: str, seq: int | None) -> str:
    """``dlq.<function>``: one entry per original message, whichever path saw it fail."""
    return f"dlq:{stream}:{seq}"


def replay(seq: int) -> str:
    """A replay of DLQ entry ``seq``: a double click replays once."""
    return f"replay:{seq}"
