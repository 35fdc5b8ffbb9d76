"""The one place a job's status is announced on ``events.<tenant>.<job_id>``.

A status change is announced by whoever made it, right after the compare-and-set that made
it: the conductor for planning, results, cancel and retry; the stage worker whose task is the
first to start (``queued -> running``, ``jobstate.mark_running``). Both go through here, so
every announcement is durable (the notify function's callbacks are driven by it) and carries
the same message id for every repeat of one change (``msgids.status``): a redelivered
message announces again, and the stream keeps it once.
"""

from __future__ import annotations

from shared import msgids
from shared.bus import Bus
from shared.events import JobEvent
from shared.jobstate import JobRecord


async def status(bus: Bus, record: JobRecord) -> None:
    """Announce ``record``'s status, error and progress, and wait for the PubAck."""
    await bus.emit(JobEvent(
        job_id=record.job_id, tenant=record.tenant, kind="status", status=record.status,
        error=record.error, progress=record.progress,
    ), durable=True, msg_id=msgids.status(record))
