"""What ``jobs.cleanup`` deletes: a succeeded job's intermediates, or an expired job whole.

The rule for intermediates: a step that another step of the job *uses* (names in ``uses``,
``each`` included) made inputs, not results; a step that no other step uses is a leaf, and
leaves are the job's outputs. So in ``hls`` the segments, encoded parts, extracted audio and
joined renditions go and only ``package`` stays; in ``web`` only ``probe`` (which stores
nothing but its manifest) goes. A pipeline that wants an inner step kept as an output gives
it a leaf of its own, or the deployment sets ``JETCUT_KEEP_INTERMEDIATES``.

Both cleanups are idempotent: the record is changed by compare-and-set first (so it never
lists a key that is already gone) and the prefixes are deleted after, so a repeat, or a
redelivery after a crash in between, deletes whatever is left and changes nothing else.
"""

from __future__ import annotations

from functools import partial

import msgspec

from shared.errors import JetcutError
from shared.function import Services
from shared.jobstate import JobRecord, JobStatus
from shared.jobstore import JobNotFound
from shared.stage import step_prefix

REMOVE_ATTEMPTS = 8
"""Re-reads of a record that keeps changing while retention tries to delete it."""


class CleanupResult(msgspec.Struct, kw_only=True):
    """What one ``jobs.cleanup`` did (for logs, metrics and tests)."""

    job_id: str
    steps: list[str] = []
    """Steps whose prefixes were deleted (intermediates), or empty for a whole job."""
    objects: int = 0
    """Objects deleted from the store."""
    record_deleted: bool = False
    skipped: str | None = None
    """Why nothing was done (the job is not finished, or not succeeded)."""


def intermediate_steps(record: JobRecord) -> list[str]:
    """Steps some other step of the job uses: their objects were inputs, not results."""
    used = {dep for step in record.steps.values() for dep in step.step_deps}
    return sorted(name for name in record.steps if name in used)


def forget_intermediates(record: JobRecord, now: float) -> bool:
    """Transition (``JobStore.apply``): a succeeded job stops listing its intermediates'
    outputs. False for a job that did not succeed, or a repeat."""
    if record.status != JobStatus.SUCCEEDED:
        return False
    return forget_outputs(record, intermediate_steps(record), now)


def forget_outputs(record: JobRecord, steps: list[str], now: float) -> bool:
    """Stop listing the outputs of ``steps`` (theirs and their parts'), noting when.

    Returns:
        False when every one of them was forgotten before (a repeat changes nothing).
    """
    changed = False
    for name in steps:
        state = record.steps[name]
        if state.cleaned_at is not None:
            continue
        state.outputs = {}
        for part in state.parts:
            part.outputs = {}
        state.cleaned_at = now
        changed = True
    if changed:
        record.updated_at = now
    return changed


async def delete_intermediates(services: Services, job_id: str, now: float) -> CleanupResult:
    """Delete a succeeded job's intermediates, record first, then objects.

    A job that did not succeed keeps everything: a failed or cancelled job may be retried
    from its checkpoints, and a running one still reads them.
    """
    if services.settings.keep_intermediates:
        return CleanupResult(job_id=job_id, skipped="JETCUT_KEEP_INTERMEDIATES is set")

    try:
        record, _ = await services.jobs.apply(job_id, partial(forget_intermediates, now=now))
    except JobNotFound:
        return CleanupResult(job_id=job_id, skipped="no such job")
    if record.status != JobStatus.SUCCEEDED:
        return CleanupResult(job_id=job_id, skipped=f"job is {record.status}, not succeeded")
    steps = intermediate_steps(record)
    objects = 0
    for name in steps:
        objects += await services.store.delete_prefix(step_prefix(job_id, name))
    return CleanupResult(job_id=job_id, steps=steps, objects=objects)


async def delete_job(services: Services, job_id: str) -> CleanupResult:
    """Delete a finished job's objects (``jobs/<job>/``), then its record.

    Objects go first: a crash in between leaves a record that the next cleanup (or the
    next retention sweep) deletes again, never objects that nothing points at. The record
    is removed only at the revision that was checked, so a job retried meanwhile survives.

    Raises:
        JetcutError: the record kept changing (transient: the message is redelivered).
    """
    for _ in range(REMOVE_ATTEMPTS):
        try:
            record, revision = await services.jobs.get_with_revision(job_id)
        except JobNotFound:
            record, revision = None, 0
        if record is not None and not record.terminal:
            return CleanupResult(job_id=job_id, skipped=f"job is {record.status}, not finished")
        objects = await services.store.delete_prefix(f"jobs/{job_id}/")
        if record is None:
            return CleanupResult(job_id=job_id, objects=objects)
        if await services.jobs.remove(job_id, revision):
            return CleanupResult(job_id=job_id, objects=objects, record_deleted=True)
    raise JetcutError(f"job {job_id}: the record kept changing during retention")
