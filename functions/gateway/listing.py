"""``GET /v1/jobs``: the caller's jobs, newest first, filtered, a page at a time.

The jobs KV has no secondary index, so a page costs one pass over the latest revision of
every record in the bucket (one ordered consumer, no per-key round trips; records of other
tenants and non-matching ones are skipped after a partial decode), then one read per job
on the page. That is O(records in the bucket) per page: fine for the tens of thousands that
retention (``JETCUT_RETENTION_S``) keeps, and the reason a per-tenant index is the upgrade
path for more.

Order and cursor: ``(created_at, job_id)`` descending. The cursor is the position of the
last job of a page, so the next page starts strictly after it: jobs made meanwhile are
newer and never shift a page; none is shown twice or skipped.
"""

from __future__ import annotations

import base64
import binascii
import heapq

import msgspec

from functions.gateway.views import JobView, view
from shared.errors import MalformedRequest
from shared.function import Services
from shared.jobstate import JobRecord, JobStatus
from shared.jobstore import JobNotFound

MAX_LIMIT = 500
"""The largest page the document promises; ``JETCUT_LIST_MAX_LIMIT`` may lower it."""
CURSOR_PATTERN = r"^[A-Za-z0-9_-]+=*$"
"""A cursor is base64url (its content is this API's own: only one it returned works)."""
FAR_FUTURE = 32503680000.0
"""``created_before``'s default, 3000-01-01: no bound. (A parameter that may be absent is
given a value, not ``null``: a query string cannot say ``null``.)"""
STATUS_PATTERN = "^({0})(,({0}))*$".format("|".join(s.value for s in JobStatus))
"""One status, or a comma list of them."""


class _Summary(msgspec.Struct):
    """The fields a listing filters and orders on (the rest of the record is skipped)."""

    job_id: str
    tenant: str
    status: str = "queued"
    recipe: str | None = None
    created_at: float = 0.0


_summary = msgspec.json.Decoder(_Summary)


class JobPage(msgspec.Struct):
    jobs: list[JobView]
    """Newest first."""
    next_cursor: str | None
    """Pass as ``cursor`` for the next page; ``null`` on the last one."""


def encode_cursor(created_at: float, job_id: str) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode([created_at, job_id])).decode()


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        created_at, job_id = msgspec.json.decode(base64.urlsafe_b64decode(cursor.encode()),
                                                 type=tuple[float, str])
    except (ValueError, binascii.Error, msgspec.DecodeError, msgspec.ValidationError):
        raise MalformedRequest("cursor is not one this API returned") from None
    return created_at, job_id


def _statuses(value: str | None) -> set[str] | None:
    if not value:
        return None
    wanted = {s.strip() for s in value.split(",") if s.strip()}
    unknown = wanted - {s.value for s in JobStatus}
    if unknown:
        raise MalformedRequest(f"unknown status {sorted(unknown)}; one of "
                               f"{', '.join(s.value for s in JobStatus)}")
    return wanted


async def scan(services: Services, tenant: str, *, statuses: set[str] | None = None,
               recipe: str | None = None, after: float | None = None,
               before: float | None = None,
               start: tuple[float, str] | None = None, limit: int) -> list[tuple[float, str]]:
    """``(created_at, job_id)`` of the newest ``limit`` matching jobs older than ``start``."""
    watcher = await services.jobs.kv.watch(">", ignore_deletes=True)
    found: list[tuple[float, str]] = []
    try:
        async for entry in watcher:
            if entry is None:
                break
            if not entry.value:
                continue
            try:
                job = _summary.decode(entry.value)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if job.tenant != tenant:
                continue
            if statuses is not None and job.status not in statuses:
                continue
            if recipe is not None and (job.recipe or "inline") != recipe:
                continue
            if after is not None and job.created_at <= after:
                continue
            if before is not None and job.created_at >= before:
                continue
            position = (job.created_at, job.job_id)
            if start is not None and position >= start:
                continue
            found.append(position)
    finally:
        await watcher.stop()
    return heapq.nlargest(limit, found)


async def page(services: Services, tenant: str, *, status: str | None, recipe: str | None,
               created_after: float | None, created_before: float | None, limit: int,
               cursor: str | None) -> JobPage:
    """One page of ``tenant``'s jobs (see the module doc for order and cursor).

    Raises:
        MalformedRequest: a limit over ``JETCUT_LIST_MAX_LIMIT``, an unknown status, or a
            cursor this API did not make.
    """
    top = min(MAX_LIMIT, services.settings.list_max_limit)
    if not 1 <= limit <= top:
        raise MalformedRequest(f"limit must be within 1..{top}")
    start = decode_cursor(cursor) if cursor else None
    positions = await scan(services, tenant, statuses=_statuses(status), recipe=recipe,
                           after=created_after, before=created_before, start=start,
                           limit=limit + 1)
    records: list[JobRecord] = []
    for _, job_id in positions[:limit]:
        try:
            records.append(await services.jobs.get(job_id))
        except JobNotFound:
            continue  # deleted by retention between the scan and the read
    more = len(positions) > limit
    last = positions[limit - 1] if more else None
    base = services.settings.base_url
    return JobPage(jobs=[view(r, base) for r in records],
                   next_cursor=encode_cursor(*last) if last else None)
